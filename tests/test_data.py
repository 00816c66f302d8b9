"""Examples and batches: encode, seeded resumable multi-host batches, eval padding, stats, augmentation."""

import re
import threading
import time

import numpy as np
import pytest

from data_fixtures import GOOD, MAX_LEN, SIZE, _same, _take, _write, folder, tok  # noqa: F401 (fixtures)
from pgjax import data
from pgjax.data import Augment, encode, eval_batches, stats, train_batches
from pgjax.images import ImageError, load_image
from pgjax.sources import read_jsonl


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
