"""SentencePiece tokenizer and PaliGemma's text layout (prefix, "\\n", suffix + eos, masks).

Follows big_vision's `transfers/common.py::combine_and_keep_{train,eval}` and `pp/ops_text.py`:

  text      [bos] sp(prefix)  sp("\\n")  sp(suffix) [eos]  pad ...
  mask_ar    0    0 ...        0 ...      1 ...      1     1 ...   (pp pads mask_ar with 1)
  mask_loss  0    0 ...        0 ...      1 ...      1     0 ...
  mask_input 1    1 ...        1 ...      1 ...      1     0 ...

Differences from big_vision, all on purpose: the eos is never silently truncated away (an over-long
example raises, or with truncate="keep_eos" loses suffix tokens but keeps its eos and says how many);
a trailing "\\n" on the prefix is dropped because the separator is always added; nothing is
lowercased or otherwise normalised.

The PaliGemma vocabulary is Gemma's 256000 pieces + 1024 `<locNNNN>` + 128 `<segNNN>` user-defined
pieces at the end (ids 256000+n and 257024+n). `make_sentencepiece` builds small models with the same
special ids and the same appended pieces for tests and the demo.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm

NUM_LOC, NUM_SEG = 1024, 128
LOC_PIECES = tuple(f"<loc{n:04d}>" for n in range(NUM_LOC))
SEG_PIECES = tuple(f"<seg{n:03d}>" for n in range(NUM_SEG))
TRUNCATE_POLICIES = ("error", "keep_eos")


class Tokenizer:
  """A SentencePiece model with PaliGemma's loc/seg pieces. `Tokenizer("paligemma_tokenizer.model")`.

  A plain Gemma tokenizer lacks the loc/seg pieces; `add_loc_seg=True` appends them in memory, as
  big_vision's `gemma(tokensets=("loc", "seg"))` does (a no-op if they are already there).
  """

  def __init__(self, path, *, add_loc_seg: bool = False):
    self.path = os.fspath(path)
    try:
      from pgjax import files
      proto = Path(files.regular_file(self.path, "tokenizer model")).read_bytes()
    except FileNotFoundError:
      raise FileNotFoundError(f"tokenizer model not found: {self.path}") from None
    except OSError as e:
      raise ValueError(f"cannot read tokenizer model {self.path}: {e}") from e
    self.sp = _load_proto(proto, self.path)
    if add_loc_seg and self.sp.piece_to_id(LOC_PIECES[0]) == self.sp.unk_id():
      self.sp = _load_proto(_append_pieces(proto, LOC_PIECES + SEG_PIECES), self.path)
    self._loc = self._find_pieces(LOC_PIECES)
    self._seg = self._find_pieces(SEG_PIECES)
    self._loc_seg = frozenset(self._loc.tolist()) | frozenset(self._seg.tolist())
    # sp.decode keeps USER_DEFINED pieces (the real model's loc/seg) but drops CONTROL ones; if a
    # converted tokenizer marks them CONTROL, decode() splices their text back in by hand.
    self._loc_seg_dropped = any(self.sp.is_control(int(i)) for i in self._loc[:1].tolist() + self._seg[:1].tolist())
    # big_vision tokenizes the separator on its own: sp("\n"), id 108 for Gemma.
    self.sep_ids = tuple(self.sp.encode("\n"))
    if not self.sep_ids:
      raise ValueError(f"tokenizer {self.path} encodes '\\n' to nothing; PaliGemma needs a newline piece")

  def _find_pieces(self, pieces):
    ids = np.array([self.sp.piece_to_id(p) for p in pieces], np.int32)
    missing = [p for p, i in zip(pieces, ids) if i == self.sp.unk_id()]
    if missing:
      raise ValueError(f"tokenizer {self.path} is not a PaliGemma tokenizer: {len(missing)} pieces such as "
                       f"{missing[0]} are missing (use paligemma_tokenizer.model, or Tokenizer(path, add_loc_seg=True) "
                       f"for a plain Gemma tokenizer)")
    return ids

  def __repr__(self):
    return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self.sp.pad_id()

  @property
  def eos_id(self) -> int:
    return self.sp.eos_id()

  @property
  def bos_id(self) -> int:
    return self.sp.bos_id()

  @property
  def unk_id(self) -> int:
    return self.sp.unk_id()

  def loc_id(self, n: int) -> int:
    """Id of `<locNNNN>`, n in 0..1023 (a box coordinate round(c * 1023))."""
    if not 0 <= n < NUM_LOC:
      raise ValueError(f"loc index {n} is outside 0..{NUM_LOC - 1}")
    return int(self._loc[n])

  def seg_id(self, n: int) -> int:
    """Id of `<segNNN>`, n in 0..127 (a VQ-VAE mask code)."""
    if not 0 <= n < NUM_SEG:
      raise ValueError(f"seg index {n} is outside 0..{NUM_SEG - 1}")
    return int(self._seg[n])

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos or eos and without any normalisation (case is kept)."""
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    return self.sp.encode(text)

  def decode(self, ids, *, stop_at_eos: bool = True) -> str:
    """Text of `ids`: cut at the first eos (if asked), pad dropped, `<locNNNN>`/`<segNNN>` kept."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if stop_at_eos and self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    ids = [i for i in ids if i != self.pad_id]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
    if not self._loc_seg_dropped:
      return self.sp.decode(ids)
    out, run = [], []
    for i in ids:
      if i in self._loc_seg:
        out += [self.sp.decode(run), self.sp.id_to_piece(i)]
        run = []
      else:
        run.append(i)
    return "".join(out + [self.sp.decode(run)])

  def encode_example(self, prefix: str, suffix: str | None = None, *, max_len: int,
                     truncate: str = "error") -> dict:
    """One example laid out as big_vision builds it, padded to `max_len` (the full token count).

    Training (suffix given): [bos] prefix "\\n" suffix [eos]; mask_ar and mask_loss are 1 on the
    suffix and eos. The train step feeds text[:-1] and predicts text[1:], so max_len here is
    big_vision's text_len + 1. Decode prompt (suffix None): [bos] prefix "\\n", masks 0.

    A prefix ending in "\\n" loses that one "\\n": the separator is always added (tokenized on its
    own, as big_vision does), so "x" and "x\\n" must not give [..., "\\n", "\\n"].

    Too long: the prompt part never fits -> ValueError. The suffix part: truncate="error" raises;
    "keep_eos" drops suffix tokens from the end but keeps the eos last. "num_truncated" in the
    result counts the dropped tokens (0 normally), so callers can report them.
    """
    if truncate not in TRUNCATE_POLICIES:
      raise ValueError(f"truncate={truncate!r}; expected one of {TRUNCATE_POLICIES}")
    prompt, answer = self._layout(prefix, suffix)
    need = len(prompt) + len(answer)
    if len(prompt) + (suffix is not None) > max_len:
      what = "prompt ([bos] prefix \"\\n\")" + (" plus the eos" if suffix is not None else "")
      raise ValueError(f"{what} needs {len(prompt) + (suffix is not None)} tokens but max_len is {max_len} "
                       f"(prefix {prefix!r})")
    num_truncated = max(0, need - max_len)
    if num_truncated:
      if truncate == "error":
        raise ValueError(f"example needs {need} tokens ({len(prompt)} prompt + {len(answer)} suffix with eos) "
                         f"but max_len is {max_len}; raise max_len or pass truncate='keep_eos' "
                         f"(prefix {prefix!r})")
      answer = answer[:len(answer) - 1 - num_truncated] + [self.eos_id]
    n_prompt, n = len(prompt), len(prompt) + len(answer)
    text = np.full(max_len, self.pad_id, np.int32)
    text[:n] = prompt + answer
    mask_ar = np.ones(max_len, np.int32)
    mask_ar[:n_prompt] = 0
    mask_loss = np.zeros(max_len, np.int32)
    mask_loss[n_prompt:n] = 1
    mask_input = np.zeros(max_len, np.int32)
    mask_input[:n] = 1
    return dict(text=text, mask_ar=mask_ar, mask_loss=mask_loss, mask_input=mask_input,
                num_truncated=num_truncated)

  def example_len(self, prefix: str, suffix: str | None = None) -> int:
    """The tokens `encode_example` lays out before padding: [bos] prefix "\\n" (a prompt, when suffix
    is None) plus suffix [eos]. The example fits max_len untruncated when this is at most max_len."""
    return sum(len(ids) for ids in self._layout(prefix, suffix))

  def _layout(self, prefix, suffix) -> tuple[list[int], list[int]]:
    """([bos] prefix "\\n", suffix [eos] or nothing): the token layout `encode_example` pads and
    `example_len` counts."""
    if not isinstance(prefix, str) or not isinstance(suffix, (str, type(None))):
      raise TypeError(f"prefix and suffix must be str (suffix may be None), got {type(prefix).__name__} "
                      f"and {type(suffix).__name__}")
    if prefix.endswith("\n"):
      prefix = prefix[:-1]
    prompt = [self.bos_id] + self.encode(prefix) + list(self.sep_ids)
    answer = [] if suffix is None else self.encode(suffix) + [self.eos_id]
    return prompt, answer


def _load_proto(proto: bytes, name: str) -> spm.SentencePieceProcessor:
  sp = spm.SentencePieceProcessor()
  try:
    sp.load_from_serialized_proto(proto)
  except (RuntimeError, OSError) as e:
    raise ValueError(f"{name} is not a valid SentencePiece model: {e}") from e
  return sp


# --- Building small models. ModelProto is read and written by hand (no protobuf dependency): its
# `pieces` are repeated field 1, each a SentencePiece message {1: piece string, 2: score float32,
# 3: type enum}. USER_DEFINED pieces are matched whole by the encoder and kept by the decoder.

_USER_DEFINED = 4


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    n, low = n >> 7, n & 0x7F
    out.append(low | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = b[i]
    i += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if byte < 0x80:
      return value, i


def _end_of_pieces(proto: bytes) -> int:
  """Byte offset just after the last top-level field-1 (pieces) record."""
  i, end = 0, 0
  while i < len(proto):
    key, i = _read_varint(proto, i)
    wire = key & 7
    if wire == 0:
      _, i = _read_varint(proto, i)
    elif wire == 2:
      n, i = _read_varint(proto, i)
      i += n
    elif wire in (1, 5):
      i += 8 if wire == 1 else 4
    else:
      raise ValueError(f"unexpected protobuf wire type {wire} in SentencePiece model")
    if key >> 3 == 1:
      end = i
  return end


def _append_pieces(proto: bytes, pieces: Iterable[str], piece_type: int = _USER_DEFINED) -> bytes:
  """`proto` with USER_DEFINED score-0 pieces appended at the end of the vocabulary (big_vision's
  `_add_pieces`). They go right after the existing pieces, where protobuf itself would write them;
  appending at the very end of the bytes also loads, but this keeps the file canonical."""
  records = []
  for piece in pieces:
    s = piece.encode()
    body = b"\x0a" + _varint(len(s)) + s + b"\x15" + struct.pack("<f", 0.0) + b"\x18" + _varint(piece_type)
    records.append(b"\x0a" + _varint(len(body)) + body)
  at = _end_of_pieces(proto)
  return proto[:at] + b"".join(records) + proto[at:]


def make_sentencepiece(texts: Iterable[str], path, vocab_size: int, *, model_type: str = "bpe",
                       add_loc_seg: bool = True, user_defined_symbols: Iterable[str] = ("\n",),
                       seed: int = 0) -> Path:
  """Trains a small Gemma-style SentencePiece model on `texts` and writes it to `path`.

  Gemma's conventions: pad 0 `<pad>`, eos 1 `<eos>`, bos 2 `<bos>`, unk 3 `<unk>`; byte fallback; no
  dummy prefix, no whitespace folding, identity normalisation (so case, spaces and "\\n" survive);
  digits split; "\\n" one user-defined piece. `vocab_size` is the trained vocabulary (it must hold
  the 256 byte pieces and every character); with `add_loc_seg` the 1024 `<locNNNN>` and 128
  `<segNNN>` pieces follow as ids vocab_size+n and vocab_size+1024+n. Single-threaded with a fixed
  seed, so the same input gives the same bytes.
  """
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type=model_type,
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
      unk_piece="<unk>", byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
      normalization_rule_name="identity", split_digits=True, allow_whitespace_only_pieces=True,
      user_defined_symbols=list(user_defined_symbols), character_coverage=1.0, num_threads=1,
      input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
  proto = model.getvalue()
  if add_loc_seg:
    proto = _append_pieces(proto, LOC_PIECES + SEG_PIECES)
  path = Path(path)
  from pgjax import files
  with files.atomic_write(path) as f:  # a crash never leaves a half-written model behind
    f.write(proto)
  return path
