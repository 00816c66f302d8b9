"""HTML views: embedded images, escaped text, boxes drawn, the SVG loss curve, and a real browser render."""

import base64
import io
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import screenshot
from pgjax import viz

RED = (255, 0, 0)


def _red(h=64, w=64):
  a = np.zeros((h, w, 3), np.uint8)
  a[...] = RED
  return a


def _decode_images(page: str) -> list[np.ndarray]:
  uris = re.findall(r'<img src="data:image/(?:png|jpeg);base64,([^"]+)"', page)
  return [np.asarray(Image.open(io.BytesIO(base64.b64decode(u))).convert("RGB")) for u in uris]


def test_data_html_embeds_every_image_and_escapes_text(tmp_path):
  path = tmp_path / "grey.png"
  Image.fromarray(np.full((30, 50), 128, np.uint8)).save(path)
  rows = [dict(image=str(path), prefix="caption en <script>alert(1)</script>", suffix="a & b"),
          dict(image=np.linspace(-1, 1, 56 * 56 * 3, dtype=np.float32).reshape(56, 56, 3), prefix="ocr", suffix="x"),
          dict(image=_red(), prefix="answer en q", answers=['"yes"', "no"])]
  page = viz.data_html(rows, title="data <check>")
  assert page.count('<img src="data:image/') == 3 and len(_decode_images(page)) == 3
  assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
  assert "a &amp; b" in page and "&quot;yes&quot; | no" in page and "<title>data &lt;check&gt;</title>" in page
  # The float image went through the [-1, 1] -> [0, 255] mapping: its first pixel is black, last white.
  grey, ramp, red = _decode_images(page)
  assert grey.shape == (30, 50, 3) and abs(int(grey[15, 25, 0]) - 128) <= 3
  assert ramp[0, 0].max() <= 8 and ramp[-1, -1].min() >= 247
  assert np.abs(red.astype(int) - RED).max() <= 8


def test_images_are_shrunk_to_max_side():
  (im,) = _decode_images(viz.data_html([dict(image=_red(600, 1000), prefix="p", suffix="s")]))
  assert im.shape == (154, 256, 3)  # aspect kept (600/1000 * 256 = 153.6)


def test_predictions_html_marks_right_and_wrong_and_truncation():
  rows = [dict(image=_red(), prefix="ocr", suffix="cat"), dict(image=_red(), prefix="ocr", suffix="cat"),
          dict(image=_red(), prefix="answer en q", answers=["two"] * 5 + ["2"] * 5),
          dict(image=_red(), prefix="caption en"), dict(image=_red(), prefix="caption en", suffix="a red square")]
  preds = [dict(prediction="cat", hit_eos=True, num_tokens=2), dict(prediction="dog", hit_eos=False, num_tokens=7),
           "2", "a red square", "red"]
  page = viz.predictions_html(rows, preds, metrics={"exact_match": 0.25, "truncated": 1})
  classes = re.findall(r'<div class="card ?([a-z]*)">', page)
  assert classes == ["ok", "bad", "ok", "", ""]  # no target; a caption is not right or wrong by itself
  assert "TRUNCATED at 7 tokens (no eos)" in page and "VQA accuracy 1.00" in page
  assert "<td>exact_match</td><td>0.25</td>" in page
  with pytest.raises(ValueError, match="2 rows but 1 predictions"):
    viz.predictions_grid(rows[:2], preds[:1])


def test_detections_are_drawn_scaled_to_the_image():
  # A black 200 x 100 image; one predicted box over its right half: x 100..200, all of y.
  rows = [dict(image=np.zeros((100, 200, 3), np.uint8), prefix="detect cat",
               suffix="<loc0000><loc0000><loc1023><loc0511> cat")]
  page = viz.predictions_html(rows, ["<loc0000><loc0512><loc1023><loc1023> cat"])
  (im,) = _decode_images(page)
  near = lambda color: (np.abs(im.astype(int) - color).max(-1) < 60)  # noqa: E731  (JPEG)
  pred, target = near(viz.PRED_COLOR), near(viz.TARGET_COLOR)
  assert pred[:, 100:].sum() > 100 and pred[40:60, :95].sum() == 0  # the box is on the right half only
  assert target[:, :100].sum() > 100 and target[40:60, 105:].sum() == 0
  assert "boxes: 0 of 1 target(s) matched at IoU 0.5, 1 predicted" in page


def test_a_bad_image_does_not_break_the_page(tmp_path):
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"not an image")
  page = viz.data_html([dict(image=str(bad), prefix="p", suffix="s"), dict(image=str(tmp_path / "missing.png"),
                                                                          prefix="p", suffix="s")])
  assert page.count("image unavailable") == 2 and "<img" not in page


def test_loss_curve_svg():
  steps, losses = list(range(0, 50, 2)), [3.0 / (1 + 0.1 * s) for s in range(0, 50, 2)]
  svg = viz.loss_curve_svg(steps, losses, eval_points={"val": [(10, 1.5), (40, 0.9)]})
  (points,) = re.findall(r'<polyline[^>]* points="([^"]+)"', svg)
  assert len(points.split()) == len(losses)
  xs = [float(p.split(",")[0]) for p in points.split()]
  assert xs == sorted(xs)  # steps left to right
  ys = [float(p.split(",")[1]) for p in points.split()]
  assert ys == sorted(ys)  # a falling loss goes down the screen (SVG y grows downwards)
  assert svg.count("<circle") == 2 and ">step</text>" in svg and ">loss</text>" in svg
  assert svg.startswith("<svg") and svg.endswith("</svg>")
  # A NaN is left out of the line, and said so.
  svg = viz.loss_curve_svg([0, 1, 2], [1.0, float("nan"), 0.5])
  (points,) = re.findall(r'points="([^"]+)"', svg)
  assert len(points.split()) == 2 and "1 non-finite loss value(s) not drawn" in svg
  assert "<polyline" not in viz.loss_curve_svg([], []) and "no data" in viz.loss_curve_svg([], [])
  assert len(re.findall(r'points="([^"]+)"', viz.loss_curve_svg([5], [2.0]))[0].split()) == 1


def test_ticks_are_round_numbers():
  assert viz._ticks(0, 10) == [0, 2, 4, 6, 8, 10]
  assert viz._ticks(0.13, 0.92) == pytest.approx([0.2, 0.4, 0.6, 0.8])
  assert viz._ticks(1, 1) == [1]


def _report(tmp_path):
  rows = [dict(image=_red(), prefix="caption en <script>", suffix="red")]
  svg = viz.loss_curve_svg(range(20), np.linspace(3, 1, 20))
  page = viz.report_html({"out": "<dir>", "steps": 20, "config": {"lr": 0.03}}, svg,
                         {"before": {"exact_match": 0.0}, "after": {"exact_match": 1.0}},
                         viz.predictions_grid(rows, ["red"]))
  return viz.write_html(tmp_path / "sub" / "report.html", page), page


def test_report_html_and_atomic_write(tmp_path):
  path, page = _report(tmp_path)
  assert open(path, encoding="utf-8").read() == page
  assert os.listdir(tmp_path / "sub") == ["report.html"]  # no temp file left behind
  assert "<polyline" in page and page.count('<img src="data:image/') == 1
  assert "&lt;dir&gt;" in page and "<script>" not in page and "{&quot;lr&quot;: 0.03}" in page
  assert "<th>before</th><th>after</th>" in page and "<td>exact_match</td><td>0</td><td>1</td>" in page


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium on PATH (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
  path, _ = _report(tmp_path)
  px = screenshot(path, tmp_path / "shot.png").astype(int)
  assert px.shape[:2] == (1600, 1200) and px.var() > 0
  # The pure red test image was decoded and drawn: a block of red pixels (shown in a 256 px box).
  red = (px[..., 0] > 230) & (px[..., 1] < 30) & (px[..., 2] < 30)
  assert red.sum() > 200 * 200, red.sum()


def test_16_bit_images_are_shown_as_the_model_sees_them(tmp_path):
  """A 16-bit grey PNG (0..65535) is scaled to 8 bits as data.load_image scales it, not clipped to white by
  Pillow's RGB conversion; a uint16 array likewise."""
  ramp = (np.arange(64, dtype=np.uint32) * 1000).astype(np.uint16)[None].repeat(4, 0)  # 0 .. 63000
  Image.fromarray(ramp).save(tmp_path / "ramp.png")  # mode I;16
  expected = np.round(ramp.astype(np.float64) / 257.0)  # 65535 -> 255, as the model's decoder
  for image in (str(tmp_path / "ramp.png"), ramp):
    shown = np.asarray(viz.to_pil(image))
    assert shown.shape == (4, 64, 3)
    np.testing.assert_allclose(shown[..., 0], expected, atol=1)
    assert (shown[..., 0] == shown[..., 2]).all()


def test_imports_without_jax_or_the_model():
  """viz draws and scores boxes from detection.py and metrics.py, so a report can be built without jax."""
  code = "import sys, pgjax.viz; assert not {'jax', 'pgjax.evaluate'} & set(sys.modules), sorted(sys.modules)"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's pgjax
  subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def _filling_vae(logit=1.0):
  """A segmentation VAE whose decoder says `logit` everywhere: every valid object's mask is its whole box."""
  from pgjax import segmentation
  shapes = segmentation.vae_shapes(encoder=(2, 2, 2, 2), enc_hidden=2, num_codes=16, code_dim=2, decoder=2,
                                   dec_hidden=2, upsample=(2, 2, 2, 2))
  vae = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  vae["decoder.12.bias"][:] = logit
  return segmentation.check_vae(vae)


SEGS = "".join(f"<seg{i:03d}>" for i in range(16))


def _seg_page():
  # A black 200 x 100 image: the target mask is its left half, the predicted one its right half.
  rows = [dict(image=np.zeros((100, 200, 3), np.uint8), prefix="segment cat",
               suffix="<loc0000><loc0000><loc1023><loc0512>" + SEGS + " cat")]
  return viz.predictions_html(rows, ["<loc0000><loc0512><loc1023><loc1023>" + SEGS + " cat"], vae=_filling_vae())


def test_masks_are_overlaid_target_next_to_prediction():
  target, pred = _decode_images(_seg_page())  # two images: the target's overlay, then the prediction's
  tint = lambda im, color: np.abs(im.astype(int) - np.asarray(color) * 0.45).max(-1) < 40  # noqa: E731 (on black)
  # Shown as it is (200 x 100, under max_side): the left half is x < 100 (margins for the outline, label, JPEG).
  assert target.shape == (100, 200, 3)
  assert tint(target, viz.TARGET_COLOR)[20:90, 5:95].mean() > 0.9 and not tint(target, viz.TARGET_COLOR)[20:90, 110:].any()
  assert tint(pred, viz.PRED_COLOR)[20:90, 105:195].mean() > 0.9 and not tint(pred, viz.PRED_COLOR)[20:90, :90].any()


def test_data_view_draws_the_masks_a_suffix_decodes_to():
  rows = [dict(image=np.zeros((100, 200, 3), np.uint8), prefix="segment cat",
               suffix="<loc0000><loc0000><loc1023><loc0512>" + SEGS + " cat")]
  (im,) = _decode_images(viz.data_html(rows, vae=_filling_vae()))
  tint = np.abs(im.astype(int) - np.asarray(viz.TARGET_COLOR) * 0.45).max(-1) < 40
  assert tint[20:90, 5:95].mean() > 0.9 and not tint[20:90, 110:].any()
  # Without the VAE the box alone is drawn: no fill.
  (plain,) = _decode_images(viz.data_html(rows))
  assert not (np.abs(plain.astype(int) - np.asarray(viz.TARGET_COLOR) * 0.45).max(-1) < 40)[30:90, 30:90].any()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium on PATH (apt-get install chromium)")
def test_mask_overlays_render_in_headless_chromium(tmp_path):
  path = viz.write_html(tmp_path / "seg.html", _seg_page())
  px = screenshot(path, tmp_path / "shot.png").astype(int)
  for color in (viz.TARGET_COLOR, viz.PRED_COLOR):
    tinted = np.abs(px[..., :3] - np.asarray(color) * 0.45).max(-1) < 40
    assert tinted.sum() > 100 * 100, (color, tinted.sum())
