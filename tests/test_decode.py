"""KV-cached decoding: equal to an uncached argmax loop, per-row positions, eos handling, cache dtype."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_close_f32, prefix_lm_batch, random_params, sharpen
from pgjax import config, decode, decode_view, gemma, paligemma

# Prompts of different lengths in one right-padded batch.
PROMPTS = [(5, 0), (2, 0), (7, 0)]
MAX_NEW = 7


@pytest.fixture(scope="module", params=["tiny-gemma1-mqa", "tiny-gemma2-gqa"])
def setup(request):
  cfg = config.get(request.param)
  params = random_params(cfg, seed=11)
  batch = prefix_lm_batch(cfg, PROMPTS, 8, seed=5)
  return cfg, params, batch


_forward = jax.jit(paligemma.forward, static_argnames="cfg")


def uncached_greedy(cfg, params, image, prompt, n):
  """The slow reference: a teacher-forced forward over the whole sequence at every step, one row alone.

  The sequence is right-padded to a fixed length (one compilation); padding is causal and after the
  position read, so it changes nothing there (test_paligemma checks this).
  """
  L = n + MAX_NEW
  seq = np.zeros((1, L), np.int32)
  seq[0, :n] = prompt[:n]
  mask_ar = np.array([[0] * n + [1] * MAX_NEW])
  tokens, logits = [], []
  for t in range(MAX_NEW):
    out, _ = _forward(params, image[None], seq, mask_ar, cfg=cfg)
    logits.append(np.asarray(out[0, n + t - 1]))
    tokens.append(int(np.argmax(logits[-1])))
    if n + t < L:
      seq[0, n + t] = tokens[-1]
  return np.array(tokens), np.stack(logits)


def test_cached_greedy_equals_uncached_argmax_loop(setup):
  cfg, params, batch = setup
  tokens, step_logits = decode.greedy(params, batch["image"], batch["text"], batch["mask_input"], cfg=cfg,
                                      max_new_tokens=MAX_NEW, eos_id=None)
  for b, (n, _) in enumerate(PROMPTS):
    ref_tokens, ref_logits = uncached_greedy(cfg, params, batch["image"][b], batch["text"][b], n)
    np.testing.assert_array_equal(np.asarray(tokens[b]), ref_tokens)
    # 64 eps32 * max|logits|: the cached step splits each softmax over cache slots and new tokens and runs
    # other shapes (other summation orders); a wrong position or mask moves logits by O(max|logits|).
    assert_close_f32(np.asarray(step_logits[b]), ref_logits, ulps_of_max=64)


def test_prefill_and_decode_step_loop_equals_greedy(setup):
  cfg, params, batch = setup
  ref, ref_logits = decode.greedy(params, batch["image"], batch["text"], batch["mask_input"], cfg=cfg,
                                  max_new_tokens=4, eos_id=None)
  N = cfg.num_image_tokens + batch["text"].shape[1]
  logits, cache = decode.prefill(params, batch["image"], batch["text"], batch["mask_input"], cfg=cfg,
                                 cache_size=N + 3)
  toks = []
  for t in range(4):
    # 64 eps32 * max|logits|: the same steps, compiled alone rather than inside greedy's loop.
    assert_close_f32(logits, ref_logits[:, t], ulps_of_max=64)
    toks.append(jnp.argmax(logits, -1))
    if t < 3:
      old = cache
      logits, cache = decode.decode_step(params, toks[-1], cache, cfg=cfg)
      assert old["k"].is_deleted()  # the cache was donated
  np.testing.assert_array_equal(np.stack(toks, 1), np.asarray(ref))


def test_eos_stops_rows_and_cuts_after_it(setup):
  cfg, params, batch = setup
  free, _ = decode.greedy(params, batch["image"], batch["text"], batch["mask_input"], cfg=cfg,
                          max_new_tokens=MAX_NEW, eos_id=None)
  free = np.asarray(free)
  eos = int(free[0, 2])  # make row 0's third token the eos
  tokens, logits, info = decode.greedy(params, batch["image"], batch["text"], batch["mask_input"], cfg=cfg,
                                       max_new_tokens=MAX_NEW, eos_id=eos, return_info=True)
  tokens, logits = np.asarray(tokens), np.asarray(logits)
  for b in range(len(PROMPTS)):
    hits = np.flatnonzero(free[b] == eos)
    n = hits[0] + 1 if len(hits) else MAX_NEW
    np.testing.assert_array_equal(tokens[b, :n], free[b, :n])  # eos kept
    assert (tokens[b, n:] == 0).all() and (logits[b, n:] == 0).all()
    assert int(info["num_tokens"][b]) == n
    assert bool(info["hit_eos"][b]) == bool(len(hits))


def test_stops_early_when_every_row_has_eos(setup):
  cfg, params, batch = setup
  free, _ = decode.greedy(params, batch["image"], batch["text"], batch["mask_input"], cfg=cfg,
                          max_new_tokens=MAX_NEW, eos_id=None)
  # Every row emits its own first token first; pick rows whose first token is shared, else use one row.
  first = int(np.asarray(free)[0, 0])
  rows = np.asarray(free)[:, 0] == first
  _, _, info = decode.greedy(params, batch["image"], batch["text"], batch["mask_input"], cfg=cfg,
                             max_new_tokens=MAX_NEW, eos_id=first, valid_B=rows, return_info=True)
  assert int(info["steps"]) == 1  # all valid rows stopped at their first token
  np.testing.assert_array_equal(np.asarray(info["num_tokens"]), np.where(rows, 1, 0))


def test_padding_rows_come_back_empty(setup):
  cfg, params, batch = setup
  valid = np.array([True, False, True])
  tokens, _ = decode.greedy(params, batch["image"], batch["text"], batch["mask_input"], cfg=cfg,
                            max_new_tokens=3, eos_id=None, valid_B=valid)
  assert (np.asarray(tokens)[1] == 0).all()


def test_bfloat16_cache_is_close_to_float32(setup):
  cfg, params, batch = setup
  _, ref = decode.greedy(params, batch["image"], batch["text"], batch["mask_input"], cfg=cfg,
                         max_new_tokens=1, eos_id=None)
  _, out = decode.greedy(params, batch["image"], batch["text"], batch["mask_input"], cfg=cfg,
                         max_new_tokens=1, eos_id=None, cache_dtype=jnp.bfloat16)
  ref, out = np.asarray(ref), np.asarray(out)
  assert not np.array_equal(out, ref)  # the prompt's attention really used bf16 keys and values
  assert np.abs(out - ref).max() < 3e-2 * np.abs(ref).max()


# The decode view: same tokens, and values to float32 rounding: 64 eps32 * max|x| per leaf (the fused
# matmuls sum the same products in another order; a misplaced weight moves values by O(max|x|)).
VIEW_ULPS = 64


@pytest.fixture(scope="module", params=["tiny-gemma1-mqa", "tiny-gemma1-mha", "tiny-gemma2-gqa"])
def view_setup(request):
  cfg = config.get(request.param)
  params = sharpen(random_params(cfg, seed=11))  # varied text, so that an eos can stop a row after a few tokens
  batch = prefix_lm_batch(cfg, PROMPTS, 8, seed=5)
  return cfg, params, batch, decode.make_view(params, cfg=cfg)


def test_decode_view_holds_the_checkpoint_weights(view_setup):
  cfg, params, _, view = view_setup
  c = cfg.llm
  D, N, K, H, F = c.width, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim
  lp = params["llm"]["layers"]
  np.testing.assert_array_equal(np.asarray(view["head_DV"]), np.asarray(params["llm"]["embedder"]["input_embedding"]).T)
  assert len(view["layers"]) == c.depth
  for l, p in enumerate(view["layers"]):
    assert p["attn"]["qkv_DZ"].shape == (D, (N + 2 * K) * H) and p["mlp"]["gating_DZ"].shape == (D, 2 * F)
    q_DNH = np.asarray(p["attn"]["qkv_DZ"][:, :N * H]).reshape(D, N, H)
    v_DKH = np.asarray(p["attn"]["qkv_DZ"][:, (N + K) * H:]).reshape(D, K, H)
    if "qkv_einsum" in lp["attn"]:
      q_NDH, v_KDH = lp["attn"]["qkv_einsum"]["w"][l, 0], lp["attn"]["qkv_einsum"]["w"][l, 2]
    else:
      q_NDH, v_KDH = lp["attn"]["q_einsum"]["w"][l], lp["attn"]["kv_einsum"]["w"][l, 1]
    np.testing.assert_array_equal(q_DNH, np.asarray(q_NDH).transpose(1, 0, 2))
    np.testing.assert_array_equal(v_DKH, np.asarray(v_KDH).transpose(1, 0, 2))
    np.testing.assert_array_equal(np.asarray(p["mlp"]["gating_DZ"][:, F:]), np.asarray(lp["mlp"]["gating_einsum"][l, 1]))
    np.testing.assert_array_equal(np.asarray(p["pre_ffw_norm"]["scale"]), np.asarray(lp["pre_ffw_norm"]["scale"][l]))


@pytest.mark.parametrize("rows", ["all", "one padding row", "only the eos row"])
def test_decode_view_greedy_equals_scan_path(view_setup, rows):
  cfg, params, batch, view = view_setup
  args = (params, batch["image"], batch["text"], batch["mask_input"])
  free, _ = decode.greedy(*args, cfg=cfg, max_new_tokens=MAX_NEW, eos_id=None)
  # As eos, the token some row r first emits latest (before its last step): row r stops early, others
  # maybe; with only row r valid, the whole loop does.
  n0, r, eos = max((row.index(t), b, t) for b, row in enumerate(np.asarray(free)[:, :-1].tolist()) for t in row)
  valid = np.ones(len(PROMPTS), bool)
  if rows != "all":
    valid[(r + 1) % len(PROMPTS)] = False
  if rows == "only the eos row":
    valid[:] = False
    valid[r] = True
  kw = dict(cfg=cfg, max_new_tokens=MAX_NEW, eos_id=eos, valid_B=valid, return_info=True)
  ref_tokens, ref_logits, ref_info = decode.greedy(*args, **kw)
  tokens, logits, info = decode.greedy(*args, **kw, decode_view=view)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(ref_tokens))
  assert_close_f32(np.asarray(logits), np.asarray(ref_logits), ulps_of_max=VIEW_ULPS)
  chex.assert_trees_all_equal(jax.device_get(info), jax.device_get(ref_info))
  assert int(info["num_tokens"][r]) == n0 + 1 < MAX_NEW and not np.asarray(tokens)[~valid].any()
  if rows == "only the eos row":
    assert int(info["steps"]) == n0 + 1


def test_decode_view_prefill_and_decode_step_equal_scan_path(view_setup):
  cfg, params, batch, view = view_setup
  args = (params, batch["image"], batch["text"], batch["mask_input"])
  N = cfg.num_image_tokens + batch["text"].shape[1]
  ref_logits, ref_cache = decode.prefill(*args, cfg=cfg, cache_size=N + 2)
  logits, cache = decode.prefill(*args, decode_view=view, cfg=cfg, cache_size=N + 2)
  for _ in range(2):
    assert_close_f32(logits, ref_logits, ulps_of_max=VIEW_ULPS)
    assert_close_f32(cache, ref_cache, ulps_of_max=VIEW_ULPS)
    tok = jnp.argmax(ref_logits, -1)
    ref_logits, ref_cache = decode.decode_step(params, tok, ref_cache, cfg=cfg)
    logits, cache = decode.decode_step(params, tok, cache, view, cfg=cfg)
  assert_close_f32(logits, ref_logits, ulps_of_max=VIEW_ULPS)


def test_decode_view_of_another_depth_is_refused(view_setup):
  cfg, params, batch, view = view_setup
  with pytest.raises(ValueError, match="decode_view has 1 layers"):
    decode.greedy(params, batch["image"], batch["text"], batch["mask_input"], cfg=cfg, max_new_tokens=2,
                  decode_view=dict(view, layers=view["layers"][:1]))


def test_forward_out_index_equals_the_full_forward_there(view_setup):
  # What a view prefill relies on: the last layer run for one query per row gives that query's output.
  cfg, params, _, view = view_setup
  B, T, D = 3, 9, cfg.llm.width
  x_BTD = jax.random.normal(jax.random.key(0), (B, T, D))
  positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
  mask_BTT = jnp.broadcast_to(jnp.tri(T, dtype=bool), (B, T, T))
  index_B = jnp.array([8, 0, 4])
  full, aux = gemma.forward(params["llm"], x_BTD, positions_BT, mask_BTT, cfg=cfg.llm, return_kv=True)
  out, out_aux = decode_view.forward(params["llm"], view, x_BTD, positions_BT,
                                     mask_BTT, index_B, cfg=cfg.llm)
  assert out.shape == (B, 1, D)
  assert_close_f32(out[:, 0], full[jnp.arange(B), index_B], ulps_of_max=VIEW_ULPS)
  assert_close_f32(out_aux["kv"], aux["kv"], ulps_of_max=VIEW_ULPS)
  with pytest.raises(TypeError, match="out_index_B"):  # the scan path runs every layer alike
    gemma.forward(params["llm"], x_BTD, positions_BT, mask_BTT, cfg=cfg.llm, out_index_B=index_B)


def _big_copies(hlo_text, min_elements):
  """Instructions of an optimised module that copy, transpose or slice >= min_elements elements."""
  found = []
  for m in re.finditer(r"= \w+\[([\d,]*)\]\{[^}]*\} (copy|transpose|dynamic-slice)\(", hlo_text):
    if np.prod([int(d) for d in m.group(1).split(",") if d]) >= min_elements:
      found.append(m.group(0))
  return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="about XLA:CPU's layouts")
def test_decode_view_decode_step_reads_weights_in_place():
  # Shapes only (nothing is allocated): the bench-small decode step, compiled with and without the view.
  cfg = config.get("bench-small")
  params = jax.eval_shape(functools.partial(paligemma.init, cfg=cfg), jax.random.key(0))
  view = jax.eval_shape(functools.partial(decode_view.make_decode_view, cfg=cfg.llm), params["llm"])
  s = cfg.vision.image_size
  _, cache = jax.eval_shape(functools.partial(decode.prefill, cfg=cfg, cache_size=cfg.num_image_tokens + 48),
                            params, jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32),
                            jax.ShapeDtypeStruct((1, 16), jnp.int32), jax.ShapeDtypeStruct((1, 16), bool))
  tokens = jax.ShapeDtypeStruct((1,), jnp.int32)
  scan_hlo, view_hlo = (decode.decode_step.lower(params, tokens, cache, v, cfg=cfg).compile().as_text()
                        for v in (None, view))
  # q, the output projection and the MLP's matrices have >= D x D elements; the cache's and the
  # activations' copies are far smaller.
  D = cfg.llm.width
  assert _big_copies(scan_hlo, D * D)  # each layer's weights sliced and re-laid-out, every token
  assert not _big_copies(view_hlo, D * D)
