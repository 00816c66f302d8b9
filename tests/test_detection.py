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
