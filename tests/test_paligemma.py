"""Semantics of the PaliGemma forward: the prefix-LM mask, what each position can see, dtypes, jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import EPS32, assert_close_f32, prefix_lm_batch, random_params
from pgjax import config, paligemma

T, F = True, False


@pytest.mark.parametrize("mask_ar, mask_input, expected", [
    # All ones: plain causal attention.
    ([1, 1, 1, 1], [1, 1, 1, 1], [[T, F, F, F], [T, T, F, F], [T, T, T, F], [T, T, T, T]]),
    # Prefix-LM: the first three see each other; the rest are causal.
    ([0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [[T, T, T, F, F], [T, T, T, F, F], [T, T, T, F, F],
                                        [T, T, T, T, F], [T, T, T, T, T]]),
    # A leading 1 changes nothing: only differences of the cumulative sum matter.
    ([1, 0, 0, 1, 1], [1, 1, 1, 1, 1], [[T, T, T, F, F], [T, T, T, F, F], [T, T, T, F, F],
                                        [T, T, T, T, F], [T, T, T, T, T]]),
    # Block-causal: pairs see each other and every earlier pair.
    ([1, 0, 1, 0, 1, 0], [1] * 6, [[T, T, F, F, F, F], [T, T, F, F, F, F], [T, T, T, T, F, F],
                                   [T, T, T, T, F, F], [T, T, T, T, T, T], [T, T, T, T, T, T]]),
    # Padding (mask_input 0) neither sees nor is seen, whatever mask_ar says.
    ([0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [[T, T, F, F, F, F], [T, T, F, F, F, F], [T, T, T, F, F, F],
                                             [T, T, T, T, F, F], [F] * 6, [F] * 6]),
])
def test_make_attn_mask_truth_tables(mask_ar, mask_input, expected):
  mask = paligemma.make_attn_mask(jnp.array([mask_input]), jnp.array([mask_ar]))
  np.testing.assert_array_equal(np.asarray(mask[0]), np.array(expected))


@pytest.fixture(scope="module")
def tiny():
  cfg = config.get("tiny-gemma1-mqa")
  return cfg, random_params(cfg, seed=7)


def _logits(cfg, params, batch):
  return np.asarray(paligemma.forward(params, batch["image"], batch["text"], batch["mask_ar"], cfg=cfg)[0])


def test_suffix_token_only_affects_later_positions(tiny):
  cfg, params = tiny
  batch = prefix_lm_batch(cfg, [(4, 6)], 10)
  base = _logits(cfg, params, batch)
  for j in range(4, 10):  # every suffix position
    b = {**batch, "text": batch["text"].copy()}
    b["text"][0, j] = (b["text"][0, j] + 1) % cfg.llm.vocab_size
    changed = np.abs(_logits(cfg, params, b) - base).max(-1)[0] > 1e-6
    np.testing.assert_array_equal(changed, np.arange(10) >= j)


def test_prefix_token_and_image_affect_every_position(tiny):
  cfg, params = tiny
  batch = prefix_lm_batch(cfg, [(4, 6)], 10)
  base = _logits(cfg, params, batch)
  for j in range(1, 4):  # prefix positions (after bos)
    b = {**batch, "text": batch["text"].copy()}
    b["text"][0, j] = (b["text"][0, j] + 1) % cfg.llm.vocab_size
    assert (np.abs(_logits(cfg, params, b) - base).max(-1)[0] > 1e-6).all()
  b = {**batch, "image": batch["image"] * 0.5}
  assert (np.abs(_logits(cfg, params, b) - base).max(-1)[0] > 1e-6).all()


def test_right_padding_changes_no_real_position(tiny):
  cfg, params = tiny
  short = prefix_lm_batch(cfg, [(4, 3)], 7)
  padded = prefix_lm_batch(cfg, [(4, 3)], 11)
  # 64 eps32 * max|logits|: the same math over a longer sequence (other matmul shapes, so other summation
  # orders; a few eps of reordering here on AMD and Intel); a padding leak moves logits by O(max|logits|).
  assert_close_f32(_logits(cfg, params, padded)[:, :7], _logits(cfg, params, short), ulps_of_max=64)


def test_jit_and_no_jit_agree(tiny):
  cfg, params = tiny
  batch = prefix_lm_batch(cfg, [(4, 6), (2, 3)], 10)
  jitted = jax.jit(paligemma.forward, static_argnames="cfg")(params, batch["image"], batch["text"], batch["mask_ar"],
                                                             cfg=cfg)[0]
  with jax.disable_jit():
    eager = paligemma.forward(params, batch["image"], batch["text"], batch["mask_ar"], cfg=cfg)[0]
  # 64 eps32 * max|logits|: the same ops, fused by XLA under jit and not eagerly (other summation orders).
  assert_close_f32(jitted, eager, ulps_of_max=64)


@pytest.mark.parametrize("name", ["tiny-gemma1-mqa", "tiny-gemma2-gqa"])
@pytest.mark.parametrize("dtype, tol", [(jnp.float16, 2e-2), (jnp.bfloat16, 1e-1)])
def test_half_precision_params_give_finite_logits_close_to_float32(name, dtype, tol):
  cfg = config.get(name)
  params = random_params(cfg, seed=1)
  batch = prefix_lm_batch(cfg, [(4, 6), (2, 3)], 10)
  ref = _logits(cfg, params, batch)
  half = jax.tree.map(lambda x: x.astype(dtype), params)
  out = _logits(cfg, half, batch)
  assert np.isfinite(out).all()
  # Relative to the logits' scale; the tolerance is the storage dtype's (fp16 ~1e-3, bf16 ~1e-2 per weight).
  assert np.abs(out - ref).max() <= tol * np.abs(ref).max()
  assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_aux_exposes_named_intermediates_and_attention(tiny):
  cfg, params = tiny
  batch = prefix_lm_batch(cfg, [(4, 6)], 10)
  _, aux = paligemma.forward(params, batch["image"], batch["text"], batch["mask_ar"], cfg=cfg, return_attn=True)
  P, D = cfg.num_image_tokens, cfg.llm.width
  assert aux["img/zimg"].shape == (1, P, D)
  assert aux["llm/pre_logits"].shape == (1, 10, D)
  attn = np.asarray(aux["llm/attn"])  # (L, B, K, G, N, N)
  assert attn.shape == (cfg.llm.depth, 1, 1, 4, P + 10, P + 10)
  # Sums of S = P + 10 float32 probabilities normalised by a float32 sum of the same S terms: at worst about
  # 2S roundings of 1, whatever the order.
  assert_close_f32(attn.sum(-1), np.ones(attn.shape[:-1]), ulps_of_max=2 * attn.shape[-1])
  # Attention probabilities are zero exactly where the mask forbids.
  mask = np.asarray(aux["attn_mask"])[0]
  assert np.all(attn[:, 0, :, :, ~mask] == 0.0)


def test_remat_gives_the_same_values_and_gradients(tiny):
  import dataclasses
  cfg, params = tiny
  batch = prefix_lm_batch(cfg, [(4, 6)], 10)

  def f(p, c):
    return paligemma.forward(p, batch["image"], batch["text"], batch["mask_ar"], cfg=c)[0].sum()

  grad = jax.jit(jax.grad(f), static_argnums=1)  # jitted as in training (op by op it took twice as long)
  g0 = grad(params, cfg)
  for remat in ("full", "dots"):
    g1 = grad(params, dataclasses.replace(cfg, remat=remat))
    # Per leaf 64 eps32 * max|g| (+ a floor, below): the recomputed backward sums the same products in other
    # orders; seen: <= 5 eps32 * max|g| on AMD, 7 on Intel (1.26e-5 on a leaf of max 15), while a gradient off by
    # a factor 1 + 1e-4 is 840. The key bias's gradient is zero in exact math (it adds q.b to all of a query's
    # logits, which softmax ignores): rounding noise of terms as large as the key kernel's gradient, the floor.
    key_g = g0["img"]["Transformer"]["encoderblock"]["MultiHeadDotProductAttention_0"]["key"]["kernel"]
    assert_close_f32(g1, g0, ulps_of_max=64, floor=64 * EPS32 * float(jnp.abs(key_g).max()),
                     what=f"remat={remat} ")


@pytest.mark.parametrize("remat", ["none", "full"])
def test_out_start_gives_the_text_positions_values_and_gradients(tiny, remat):
  """gemma.forward(out_start=P) (the last layer's queries, output projection and MLP at positions P.. only)
  against the whole stack run everywhere and sliced: same outputs, keys/values and gradients."""
  from pgjax import gemma
  cfg, params = tiny
  batch = prefix_lm_batch(cfg, [(4, 6), (3, 5)], 10)
  x_BND, _ = paligemma.embed_image_and_text(params, batch["image"], batch["text"], cfg=cfg)
  P = cfg.num_image_tokens
  mask_ar_BN, mask_input_BN = paligemma.full_masks(batch["mask_ar"], batch["mask_input"], P)
  mask_BNN = paligemma.make_attn_mask(mask_input_BN, mask_ar_BN)
  positions_BN = jnp.broadcast_to(jnp.arange(x_BND.shape[1]), x_BND.shape[:2])
  w = jax.random.normal(jax.random.key(3), (x_BND.shape[0], 10, cfg.llm.width))

  @functools.partial(jax.jit, static_argnums=1)
  def run(llm, start):
    out, aux = gemma.forward(llm, x_BND, positions_BN, mask_BNN, cfg=cfg.llm, remat=remat, return_kv=True,
                             out_start=start)
    return (out if start is not None else out[:, P:]), aux["kv"]

  full, kv_full = run(params["llm"], None)
  cut, kv_cut = run(params["llm"], P)
  assert cut.shape == full.shape == (2, 10, cfg.llm.width)
  # 64 eps32 * max|x|: the last layer's ops at fewer positions (other shapes, other summation orders).
  assert_close_f32(cut, full, ulps_of_max=64)
  # The keys and values come from the same ops on the same inputs: at most a fusion's reordering, 16 eps32.
  assert_close_f32(kv_cut, kv_full, ulps_of_max=16)
  grad = lambda start: jax.jit(jax.grad(lambda llm: (run(llm, start)[0] * w).sum()))(params["llm"])
  # Per leaf 64 eps32 * max|g|: the backward of the same math with other shapes in the last layer.
  assert_close_f32(grad(P), grad(None), ulps_of_max=64)
  with pytest.raises(ValueError, match="return_attn"):
    gemma.forward(params["llm"], x_BND, positions_BN, mask_BNN, cfg=cfg.llm, return_attn=True, out_start=P)
