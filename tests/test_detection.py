"""The <loc> detection text: literal bins on non-square images, round trips, clipping, malformed groups, box IoU,
and that the module imports without jax (viz draws boxes with it)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from pgjax import detection
from pgjax.detection import encode_detections, parse_detections


def test_encode_detections_literal_yxyx_on_a_non_square_image():
  # 640 wide, 480 high: y0 120/480*1023 = 255.75 -> 256; x0 0 -> 0; y1 = height -> 1023; x1 320/640 -> 511.5 -> 512
  # (round half to even); the second box's x1 480/640*1023 = 767.25 -> 767.
  text = encode_detections([(0, 120, 320, 480), (64, 0, 480, 48)], ["cat", "red car"], 640, 480)
  assert text == "<loc0256><loc0000><loc1023><loc0512> cat ; <loc0000><loc0102><loc0102><loc0767> red car"


def test_parse_detections_edge_bins_and_order():
  dets = parse_detections("<loc0000><loc0000><loc1023><loc1023> all ; <loc0000><loc1023><loc1023><loc1023> edge",
                          640, 480)
  assert dets == [dict(box=(0.0, 0.0, 640.0, 480.0), label="all"), dict(box=(640.0, 0.0, 640.0, 480.0), label="edge")]
  # y first: bins (y0, x0, y1, x1) = (1023 * .25, 1023 * .5, ...) on a 200 x 100 image.
  (d,) = parse_detections("<loc0341><loc0682><loc1023><loc1023> bird", 200, 100)
  assert d["box"] == pytest.approx((682 / 1023 * 200, 341 / 1023 * 100, 200, 100))


@pytest.mark.parametrize("width,height", [(640, 480), (300, 1200), (1, 1), (1023, 1023)])
def test_loc_round_trip(width, height):
  rng = np.random.default_rng(width + height)
  a = rng.uniform(0, 1, (20, 2, 2)) * [width, height]
  boxes = np.concatenate([a.min(1), a.max(1)], axis=1)  # x0 y0 x1 y1
  boxes[0] = (0, 0, width, height)  # edge bins 0 and 1023
  labels = [f"thing {i}" for i in range(len(boxes))]
  dets = parse_detections(encode_detections(boxes, labels, width, height), width, height)
  assert [d["label"] for d in dets] == labels
  # Half a bin is the most a coordinate can move.
  tol = np.array([width, height, width, height]) / 1023 / 2 + 1e-9
  assert np.all(np.abs(np.array([d["box"] for d in dets]) - boxes) < tol)
  np.testing.assert_allclose(dets[0]["box"], (0, 0, width, height))
  # A decoded text encodes back to itself.
  text = encode_detections([d["box"] for d in dets], labels, width, height)
  assert parse_detections(text, width, height) == dets


def test_encode_detections_clips_and_rejects_bad_input():
  assert encode_detections([(-5, -5, 700, 500)], ["x"], 640, 480) == "<loc0000><loc0000><loc1023><loc1023> x"
  assert encode_detections([], [], 640, 480) == ""
  for boxes, labels in [([(10, 0, 5, 5)], ["x"]), ([(0, 0, 5, 5)], ["a ; b"]), ([(0, 0, 5, 5)], [""]),
                        ([(0, 0, 5, 5)], ["x", "y"])]:
    with pytest.raises(ValueError):
      encode_detections(boxes, labels, 640, 480)


def test_parse_detections_tolerates_malformed_groups():
  text = ("<loc0001><loc0002><loc0003> partial ; <loc0010><loc0020><loc0030><loc0040> dog ; "
          "<loc1024><loc0000><loc0001><loc0001> too big ; <loc0500><loc0000><loc0100><loc0001> inverted ; "
          "<loc0001><loc0001><loc0002><loc0002><loc0003> five ; <loc0001><loc0001><loc0002><loc0002>")
  dets, bad = parse_detections(text, 1023, 1023, return_malformed=True)
  assert dets == [dict(box=(20.0, 10.0, 40.0, 30.0), label="dog")] and bad == 5
  assert parse_detections("a cat on a mat", 10, 10, return_malformed=True) == ([], 0)
  assert parse_detections("", 10, 10) == []
  # No spaces around ";" or before the label; segmentation tokens between box and label.
  segs = "".join(f"<seg{i:03d}>" for i in range(16))
  dets = parse_detections(f"<loc0000><loc0000><loc1023><loc1023>cat;<loc0000><loc0000><loc1023><loc1023> {segs} dog",
                          10, 10)
  assert [d["label"] for d in dets] == ["cat", "dog"]
  # Objects without " ; " between them still split at the next box.
  dets = parse_detections("<loc0000><loc0000><loc1023><loc1023> cat <loc0000><loc0000><loc0511><loc0511> dog", 10, 10)
  assert [d["label"] for d in dets] == ["cat", "dog"]


def test_zero_area_boxes_match_only_themselves():
  """A one-bin-thin box has no area: the same box is a match (IoU 1), any other is not (0)."""
  assert detection.box_iou((5, 5, 5, 9), (5, 5, 5, 9)) == 1.0
  assert detection.box_iou((5, 5, 5, 9), (6, 5, 6, 9)) == 0.0
  assert detection.box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)  # 1 / (4 + 4 - 1)


def test_imports_without_jax():
  code = "import sys, pgjax.detection; assert 'jax' not in sys.modules, sorted(sys.modules)"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's pgjax
  subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


# COCO mAP: expected values computed by hand from COCO's definition (101 recall points, IoU >= t matches);
# approx: pycocotools averages the 101 points in float64 (1.0 comes back as 0.9999999999999998).
def loc(y0, x0, y1, x1, label):
  return "".join(f"<loc{b:04d}>" for b in (y0, x0, y1, x1)) + " " + label


def test_coco_map_of_an_exact_box_is_one_and_of_an_iou_0625_box_is_three_tenths():
  gt = loc(0, 0, 800, 800, "cat")
  assert detection.coco_map([gt], [gt]) == pytest.approx({"map": 1.0, "map50": 1.0})
  # [0, 800]^2 against [0, 800] x [0, 500]: IoU 500/800 = 0.625, a match at t = 0.50, 0.55, 0.60 of the 10.
  m = detection.coco_map([loc(0, 0, 800, 500, "cat")], [gt])
  assert m["map50"] == pytest.approx(1.0) and m["map"] == pytest.approx(0.3)


def test_coco_map_counts_a_miss_and_a_later_duplicate():
  a, b = loc(0, 0, 400, 400, "cat"), loc(500, 500, 900, 900, "cat")
  # Two targets, one found: precision 1 up to recall 0.5, none past it: 51 of the 101 recall points.
  assert detection.coco_map([a], [f"{a} ; {b}"])["map"] == pytest.approx(51 / 101)
  # A duplicate after the match is a false positive past recall 1: the interpolated precision stays 1.
  assert detection.coco_map([f"{a} ; {a}"], [a])["map"] == pytest.approx(1.0)
  # A wrong label is no match.
  assert detection.coco_map([loc(0, 0, 400, 400, "dog")], [a])["map"] == 0.0


def test_coco_map_ranks_equal_scores_in_the_order_generated_and_empty_images_count():
  a = loc(0, 0, 400, 400, "cat")
  fp = loc(500, 500, 900, 900, "cat")
  # Row 0 has no target; its box is a false positive. First in order, it is ranked above the true positive:
  # precision 1/2 at recall 1, so 0.5 at every recall point. After it, the true positive comes first: 1.0.
  assert detection.coco_map([fp, a], ["", a])["map"] == pytest.approx(0.5)
  assert detection.coco_map([a, fp], [a, ""])["map"] == pytest.approx(1.0)
  # Within a row, the order generated.
  assert detection.coco_map([f"{fp} ; {a}"], [a])["map"] == pytest.approx(0.5)
  # An empty image with nothing predicted changes nothing; no target anywhere leaves AP undefined.
  assert detection.coco_map([a, ""], [a, ""])["map"] == pytest.approx(1.0)
  assert detection.coco_map([a], [""]) == {"map": None, "map50": None}
  assert detection.coco_map([""], [a]) == {"map": 0.0, "map50": 0.0}


def test_detection_metrics_carry_map_next_to_f1():
  a = loc(0, 0, 400, 400, "cat")
  m = detection.detection_metrics([a], [a])
  assert m["map"] == pytest.approx(1.0) and m["map50"] == pytest.approx(1.0) and m["f1"] == 1.0
