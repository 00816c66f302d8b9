"""The <loc>/<seg> output grammar on the demo's tokenizer: token classes, sequences it accepts and refuses,
and decoding under it."""

from pathlib import Path

import numpy as np
import pytest

from pgjax import decode, grammar, tokenizer

TOK = Path(__file__).resolve().parents[1] / "weights" / "demo" / "tokenizer.model"
V = 1700  # a model vocabulary larger than the tokenizer's 1,652 pieces: the extra ids are never allowed


@pytest.fixture(scope="module")
def tok():
  return tokenizer.Tokenizer(TOK)


def ids(tok, text, eos=True):
  return tok.encode(text) + ([tok.eos_id] if eos else [])


def test_token_classes(tok):
  c = grammar.token_classes(tok, V)
  assert c[tok.eos_id] == grammar.EOS and c[tok.bos_id] == grammar.NEVER and c[tok.pad_id] == grammar.NEVER
  assert c[tok.loc_id(0)] == c[tok.loc_id(1023)] == grammar.LOC
  assert c[tok.seg_id(0)] == c[tok.seg_id(127)] == grammar.SEG
  assert (c[tok.vocab_size:] == grammar.NEVER).all()
  semi = tok.encode(";")  # byte fallback in this tokenizer: "▁", "<0x3B>"
  assert grammar.SEP in c[semi]
  assert c[tok.encode(" cat")[0]] == grammar.WORD


@pytest.mark.parametrize("text, ok", [
    ("<loc0001><loc0002><loc0003><loc0004> cat", True),
    ("<loc0001><loc0002><loc0003><loc0004> big dog ; <loc0005><loc0006><loc0007><loc0008> cat", True),
    ("", True),  # nothing found
    ("<loc0001><loc0002><loc0003> cat", False),  # three locs
    ("<loc0001><loc0002><loc0003><loc0004><loc0005> cat", False),  # five
    ("<loc0001><loc0002><loc0003><loc0004>", False),  # no label before eos
    ("<loc0001><loc0002><loc0003><loc0004> ;", False),  # a separator where the label should be
    ("cat <loc0001><loc0002><loc0003><loc0004>", False),  # a label first
    ("<loc0001><loc0002><loc0003><loc0004> cat <loc0005><loc0006><loc0007><loc0008> dog", False),  # no ";"
    ("<loc0001><loc0002><loc0003><loc0004><seg001> cat", False),  # seg tokens in a detection
])
def test_detect_grammar(tok, text, ok):
  assert grammar.accepts(grammar.for_task(tok, V, "detect"), ids(tok, text)) is ok


def test_segment_grammar(tok):
  g = grammar.for_task(tok, V, "segment")
  locs = "<loc0001><loc0002><loc0003><loc0004>"
  segs = "".join(f"<seg{i:03d}>" for i in range(16))
  assert grammar.accepts(g, ids(tok, locs + segs + " cat ; " + locs + segs + " dog"))
  assert not grammar.accepts(g, ids(tok, locs + segs[:-8] + " cat"))  # 15 seg tokens
  assert not grammar.accepts(g, ids(tok, locs + " cat"))
  assert grammar.accepts(g, ids(tok, "")) and not grammar.accepts(grammar.for_task(tok, V, "segment", allow_empty=False),
                                                                  ids(tok, ""))
  assert grammar.accepts(g, ids(tok, locs + segs + " ca", eos=False))  # a prefix is fine until eos


def test_every_state_allows_a_token_and_errors_name_the_task(tok):
  for task in ("detect", "segment"):
    g = grammar.for_task(tok, V, task)
    allowed_QV = g.next_QC[:, g.class_V] >= 0
    assert allowed_QV.any(axis=1).all()
  with pytest.raises(ValueError, match="'caption'"):
    grammar.for_task(tok, V, "caption")
  with pytest.raises(ValueError, match="vocabulary is 100"):
    grammar.for_task(tok, 100, "detect")


def test_decoding_under_the_grammar_follows_it(tok):
  from pgjax import config
  from helpers import random_params
  import dataclasses
  cfg = config.get("tiny-gemma1-mqa")
  cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=V))
  params = random_params(cfg, seed=1)
  # eos's logit 0 (its tied embedding zeroed): the largest of 1,024 random loc logits beats it, so boxes come first.
  e = params["llm"]["embedder"]["input_embedding"]
  params["llm"]["embedder"]["input_embedding"] = e.at[tok.eos_id].set(0.0)
  prompt = np.array([[tok.bos_id] + tok.encode("detect cat") + list(tok.sep_ids)])
  image = np.zeros((1, 56, 56, 3), np.float32)
  mask = np.ones_like(prompt)
  import jax
  for task in ("detect", "segment"):
    g = grammar.for_task(tok, V, task, allow_empty=False)
    outs = [decode.greedy(params, image, prompt, mask, cfg=cfg, max_new_tokens=30, eos_id=tok.eos_id,
                          grammar=g, return_logits=False)[0],
            decode.sample(params, image, prompt, mask, cfg=cfg, key=jax.random.key(0), max_new_tokens=30,
                          eos_id=tok.eos_id, grammar=g)[0],
            decode.beam_search(params, image, prompt, mask, cfg=cfg, beam_size=3, max_new_tokens=30,
                               eos_id=tok.eos_id, grammar=g)[0]]
    for out in outs:
      seq = np.asarray(out[0]).tolist()
      assert grammar.accepts(g, seq), (task, seq)
      assert grammar.LOC in g.class_V[seq]  # it produced boxes, not only an eos
