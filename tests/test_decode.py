"""KV-cached decoding: equal to an uncached argmax loop, per-row positions, eos handling, cache dtype."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import prefix_lm_batch, random_params
from pgjax import config, decode, paligemma

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
    chex.assert_trees_all_close(np.asarray(step_logits[b]), ref_logits, rtol=1e-5, atol=1e-5)


def test_prefill_and_decode_step_loop_equals_greedy(setup):
  cfg, params, batch = setup
  ref, ref_logits = decode.greedy(params, batch["image"], batch["text"], batch["mask_input"], cfg=cfg,
                                  max_new_tokens=4, eos_id=None)
  N = cfg.num_image_tokens + batch["text"].shape[1]
  logits, cache = decode.prefill(params, batch["image"], batch["text"], batch["mask_input"], cfg=cfg,
                                 cache_size=N + 3)
  toks = []
  for t in range(4):
    chex.assert_trees_all_close(logits, ref_logits[:, t], rtol=1e-5, atol=1e-5)
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
