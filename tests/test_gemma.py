"""gemma.py: the embedding's multiplier, the tied head and its soft cap, a one-layer forward against numpy, and
the cached forward against the uncached one."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from helpers import assert_close_f32
from pgjax import gemma
from pgjax.config import GemmaConfig

# Jitted: one compilation per call site instead of one per op (the suite runs on 2 cores).
forward = jax.jit(gemma.forward, static_argnames=("cfg", "return_kv"))
forward_cached = jax.jit(gemma.forward_cached, static_argnames="cfg")
logits_fn = jax.jit(gemma.logits, static_argnames="cfg")
init = jax.jit(gemma.init, static_argnums=1)

# Width 16 (sqrt(16) = 4 would be exact in any dtype; the embedding test uses width 8).
BASE = dict(vocab_size=50, width=16, depth=1, num_heads=4, head_dim=8, mlp_dim=32)
CONFIGS = {
    "gemma1-mqa": GemmaConfig(num_kv_heads=1, **BASE),
    "gemma1-mha": GemmaConfig(num_kv_heads=4, **BASE),  # q, k and v fused in qkv_einsum
    # Gemma 2: post-norms, caps small enough to bend these logits, 28B-style query scaling.
    "gemma2-gqa": GemmaConfig(num_kv_heads=2, post_norms=True, attn_logits_softcap=1.5, final_logits_softcap=3.0,
                              query_pre_attn_scalar=12, **BASE),
}

# float32 against float64 through a block (dots of <= 32 terms, three or five RMS norms, a softmax over T):
# a few roundings of each partial sum, within a few times the outputs' largest magnitude: 64 eps32 * max|out|.
# A missing (1 + scale), a wrong RoPE pairing, head grouping or cap moves outputs by O(max|out|).
NUMPY_ULPS = 64


@functools.cache
def _params(cfg, seed=0):
  """gemma.init with random norm scales (zero as initialised, which would hide a missing 1 +). Cached: not to
  be edited."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(init(jax.random.key(seed), cfg))
  rng = np.random.default_rng(seed)
  out = [np.asarray(leaf, np.float64) + (0.3 * rng.normal(size=leaf.shape) if path[-1].key == "scale" else 0)
         for path, leaf in leaves]
  return jax.tree_util.tree_unflatten(treedef, out)


def _f32(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)


def test_embed_multiplier_is_cast_to_the_table_dtype_first():
  cfg = GemmaConfig(vocab_size=5, width=8, depth=1, num_heads=1, head_dim=8, mlp_dim=8)
  table = np.random.default_rng(0).normal(size=(5, 8)).astype(ml_dtypes.bfloat16)
  tokens = np.array([[3, 0, 4]])
  x = gemma.embed({"embedder": {"input_embedding": jnp.asarray(table)}}, tokens, cfg=cfg)
  assert x.dtype == jnp.float32
  # sqrt(8) = 2.8284271 is 2.828125 in bfloat16; the product of two bfloat16 numbers, rounded to bfloat16.
  mult = np.float64(ml_dtypes.bfloat16(math.sqrt(8)))
  assert mult == 2.828125
  expected = (table[tokens].astype(np.float64) * mult).astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(x), expected)
  # Not the float32 multiplier (the products differ in some elements by a bfloat16 rounding or more).
  assert not np.array_equal(expected, (table[tokens].astype(np.float32) * np.float32(math.sqrt(8))))
  # A float32 table: sqrt(8) in float32, one rounding of each product.
  table32 = table.astype(np.float32)
  x32 = gemma.embed({"embedder": {"input_embedding": jnp.asarray(table32)}}, tokens, cfg=cfg)
  np.testing.assert_array_equal(np.asarray(x32), table32[tokens] * np.float32(math.sqrt(8)))


def test_logits_are_tied_and_soft_capped():
  cfg = CONFIGS["gemma1-mqa"]
  params = _params(cfg)
  x = 2 * np.random.default_rng(1).normal(size=(2, 3, 16))
  table = params["embedder"]["input_embedding"]
  logits = x @ table.T
  # Dots of D = 16 terms in float32: a few roundings of partial sums within a few times max|logits|.
  assert_close_f32(logits_fn(_f32(params), _f32(x), cfg=cfg), logits, ulps_of_max=32)
  capped = dataclasses.replace(cfg, final_logits_softcap=2.0)
  out = np.asarray(logits_fn(_f32(params), _f32(x), cfg=capped))
  assert np.abs(out).max() <= 2.0 and np.abs(logits).max() > 4.0  # the cap bends these logits
  # 2 tanh(l / 2) has slope <= 1: the logits' 32 eps32 * max|logits| carry over, and max|logits| is less than
  # 4 max|out| here; plus tanh's own few roundings.
  assert np.abs(logits).max() < 4 * np.abs(out).max()
  assert_close_f32(out, 2.0 * np.tanh(logits / 2.0), ulps_of_max=32 * 4 + 8)


def _rms_norm(x, scale, eps=1e-6):
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * (1 + scale)


def _rope(x_BTNH, positions_BT, max_wavelength):
  H = x_BTNH.shape[-1]
  angle = positions_BT[..., None, None] * max_wavelength ** (-2.0 * np.arange(H // 2) / H)
  x1, x2 = x_BTNH[..., :H // 2], x_BTNH[..., H // 2:]
  return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _forward_np(params, x, positions, mask, cfg):
  """The documented math in float64 for one layer: RMSNorm (1 + scale); q, k, v; RoPE over halves; queries
  scaled after RoPE; head n reads kv head n // G; logits soft-capped, then masked; post-norms (Gemma 2); GeGLU
  MLP with tanh GELU; final norm."""
  p = jax.tree.map(lambda a: a[0], params["layers"])
  attn, N, K = p["attn"], cfg.num_heads, cfg.num_kv_heads
  h = _rms_norm(x, p["pre_attention_norm"]["scale"])
  if "qkv_einsum" in attn:
    w_q, w_k, w_v = attn["qkv_einsum"]["w"]
  else:
    w_q, (w_k, w_v) = attn["q_einsum"]["w"], attn["kv_einsum"]["w"]
  q, k, v = (np.einsum("BTD,NDH->BTNH", h, w) for w in (w_q, w_k, w_v))
  q = _rope(q, positions, cfg.rope_max_wavelength) * cfg.query_scale
  k = np.repeat(_rope(k, positions, cfg.rope_max_wavelength), N // K, axis=2)
  v = np.repeat(v, N // K, axis=2)
  logits = np.einsum("BTNH,BSNH->BNTS", q, k)
  if cfg.attn_logits_softcap:
    logits = cfg.attn_logits_softcap * np.tanh(logits / cfg.attn_logits_softcap)
  logits = np.where(mask[:, None], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  a = np.einsum("BTNH,NHD->BTD", np.einsum("BNTS,BSNH->BTNH", probs, v), attn["attn_vec_einsum"]["w"])
  if cfg.post_norms:
    a = _rms_norm(a, p["post_attention_norm"]["scale"])
  x = x + a
  h = _rms_norm(x, p["pre_ffw_norm"]["scale"])
  gate, up = (h @ w for w in p["mlp"]["gating_einsum"])
  f = (_gelu(gate) * up) @ p["mlp"]["linear"]
  if cfg.post_norms:
    f = _rms_norm(f, p["post_ffw_norm"]["scale"])
  return _rms_norm(x + f, params["final_norm"]["scale"])


def _inputs(B=2, T=6, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, T, 16))
  positions = np.broadcast_to(np.arange(T), (B, T)).copy()
  positions[1] += 3  # another row's positions start later: RoPE must use them, not the slot index
  mask = np.broadcast_to(np.tri(T, dtype=bool), (B, T, T)).copy()
  mask[1, :, :2] = False  # row 1's first two keys are padding
  mask[1, :2, :2] = np.eye(2, dtype=bool)  # ... which still see themselves, so no row is fully masked
  return x, positions, mask


@pytest.mark.parametrize("name", CONFIGS)
def test_one_layer_forward_matches_numpy(name):
  cfg = CONFIGS[name]
  params = _params(cfg)
  x, positions, mask = _inputs()
  out, aux = forward(_f32(params), _f32(x), positions, mask, cfg=cfg)
  assert out.shape == x.shape and out.dtype == jnp.float32 and aux == {}
  assert_close_f32(out, _forward_np(params, x, positions, mask, cfg), ulps_of_max=NUMPY_ULPS)


@pytest.mark.parametrize("name", ["gemma1-mqa", "gemma2-gqa"])  # the fused qkv_einsum is the numpy test's
def test_forward_cached_equals_forward(name):
  cfg = dataclasses.replace(CONFIGS[name], depth=2)
  params = _f32(_params(cfg))
  B, T0, T1, S = 2, 5, 3, 10  # a prompt of 5, then 3 new tokens, in a cache of 10 slots
  rng = np.random.default_rng(2)
  x_BTD = rng.normal(size=(B, T0 + T1, 16)).astype(np.float32)
  positions_BT = np.broadcast_to(np.arange(T0 + T1), (B, T0 + T1))
  causal_BTT = np.broadcast_to(np.tri(T0 + T1, dtype=bool), (B, T0 + T1, T0 + T1))
  ref, aux = forward(params, x_BTD, positions_BT, causal_BTT, cfg=cfg, return_kv=True)
  k_LBTKH, v_LBTKH = (np.asarray(a) for a in aux["kv"])
  # The cache holds the prompt's keys and values in slots 0..4; slots 5..9 hold garbage, marked invalid.
  pad = ((0, 0), (0, 0), (0, S - T0), (0, 0), (0, 0))
  k_cache = np.pad(k_LBTKH[:, :, :T0], pad, constant_values=7.0)
  v_cache = np.pad(v_LBTKH[:, :, :T0], pad, constant_values=-7.0)
  valid_BS = np.arange(S)[None].repeat(B, 0) < T0
  out, (k_new, v_new) = forward_cached(params, x_BTD[:, T0:], positions_BT[:, T0:], k_cache, v_cache, valid_BS,
                                             cfg=cfg)
  # The same math with the softmax split over cache slots and new tokens (other shapes, other summation
  # orders): 64 eps32 * max|x|; a wrong position, a seen garbage slot or a missed causal mask is O(max|x|).
  assert_close_f32(out, ref[:, T0:], ulps_of_max=64)
  assert_close_f32((k_new, v_new), (k_LBTKH[:, :, T0:], v_LBTKH[:, :, T0:]), ulps_of_max=64)
