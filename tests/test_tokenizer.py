"""Tokenizer: special ids, loc/seg pieces, decode, and big_vision's text layout built by hand."""

import random

import numpy as np
import pytest

from pgjax import tokenizer
from pgjax.tokenizer import Tokenizer, make_sentencepiece

BASE = 400  # the trained vocabulary; loc pieces follow at BASE + n, seg at BASE + 1024 + n


def _sentences(n=300, seed=0):
  rng = random.Random(seed)
  words = ("the a cat dog sits on mat runs in park red blue green big small bird flies over house car "
           "drives road caption en answer detect segment what is of Hello World 12 2024").split()
  return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) + rng.choice([".", "?", ""])
          for _ in range(n)]


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
  return make_sentencepiece(_sentences(), tmp_path_factory.mktemp("tok") / "tiny.model", BASE)


@pytest.fixture(scope="session")
def tok(model_path):
  return Tokenizer(model_path)


def test_special_ids_and_sizes(tok):
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
  assert [tok.sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
  assert tok.vocab_size == BASE + 1024 + 128


def test_newline_is_one_piece(tok):
  assert len(tok.sep_ids) == 1
  assert tok.sp.id_to_piece(tok.sep_ids[0]) == "\n"
  assert tuple(tok.encode("\n")) == tok.sep_ids


def test_every_loc_and_seg_is_one_id(tok):
  for n in range(1024):
    assert tok.encode(f"<loc{n:04d}>") == [BASE + n] == [tok.loc_id(n)]
  for n in range(128):
    assert tok.encode(f"<seg{n:03d}>") == [BASE + 1024 + n] == [tok.seg_id(n)]
  with pytest.raises(ValueError):
    tok.loc_id(1024)
  with pytest.raises(ValueError):
    tok.seg_id(-1)


@pytest.mark.parametrize("text", [
    "<loc0123> cat", "<loc0123><loc0456><loc0789><loc1023> cat", "<loc0000><loc1023><seg000><seg127> a ; b",
    "Hello World", "  two  spaces\tand a tab\nand a newline", "Ünïcödé 東京 {\"json\": [1, 2]}",
])
def test_decode_round_trips_without_normalisation(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_no_lowercasing(tok):
  assert tok.encode("Hello World") != tok.encode("hello world")


def test_control_piece_names_in_text_are_plain_text(tok):
  # User text cannot inject an eos or bos by spelling it.
  ids = tok.encode("<eos><bos><pad>")
  assert not {0, 1, 2} & set(ids)
  assert tok.decode(ids) == "<eos><bos><pad>"


def test_decode_stops_at_eos_and_drops_pad(tok):
  a, b = tok.encode("a cat"), tok.encode("dog")
  assert tok.decode(a + [tok.eos_id] + b + [0, 0]) == "a cat"
  assert tok.decode(np.array(a + [0, 0, 0])) == "a cat"
  assert tok.decode(a + [tok.eos_id] + b, stop_at_eos=False) == "a catdog"
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode(a + [tok.vocab_size])


def test_decode_keeps_loc_pieces_even_when_typed_control(model_path, tmp_path):
  # A converted tokenizer may mark loc/seg as CONTROL, which sp.decode drops; decode must not.
  plain = make_sentencepiece(_sentences(), tmp_path / "plain.model", BASE, add_loc_seg=False).read_bytes()
  control = tokenizer._append_pieces(plain, tokenizer.LOC_PIECES + tokenizer.SEG_PIECES, piece_type=3)
  (tmp_path / "control.model").write_bytes(control)
  tok = Tokenizer(tmp_path / "control.model")
  assert tok.sp.decode([BASE + 123]) == ""  # the behaviour being worked around
  ids = [BASE + 123, BASE + 456] + tok.encode(" cat") + [BASE + 1024 + 5]
  assert tok.decode(ids) == "<loc0123><loc0456> cat<seg005>"


def test_encode_example_training_layout(tok):
  p, s, nl = tok.encode("caption en"), tok.encode("a cat"), tok.encode("\n")
  n_prompt, n_answer, max_len = 1 + len(p) + len(nl), len(s) + 1, 24
  pad = max_len - n_prompt - n_answer
  ex = tok.encode_example("caption en", "a cat", max_len=max_len)
  np.testing.assert_array_equal(ex["text"], [2] + p + nl + s + [1] + [0] * pad)
  np.testing.assert_array_equal(ex["mask_ar"], [0] * n_prompt + [1] * n_answer + [1] * pad)
  np.testing.assert_array_equal(ex["mask_loss"], [0] * n_prompt + [1] * n_answer + [0] * pad)
  np.testing.assert_array_equal(ex["mask_input"], [1] * (n_prompt + n_answer) + [0] * pad)
  assert ex["num_truncated"] == 0
  assert all(ex[k].dtype == np.int32 and ex[k].shape == (max_len,)
             for k in ("text", "mask_ar", "mask_loss", "mask_input"))


def test_encode_example_loc_suffix(tok):
  ex = tok.encode_example("detect cat", "<loc0001><loc0002><loc1000><loc1023> cat", max_len=32)
  p, nl = tok.encode("detect cat"), tok.encode("\n")
  answer = [BASE + 1, BASE + 2, BASE + 1000, BASE + 1023] + tok.encode(" cat") + [1]
  np.testing.assert_array_equal(ex["text"][:1 + len(p) + len(nl) + len(answer)], [2] + p + nl + answer)


def test_encode_example_decode_prompt(tok):
  p, nl = tok.encode("answer en what is red?"), tok.encode("\n")
  n, max_len = 1 + len(p) + len(nl), 20
  ex = tok.encode_example("answer en what is red?", max_len=max_len)
  np.testing.assert_array_equal(ex["text"], [2] + p + nl + [0] * (max_len - n))
  np.testing.assert_array_equal(ex["mask_ar"], [0] * n + [1] * (max_len - n))
  np.testing.assert_array_equal(ex["mask_loss"], [0] * max_len)
  np.testing.assert_array_equal(ex["mask_input"], [1] * n + [0] * (max_len - n))


def test_trailing_newline_on_prefix_is_the_separator(tok):
  a = tok.encode_example("x", "y", max_len=12)
  b = tok.encode_example("x\n", "y", max_len=12)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  # Only one "\n" is taken: a second one is the user's text.
  c = tok.encode_example("x\n\n", max_len=12)
  np.testing.assert_array_equal(c["text"][:c["mask_input"].sum()], [2] + tok.encode("x\n") + tok.encode("\n"))


def test_over_long_suffix_raises_or_keeps_eos(tok):
  p, s, nl = tok.encode("caption en"), tok.encode("a big red cat sits on the mat"), tok.encode("\n")
  need = 1 + len(p) + len(nl) + len(s) + 1
  exact = tok.encode_example("caption en", "a big red cat sits on the mat", max_len=need)
  assert exact["text"][-1] == 1 and exact["mask_input"].all() and exact["num_truncated"] == 0
  with pytest.raises(ValueError, match=f"needs {need} tokens.*max_len is {need - 3}"):
    tok.encode_example("caption en", "a big red cat sits on the mat", max_len=need - 3)
  ex = tok.encode_example("caption en", "a big red cat sits on the mat", max_len=need - 3, truncate="keep_eos")
  np.testing.assert_array_equal(ex["text"], [2] + p + nl + s[:len(s) - 3] + [1])
  np.testing.assert_array_equal(ex["mask_loss"], [0] * (1 + len(p) + len(nl)) + [1] * (len(s) - 2))
  assert ex["num_truncated"] == 3
  # Room for the eos alone: every suffix token goes, the eos stays.
  ex = tok.encode_example("caption en", "a big red cat", max_len=2 + len(p) + len(nl), truncate="keep_eos")
  assert ex["text"][-1] == 1 and ex["mask_loss"].sum() == 1 and ex["num_truncated"] == len(tok.encode("a big red cat"))


def test_over_long_prefix_always_raises(tok):
  n = 1 + len(tok.encode("caption en")) + len(tok.encode("\n"))
  tok.encode_example("caption en", max_len=n)  # a prompt alone fits exactly
  for truncate in ("error", "keep_eos"):
    with pytest.raises(ValueError, match=f"needs {n + 1} tokens but max_len is {n}"):
      tok.encode_example("caption en", "a cat", max_len=n, truncate=truncate)
  with pytest.raises(ValueError, match=f"needs {n} tokens but max_len is {n - 1}"):
    tok.encode_example("caption en", max_len=n - 1)
  with pytest.raises(ValueError, match="truncate"):
    tok.encode_example("caption en", "a cat", max_len=64, truncate="drop")


def test_example_len_counts_the_layout(tok):
  p, s = tok.encode("caption en"), tok.encode("a big red cat")
  assert tok.example_len("caption en") == 1 + len(p) + 1  # [bos] prefix "\n"
  assert tok.example_len("caption en\n") == 1 + len(p) + 1  # the trailing "\n" is the separator
  assert tok.example_len("caption en", "a big red cat") == 1 + len(p) + 1 + len(s) + 1  # suffix [eos]
  assert tok.example_len("caption en", "") == 1 + len(p) + 1 + 1  # the eos alone
  for prefix, suffix in [("caption en", None), ("x\n\n", "y"), ("answer en what?", "two")]:
    n = tok.example_len(prefix, suffix)
    assert tok.encode_example(prefix, suffix, max_len=n)["mask_input"].sum() == n  # fits exactly
  with pytest.raises(TypeError, match="prefix and suffix must be str"):
    tok.example_len("caption en", 3)


def test_missing_or_bad_model_file(tmp_path):
  missing = tmp_path / "nope.model"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    Tokenizer(missing)
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a sentencepiece model")
  with pytest.raises(ValueError, match=str(bad)):
    Tokenizer(bad)


def test_plain_gemma_style_model_needs_loc_seg(tmp_path):
  path = make_sentencepiece(_sentences(), tmp_path / "plain.model", BASE, add_loc_seg=False)
  with pytest.raises(ValueError, match="<loc0000>"):
    Tokenizer(path)
  tok = Tokenizer(path, add_loc_seg=True)
  assert tok.encode("<loc0007><seg007>") == [BASE + 7, BASE + 1024 + 7]


@pytest.mark.parametrize("model_type,vocab_size", [("bpe", BASE), ("unigram", 320)])
def test_make_sentencepiece_is_deterministic(tmp_path, model_type, vocab_size):
  a = make_sentencepiece(_sentences(), tmp_path / "a.model", vocab_size, model_type=model_type).read_bytes()
  b = make_sentencepiece(_sentences(), tmp_path / "b.model", vocab_size, model_type=model_type).read_bytes()
  assert a == b
  assert Tokenizer(tmp_path / "a.model").loc_id(5) == vocab_size + 5
