"""Beam search: against an exhaustive search over every sequence of a tiny vocabulary, against a plain
Python beam search over teacher-forced forwards, against greedy at beam size 1, against transformers'
beam search where the two definitions coincide, and row by row over padded batches."""

import itertools

import jax
import numpy as np
import pytest

from helpers import assert_close_f32, prefix_lm_batch, random_params, sharpen
from pgjax import config, decode, paligemma

PROMPTS = [(5, 0), (2, 0), (7, 0)]
M = 4


@pytest.fixture(scope="module", params=["tiny-gemma1-mqa", "tiny-gemma2-gqa"])
def setup(request):
  cfg = config.get(request.param)
  # Logits 3x larger too: a few likely tokens per step, so that sequences differ by more than one token's cost.
  params = sharpen(random_params(cfg, seed=11), logits_scale=3.0)
  batch = prefix_lm_batch(cfg, PROMPTS, 8, seed=5)
  return cfg, params, batch


_forward = jax.jit(paligemma.forward, static_argnames="cfg")


class Scorer:
  """Next-token log-probs (log_softmax of raw logits) after any continuation of row b's prompt, from one
  teacher-forced forward over every asked continuation at once (right-padded: padding is causal and after
  the positions read)."""

  def __init__(self, cfg, params, batch, b):
    self.cfg, self.params, self.b = cfg, params, b
    self.n = int(batch["mask_input"][b].sum())
    self.prompt, self.image = batch["text"][b, :self.n], batch["image"][b]
    self.memo = {}

  def fill(self, seqs):
    seqs = [s for s in seqs if s not in self.memo]
    if not seqs:
      return
    L = self.n + M
    text = np.zeros((len(seqs), L), np.int32)
    for i, s in enumerate(seqs):
      text[i, :self.n + len(s)] = np.concatenate([self.prompt, s])
    mask_ar = np.broadcast_to(np.arange(L) >= self.n, text.shape).astype(np.int32)
    logits, _ = _forward(self.params, np.repeat(self.image[None], len(seqs), 0), text, mask_ar, cfg=self.cfg)
    lp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
    for i, s in enumerate(seqs):
      self.memo[s] = lp[i, self.n + len(s) - 1]

  def __call__(self, seq):
    self.fill([seq])
    return self.memo[seq]


def choose_vocab(scorer, k):
  """k tokens to continue with, the prompt's top k next tokens, and as eos the token whose log-prob rises most
  after one of them: finishing at once then competes with finishing later (the best sequences found are 1 to
  4 tokens long, and a narrow beam misses some of them)."""
  tokens = tuple(int(t) for t in np.argsort(-scorer(()))[:k])
  scorer.fill([(t,) for t in tokens])
  gain = np.max([scorer((t,)) for t in tokens], axis=0) - scorer(())
  gain[list(tokens)] = -np.inf
  return tokens, int(np.argmax(gain))


def forbid_all_but(cfg, allowed):
  return sorted(set(range(cfg.llm.vocab_size)) - set(allowed))


def exhaustive(scorer, tokens, eos):
  """The best finished sequence (eos within M tokens, none before it) over every such sequence."""
  prefixes = [p for m in range(M) for p in itertools.product(tokens, repeat=m)]
  scorer.fill(prefixes)
  best = None
  for p in prefixes:
    s = sum(scorer(p[:i])[t] for i, t in enumerate(p)) + scorer(p)[eos]
    best = max(best, (s, p + (eos,))) if best else (s, p + (eos,))
  return best


def python_beam(scorer, tokens, eos, K):
  """big_vision's beam search written plainly: every live beam also scored finished with eos, live beams
  extended by non-eos tokens, the best K kept of each, stop when the best live is below the best finished."""
  live, fin = [(0.0, ())], []
  for _ in range(M):
    scorer.fill([seq for _, seq in live])
    cands = []
    for s, seq in live:
      lp = scorer(seq)
      fin.append((s + lp[eos], seq + (eos,)))
      cands += [(s + lp[t], seq + (t,)) for t in tokens]
    fin = sorted(fin, key=lambda x: -x[0])[:K]
    live = sorted(cands, key=lambda x: -x[0])[:K]
    if live[0][0] < fin[0][0]:
      break
  return fin


def padded(seq):
  return np.array(list(seq) + [0] * (M - len(seq)))


@pytest.mark.slow
def test_wide_beam_finds_the_true_best_sequence(setup):
  cfg, params, batch = setup
  # 3 tokens + eos, 4 steps: 27 beams hold every live sequence, so the search is exhaustive.
  for b in range(len(PROMPTS)):
    scorer = Scorer(cfg, params, batch, b)
    tokens, eos = choose_vocab(scorer, 3)
    want_score, want_seq = exhaustive(scorer, tokens, eos)
    row = {k: batch[k][b:b + 1] for k in ("image", "text", "mask_input")}
    got, score = decode.beam_search(params, row["image"], row["text"], row["mask_input"], cfg=cfg, beam_size=27,
                                    max_new_tokens=M, eos_id=eos, forbid=forbid_all_but(cfg, tokens + (eos,)))
    np.testing.assert_array_equal(np.asarray(got[0]), padded(want_seq))
    # 64 eps32 of the summed magnitude: float32 sums of cached-loop log-probs against float64 sums.
    np.testing.assert_allclose(float(score[0]), want_score, rtol=0, atol=64 * 2 ** -23 * abs(want_score))


@pytest.mark.parametrize("K", [1, 2])
def test_narrow_beam_equals_a_plain_beam_search(setup, K):
  # In these fixtures a beam of 1 or 2 misses the exhaustive best in some rows: the pruning and the stop
  # are what is compared.
  cfg, params, batch = setup
  for b in range(len(PROMPTS)):
    scorer = Scorer(cfg, params, batch, b)
    tokens, eos = choose_vocab(scorer, 3)
    ref = python_beam(scorer, tokens, eos, K)
    row = {k: batch[k][b:b + 1] for k in ("image", "text", "mask_input")}
    got, score, beams, beam_scores = decode.beam_search(
        params, row["image"], row["text"], row["mask_input"], cfg=cfg, beam_size=K, max_new_tokens=M, eos_id=eos,
        forbid=forbid_all_but(cfg, tokens + (eos,)), return_beams=True)
    np.testing.assert_array_equal(np.asarray(got[0]), padded(ref[0][1]))
    for k, (s, seq) in enumerate(ref):
      np.testing.assert_array_equal(np.asarray(beams[0, k]), padded(seq))
      np.testing.assert_allclose(float(beam_scores[0, k]), s, rtol=0, atol=64 * 2 ** -23 * abs(s))


def test_beam_size_one_follows_greedy(setup):
  cfg, params, batch = setup
  args = (params, batch["image"], batch["text"], batch["mask_input"])
  greedy, logits = decode.greedy(*args, cfg=cfg, max_new_tokens=M, eos_id=None)
  tokens, score = decode.beam_search(*args, cfg=cfg, beam_size=1, max_new_tokens=M, eos_id=None)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(greedy))  # no eos: the argmax chain itself
  lp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  g = np.asarray(greedy)
  greedy_score = np.take_along_axis(lp, g[..., None], -1)[..., 0].sum(1)
  assert_close_f32(np.asarray(score), greedy_score, ulps_of_max=64)
  # With an eos, one beam returns the best of greedy's prefixes ended by eos (it scores each as finished):
  # greedy's own output when that ends the best, an earlier stop when finishing there scored higher.
  eos = int(g[0, 2])
  tokens, score = decode.beam_search(*args, cfg=cfg, beam_size=1, max_new_tokens=M, eos_id=eos)
  for b in range(len(PROMPTS)):
    cands = []
    for j in range(M):
      cands.append((lp[b, np.arange(j), g[b, :j]].sum() + lp[b, j, eos], j))
      if g[b, j] == eos:
        break
    s, j = max(cands)
    np.testing.assert_array_equal(np.asarray(tokens[b]), padded(list(g[b, :j]) + [eos]))
    np.testing.assert_allclose(float(score[b]), s, rtol=0, atol=64 * 2 ** -23 * abs(s))


def test_rows_of_a_padded_batch_equal_each_row_alone(setup):
  cfg, params, batch = setup
  K, eos = 3, 7
  pad = lambda x: np.concatenate([x, x[:1]])  # noqa: E731 (a padding row, flagged invalid)
  tokens, score, info = decode.beam_search(params, pad(batch["image"]), pad(batch["text"]), pad(batch["mask_input"]),
                                           cfg=cfg, beam_size=K, max_new_tokens=M, eos_id=eos,
                                           valid_B=np.array([True] * 3 + [False]), return_info=True)
  assert not np.asarray(tokens[3]).any() and int(info["num_tokens"][3]) == 0
  for b, (n, _) in enumerate(PROMPTS):
    t1, s1, i1 = decode.beam_search(params, batch["image"][b:b + 1], batch["text"][b:b + 1, :n],
                                    batch["mask_input"][b:b + 1, :n], cfg=cfg, beam_size=K, max_new_tokens=M,
                                    eos_id=eos, return_info=True)
    np.testing.assert_array_equal(np.asarray(t1[0]), np.asarray(tokens[b]))
    assert_close_f32(np.asarray(s1), np.asarray(score[b:b + 1]), ulps_of_max=64)
    assert int(i1["num_tokens"][0]) == int(info["num_tokens"][b])
    assert bool(i1["hit_eos"][0]) == bool(info["hit_eos"][b])


def test_no_finished_beam_returns_the_best_live_one_flagged(setup):
  cfg, params, batch = setup
  args = (params, batch["image"], batch["text"], batch["mask_input"])
  tokens, score, info = decode.beam_search(*args, cfg=cfg, beam_size=2, max_new_tokens=M, eos_id=5, forbid=[5],
                                           return_info=True)
  assert not np.asarray(info["hit_eos"]).any() and (np.asarray(info["num_tokens"]) == M).all()
  assert (np.asarray(tokens) != 5).all() and np.isfinite(np.asarray(score)).all()


def test_bad_arguments_are_refused(setup):
  cfg, params, batch = setup
  args = (params, batch["image"], batch["text"], batch["mask_input"])
  with pytest.raises(ValueError, match="beam_size"):
    decode.beam_search(*args, cfg=cfg, beam_size=0, max_new_tokens=M)
  with pytest.raises(ValueError, match="max_new_tokens"):
    decode.beam_search(*args, cfg=cfg, beam_size=2, max_new_tokens=0)
