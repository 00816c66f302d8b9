"""The <seg> codec: the released file's layout, encode/decode against a PyTorch oracle built from the same
state dict, and big_vision's mask <-> text conventions pinned by literal, hand-computed examples."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from pgjax import segmentation as seg

# vae-oid.npz as released: its keys, PyTorch layouts, and the widths of big_vision's VQ-VAE (encoder
# 16 -> 32 -> 64 -> 128, residual blocks at 128, the codebook 128 x 512, decoder 128 -> 64 -> 32 -> 16).
RELEASED = {
    "_vq_vae._embedding": (128, 512),
    "encoder.0.weight": (16, 1, 3, 3), "encoder.2.weight": (32, 16, 3, 3),
    "encoder.4.weight": (64, 32, 3, 3), "encoder.6.weight": (128, 64, 3, 3),
    **{f"encoder.{i}.net.{j}.weight": s for i in (8, 9)
       for j, s in ((0, (128, 128, 3, 3)), (2, (128, 128, 3, 3)), (4, (128, 128, 1, 1)))},
    "encoder.10.weight": (512, 128, 1, 1),
    "decoder.0.weight": (128, 512, 1, 1),
    **{f"decoder.{i}.net.{j}.weight": s for i in (2, 3)
       for j, s in ((0, (128, 128, 3, 3)), (2, (128, 128, 3, 3)), (4, (128, 128, 1, 1)))},
    "decoder.4.weight": (128, 128, 4, 4), "decoder.6.weight": (128, 64, 4, 4),
    "decoder.8.weight": (64, 32, 4, 4), "decoder.10.weight": (32, 16, 4, 4),
    "decoder.12.weight": (1, 16, 1, 1),
}
TRANSPOSED = ("decoder.4", "decoder.6", "decoder.8", "decoder.10")


def with_biases(weights):
  out = dict(weights)
  for k, s in weights.items():
    if k.endswith(".weight"):
      out[k[:-len("weight")] + "bias"] = (s[1] if k[:-len(".weight")] in TRANSPOSED else s[0],)
  return out


def small_shapes(enc=(4, 6, 8, 8), hid=5, K=16, D=8, dec=8, up=(8, 6, 4, 4)):
  s = {"_vq_vae._embedding": (K, D)}
  c = 1
  for key, o in zip(("encoder.0", "encoder.2", "encoder.4", "encoder.6"), enc):
    s[key + ".weight"], c = (o, c, 3, 3), o
  for i in (8, 9):
    s.update({f"encoder.{i}.net.0.weight": (hid, c, 3, 3), f"encoder.{i}.net.2.weight": (hid, hid, 3, 3),
              f"encoder.{i}.net.4.weight": (c, hid, 1, 1)})
  s["encoder.10.weight"] = (D, c, 1, 1)
  s["decoder.0.weight"], c = (dec, D, 1, 1), dec
  for i in (2, 3):
    s.update({f"decoder.{i}.net.0.weight": (hid, c, 3, 3), f"decoder.{i}.net.2.weight": (hid, hid, 3, 3),
              f"decoder.{i}.net.4.weight": (c, hid, 1, 1)})
  for key, o in zip(TRANSPOSED, up):
    s[key + ".weight"], c = (c, o, 4, 4), o
  s["decoder.12.weight"] = (1, c, 1, 1)
  return with_biases(s)


def random_vae(shapes, seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for k, s in shapes.items():
    fan_in = int(np.prod(s[1:])) if len(s) == 4 else 1
    out[k] = (rng.standard_normal(s) / np.sqrt(max(fan_in, 1))).astype(np.float32)
  return out


# ---------------------------------------------------------------------------------------------------
# The file.


def test_released_layout_loads_and_its_widths_are_read_from_the_file(tmp_path):
  shapes = with_biases(RELEASED)
  arrays = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  arrays["an_unused_array"] = np.zeros(3, np.float32)  # the released file may hold more; it is ignored
  np.savez(tmp_path / "vae-oid.npz", **arrays)
  vae = seg.load_vae(tmp_path / "vae-oid.npz")
  assert {k: tuple(v.shape) for k, v in vae.items()} == shapes
  assert seg.expected_shapes(arrays) == shapes
  assert seg.vae_shapes() == shapes  # the defaults are the released widths
  small = seg.init_vae(jax.random.key(0), **seg.widths(random_vae(small_shapes())))
  assert {k: tuple(v.shape) for k, v in small.items()} == small_shapes()
  # The same code runs at these widths: 16 codes out, 64x64 logits back.
  assert seg.encode(vae, np.zeros((2, 64, 64), np.float32)).shape == (2, 16)
  assert seg.decode(vae, np.zeros((2, 16), np.int32)).shape == (2, 64, 64)


def test_load_names_the_file_and_every_wrong_key(tmp_path):
  arrays = random_vae(small_shapes())
  bad = dict(arrays)
  bad["encoder.8.net.2.weight"] = np.zeros((5, 5, 1, 1), np.float32)
  del bad["decoder.12.bias"]
  np.savez(tmp_path / "bad.npz", **bad)
  with pytest.raises(ValueError) as e:
    seg.load_vae(tmp_path / "bad.npz")
  msg = str(e.value)
  assert "bad.npz" in msg and "encoder.8.net.2.weight: shape (5, 5, 1, 1), expected (5, 5, 3, 3)" in msg
  assert "decoder.12.bias: missing (expected (1,))" in msg
  np.savez(tmp_path / "other.npz", weights=np.zeros(3))
  with pytest.raises(ValueError, match=r"other\.npz: not a PaliGemma segmentation VAE.*_vq_vae\._embedding"):
    seg.load_vae(tmp_path / "other.npz")
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match=r"junk\.npz: cannot read"):
    seg.load_vae(tmp_path / "junk.npz")


def test_save_then_load_is_the_same_arrays(tmp_path):
  vae = seg.check_vae(random_vae(small_shapes()))
  seg.save_vae(tmp_path / "v.npz", vae)
  back = seg.load_vae(tmp_path / "v.npz")
  assert back.keys() == vae.keys()
  for k in vae:
    np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(vae[k]))


# ---------------------------------------------------------------------------------------------------
# The codec against PyTorch, from the same state dict.


def torch_encoder_output(sd, masks):
  """The encoder in PyTorch: TF SAME for the stride-2 3x3 convs is zero padding after (one row, one col)."""
  t = {k: torch.from_numpy(v) for k, v in sd.items()}
  x = 2.0 * (torch.from_numpy(masks)[:, None] - 0.5)
  for key in ("encoder.0", "encoder.2", "encoder.4", "encoder.6"):
    x = F.relu(F.conv2d(F.pad(x, (0, 1, 0, 1)), t[key + ".weight"], t[key + ".bias"], stride=2))
  for key in ("encoder.8.net", "encoder.9.net"):
    h = F.relu(F.conv2d(x, t[key + ".0.weight"], t[key + ".0.bias"], padding=1))
    h = F.relu(F.conv2d(h, t[key + ".2.weight"], t[key + ".2.bias"], padding=1))
    x = x + F.conv2d(h, t[key + ".4.weight"], t[key + ".4.bias"])
  z = F.conv2d(x, t["encoder.10.weight"], t["encoder.10.bias"])  # [B, D, 4, 4]
  return z.permute(0, 2, 3, 1).reshape(len(masks), 16, -1).double()


def torch_decode(sd, codes):
  t = {k: torch.from_numpy(v) for k, v in sd.items()}
  e = t["_vq_vae._embedding"][torch.from_numpy(codes).long()]  # [B, 16, D]
  x = e.reshape(len(codes), 4, 4, -1).permute(0, 3, 1, 2)
  x = F.relu(F.conv2d(x, t["decoder.0.weight"], t["decoder.0.bias"]))
  for key in ("decoder.2.net", "decoder.3.net"):
    h = F.relu(F.conv2d(x, t[key + ".0.weight"], t[key + ".0.bias"], padding=1))
    h = F.relu(F.conv2d(h, t[key + ".2.weight"], t[key + ".2.bias"], padding=1))
    x = x + F.conv2d(h, t[key + ".4.weight"], t[key + ".4.bias"])
  for key in TRANSPOSED:
    x = F.relu(F.conv_transpose2d(x, t[key + ".weight"], t[key + ".bias"], stride=2, padding=1))
  return F.conv2d(x, t["decoder.12.weight"], t["decoder.12.bias"])[:, 0].numpy()


def blob_masks(n, seed=0):
  """Soft-edged random ellipses in [0, 1], [n, 64, 64]."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:64, :64] + 0.5
  out = []
  for _ in range(n):
    cy, cx, ry, rx = rng.uniform(16, 48), rng.uniform(16, 48), rng.uniform(6, 20), rng.uniform(6, 20)
    d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    out.append(np.clip(1.5 - d, 0, 1))
  return np.stack(out).astype(np.float32)


def test_encode_picks_the_nearest_code_of_the_torch_encoder():
  sd = random_vae(small_shapes())
  # Codebook rows taken from the encoder's outputs on other masks, so that the nearest code varies by cell.
  other = torch_encoder_output(sd, blob_masks(4, seed=9)).reshape(-1, 8).numpy()
  sd["_vq_vae._embedding"] = other[np.random.default_rng(3).choice(len(other), 16, replace=False)].astype(np.float32)
  vae = seg.check_vae(sd)
  masks = blob_masks(6)
  codes = np.asarray(seg.encode(vae, masks))
  assert codes.shape == (6, 16) and codes.dtype == np.int32
  z = torch_encoder_output(sd, masks)                      # [B, 16, D] float64
  e = torch.from_numpy(sd["_vq_vae._embedding"]).double()  # [K, D]
  d = ((z[:, :, None] - e[None, None]) ** 2).sum(-1).numpy()   # [B, 16, K]
  ours, best = np.take_along_axis(d, codes[..., None], -1)[..., 0], d.min(-1)
  # Ours is a nearest code: its distance is the minimum up to float32 rounding of distances of size ~|z|^2
  # (a near-tie may go either way, as it may in big_vision's float32 TF).
  np.testing.assert_allclose(ours, best, rtol=0, atol=1e-5 * (1 + d.max()))
  assert (codes == d.argmin(-1)).mean() > 0.9  # and not a tie-break artefact: nearly all agree outright
  assert len(np.unique(codes)) > 3


def test_decode_equals_torch_conv_transpose_decoder():
  sd = random_vae(small_shapes(), seed=1)
  vae = seg.check_vae(sd)
  codes = np.random.default_rng(2).integers(0, 16, (5, 16)).astype(np.int32)
  ours = np.asarray(seg.decode(vae, codes))
  ref = torch_decode(sd, codes)
  assert ours.shape == (5, 64, 64) and ours.dtype == np.float32
  # float32 convs in two libraries: rounding of sums of a few hundred terms, relative to the output scale.
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
  assert np.abs(ref).max() > 0.1 and np.std(ref) > 0.01  # a non-trivial output


def test_codec_refuses_bad_shapes_and_codes():
  vae = seg.check_vae(random_vae(small_shapes()))
  with pytest.raises(ValueError, match=r"masks must be \[B, 64, 64\], got shape \(2, 32, 32\)"):
    seg.encode(vae, np.zeros((2, 32, 32)))
  with pytest.raises(ValueError, match=r"codes must be \[B, 16\]"):
    seg.decode(vae, np.zeros((2, 15), np.int32))
  with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\), got 16\.\.16"):
    seg.decode(vae, np.full((1, 16), 16))


# ---------------------------------------------------------------------------------------------------
# Mask -> text: refcoco_mask2str's conventions.


def test_crop_edges_round_half_to_even_in_float32():
  # tf.round(h * y1) in float32: 333 * 0.5 = 166.5 -> 166, 500 * 0.125 = 62.5 -> 62, 3 * 0.5 -> 2 (to even).
  assert seg.crop_box_px((0.5, 0.125, 1.0, 1.0), 333, 500) == (166, 62, 333, 500)
  assert seg.crop_box_px((0.5, 0.5, 0.5, 0.5), 3, 5) == (2, 2, 2, 2)


def test_loc_bins_are_round_of_1023_times_the_coordinate():
  # 0.5 * 1023 = 511.5 -> 512 (half to even), 0.25 * 1023 = 255.75 -> 256, 1.0 -> 1023.
  assert seg.loc_text((0.5, 0.25, 1.0, 1.0)) == "<loc0512><loc0256><loc1023><loc1023>"
  with pytest.raises(ValueError, match="normalised"):
    seg.loc_text((0.5, 0.2, 0.4, 1.0))  # y2 < y1


@pytest.mark.parametrize("h,w", [(150, 90), (40, 30), (64, 64), (200, 17), (7, 64)])
def test_crop_resize_is_antialiased_bilinear_like_pillow_and_jax(h, w):
  # Two independent implementations of the antialiased triangle filter TF uses: Pillow's float BILINEAR
  # resize and jax.image.resize("linear", antialias=True).
  m = (np.random.default_rng(h * w).random((h, w)) > 0.6).astype(np.uint8) * 255
  ours = seg.crop_to_64(m, (0.0, 0.0, 1.0, 1.0))
  pil = np.asarray(PIL.Image.fromarray(m.astype(np.float32)).resize((64, 64), PIL.Image.BILINEAR)) / 255.0
  jx = np.asarray(jax.image.resize(jnp.asarray(m, jnp.float32), (64, 64), "linear", antialias=True)) / 255.0
  # Sums of up to ~25 weighted terms in [0, 1], theirs in float32.
  np.testing.assert_allclose(ours, pil, rtol=0, atol=2e-5)
  np.testing.assert_allclose(ours, jx, rtol=0, atol=2e-5)
  assert 0.2 < ours.mean() < 0.6


def test_mask_box_and_the_crop():
  m = np.zeros((10, 20), np.uint8)
  m[2:5, 4:10] = 255
  assert seg.mask_box(m) == (0.2, 0.2, 0.5, 0.5)
  # The tight crop is all mask (its resize weights sum to 1 up to float32 rounding).
  np.testing.assert_allclose(seg.crop_to_64(m), np.ones((64, 64)), rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match="empty"):
    seg.mask_box(np.zeros((4, 4), bool))
  with pytest.raises(ValueError, match="0/1"):
    seg.crop_to_64(np.ones((4, 4), np.uint8))
  with pytest.raises(ValueError, match="crops no pixel"):
    seg.crop_to_64(m, (0.0, 0.0, 0.01, 1.0))


def test_mask_to_text_is_four_locs_then_the_sixteen_codes_of_the_crop():
  vae = seg.check_vae(random_vae(small_shapes()))
  m = np.zeros((100, 200), bool)
  m[20:60, 50:150] = True
  m[30:40, 60:70] = False
  text = seg.mask_to_text(vae, m, label="cat")
  locs = "".join(f"<loc{round(c * 1023):04d}>" for c in (0.2, 0.25, 0.6, 0.75))
  codes = np.asarray(seg.encode(vae, seg.crop_to_64(m)[None]))[0]
  assert text == locs + "".join(f"<seg{c:03d}>" for c in codes) + " cat"
  assert re.fullmatch(r"(<loc\d{4}>){4}(<seg\d{3}>){16} cat", text)


# ---------------------------------------------------------------------------------------------------
# Text -> masks: the evaluator's conventions.


def constant_vae(logit):
  """A VAE whose decoder outputs `logit` everywhere (all weights zero, the last bias = logit)."""
  vae = {k: np.zeros(s, np.float32) for k, s in small_shapes().items()}
  vae["decoder.12.bias"][:] = logit
  return seg.check_vae(vae)


SEGS = "".join(f"<seg{i:03d}>" for i in range(16))


def test_box_is_bin_over_1023_truncated_to_pixels():
  # 1000 / 1023 * 640 = 625.6: int() gives 625 (rounding would give 626, /1024 gives 625.0).
  assert seg.box_px((0, 1000, 1023, 1023), 480, 640) == (625, 0, 640, 480)
  # 511 / 1023 * 1023 = 511 exactly; 1 / 1023 * 100 = 0.098 -> 0.
  assert seg.box_px((511, 1, 1023, 512), 1023, 100) == (0, 511, 50, 1023)


def test_text_to_masks_fills_the_truncated_box_when_the_decoder_says_inside():
  text = "<loc0100><loc1000><loc0900><loc1023>" + SEGS + " cat ; <loc0000><loc0000><loc0512><loc0512>" + SEGS
  objs = seg.text_to_masks(constant_vae(1.0), text, 480, 640)
  assert [o["label"] for o in objs] == ["cat", ""]
  # y: 100/1023*480 = 46.9 -> 46, 900/1023*480 = 422.3 -> 422; x: 625.6 -> 625, 640.
  assert objs[0]["box"] == (625, 46, 640, 422)
  expected = np.zeros((480, 640), bool)
  expected[46:422, 625:640] = True
  np.testing.assert_array_equal(objs[0]["mask"], expected)
  assert objs[1]["box"] == (0, 0, 320, 240)  # 512/1023*640 = 320.3 -> 320, 512/1023*480 = 240.2 -> 240
  assert objs[1]["mask"].sum() == 320 * 240
  out = seg.text_to_masks(constant_vae(-1.0), text, 480, 640)
  assert out[0]["box"] == (625, 46, 640, 422) and not out[0]["mask"].any()  # logits <= 0: no pixel


def test_paste_resizes_the_logits_into_the_box_and_thresholds_at_zero():
  lg = np.where(np.arange(64) < 32, 1.0, -1.0)[None].repeat(64, 0).astype(np.float32)
  m = seg.paste(lg, (10, 5, 42, 25), 30, 50)  # a 32-wide box: the left half of it
  expected = np.zeros((30, 50), bool)
  expected[5:25, 10:26] = True
  np.testing.assert_array_equal(m, expected)


@pytest.mark.parametrize("text,why", [
    ("<loc0100><loc0100><loc0050><loc0200>" + SEGS, "y2 < y1"),
    ("<loc0100><loc0100><loc0100><loc0200>" + SEGS, "y2 == y1"),
    ("<loc0100><loc0100><loc1024><loc0200>" + SEGS, "loc 1024 is no token"),
    ("<loc0100><loc0100><loc0200><loc0200>" + SEGS[:-8], "15 seg tokens"),
    ("<loc0100><loc0100><loc0200><loc0200>" + SEGS.replace("<seg015>", "<seg128>"), "seg 128 is no token"),
    ("<loc0100><loc0100><loc0200>" + SEGS, "3 loc tokens"),
    ("a cat", "no tokens"),
])
def test_invalid_objects_have_no_mask_and_never_raise(text, why):
  (obj,) = seg.text_to_masks(constant_vae(1.0), text + " cat", 100, 100)
  assert obj["mask"] is None, why


def test_a_code_past_the_vaes_codebook_is_invalid_not_an_error():
  # small_shapes' codebook has 16 rows; <seg100> is a token, but not one of this VAE's codes.
  (obj,) = seg.text_to_masks(constant_vae(1.0), "<loc0100><loc0100><loc0900><loc0900>" + SEGS.replace(
      "<seg003>", "<seg100>"), 10, 10)
  assert obj["box"] == (0, 0, 8, 8) and obj["mask"] is None


def test_a_box_that_collapses_after_truncation_is_invalid():
  # bins 100 and 101 of a 10-pixel side: 0.977 and 0.987 both truncate to 0.
  (obj,) = seg.text_to_masks(constant_vae(1.0), "<loc0100><loc0100><loc0101><loc0900>" + SEGS, 10, 10)
  assert obj["box"] is None and obj["mask"] is None


# ---------------------------------------------------------------------------------------------------
# The evaluator's metrics, hand-computed with a decoder that fills the box.


def test_segmentation_metrics_are_big_vision_miou_and_box_accuracy():
  vae = constant_vae(1.0)
  half = np.zeros((100, 100), bool)
  half[:50] = True
  target = {"masks": [half], "box": (0.0, 0.0, 0.5, 1.0)}
  preds = ["<loc0000><loc0000><loc0512><loc1023>" + SEGS + " ; <loc0000><loc0000><loc1023><loc1023>" + SEGS,
           "<loc0000><loc0000>" + SEGS,  # invalid: IoU 0, box 0
           "<loc0000><loc0000><loc1023><loc1023>" + SEGS]
  m = seg.segmentation_metrics(vae, preds, [target] * 3)
  # Row 0: rows 0..int(512/1023*100) = 50, the first object only: IoU 1 (its second, the whole image, is
  # ignored as the evaluator ignores tokens after the 20th). Row 2: the whole image against the top half: 0.5,
  # box IoU 0.5 >= 0.5 a hit.
  assert m["miou"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
  assert m["box_accuracy"] == pytest.approx(2 / 3) and m["invalid"] == 1 and m["num_examples"] == 3


def test_segmentation_metrics_take_the_union_when_the_target_has_several_objects():
  vae = constant_vae(1.0)
  a, b = np.zeros((100, 100), bool), np.zeros((100, 100), bool)
  a[:50, :50], b[50:, 50:] = True, True
  pred = ("<loc0000><loc0000><loc0512><loc0512>" + SEGS + " one ; " + "<loc0512><loc0512><loc1023><loc1023>" + SEGS
          + " two")
  m = seg.segmentation_metrics(vae, [pred], [{"masks": [a, b], "box": (0.0, 0.0, 0.5, 0.5)}])
  # Boxes [0, 50)^2 and [50, 100)^2 (512/1023*100 = 50.05 -> 50): exactly the two targets.
  assert m["miou"] == pytest.approx(1.0) and m["box_accuracy"] == 1.0


def test_evaluate_scores_segment_rows_from_their_mask_files(tmp_path):
  from pgjax import evaluate
  PIL.Image.new("RGB", (100, 100)).save(tmp_path / "im.png")
  half = np.zeros((100, 100), np.uint8)
  half[:50] = 255
  PIL.Image.fromarray(half).save(tmp_path / "m.png")
  vae_path = tmp_path / "vae.npz"
  seg.save_vae(vae_path, constant_vae(1.0))
  rows = [{"image": str(tmp_path / "im.png"), "prefix": "segment top", "mask": [str(tmp_path / "m.png")],
           "_source": "val.jsonl:1"}]
  from pgjax import annotations
  rows = annotations.build_suffixes(rows, vae_path=str(vae_path), cache_dir="off")
  m = evaluate.score(rows, ["<loc0000><loc0000><loc1023><loc1023>" + SEGS], vae=str(vae_path))
  assert m["task"] == "segment" and m["miou"] == pytest.approx(0.5) and m["box_accuracy"] == 1.0
  with pytest.raises(ValueError, match=r"val\.jsonl:1: a segmentation row is scored with the segmentation VAE"):
    evaluate.score(rows, ["x"])
