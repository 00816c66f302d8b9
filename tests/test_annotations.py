"""Rows that give masks or pixel boxes instead of a suffix: the text built for them (loc bins by hand), the
codes' cache, the bad-input errors naming file:line, and the shipped demo VAE's reconstruction."""

import json
import os

import numpy as np
import PIL.Image
import pytest

from pgjax import annotations, demo, segmentation, sources

VAE = demo.VAE


def write_row_files(tmp_path, rows, size=(40, 30), masks=None):
  """An RGB image of `size` (width, height), mask PNGs from `masks` (name -> bool array), and a JSONL."""
  PIL.Image.new("RGB", size, (200, 30, 30)).save(tmp_path / "im.png")
  for name, m in (masks or {}).items():
    PIL.Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / name)
  path = tmp_path / "data.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def rect(h, w, rows, cols):
  m = np.zeros((h, w), bool)
  m[rows[0]:rows[1], cols[0]:cols[1]] = True
  return m


def test_a_mask_row_gets_its_box_and_codes_as_its_suffix(tmp_path):
  m = rect(30, 40, (3, 27), (8, 32))
  path = write_row_files(tmp_path, [{"image": "im.png", "prefix": "segment box", "mask": "m.png"}],
                         masks={"m.png": m})
  (row,) = sources.read_jsonl(path)
  assert row["mask"] == [str(tmp_path / "m.png")] and "suffix" not in row
  (built,) = annotations.build_suffixes([row], vae_path=VAE, cache_dir=tmp_path / "cache")
  # The tight box (3/30, 8/40, 27/30, 32/40) = (0.1, 0.2, 0.9, 0.8): bins 102.3 -> 102, 204.6 -> 205,
  # 920.7 -> 921, 818.4 -> 818.
  assert built["suffix"].startswith("<loc0102><loc0205><loc0921><loc0818>")
  vae = segmentation.load_vae(VAE)
  assert built["suffix"] == segmentation.mask_to_text(vae, m)
  assert "suffix" not in row  # the input rows are left as they were


def test_the_codes_are_cached_by_mask_content(tmp_path, monkeypatch):
  m = rect(30, 40, (3, 27), (8, 32))
  path = write_row_files(tmp_path, [{"image": "im.png", "prefix": "segment box", "mask": "m.png"}],
                         masks={"m.png": m})
  rows = sources.read_jsonl(path)
  first = annotations.build_suffixes(rows, vae_path=VAE, cache_dir=tmp_path / "cache")
  assert len(list((tmp_path / "cache").rglob("*.json"))) == 1

  def no_encode(*a, **k):
    raise AssertionError("the VAE ran for a cached mask")

  monkeypatch.setattr(segmentation, "encode", no_encode)
  assert annotations.build_suffixes(rows, vae_path=VAE, cache_dir=tmp_path / "cache") == first
  # The same content under another name hits the same entry; a changed mask does not.
  os.replace(tmp_path / "m.png", tmp_path / "renamed.png")
  rows[0]["mask"] = [str(tmp_path / "renamed.png")]
  assert annotations.build_suffixes(rows, vae_path=VAE, cache_dir=tmp_path / "cache")[0]["suffix"] == first[0]["suffix"]
  PIL.Image.fromarray(rect(30, 40, (4, 27), (8, 32)).astype(np.uint8) * 255).save(tmp_path / "renamed.png")
  with pytest.raises(AssertionError, match="cached"):
    annotations.build_suffixes(rows, vae_path=VAE, cache_dir=tmp_path / "cache")


def test_several_objects_with_labels_and_given_pixel_boxes(tmp_path):
  a, b = rect(30, 40, (3, 27), (8, 32)), rect(30, 40, (0, 10), (0, 10))
  row = {"image": "im.png", "prefix": "segment shapes", "mask": ["a.png", "b.png"], "labels": ["big", "small"],
         "box": [[8, 3, 32, 27], [0, 0, 20, 15]]}
  path = write_row_files(tmp_path, [row], masks={"a.png": a, "b.png": b})
  (built,) = annotations.build_suffixes(sources.read_jsonl(path), vae_path=VAE, cache_dir="off")
  first, second = built["suffix"].split(" ; ")
  assert first.endswith(" big") and second.endswith(" small")
  # The second box as given, not the mask's: (0/30, 0/40, 15/30, 20/40) -> bins 0, 0, 511.5 -> 512, 512.
  assert second.startswith("<loc0000><loc0000><loc0512><loc0512>")
  objs = segmentation.parse_objects(built["suffix"])
  assert [o["valid"] for o in objs] == [True, True] and [o["label"] for o in objs] == ["big", "small"]


def test_detection_rows_get_loc_text_from_pixel_boxes(tmp_path):
  row = {"image": "im.png", "prefix": "detect cat", "boxes": [[20, 10, 120, 60]], "labels": ["cat"]}
  path = write_row_files(tmp_path, [row], size=(200, 100))
  (built,) = annotations.build_suffixes(sources.read_jsonl(path))
  # y0 = 10/100 -> 102.3 -> 102, x0 = 20/200 -> 102, y1 = 60/100 -> 613.8 -> 614, x1 = 120/200 -> 614.
  assert built["suffix"] == "<loc0102><loc0102><loc0614><loc0614> cat"


@pytest.mark.parametrize("row,match", [
    ({"mask": "gone.png"}, r"data\.jsonl:1: mask file not found: .*gone\.png"),
    ({"mask": "m.png", "suffix": "x"}, r'data\.jsonl:1: both "suffix" and "mask"'),
    ({"mask": "m.png", "box": [1, 2, 3]}, r'data\.jsonl:1: "box" must be \[x0, y0, x1, y1\]'),
    ({"mask": ["m.png", "m.png"], "labels": ["one"]}, r'"labels" must be a list of 2 strings'),
    ({"box": [0, 0, 1, 1]}, r'"box" is given without a "mask"'),
    ({"boxes": [[0, 0, 1, 1]]}, r'"boxes" needs "labels"'),
    ({"mask": 3}, r'"mask" must be a path string'),
])
def test_bad_annotation_fields_name_the_line(tmp_path, row, match):
  path = write_row_files(tmp_path, [dict({"image": "im.png", "prefix": "segment"}, **row)],
                         masks={"m.png": rect(30, 40, (3, 27), (8, 32))})
  with pytest.raises(ValueError, match=match):
    sources.read_jsonl(path)


@pytest.mark.parametrize("mask,match", [
    (rect(20, 40, (3, 17), (8, 32)), r"data\.jsonl:1: mask .*m\.png is 40x20, its image is 40x30"),
    (np.zeros((30, 40), bool), r"data\.jsonl:1: mask .*m\.png is empty"),
])
def test_bad_masks_name_the_line_and_the_file(tmp_path, mask, match):
  path = write_row_files(tmp_path, [{"image": "im.png", "prefix": "segment", "mask": "m.png"}], masks={"m.png": mask})
  rows = sources.read_jsonl(path)
  with pytest.raises(ValueError, match=match):
    annotations.build_suffixes(rows, vae_path=VAE, cache_dir="off")


def test_a_mask_row_without_a_vae_says_what_it_needs(tmp_path):
  path = write_row_files(tmp_path, [{"image": "im.png", "prefix": "segment", "mask": "m.png"}],
                         masks={"m.png": rect(30, 40, (3, 27), (8, 32))})
  with pytest.raises(ValueError, match=r"data\.jsonl:1: the row gives a mask; .*segmentation VAE"):
    annotations.build_suffixes(sources.read_jsonl(path))


def test_shipped_demo_vae_reconstructs_held_out_masks():
  # The target: decode(encode(m)) of the shipped VAE at IoU >= 0.9 on demo masks it was not trained on
  # (easy-vqa's test images; it trained on the train images).
  vae = segmentation.load_vae(VAE)
  paths = demo._image_paths("test")[:300]
  crops = np.stack([segmentation.crop_to_64(demo.shape_mask(p)) for p in paths])
  recon = np.asarray(segmentation.decode(vae, segmentation.encode(vae, crops))) > 0
  iou = np.mean([segmentation.mask_iou(r, c > 0.5) for r, c in zip(recon, crops)])
  assert iou >= 0.9, iou
  with open(os.path.splitext(VAE)[0] + ".json") as f:
    assert json.load(f)["held_out_iou_64"] >= 0.9  # what the shipped file's record says of all 1000


def test_shape_mask_is_the_shapes_pixels():
  # easy-vqa's images: one shape on a plain background; the mask covers the shape's colour, not the rest.
  p = demo._image_paths("train")[0]
  im = np.asarray(PIL.Image.open(p).convert("RGB")).astype(int)
  m = demo.shape_mask(p) > 0
  bg = np.median(im[[0, 0, -1, -1], [0, -1, 0, -1]], 0)
  far = np.abs(im - bg).sum(-1) > 60
  assert 0 < m.sum() < m.size and ((m == far).mean() > 0.97)


def test_finetune_builds_the_text_of_mask_rows_with_its_vae(tmp_path):
  from pgjax import finetune
  rows = []
  for i, p in enumerate(demo._image_paths("train")[:8]):
    PIL.Image.fromarray(demo.shape_mask(p)).save(tmp_path / f"m{i}.png")
    rows.append({"image": p, "prefix": "segment shape", "mask": f"m{i}.png"})
  path = tmp_path / "train.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  tc = finetune.TrainConfig(steps=1, batch_size=8, max_len=32, task="exact", compute_dtype="float32")
  kw = dict(train=str(path), checkpoint=demo.CHECKPOINT, tokenizer=demo.TOKENIZER, model=demo.load_config(),
            quiet=True)
  with pytest.raises(ValueError, match=r"train\.jsonl:1: the row gives a mask"):
    finetune.finetune(tc, **kw)
  run = finetune.finetune(tc, vae=VAE, **kw)
  assert len(run.history.loss) == 1 and np.isfinite(run.history.loss[0])
