"""Data pipeline: JSONL and `datasets` sources, bad rows, encode, seeded resumable batches, eval padding."""

import io
import json
import random
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pgjax import data
from pgjax.data import Augment, ImageError, encode, eval_batches, load_image, read_jsonl, stats, train_batches
from pgjax.tokenizer import Tokenizer, make_sentencepiece

SIZE, MAX_LEN = 8, 24
WORDS = "the a cat dog sits on mat runs in park red blue big small bird caption en answer detect left".split()


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
  rng = random.Random(0)
  texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) for _ in range(200)]
  return Tokenizer(make_sentencepiece(texts, tmp_path_factory.mktemp("tok") / "tiny.model", 300))


def _image(path, seed, shape=(12, 10, 3)):
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, np.uint8)).save(path)
  return path


def _write(path, lines):
  """Each line a dict (dumped as JSON) or a str/bytes written as is."""
  with open(path, "wb") as f:
    for line in lines:
      line = json.dumps(line) if isinstance(line, dict) else line
      f.write((line.encode() if isinstance(line, str) else line) + b"\n")
  return path


def _rows(n):
  return [dict(image=f"images/{i}.{'jpg' if i % 3 == 0 else 'png'}", prefix="caption en",
               suffix=" ".join(WORDS[(i + k) % len(WORDS)] for k in range(i % 4 + 1))) for i in range(n)]


@pytest.fixture
def folder(tmp_path):
  (tmp_path / "images").mkdir()
  for i, row in enumerate(_rows(7)):
    _image(tmp_path / row["image"], i)
  _write(tmp_path / "train.jsonl", _rows(7))
  return tmp_path


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _take(batches, n=None):
  with batches:
    return [b for _, b in zip(range(n) if n else iter(int, 1), batches)]


# ------------------------------------------------------------------------------------------ sources


def test_read_jsonl_rows(folder):
  _write(folder / "v.jsonl", [dict(image="images/1.png", prefix="answer en what", answers=["a", "b"]), "",
                              dict(image="images/2.png", prefix="caption en", suffix=None, id=7)])
  rows = read_jsonl(folder / "v.jsonl")
  assert isinstance(rows, list) and isinstance(rows, data.Rows) and rows.skipped == []
  assert rows[0] == dict(image=str(folder / "images/1.png"), prefix="answer en what", answers=["a", "b"],
                         _source=f"{folder / 'v.jsonl'}:1")
  assert rows[1] == dict(image=str(folder / "images/2.png"), prefix="caption en", id=7,
                         _source=f"{folder / 'v.jsonl'}:3")  # blank line 2 ignored; null suffix = none


def test_image_dir(folder, tmp_path_factory):
  elsewhere = tmp_path_factory.mktemp("meta")
  _write(elsewhere / "a.jsonl", [dict(image="0.jpg", prefix="caption en", suffix="x"),
                                 dict(image=str(folder / "images/1.png"), prefix="caption en", suffix="y")])
  with pytest.raises(ValueError, match=r"a\.jsonl:1: image file not found: .*meta.*0\.jpg"):
    read_jsonl(elsewhere / "a.jsonl")  # relative to the JSONL's own folder by default
  rows = read_jsonl(elsewhere / "a.jsonl", image_dir=folder / "images")
  assert [r["image"] for r in rows] == [str(folder / "images/0.jpg"), str(folder / "images/1.png")]


GOOD = dict(image="images/1.png", prefix="caption en", suffix="a cat")
BAD_ROWS = {
    "bad json": ('{"image": "images/1.png", "prefix": ', r"malformed JSON"),
    "not utf-8": (b'{"image": "images/1.png", "prefix": "\xff"}', r"not UTF-8"),
    "non-object": ("[1, 2]", r"expected a JSON object, got a list"),
    "missing image": (dict(prefix="caption en", suffix="x"), r'missing or empty "image"'),
    "empty image": (dict(image="", prefix="caption en"), r'missing or empty "image"'),
    "image not str": (dict(image=5, prefix="caption en"), r'"image" must be a path string, got a number'),
    "two images": (dict(image=["images/1.png", "images/2.png"], prefix="x"), r"2 images; one image per example"),
    "missing prefix": (dict(image="images/1.png", suffix="x"), r'missing or empty "prefix"'),
    "empty prefix": (dict(image="images/1.png", prefix="", suffix="x"), r'missing or empty "prefix"'),
    "prefix not str": (dict(image="images/1.png", prefix=["caption"]), r'"prefix" must be a string, got a list'),
    "suffix not str": (dict(image="images/1.png", prefix="caption en", suffix=3), r'"suffix" must be a string'),
    "missing file": (dict(image="images/nope.png", prefix="caption en"), r"image file not found: .*nope\.png"),
    "corrupt image": (dict(image="images/junk.png", prefix="caption en"), r"junk\.png: cannot decode image"),
    # Valid JSON escapes of half a UTF-16 pair: a str that cannot become UTF-8 (sentencepiece crashed on it).
    "lone surrogate prefix": (r'{"image": "images/1.png", "prefix": "\ud83d", "suffix": "a"}',
                              r'"prefix" is not valid Unicode: lone surrogate \\ud83d at character 0'),
    "lone surrogate suffix": (r'{"image": "images/1.png", "prefix": "caption en", "suffix": "ab\ude00"}',
                              r'"suffix" is not valid Unicode: lone surrogate \\ude00 at character 2'),
    "lone surrogate answer": (r'{"image": "images/1.png", "prefix": "answer en", "answers": ["x", "\udfff"]}',
                              r'"answers"\[1\] is not valid Unicode: lone surrogate \\udfff at character 0'),
    "lone surrogate other field": (r'{"image": "images/1.png", "prefix": "x", "suffix": "y", "meta": {"id": "\ud800"}}',
                                   r'"meta"\."id" is not valid Unicode'),
    "answers object": (dict(image="images/1.png", prefix="answer en what", answers={"yes": 3}),
                       r'"answers" must be a list of strings, got an object'),
    "answers string": (dict(image="images/1.png", prefix="answer en what", suffix="yes", answers="yes"),
                       r'"answers" must be a list of strings, got a string'),
    "answer not str": (dict(image="images/1.png", prefix="answer en what", answers=["yes", 2]),
                       r'"answers"\[1\] must be a string, got a number'),
    "references object": (dict(image="images/1.png", prefix="caption en", references={"a": "cat"}),
                          r'"references" must be a list of strings, got an object'),
}


@pytest.mark.parametrize("kind", BAD_ROWS)
def test_bad_rows(folder, kind):
  line, problem = BAD_ROWS[kind]
  (folder / "images/junk.png").write_bytes(b"this is not a png")
  path = _write(folder / "bad.jsonl", [GOOD, GOOD, line, GOOD])
  with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + ".*" + problem):
    read_jsonl(path)
  rows = read_jsonl(path, skip_bad=True)
  assert [r["_source"] for r in rows] == [f"{path}:{n}" for n in (1, 2, 4)]
  assert len(rows.skipped) == 1 and rows.skipped[0][0] == f"{path}:3"
  assert re.search(problem, rows.skipped[0][1])


def test_surrogate_pairs_and_target_lists_accepted(folder):
  """A surrogate *pair* escape is one valid character; null/empty targets mean "none", as evaluate reads them."""
  pair = r'{"image": "images/1.png", "prefix": "caption \ud83d\ude00", "suffix": "\u00e9"}'
  path = _write(folder / "ok.jsonl", [pair,
                                      dict(image="images/1.png", prefix="answer en", suffix="a", answers=None),
                                      dict(image="images/1.png", prefix="answer en", answers=[]),
                                      dict(image="images/1.png", prefix="caption en", references=["a cat", "the cat"])])
  rows = read_jsonl(path)
  assert rows[0]["prefix"] == "caption \U0001F600" and rows[0]["suffix"] == "\u00e9"
  assert rows[1]["answers"] is None and rows[2]["answers"] == [] and rows[3]["references"] == ["a cat", "the cat"]


def test_all_problems_reported_in_line_order(folder):
  (folder / "images/junk.png").write_bytes(b"junk")
  path = _write(folder / "bad.jsonl", [GOOD, dict(image="images/junk.png", prefix="x"), "{", GOOD])
  with pytest.raises(ValueError, match=re.escape(f"{path}:2: ") + r".*junk\.png.*\(and 1 more bad rows"):
    read_jsonl(path)
  rows = read_jsonl(path, skip_bad=True)
  assert len(rows) == 2 and [s for s, _ in rows.skipped] == [f"{path}:2", f"{path}:3"]


def test_truncated_jpeg_needs_full_validation(folder):
  noise = np.random.default_rng(4).integers(0, 256, (32, 32, 3), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(noise).save(buf, "JPEG", quality=90)
  (folder / "images/cut.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
  path = _write(folder / "t.jsonl", [GOOD, dict(image="images/cut.jpg", prefix="x", suffix="y")])
  assert len(read_jsonl(path)) == 2  # the header is fine: this is only found by decoding
  with pytest.raises(ValueError, match=re.escape(f"{path}:2: ") + r".*cut\.jpg.*truncated"):
    read_jsonl(path, validate_images="full")
  assert read_jsonl(path, validate_images="full", skip_bad=True).skipped[0][0] == f"{path}:2"
  with pytest.raises(ValueError, match="validate_images"):
    read_jsonl(path, validate_images="yes")


def _hf(folder, image_kind):
  datasets = pytest.importorskip("datasets")
  rows = _rows(7)
  paths = [str(folder / r["image"]) for r in rows]
  if image_kind == "paths":  # a plain string column, relative to image_dir
    images, feature = [r["image"] for r in rows], datasets.Value("string")
  elif image_kind == "Image(path)":
    images, feature = paths, datasets.Image()
  else:  # the encoded file bytes, as a dataset pushed to the hub stores them
    images, feature = [{"bytes": Path(p).read_bytes(), "path": None} for p in paths], datasets.Image()
  cols = dict(image=images, prefix=[r["prefix"] for r in rows], suffix=[r["suffix"] for r in rows])
  features = datasets.Features(image=feature, prefix=datasets.Value("string"), suffix=datasets.Value("string"))
  return datasets.Dataset.from_dict(cols, features=features)


@pytest.mark.parametrize("image_kind", ["paths", "Image(path)", "Image(bytes)"])
def test_hf_dataset_gives_identical_batches(folder, tok, image_kind):
  ds = _hf(folder, image_kind)
  hf_rows = data.from_hf_dataset(ds, image_dir=folder, name="train")
  assert [r["_source"] for r in hf_rows] == [f"train[{i}]" for i in range(7)]
  jsonl_rows = read_jsonl(folder / "train.jsonl")
  kw = dict(batch_size=3, size=SIZE, max_len=MAX_LEN, process_index=0, process_count=1)
  for a, b in zip(_take(train_batches(jsonl_rows, tok, seed=3, **kw), 4),
                  _take(train_batches(hf_rows, tok, seed=3, **kw), 4)):
    _same(a, b)
  for a, b in zip(_take(eval_batches(jsonl_rows, tok, **kw)), _take(eval_batches(hf_rows, tok, **kw))):
    _same(a, b)


def test_hf_bad_rows(folder):
  datasets = pytest.importorskip("datasets")
  ds = datasets.Dataset.from_dict(dict(image=["images/1.png", "images/nope.png", "images/2.png"],
                                       prefix=["caption en", "caption en", ""], suffix=["a", "b", "c"]))
  with pytest.raises(ValueError, match=r"^dataset\[1\]: image file not found.*\(and 1 more"):
    data.from_hf_dataset(ds, image_dir=folder)
  rows = data.from_hf_dataset(ds, image_dir=folder, skip_bad=True)
  assert len(rows) == 1 and [s for s, _ in rows.skipped] == ["dataset[1]", "dataset[2]"]
  assert 'missing or empty "prefix"' in rows.skipped[1][1]


# ----------------------------------------------------------------------------------------- examples


def test_encode_layouts(folder, tok):
  row = read_jsonl(folder / "train.jsonl")[1]
  ex = encode(row, tok, size=SIZE, max_len=MAX_LEN)
  want = tok.encode_example(row["prefix"], row["suffix"], max_len=MAX_LEN)
  for k in ("text", "mask_ar", "mask_loss", "mask_input"):
    np.testing.assert_array_equal(ex[k], want[k])
  assert ex["image"].dtype == np.float32 and ex["image"].shape == (SIZE, SIZE, 3)
  np.testing.assert_array_equal(ex["image"], load_image(row["image"], SIZE))  # exactly, no augmentation
  prompt = encode(row, tok, size=SIZE, max_len=MAX_LEN, layout="prompt")
  np.testing.assert_array_equal(prompt["text"], tok.encode_example(row["prefix"], max_len=MAX_LEN)["text"])
  assert prompt["mask_loss"].sum() == 0
  no_suffix = {k: v for k, v in row.items() if k != "suffix"}
  np.testing.assert_array_equal(encode(no_suffix, tok, size=SIZE, max_len=MAX_LEN)["text"], prompt["text"])
  with pytest.raises(ValueError, match=re.escape(row["_source"]) + r': a training example needs a "suffix"'):
    encode(no_suffix, tok, size=SIZE, max_len=MAX_LEN, layout="train")
  # An empty suffix still has one supervised token: the eos.
  ex = encode(dict(row, suffix=""), tok, size=SIZE, max_len=MAX_LEN)
  assert ex["mask_loss"].sum() == 1 and ex["text"][ex["mask_loss"] == 1][0] == tok.eos_id


def test_training_rows_need_a_suffix(folder, tok):
  rows = read_jsonl(folder / "train.jsonl")
  del rows[4]["suffix"]
  with pytest.raises(ValueError, match=r'1 training row\(s\) have no "suffix".*train\.jsonl:5'):
    train_batches(rows, tok, batch_size=2, size=SIZE, max_len=MAX_LEN, seed=0, process_index=0, process_count=1)


# ------------------------------------------------------------------------------------------ batches


def _epochs(n, seed, count):
  return np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in range(count)])


def test_order_determinism_and_resumption(folder, tok):
  rows = read_jsonl(folder / "train.jsonl")
  kw = dict(batch_size=3, size=SIZE, max_len=MAX_LEN, seed=5, process_index=0, process_count=1)
  full, infos = [], []
  with train_batches(rows, tok, **kw) as it:
    for _ in range(9):  # 27 examples: nearly four epochs of 7, batches straddling epoch boundaries
      full.append(next(it))
      infos.append(it.info)
  order = np.concatenate([i["indices"] for i in infos])
  np.testing.assert_array_equal(order, _epochs(7, 5, 4)[:27])
  for e in range(3):
    assert sorted(order[7 * e:7 * (e + 1)]) == list(range(7))  # each epoch: every example once
  assert infos[2]["sources"] == [rows[i]["_source"] for i in order[6:9]]
  for s, b in enumerate(full):  # each batch really holds its rows
    for j, i in enumerate(order[3 * s:3 * s + 3]):
      np.testing.assert_array_equal(b["image"][j], load_image(rows[i]["image"], SIZE))
      np.testing.assert_array_equal(b["text"][j], tok.encode_example(rows[i]["prefix"], rows[i]["suffix"],
                                                                      max_len=MAX_LEN)["text"])
  again = _take(train_batches(rows, tok, **kw), 9)
  for a, b in zip(full, again):
    _same(a, b)
  for k in (1, 2, 5):  # step 2 starts mid-epoch (example 6), 5 crosses into epoch 2
    tail = _take(train_batches(rows, tok, start_step=k, **kw), 9 - k)
    assert len(tail) == 9 - k
    for a, b in zip(full[k:], tail):
      _same(a, b)
  assert len(_take(train_batches(rows, tok, num_steps=4, **kw))) == 4
  other = _take(train_batches(rows, tok, **dict(kw, seed=6)), 3)
  assert any(not np.array_equal(a["text"], b["text"]) for a, b in zip(full, other))


@pytest.mark.parametrize("hosts", [2, 3])
def test_multi_host_shares_make_the_global_batch(folder, tok, hosts):
  rows = read_jsonl(folder / "train.jsonl")
  kw = dict(batch_size=6, size=SIZE, max_len=MAX_LEN, seed=1, start_step=1,
            augment=Augment(crop_scale=(0.5, 1.0), flip=True, brightness=0.1))
  one = _take(train_batches(rows, tok, process_index=0, process_count=1, **kw), 3)
  shares = [_take(train_batches(rows, tok, process_index=p, process_count=hosts, **kw), 3) for p in range(hosts)]
  for s in range(3):
    assert shares[0][s]["image"].shape[0] == 6 // hosts
    _same(one[s], {k: np.concatenate([sh[s][k] for sh in shares]) for k in one[s]})
  with pytest.raises(ValueError, match="multiple of process_count=4"):
    train_batches(rows, tok, process_index=0, process_count=4, **kw)


def test_default_process_is_jax(folder, tok):
  rows = read_jsonl(folder / "train.jsonl")
  b = _take(train_batches(rows, tok, batch_size=2, size=SIZE, max_len=MAX_LEN, seed=0), 1)[0]
  assert b["text"].shape == (2, MAX_LEN)  # one process here


def test_eval_batches_cover_every_row_once(folder, tok):
  rows = read_jsonl(folder / "train.jsonl")
  batches = _take(eval_batches(rows, tok, batch_size=3, size=SIZE, max_len=MAX_LEN, process_index=0, process_count=1))
  assert len(batches) == 3 and all(b["text"].shape == (3, MAX_LEN) for b in batches)
  index = np.concatenate([b["index"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  np.testing.assert_array_equal(index, [0, 1, 2, 3, 4, 5, 6, -1, -1])
  np.testing.assert_array_equal(valid, index >= 0)
  last = batches[-1]
  for k in data.BATCH_KEYS:  # padding repeats the last row
    np.testing.assert_array_equal(last[k][1], last[k][0])
    np.testing.assert_array_equal(last[k][2], last[k][0])
  for b in batches:
    assert b["mask_loss"].sum() == 0  # prompts only
    for j, i in enumerate(b["index"]):
      if i >= 0:
        np.testing.assert_array_equal(b["text"][j], tok.encode_example(rows[i]["prefix"], max_len=MAX_LEN)["text"])
  shares = [_take(eval_batches(rows, tok, batch_size=4, size=SIZE, max_len=MAX_LEN, process_index=p, process_count=2))
            for p in range(2)]
  index = np.concatenate([np.concatenate([shares[0][s]["index"], shares[1][s]["index"]]) for s in range(2)])
  np.testing.assert_array_equal(index, [0, 1, 2, 3, 4, 5, 6, -1])
  assert _take(eval_batches([], tok, batch_size=4, size=SIZE, max_len=MAX_LEN, process_index=0, process_count=1)) == []


def _pipeline_threads():
  return {t for t in threading.enumerate() if t.name.startswith("pgjax-data")}


def test_worker_error_surfaces_and_threads_end(folder, tok):
  rows = read_jsonl(folder / "train.jsonl")
  before = _pipeline_threads()
  order = _epochs(7, 0, 1)
  (folder / "images/4.png").write_bytes(b"broken after the check")  # example order.index(4) fails
  step = list(order).index(4) // 2
  it = train_batches(rows, tok, batch_size=2, size=SIZE, max_len=MAX_LEN, seed=0, process_index=0,
                     process_count=1, workers=3)
  for _ in range(step):
    next(it)
  with pytest.raises(ImageError, match=r"images/4\.png: cannot decode image.*train\.jsonl:5"):
    next(it)
  with pytest.raises(StopIteration):  # closed by the error
    next(it)
  deadline = time.time() + 5
  while _pipeline_threads() - before and time.time() < deadline:
    time.sleep(0.01)
  assert not _pipeline_threads() - before
  # The same error without threads (workers=0 decodes in the caller's thread).
  with pytest.raises(ImageError, match=r"4\.png"):
    _take(train_batches(rows, tok, batch_size=2, size=SIZE, max_len=MAX_LEN, seed=0, process_index=0,
                        process_count=1, workers=0), step + 1)


def test_close_stops_an_infinite_iterator(folder, tok):
  before = _pipeline_threads()
  it = train_batches(read_jsonl(folder / "train.jsonl"), tok, batch_size=2, size=SIZE, max_len=MAX_LEN, seed=0,
                     process_index=0, process_count=1, workers=2)
  next(it)
  it.close()
  assert list(it) == []
  deadline = time.time() + 5
  while _pipeline_threads() - before and time.time() < deadline:
    time.sleep(0.01)
  assert not _pipeline_threads() - before


def test_truncation_is_counted(folder, tok):
  long = dict(image="images/1.png", prefix="caption en", suffix=" ".join(["big red cat"] * 10))
  rows = read_jsonl(_write(folder / "long.jsonl", [GOOD, long]))
  kw = dict(batch_size=2, size=SIZE, max_len=MAX_LEN, seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"1 of 2 training examples need more than max_len=24.*long\.jsonl:2"):
    train_batches(rows, tok, **kw)
  need = int(encode(rows[1], tok, size=SIZE, max_len=200)["mask_input"].sum())
  with pytest.warns(UserWarning, match=f"drops {need - MAX_LEN} suffix tokens per epoch"):
    it = train_batches(rows, tok, truncate="keep_eos", **kw)
  with it:
    b = next(it)
    next(it)
  assert it.stats == dict(examples=4, truncated_examples=2, truncated_tokens=2 * (need - MAX_LEN), augment_limited=0)
  j = it.info["indices"].index(1)
  assert b["text"][j, -1] == tok.eos_id and b["mask_loss"][j, -1] == 1  # the eos survives
  with pytest.raises(ValueError, match=r"long\.jsonl:2: example needs"):
    encode(rows[1], tok, size=SIZE, max_len=MAX_LEN)


def test_stats(folder, tok):
  rows = read_jsonl(folder / "train.jsonl")
  rows[0]["suffix"] = ""
  rows[1]["prefix"] = "caption en\n"  # the trailing newline is dropped, as encode_example does
  lengths = [int(encode(r, tok, size=SIZE, max_len=64)["mask_input"].sum()) for r in rows]
  limit = sorted(lengths)[-3]
  s = stats(rows, tok, limit)
  assert (s["count"], s["max"], s["empty_suffix"]) == (7, max(lengths), 1)
  assert s["over_max_len"] == sum(n > limit for n in lengths)
  assert s["over_tokens"] == sum(n - limit for n in lengths if n > limit)
  assert s["over_sources"] == [r["_source"] for r, n in zip(rows, lengths) if n > limit]
  assert sum(c for _, _, c in s["histogram"]) == 7
  for lo, hi, c in s["histogram"]:
    assert c == sum(lo <= n <= hi for n in lengths)
  prompt = stats(rows, tok, limit, layout="prompt")
  assert prompt["max"] == max(int(encode(r, tok, size=SIZE, max_len=64, layout="prompt")["mask_input"].sum())
                              for r in rows)
  assert "7 examples" in data.format_stats(s)


# ------------------------------------------------------------------------------------- augmentation


def test_augmentation_is_seeded_and_resumable(folder, tok):
  rows = read_jsonl(folder / "train.jsonl")
  aug = Augment(crop_scale=(0.4, 0.9), flip=True, brightness=0.2, contrast=0.3)
  kw = dict(batch_size=3, size=SIZE, max_len=MAX_LEN, seed=2, process_index=0, process_count=1)
  a = _take(train_batches(rows, tok, augment=aug, **kw), 4)
  b = _take(train_batches(rows, tok, augment=aug, **kw), 4)
  tail = _take(train_batches(rows, tok, augment=aug, start_step=2, **kw), 2)
  plain = _take(train_batches(rows, tok, **kw), 4)
  for x, y in zip(a, b):
    _same(x, y)
  for x, y in zip(a[2:], tail):
    _same(x, y)
  for x, y in zip(a, plain):
    np.testing.assert_array_equal(x["text"], y["text"])
    assert not np.array_equal(x["image"], y["image"])
    assert x["image"].dtype == np.float32 and x["image"].min() >= -1 and x["image"].max() <= 1


def test_flip_and_crop_are_withheld_for_boxes_and_sides(folder, tok):
  rows = read_jsonl(_write(folder / "loc.jsonl", [
      dict(image="images/1.png", prefix="detect cat", suffix="<loc0100><loc0200><loc0300><loc0400> cat"),
      dict(image="images/2.png", prefix="answer en where", suffix="on the left"),
      dict(image="images/4.png", prefix="caption en", suffix="a cat")]))
  flips = {0: set(), 1: set(), 2: set()}
  for step in range(12):
    for i, row in enumerate(rows):
      ex = encode(row, tok, size=SIZE, max_len=64, augment=Augment(flip=True),
                  rng=np.random.default_rng([0, step, i]))
      plain = load_image(row["image"], SIZE)
      flips[i].add(bool(np.array_equal(ex["image"], plain[:, ::-1])))
      assert np.array_equal(ex["image"], plain) or np.array_equal(ex["image"], plain[:, ::-1])
      assert ex["augment_limited"] == (i < 2)
  assert flips == {0: {False}, 1: {False}, 2: {False, True}}
  crop = Augment(crop_scale=(0.3, 0.5))
  ex = encode(rows[0], tok, size=SIZE, max_len=64, augment=crop, rng=np.random.default_rng(0))
  np.testing.assert_array_equal(ex["image"], load_image(rows[0]["image"], SIZE))  # no crop with boxes
  ex = encode(rows[1], tok, size=SIZE, max_len=64, augment=crop, rng=np.random.default_rng(0))
  assert not ex["augment_limited"] and not np.array_equal(ex["image"], load_image(rows[1]["image"], SIZE))
  with pytest.raises(ValueError, match="crop_scale"):
    Augment(crop_scale=(0.5, 1.5))


def test_byte_order_mark_and_empty_file(folder):
  path = folder / "bom.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
  assert read_jsonl(path)[0]["prefix"] == "caption en"
  (folder / "empty.jsonl").write_bytes(b"\n")
  with pytest.warns(UserWarning, match="no rows"):
    assert read_jsonl(folder / "empty.jsonl") == []


def test_image_of_every_kind(folder):
  path = folder / "images/0.jpg"
  want = load_image(path, SIZE)
  np.testing.assert_array_equal(data.image_of(str(path), SIZE), want)
  np.testing.assert_array_equal(data.image_of(path.read_bytes(), SIZE), want)
  with Image.open(path) as im:
    np.testing.assert_array_equal(data.image_of(im, SIZE), data.preprocess_image(im, SIZE))
  with pytest.raises(ImageError, match=r"row 3: cannot decode"):
    data.image_of(b"junk", SIZE, name="row 3")
  with pytest.raises(ImageError, match="unsupported image value of type int"):
    data.image_of(5, SIZE)
