"""Token-level finite-state constraints on decoding, and the one that keeps `<loc>`/`<seg>` outputs well-formed.

A `Grammar` is two arrays: each token's class and, per state, the state a token of each class leads to
(-1: not allowed there). The decoders (`pgjax.decode`, argument `grammar=`) set the logits of tokens the
current state does not allow to -inf before choosing, and follow the transition after. Scores and returned
log-probs stay the model's own.

`for_task(tok, vocab_size, "detect" | "segment")` is PaliGemma's output format (pgjax/detection.py):

    output  := eos | object (sep object)* eos      (allow_empty=False: no lone eos)
    object  := <loc>{4} label                  (detect)
             | <loc>{4} <seg>{16} label        (segment)
    label   := other* word (word | other)*     a word token holds a letter or digit; no ";" in a label
    sep     := a token holding ";", then other*

so every output parses into complete objects with a non-empty label (`detection.parse_detections` finds
no malformed group), and eos can come only where an object is complete. Token classes come from the
pieces' text; bos, pad, unk and ids past the tokenizer's vocabulary are never allowed. After eos every
token is allowed: the decoders cut a row there.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

# Token classes.
NEVER, EOS, LOC, SEG, SEP, WORD, OTHER = range(7)
CLASS_NAMES = ("never", "eos", "loc", "seg", "sep", "word", "other")

_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Grammar(NamedTuple):
  """class_V [V] int32: each token's class; next_QC [Q, C] int32: the state after a token of class c in
  state q, -1 where it is not allowed. Decoding starts in state 0; every state allows some class."""
  class_V: np.ndarray
  next_QC: np.ndarray


def token_classes(tok, vocab_size: int) -> np.ndarray:
  """[vocab_size] int32: the class of every id, from the tokenizer's pieces (ids it does not have: NEVER)."""
  sp = tok.sp
  if tok.vocab_size > vocab_size:
    raise ValueError(f"tokenizer has {tok.vocab_size} pieces but the model's vocabulary is {vocab_size}")
  out = np.full((vocab_size,), NEVER, np.int32)
  for i in range(tok.vocab_size):
    piece = sp.id_to_piece(i)
    if i == tok.eos_id:
      out[i] = EOS
    elif sp.is_control(i) or sp.is_unknown(i) or i in (tok.bos_id, tok.pad_id):
      out[i] = NEVER
    elif re.fullmatch(r"<loc\d{4}>", piece):
      out[i] = LOC
    elif re.fullmatch(r"<seg\d{3}>", piece):
      out[i] = SEG
    else:
      m = _BYTE.fullmatch(piece)
      # A byte piece is its byte's character when ASCII; others are pieces of a UTF-8 sequence (no letter alone).
      text = (chr(int(m.group(1), 16)) if int(m.group(1), 16) < 128 else "") if m else piece.replace("\u2581", " ")
      out[i] = SEP if ";" in text else WORD if any(c.isalnum() for c in text) else OTHER
  return out


def for_task(tok, vocab_size: int, task: str = "detect", *, allow_empty: bool = True) -> Grammar:
  """The grammar of a detection ("detect") or segmentation ("segment") output (module docstring).
  allow_empty=False refuses the empty output (eos first): at least one object. Beam search wants this when
  "nothing found" should not win only for being short."""
  if task not in ("detect", "segment"):
    raise ValueError(f"no output grammar for task {task!r}: use 'detect' or 'segment'")
  class_V = token_classes(tok, vocab_size)
  for c in (EOS, LOC, WORD) + ((SEG,) if task == "segment" else ()):
    if not (class_V == c).any():
      raise ValueError(f"tokenizer {getattr(tok, 'path', tok)} has no {CLASS_NAMES[c]} token; a {task} output "
                       f"cannot be constrained with it")
  rows = []

  def state(**moves):
    rows.append(moves)
    return len(rows) - 1

  start = state()
  locs = [state() for _ in range(3)]           # after 1, 2, 3 locs
  segs = [state() for _ in range(16)] if task == "segment" else []  # after 4 locs and 0..15 segs
  label0, label, after_sep, done = state(), state(), state(), state()
  rows[start].update(loc=locs[0], **({"eos": done} if allow_empty else {}))
  for a, b in zip(locs, locs[1:] + [segs[0] if segs else label0]):
    rows[a]["loc"] = b
  for a, b in zip(segs, segs[1:] + [label0]):
    rows[a]["seg"] = b
  rows[label0].update(word=label, other=label0)
  rows[label].update(word=label, other=label, sep=after_sep, eos=done)
  rows[after_sep].update(other=after_sep, loc=locs[0])
  rows[done].update({n: done for n in CLASS_NAMES})
  next_QC = np.full((len(rows), len(CLASS_NAMES)), -1, np.int32)
  for q, moves in enumerate(rows):
    for name, to in moves.items():
      next_QC[q, CLASS_NAMES.index(name)] = to
  next_QC[:, NEVER] = -1
  return Grammar(class_V, next_QC)


def accepts(grammar: Grammar, ids) -> bool:
  """Whether a token sequence follows the grammar (up to and including its first eos, if any)."""
  q = 0
  for i in ids:
    q = int(grammar.next_QC[q, grammar.class_V[int(i)]])
    if q < 0:
      return False
    if grammar.class_V[int(i)] == EOS:
      return True
  return True
