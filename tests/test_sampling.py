"""Logit filters, sampling and best-of-n: hand-computed kept sets, greedy at temperature 0, the sampled
distribution by a chi-square test, log-probs against a teacher-forced forward, and rows independent of
their batch."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from helpers import assert_close_f32, prefix_lm_batch, random_params, sharpen
from pgjax import config, decode, paligemma

NEG = -np.inf


def kept(x):
  return set(np.flatnonzero(np.isfinite(np.asarray(x))).tolist())


def test_top_k_keeps_the_k_largest_and_ties_at_the_kth():
  x = jnp.array([[3.0, 1.0, 3.0, 0.0, 2.0]])
  assert kept(decode.filter_logits(x, top_k=1)[0]) == {0, 2}  # the two 3s tie at the 1st
  assert kept(decode.filter_logits(x, top_k=2)[0]) == {0, 2}
  assert kept(decode.filter_logits(x, top_k=3)[0]) == {0, 2, 4}
  assert kept(decode.filter_logits(x, top_k=9)[0]) == {0, 1, 2, 3, 4}
  np.testing.assert_array_equal(decode.filter_logits(x, top_k=3)[0], [3.0, NEG, 3.0, NEG, 2.0])


def test_top_p_is_big_vision_nucleus_rule():
  # probabilities 0.5, 0.2, 0.2, 0.1: cumulative 0.5, 0.7, 0.9, 1.0 (sorted), tokens 1 and 2 tied.
  x = jnp.log(jnp.array([[0.5, 0.2, 0.2, 0.1]]))
  assert kept(decode.filter_logits(x, top_p=0.3)[0]) == {0}        # at or below the top probability: argmax
  assert kept(decode.filter_logits(x, top_p=0.5)[0]) == {0}        # 0.5 reaches p at the first token
  assert kept(decode.filter_logits(x, top_p=0.6)[0]) == {0, 1, 2}  # reached at token 1; 2 ties with it
  assert kept(decode.filter_logits(x, top_p=0.95)[0]) == {0, 1, 2, 3}
  assert kept(decode.filter_logits(x, top_p=1.0)[0]) == {0, 1, 2, 3}
  assert kept(decode.filter_logits(x, top_p=None)[0]) == {0, 1, 2, 3}
  # Ties at the top: p below the top probability keeps the argmax and every token tied with it.
  assert kept(decode.filter_logits(jnp.log(jnp.array([[0.4, 0.4, 0.2]])), top_p=0.1)[0]) == {0, 1}


def test_top_p_equals_the_sorted_cumulative_rule_on_random_logits_with_ties():
  # The oracle is the rule as big_vision writes it, in float64 numpy: sort descending, count the positions whose
  # cumulative softmax is below p, keep every logit >= the one at that position.
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.integers(-4, 5, (20, 50)).astype(np.float32),  # many ties
                      (rng.standard_normal((20, 50)) * 3).astype(np.float32)])
  x[0, :3] = -np.inf  # removed entries stay removed
  for p in (0.05, 0.3, 0.5, 0.77, 0.9, 0.99):
    got = np.isfinite(np.asarray(decode.filter_logits(jnp.asarray(x), top_p=p)))
    for b in range(len(x)):
      s = np.sort(x[b].astype(np.float64))[::-1]
      e = np.exp(s - s[0])
      cum = np.cumsum(e / e.sum())
      if np.abs(cum - p).min() < 1e-5:
        continue  # within float32 rounding of p, either side is right
      want = x[b] >= s[min(np.sum(cum < p), len(s) - 1)]
      np.testing.assert_array_equal(got[b], want & np.isfinite(x[b]), err_msg=f"row {b}, p={p}")
  # Any leading shape: the rule applies along the last axis.
  x3 = jnp.asarray(x[:6].reshape(2, 3, 50))
  np.testing.assert_array_equal(decode.filter_logits(x3, top_p=0.5),
                                decode.filter_logits(x3.reshape(6, 50), top_p=0.5).reshape(2, 3, 50))


def test_temperature_divides_before_top_k_and_top_p():
  x = jnp.log(jnp.array([[4.0, 2.0, 1.0, 1.0]]))
  np.testing.assert_allclose(decode.filter_logits(x, temperature=0.5)[0], np.asarray(x[0]) / 0.5)
  # t = 1: p = 4/8, 2/8, 1/8, 1/8, cumulative .5 .75 .875: 0.8 is reached at token 2, and 3 ties with it.
  assert kept(decode.filter_logits(x, top_p=0.8)[0]) == {0, 1, 2, 3}
  # t = 0.5: p ∝ 16, 4, 1, 1, cumulative .727 .909: 0.8 is reached at token 1.
  assert kept(decode.filter_logits(x, temperature=0.5, top_p=0.8)[0]) == {0, 1}
  # top_k first, then top_p over what it left: {0, 1} renormalised is 2/3, 1/3, so 0.6 keeps token 0 only.
  assert kept(decode.filter_logits(x, top_p=0.6)[0]) == {0, 1}
  assert kept(decode.filter_logits(x, top_k=2, top_p=0.6)[0]) == {0}


def test_filter_keeps_removed_entries_removed_and_rows_apart():
  x = jnp.array([[NEG, 1.0, 2.0, 0.5], [0.0, 5.0, NEG, 4.5]])
  out = np.asarray(decode.filter_logits(x, top_k=2))
  np.testing.assert_array_equal(out, [[NEG, 1.0, 2.0, NEG], [NEG, 5.0, NEG, 4.5]])


def test_draw_matches_softmax_across_blocks_by_chi_square():
  # V = 50 cuts into blocks of 8 (C = 2^ceil(log2 ceil(sqrt 50))): the six finite logits lie in five blocks, the
  # last block (48-49, then padding) holds none. Expected: softmax in float64 numpy.
  ids = np.array([0, 9, 17, 30, 41, 42])
  x = np.full(50, NEG, np.float32)
  x[ids] = [1.0, -0.5, 0.3, 2.0, 0.0, -1.2]
  p = np.exp(x[ids].astype(np.float64) - x[ids].max())
  p /= p.sum()
  N = 6000
  keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(3), jnp.arange(N))
  tok = np.asarray(decode.draw(keys, jnp.broadcast_to(jnp.asarray(x), (N, 50))))
  assert tok.dtype == np.int32 and np.isin(tok, ids).all()  # never an entry at -inf
  counts = np.array([(tok == i).sum() for i in ids])
  chi2 = ((counts - N * p) ** 2 / (N * p)).sum()
  # 5 degrees of freedom; 20.515 is the chi-square table's critical value at alpha = 0.001 (seed fixed).
  assert (N * p >= 5).all() and chi2 < 20.515, (chi2, counts, N * p)


@pytest.mark.parametrize("V,only", [(1, 0), (50, 49), (50, 0), (257, 256), (257, 130)])
def test_draw_of_one_finite_entry_is_that_entry(V, only):
  x = np.full((4, V), NEG, np.float32)
  x[:, only] = -3.0
  keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), jnp.arange(4))
  np.testing.assert_array_equal(np.asarray(decode.draw(keys, jnp.asarray(x))), [only] * 4)


def test_first_above_falls_back_to_the_last_entry_with_mass():
  # Rounding can leave u at the total: the draw must still land on an entry with mass, not on one past it.
  cum = jnp.array([[0.0, 0.5, 0.5, 1.0, 1.0]])
  pos = jnp.array([[False, True, False, True, False]])
  assert int(decode._first_above(cum, jnp.array([0.2]), pos)[0]) == 1
  assert int(decode._first_above(cum, jnp.array([0.5]), pos)[0]) == 3
  assert int(decode._first_above(cum, jnp.array([1.0]), pos)[0]) == 3


@pytest.mark.parametrize("kw, match", [(dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
                                       (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p")])
def test_filter_refuses_bad_arguments(kw, match):
  with pytest.raises(ValueError, match=match):
    decode.filter_logits(jnp.zeros((1, 3)), **kw)


# ---------------------------------------------------------------------------------------------------
# Sampling over the model.

PROMPTS = [(5, 0), (2, 0), (7, 0)]
MAX_NEW = 6


@pytest.fixture(scope="module", params=["tiny-gemma1-mqa", "tiny-gemma2-gqa"])
def setup(request):
  cfg = config.get(request.param)
  params = sharpen(random_params(cfg, seed=11))
  batch = prefix_lm_batch(cfg, PROMPTS, 8, seed=5)
  return cfg, params, batch


def args(batch):
  return batch["image"], batch["text"], batch["mask_input"]


_forward = jax.jit(paligemma.forward, static_argnames="cfg")


def teacher_forced_logp(cfg, params, image, prompt, n, tokens):
  """log_softmax of a teacher-forced forward over [prompt[:n]; tokens] at each of `tokens`, one row alone."""
  seq = np.concatenate([prompt[:n], tokens]).astype(np.int32)[None]
  mask_ar = np.array([[0] * n + [1] * len(tokens)])
  logits, _ = _forward(params, image[None], seq, mask_ar, cfg=cfg)
  lp = np.asarray(jax.nn.log_softmax(logits[0, n - 1:-1], axis=-1))
  return lp[np.arange(len(tokens)), tokens]


def test_same_key_same_tokens_and_logp_is_the_models(setup):
  cfg, params, batch = setup
  key = jax.random.key(3)
  tokens, logp = decode.sample(params, *args(batch), cfg=cfg, key=key, max_new_tokens=MAX_NEW, eos_id=None)
  again, _ = decode.sample(params, *args(batch), cfg=cfg, key=key, max_new_tokens=MAX_NEW, eos_id=None)
  other, _ = decode.sample(params, *args(batch), cfg=cfg, key=jax.random.key(4), max_new_tokens=MAX_NEW, eos_id=None)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(again))
  assert not np.array_equal(np.asarray(tokens), np.asarray(other))
  for b, (n, _) in enumerate(PROMPTS):
    ref = teacher_forced_logp(cfg, params, batch["image"][b], batch["text"][b], n, np.asarray(tokens[b]))
    # 64 eps32 of the largest |log-prob|: the cached loop and the teacher-forced forward sum in other orders.
    assert_close_f32(np.asarray(logp[b]), ref, ulps_of_max=64)


def test_temperature_zero_is_greedy_bit_for_bit_and_a_tiny_one_samples_the_argmax(setup):
  cfg, params, batch = setup
  ref, _ = decode.greedy(params, *args(batch), cfg=cfg, max_new_tokens=MAX_NEW, eos_id=None)
  zero, _ = decode.sample(params, *args(batch), cfg=cfg, key=jax.random.key(0), temperature=0.0, top_p=0.5,
                          max_new_tokens=MAX_NEW, eos_id=None)
  np.testing.assert_array_equal(np.asarray(zero), np.asarray(ref))
  # At t = 1e-4, logits 0.01 apart differ by 100 in logits / t: the argmax has probability > 1 - V e^-100.
  cold, _ = decode.sample(params, *args(batch), cfg=cfg, key=jax.random.key(0), temperature=1e-4,
                          max_new_tokens=MAX_NEW, eos_id=None)
  np.testing.assert_array_equal(np.asarray(cold), np.asarray(ref))


def test_first_token_distribution_passes_a_chi_square_test(setup):
  cfg, params, batch = setup
  temperature, top_k, N = 0.7, 6, 3000
  rep = lambda x: np.repeat(x[:1], N, axis=0)  # noqa: E731 (row 0, N times: N independent draws)
  logits_BV, _ = decode.prefill(params, *args(batch), cfg=cfg, cache_size=cfg.num_image_tokens + 8)
  # The expected distribution, in float64 numpy: softmax of the top-6 logits / t.
  x = np.asarray(logits_BV[0], np.float64) / temperature
  top = np.argsort(-x)[:top_k]
  p = np.exp(x[top] - x[top].max())
  p /= p.sum()
  assert len(set(x[top])) == top_k and (N * p >= 5).all()  # no ties; every expected count >= 5
  tokens, _ = decode.sample(params, rep(batch["image"]), rep(batch["text"]), rep(batch["mask_input"]), cfg=cfg,
                            key=jax.random.key(7), max_new_tokens=1, temperature=temperature, top_k=top_k)
  counts = np.array([(np.asarray(tokens[:, 0]) == t).sum() for t in top])
  assert counts.sum() == N  # nothing outside the kept set
  chi2 = ((counts - N * p) ** 2 / (N * p)).sum()
  # 5 degrees of freedom; 20.515 is the chi-square table's critical value at alpha = 0.001 (seed fixed).
  assert chi2 < 20.515, (chi2, counts, N * p)


def test_top_p_sampling_draws_only_from_the_nucleus(setup):
  cfg, params, batch = setup
  N, top_p = 500, 0.6
  rep = lambda x: np.repeat(x[:1], N, axis=0)  # noqa: E731
  logits_BV, _ = decode.prefill(params, *args(batch), cfg=cfg, cache_size=cfg.num_image_tokens + 8)
  x = np.asarray(logits_BV[0], np.float64)
  order = np.argsort(-x)
  cum = np.cumsum(np.exp(x[order] - x.max()) / np.exp(x - x.max()).sum())
  nucleus = set(order[:np.searchsorted(cum, top_p) + 1].tolist())  # up to the token that reaches p
  tokens, _ = decode.sample(params, rep(batch["image"]), rep(batch["text"]), rep(batch["mask_input"]), cfg=cfg,
                            key=jax.random.key(1), max_new_tokens=1, top_p=top_p)
  drawn = set(np.asarray(tokens[:, 0]).tolist())
  assert drawn <= nucleus and len(drawn) > 1


def test_each_row_equals_the_row_alone_and_padding_changes_nothing(setup):
  cfg, params, batch = setup
  key = jax.random.key(5)
  kw = dict(cfg=cfg, max_new_tokens=MAX_NEW, temperature=1.3, top_p=0.95, eos_id=None)
  tokens, logp = decode.sample(params, *args(batch), key=key, **kw)
  for b, (n, _) in enumerate(PROMPTS):
    alone = {k: batch[k][b:b + 1, :max(n, 1)] for k in ("text", "mask_input")}
    t1, l1 = decode.sample(params, batch["image"][b:b + 1], alone["text"], alone["mask_input"],
                           key=jax.random.fold_in(key, b)[None], **kw)
    np.testing.assert_array_equal(np.asarray(t1[0]), np.asarray(tokens[b]))
    assert_close_f32(np.asarray(l1[0]), np.asarray(logp[b]), ulps_of_max=64)
  # Two padding rows appended (copies of row 0, flagged invalid): the real rows keep their tokens.
  pad = lambda x: np.concatenate([x, x[:1], x[:1]])  # noqa: E731
  padded, _ = decode.sample(params, pad(batch["image"]), pad(batch["text"]), pad(batch["mask_input"]), key=key,
                            valid_B=np.array([True] * 3 + [False] * 2), **kw)
  np.testing.assert_array_equal(np.asarray(padded[:3]), np.asarray(tokens))
  assert not np.asarray(padded[3:]).any()


def test_eos_cuts_tokens_and_logp_and_forbid_is_obeyed(setup):
  cfg, params, batch = setup
  key = jax.random.key(9)
  free, _ = decode.sample(params, *args(batch), cfg=cfg, key=key, max_new_tokens=MAX_NEW, eos_id=None)
  eos = int(np.asarray(free)[0, 2])
  tokens, logp, info = decode.sample(params, *args(batch), cfg=cfg, key=key, max_new_tokens=MAX_NEW, eos_id=eos,
                                     return_info=True)
  tokens, logp = np.asarray(tokens), np.asarray(logp)
  for b in range(len(PROMPTS)):
    hits = np.flatnonzero(np.asarray(free)[b] == eos)
    n = hits[0] + 1 if len(hits) else MAX_NEW
    np.testing.assert_array_equal(tokens[b, :n], np.asarray(free)[b, :n])
    assert (tokens[b, n:] == 0).all() and (logp[b, n:] == 0).all() and (logp[b, :n] < 0).all()
    assert int(info["num_tokens"][b]) == n
  # Forbidding every token greedy picks anywhere: none of them comes out, at any temperature.
  greedy, _ = decode.greedy(params, *args(batch), cfg=cfg, max_new_tokens=MAX_NEW, eos_id=None)
  banned = sorted(set(np.asarray(greedy).ravel().tolist()))
  for t in (0.0, 0.5):
    out, _ = decode.sample(params, *args(batch), cfg=cfg, key=key, temperature=t, max_new_tokens=MAX_NEW,
                           eos_id=None, forbid=banned)
    assert not set(np.asarray(out).ravel().tolist()) & set(banned)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    decode.sample(params, *args(batch), cfg=cfg, key=key, max_new_tokens=2, forbid=[cfg.llm.vocab_size])


def test_best_of_n_keeps_the_highest_scoring_sample(setup):
  cfg, params, batch = setup
  key, n = jax.random.key(2), 4
  eos = 7
  kw = dict(cfg=cfg, max_new_tokens=MAX_NEW, temperature=1.5, eos_id=eos)
  tokens, score = decode.best_of_n(params, *args(batch), key=key, n=n, **kw)
  for b, (m, _) in enumerate(PROMPTS):
    # Sample j of row b, run alone from its documented key; score = summed log-probs up to the eos.
    cands = []
    for j in range(n):
      t, lp = decode.sample(params, batch["image"][b:b + 1], batch["text"][b:b + 1], batch["mask_input"][b:b + 1],
                            key=jax.random.fold_in(jax.random.fold_in(key, b), j)[None], **kw)
      cands.append((float(np.asarray(lp).sum()), np.asarray(t[0])))
    best = max(range(n), key=lambda j: (cands[j][0], -j))
    np.testing.assert_array_equal(np.asarray(tokens[b]), cands[best][1])
    np.testing.assert_allclose(float(score[b]), cands[best][0], rtol=1e-5)
