"""Row sources: JSONL and `datasets`, bad rows reported by file and line, image validation."""

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_fixtures import GOOD, MAX_LEN, SIZE, _rows, _same, _take, _write, folder, tok  # noqa: F401 (fixtures)
from pgjax import sources
from pgjax.data import eval_batches, train_batches
from pgjax.sources import read_jsonl


def test_read_jsonl_rows(folder):
  _write(folder / "v.jsonl", [dict(image="images/1.png", prefix="answer en what", answers=["a", "b"]), "",
                              dict(image="images/2.png", prefix="caption en", suffix=None, id=7)])
  rows = read_jsonl(folder / "v.jsonl")
  assert isinstance(rows, list) and isinstance(rows, sources.Rows) and rows.skipped == []
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
  hf_rows = sources.from_hf_dataset(ds, image_dir=folder, name="train")
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
    sources.from_hf_dataset(ds, image_dir=folder)
  rows = sources.from_hf_dataset(ds, image_dir=folder, skip_bad=True)
  assert len(rows) == 1 and [s for s, _ in rows.skipped] == ["dataset[1]", "dataset[2]"]
  assert 'missing or empty "prefix"' in rows.skipped[1][1]


def test_byte_order_mark_and_empty_file(folder):
  path = folder / "bom.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
  assert read_jsonl(path)[0]["prefix"] == "caption en"
  (folder / "empty.jsonl").write_bytes(b"\n")
  with pytest.warns(UserWarning, match="no rows"):
    assert read_jsonl(folder / "empty.jsonl") == []


def test_json_too_deep_or_numbers_too_long_are_bad_rows_at_their_line(folder):
  good = json.dumps(dict(image="images/1.png", prefix="caption en", suffix="x"))
  deep = '{"image": "images/1.png", "prefix": "caption en", "suffix": "x", "n": ' + "[" * 100_000 + "]" * 100_000 + "}"
  long = '{"image": "images/1.png", "prefix": "caption en", "suffix": "x", "n": ' + "9" * 5000 + "}"
  (folder / "odd.jsonl").write_text("\n".join([good, deep, long]) + "\n")
  rows = read_jsonl(folder / "odd.jsonl", skip_bad=True)
  assert len(rows) == 1
  assert rows.skipped == [(f"{folder / 'odd.jsonl'}:2", "JSON nested too deeply to read"),
                          (f"{folder / 'odd.jsonl'}:3", rows.skipped[1][1])]
  assert rows.skipped[1][1].startswith("unreadable JSON value (Exceeds the limit")
  with pytest.raises(ValueError, match=r"odd\.jsonl:2: JSON nested too deeply"):
    read_jsonl(folder / "odd.jsonl")
