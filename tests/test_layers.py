"""layers.py: the norms, GELU, soft cap, RoPE, the attention core and the layer scan, against hand computation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_close_f32
from pgjax import layers

# Jitted: one compilation per call site instead of one per op (the suite runs on 2 cores).
attention = jax.jit(layers.attention, static_argnames="cap")
attention_logits = jax.jit(layers.attention_logits, static_argnames="cap")
apply_rope = jax.jit(layers.apply_rope)

# Elementwise ops and short reductions (a handful of terms) in float32 against float64 numpy: a few roundings
# of the largest value, 8 eps32 * max|x|; any wrong constant or term is off by far more.
ELEMENTWISE_ULPS = 8


def test_layer_norm_by_hand():
  x = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
  scale, bias = np.array([1.0, 2.0, 1.0, -1.0], np.float32), np.array([0.0, 0.0, 1.0, 0.5], np.float32)
  # mean 2.5, variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25 (biased, as flax's LayerNorm).
  y = (x.astype(np.float64) - 2.5) / math.sqrt(1.25 + 1e-6)
  assert_close_f32(layers.layer_norm(x, scale, bias), y * scale + bias, ulps_of_max=ELEMENTWISE_ULPS)
  # Statistics in float32 whatever x's dtype; the result in x's dtype.
  out = layers.layer_norm(jnp.asarray(x, jnp.bfloat16), scale, bias)
  assert out.dtype == jnp.bfloat16
  # bfloat16 keeps 8 significant bits: the result is the float32 one rounded, within 2**-8 of max|y| (x in
  # bfloat16 is exact here: small integers).
  ref = y * scale + bias
  assert np.abs(np.asarray(out, np.float64) - ref).max() <= 2 ** -8 * np.abs(ref).max()


def test_rms_norm_multiplies_by_one_plus_scale():
  x = np.array([[3.0, 4.0]], np.float32)
  rms = math.sqrt((9 + 16) / 2 + 1e-6)
  # A zero scale (as initialised) is the plain normalisation: the checkpoint stores scale, the op uses 1 + scale.
  assert_close_f32(layers.rms_norm(x, np.zeros(2, np.float32)), x / rms, ulps_of_max=ELEMENTWISE_ULPS)
  scale = np.array([0.5, -1.0], np.float32)
  assert_close_f32(layers.rms_norm(x, scale), np.array([[1.5 * 3 / rms, 0.0]]), ulps_of_max=ELEMENTWISE_ULPS)


def test_gelu_is_the_tanh_form():
  x = np.array([-3.0, -1.0, -0.1, 0.0, 0.5, 1.0, 2.5], np.float32)
  x64 = x.astype(np.float64)
  tanh_form = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3)))
  assert_close_f32(layers.gelu(x), tanh_form, ulps_of_max=ELEMENTWISE_ULPS)
  # Not the erf form: at x = 1 they differ by 1.5e-4, ~1000 times the bound above.
  erf_form = 0.5 * x64 * (1 + np.vectorize(math.erf)(x64 / math.sqrt(2)))
  assert np.abs(np.asarray(layers.gelu(x), np.float64) - erf_form).max() > 1e-4


def test_softcap():
  x = np.array([-100.0, -1.0, 0.0, 2.0, 1e4], np.float32)
  assert_close_f32(layers.softcap(x, 5.0), 5.0 * np.tanh(x.astype(np.float64) / 5.0), ulps_of_max=ELEMENTWISE_ULPS)
  assert np.abs(np.asarray(layers.softcap(x, 5.0))).max() <= 5.0
  np.testing.assert_array_equal(np.asarray(layers.softcap(x, 0.0)), x)  # 0 means off: exactly x


def test_rope_by_hand():
  H = 4  # two frequencies: 10000 ** (-2i / H) for i = 0, 1, i.e. 1 and 1/100
  x_BTNH = np.array([[[[1.0, 2.0, 3.0, 4.0]]] * 3], np.float32)  # [1, 3, 1, 4]: the same vector at 3 positions
  positions_BT = np.array([[0, 2, 7]])
  out = np.asarray(apply_rope(x_BTNH, positions_BT), np.float64)[0, :, 0]
  np.testing.assert_array_equal(out[0], x_BTNH[0, 0, 0])  # position 0: cos 1, sin 0, the identity
  # Halves, not interleaved pairs: (x[i], x[i + H/2]) rotates by the angle position * frequency_i.
  x1, x2 = np.array([1.0, 2.0]), np.array([3.0, 4.0])
  for t, p in ((1, 2), (2, 7)):
    a = p * np.array([1.0, 0.01])
    expected = np.concatenate([x1 * np.cos(a) - x2 * np.sin(a), x2 * np.cos(a) + x1 * np.sin(a)])
    # A rotation of a handful of float32 values: a few roundings (and sin/cos of angles <= 7) of max|x|.
    assert_close_f32(out[t], expected, ulps_of_max=ELEMENTWISE_ULPS)


def test_rope_preserves_norms_and_depends_on_relative_position():
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(2, 5, 3, 16)).astype(np.float32), rng.normal(size=(2, 5, 3, 16)).astype(np.float32)
  pos = np.broadcast_to(np.arange(5), (2, 5))
  rq = np.asarray(apply_rope(q, pos))
  # Sums of 16 squares of rotated float32 values: 16 eps32 * max|norm^2|.
  assert_close_f32(np.square(rq).sum(-1), np.square(q).sum(-1), ulps_of_max=16)
  # q.k after RoPE depends on the positions' difference only: shifting both by 10 keeps every dot product.
  dots = lambda off: np.einsum("BTNH,BSNH->BNTS", apply_rope(q, pos + off), apply_rope(k, pos + off))
  # Angles up to 14 rad, rounded in float32 (~14 eps32 rad each), rotate both sides of 16-term dots:
  # 64 eps32 * max|q.k|; a wrong pairing or frequency breaks the invariance by O(max|q.k|).
  assert_close_f32(dots(10), dots(0), ulps_of_max=64)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _attention_np(q_BTNH, k_BSKH, v_BSKH, mask_BTS=None, cap=0.0):
  """The documented math in float64: head n reads kv head n // G; logits capped, then masked; softmax over S."""
  q, k, v = (np.asarray(a, np.float64) for a in (q_BTNH, k_BSKH, v_BSKH))
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  logits_BNTS = np.einsum("BTNH,BSNH->BNTS", q, k)
  if cap:
    logits_BNTS = cap * np.tanh(logits_BNTS / cap)
  if mask_BTS is not None:
    logits_BNTS = np.where(np.asarray(mask_BTS)[:, None], logits_BNTS, -np.inf)
  return np.einsum("BNTS,BSNH->BTNH", _softmax(logits_BNTS), v)


def _qkv(B=2, T=3, S=5, N=4, K=2, H=8, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(rng.normal(size=shape).astype(np.float32) for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))


# Attention against float64 numpy: dots of H = 8 terms, a softmax over S = 5 and a weighted sum of 5 values,
# each a few roundings of the largest magnitude: 32 eps32 * max|out|. A wrong mask, cap or head grouping
# moves outputs by O(max|v|).
ATTENTION_ULPS = 32


def test_attention_masks_keys_by_hand():
  q, k, v = _qkv()
  # Key 4 of row 0 and key 0 of row 1 are hidden from every query.
  mask_BTS = np.array([[[1, 0, 0, 0, 0], [1, 1, 0, 1, 0], [1, 1, 1, 1, 0]],
                       [[0, 0, 1, 0, 0], [0, 0, 1, 0, 1], [0, 1, 1, 1, 0]]], bool)
  out, probs_BKGTS = attention(q, k, v, mask_BTS)
  assert out.shape == q.shape and probs_BKGTS.shape == (2, 2, 2, 3, 5)
  assert_close_f32(out, _attention_np(q, k, v, mask_BTS), ulps_of_max=ATTENTION_ULPS)
  # Masked keys get exactly zero probability, so their values cannot matter.
  assert np.all(np.asarray(probs_BKGTS)[np.broadcast_to(~mask_BTS[:, None, None], probs_BKGTS.shape)] == 0.0)
  v2 = np.where(mask_BTS.any(1)[:, :, None, None], v, np.float32(1e3))  # the keys no query may see
  assert not np.array_equal(v2, v)
  np.testing.assert_array_equal(np.asarray(attention(q, k, v2, mask_BTS)[0]), np.asarray(out))


def test_attention_soft_caps_before_masking():
  q, k, v = _qkv(seed=1)
  q = q * 3  # logits well beyond the cap, so the cap matters
  mask_BTS = np.broadcast_to(np.tri(3, 5, 2, dtype=bool), (2, 3, 5))
  out, probs = attention(q, k, v, mask_BTS, cap=1.0)
  assert_close_f32(out, _attention_np(q, k, v, mask_BTS, cap=1.0), ulps_of_max=ATTENTION_ULPS)
  # Capping after masking would turn the masked logits into -cap = -1, which softmax does not ignore.
  assert np.all(np.asarray(probs)[np.broadcast_to(~mask_BTS[:, None, None], probs.shape)] == 0.0)
  logits = attention_logits(q, k, cap=1.0)
  assert np.abs(np.asarray(logits)).max() <= 1.0
  assert np.abs(np.asarray(out) - _attention_np(q, k, v, mask_BTS)).max() > 1e-2  # the cap changed the output


def test_attention_logits_layout_and_gqa_grouping():
  q, k, v = _qkv(N=6, K=2)  # G = 3: query heads 0-2 read kv head 0, heads 3-5 kv head 1
  logits_BKTGS = np.asarray(attention_logits(q, k))
  ref = np.einsum("BTNH,BSNH->BNTS", np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 3, axis=2))
  for n in range(6):  # [B, K, T, G, S]: query head n = K index n // G, G index n % G
    assert_close_f32(logits_BKTGS[:, n // 3, :, n % 3], ref[:, n], ulps_of_max=ATTENTION_ULPS)
  # Grouped-query attention equals multi-head attention with each kv head repeated G times.
  mask_BTS = np.broadcast_to(np.tri(3, 5, 2, dtype=bool), (2, 3, 5))
  gqa, _ = attention(q, k, v, mask_BTS)
  mha, _ = attention(q, np.repeat(k, 3, axis=2), np.repeat(v, 3, axis=2), mask_BTS)
  # The same products in both, grouped differently by the einsums: 16 eps32 * max|out|.
  assert_close_f32(gqa, mha, ulps_of_max=16)


def test_fully_masked_query_attends_uniformly():
  # The finite MASK_VALUE (big_vision's) makes a row with no visible key a uniform average over all keys,
  # not NaN: what a padding query gets.
  q, k, v = _qkv(K=4)
  mask_BTS = np.ones((2, 3, 5), bool)
  mask_BTS[:, 1] = False
  out, probs = attention(q, k, v, mask_BTS)
  assert np.isfinite(np.asarray(out)).all()
  # exp(0) / 5 in float32, and the mean of 5 values: a few roundings of 1 and of max|v|.
  assert_close_f32(np.asarray(probs)[:, :, :, 1], np.full((2, 4, 1, 5), 0.2), ulps_of_max=ELEMENTWISE_ULPS)
  assert_close_f32(np.asarray(out)[:, 1], np.asarray(v, np.float64).mean(1), ulps_of_max=ATTENTION_ULPS)


def _block(x, p, scale):
  return jnp.tanh(x @ p["w"] + p["b"]) * scale, {"sum": x.sum(), "first": x[0]}


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_layers_equals_a_python_loop(remat):
  L, D = 3, 4
  ks = jax.random.split(jax.random.key(0), 3)
  stacked = {"w": jax.random.normal(ks[0], (L, D, D)) * 0.5, "b": jax.random.normal(ks[1], (L, D))}
  scale_L = jnp.array([1.0, 2.0, 0.5])  # a per-layer input, scanned with the params
  x0 = jax.random.normal(ks[2], (2, D))

  def loop(x, stacked):
    ys = []
    for l in range(L):
      x, y = _block(x, jax.tree.map(lambda a: a[l], stacked), scale_L[l])
      ys.append(y)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *ys)

  def scan(x, stacked):
    return layers.scan_layers(lambda c, p, scale: _block(c, p, scale), x, stacked, remat=remat, scale=scale_L)

  # The same ops in the same order, compiled in a loop body or unrolled: at most a fusion's reordering of a
  # 4-term dot, 16 eps32 * max|x|; a skipped, repeated or misordered layer is off by O(max|x|).
  assert_close_f32(jax.jit(scan)(x0, stacked), jax.jit(loop)(x0, stacked), ulps_of_max=16)
  grad = lambda f: jax.jit(jax.grad(lambda s: f(x0, s)[0].sum()))(stacked)
  assert_close_f32(grad(scan), grad(loop), ulps_of_max=16)
