"""Image loading: every PIL mode, hand-computed pixel values, EXIF, antialiasing, clear errors."""

import io

import numpy as np
import pytest
from PIL import Image

from data_fixtures import SIZE, folder  # noqa: F401 (a fixture)
from pgjax import images
from pgjax.images import ImageError, load_image, preprocess_image


def _scaled(rgb):
  return np.asarray(rgb, np.float64) / 127.5 - 1


def _palette(mode, index, colour):
  im = Image.new(mode, (7, 5), index if mode == "P" else (index, 0))
  im.putpalette(list(colour) * 256)
  return im


# (mode, a constant image of that mode, the RGB it must read as on the 0..255 scale), worked out by hand.
CASES = [
    ("1", lambda: Image.new("1", (7, 5), 1), (255, 255, 255)),
    ("L", lambda: Image.new("L", (7, 5), 100), (100, 100, 100)),
    ("LA", lambda: Image.new("LA", (7, 5), (100, 3)), (100, 100, 100)),
    ("P", lambda: _palette("P", 3, (30, 60, 90)), (30, 60, 90)),
    ("PA", lambda: _palette("PA", 3, (30, 60, 90)), (30, 60, 90)),
    ("RGB", lambda: Image.new("RGB", (7, 5), (10, 200, 77)), (10, 200, 77)),
    ("RGBA", lambda: Image.new("RGBA", (7, 5), (10, 200, 77, 0)), (10, 200, 77)),
    ("CMYK", lambda: Image.new("CMYK", (7, 5), (0, 255, 55, 0)), (255, 0, 200)),  # no K: 255 - C, M, Y
    ("YCbCr", lambda: Image.new("YCbCr", (7, 5), (128, 128, 128)), (128, 128, 128)),  # neutral chroma
    ("HSV", lambda: Image.new("HSV", (7, 5), (0, 255, 255)), (255, 0, 0)),  # hue 0, full saturation
    ("I", lambda: Image.new("I", (7, 5), 25700), (100, 100, 100)),  # 16-bit data in "I": / 257
    ("I;16", lambda: Image.new("I;16", (7, 5), 65535), (255, 255, 255)),
    ("I;16B", lambda: Image.new("I;16B", (7, 5), 257 * 20), (20, 20, 20)),
    ("I;16L", lambda: Image.new("I;16L", (7, 5), 257 * 40), (40, 40, 40)),
    ("F", lambda: Image.new("F", (7, 5), 100.5), (100.5, 100.5, 100.5)),
]


@pytest.mark.parametrize("mode,make,rgb", CASES, ids=[c[0] for c in CASES])
def test_every_mode_in_memory(mode, make, rgb):
  im = make()
  assert im.mode == mode
  out = preprocess_image(im, 4)
  assert out.dtype == np.float32 and out.shape == (4, 4, 3)
  # A constant image resizes to exactly itself, so the output is the colour / 127.5 - 1.
  tol = 2 / 127.5 if mode == "YCbCr" else 1e-6  # YCbCr -> RGB is fixed-point in Pillow
  np.testing.assert_allclose(out, np.broadcast_to(_scaled(rgb), out.shape), atol=tol, rtol=0)


FILE_MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "I;16B", "F"]


@pytest.mark.parametrize("mode", FILE_MODES)
def test_every_mode_from_tiff(tmp_path, mode):
  make, rgb = next((m, c) for name, m, c in CASES if name == mode)
  path = tmp_path / "x.tiff"
  make().save(path)
  out = load_image(path, 6)
  assert out.dtype == np.float32 and out.shape == (6, 6, 3)
  assert out.min() >= -1 and out.max() <= 1
  tol = 2 / 127.5 if mode == "YCbCr" else 1e-6
  np.testing.assert_allclose(out, np.broadcast_to(_scaled(rgb), out.shape), atol=tol, rtol=0)


def test_32_bit_integer_range():
  # "I" holding more than 16 bits is read on the 0..2**31-1 scale; negatives clip to black.
  np.testing.assert_allclose(preprocess_image(Image.new("I", (3, 3), 2**31 - 1), 2), 1.0, atol=1e-6)
  np.testing.assert_allclose(preprocess_image(Image.new("I", (3, 3), 2**30), 2), _scaled(255 / 2), atol=1e-6)
  np.testing.assert_allclose(preprocess_image(Image.new("I", (3, 3), -5), 2), -1.0, atol=1e-6)


def test_lab_neutral_is_grey(tmp_path):
  Image.frombytes("LAB", (3, 2), bytes([255, 0, 0] * 6)).save(tmp_path / "lab.tiff")  # L max, a = b = 0
  out = load_image(tmp_path / "lab.tiff", 4)
  assert np.all(out > 1 - 3 / 127.5)


def test_sixteen_bit_png_scales_not_clips(tmp_path):
  x = np.array([[0, 257, 65535], [32896, 65535, 0]], np.uint16)  # 32896 = 257 * 128
  Image.fromarray(x).save(tmp_path / "x.png")
  out = load_image(tmp_path / "x.png", (2, 3))
  np.testing.assert_allclose(out[..., 0], _scaled(x / 257), atol=1e-6, rtol=0)
  assert out[0, 2, 0] == 1.0


def test_grey_replicates_and_alpha_is_dropped(tmp_path):
  rng = np.random.default_rng(0)
  grey = rng.integers(0, 256, (8, 8), np.uint8)
  out = preprocess_image(Image.fromarray(grey), 8)
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  np.testing.assert_allclose(out[..., 0], _scaled(grey), atol=1e-6)
  rgb = rng.integers(0, 256, (8, 8, 3), np.uint8)
  for alpha in (0, 128, 255):
    rgba = np.concatenate([rgb, np.full((8, 8, 1), alpha, np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "a.png")  # RGBA PNG
    np.testing.assert_allclose(load_image(tmp_path / "a.png", 8), _scaled(rgb), atol=1e-6)


def test_palette_with_transparency(tmp_path):
  im = _palette("P", 1, (30, 60, 90))
  im.info["transparency"] = bytes([255, 0] + [255] * 254)  # index 1 fully transparent
  im.save(tmp_path / "p.png")
  with Image.open(tmp_path / "p.png") as reread:
    assert reread.mode == "P" and reread.info.get("transparency") is not None
  np.testing.assert_allclose(load_image(tmp_path / "p.png", 3), np.broadcast_to(_scaled((30, 60, 90)), (3, 3, 3)),
                             atol=1e-6)


def test_exif_orientation_is_applied(tmp_path):
  # Stored 64 wide x 32 tall: left half red, right half blue. Orientation 6 = display rotated 90° clockwise,
  # so the left half ends up on top: displayed 32 wide x 64 tall, top red, bottom blue.
  x = np.zeros((32, 64, 3), np.uint8)
  x[:, :32] = (255, 0, 0)
  x[:, 32:] = (0, 0, 255)
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(x).save(tmp_path / "r.jpg", quality=95, exif=exif)
  out = load_image(tmp_path / "r.jpg", (64, 32))
  assert out.shape == (64, 32, 3)
  np.testing.assert_allclose(out[4:28].mean((0, 1)), [1, -1, -1], atol=0.05)
  np.testing.assert_allclose(out[36:60].mean((0, 1)), [-1, -1, 1], atol=0.05)
  Image.fromarray(x).save(tmp_path / "plain.jpg", quality=95)  # no tag: unrotated
  out = load_image(tmp_path / "plain.jpg", (32, 64))
  np.testing.assert_allclose(out[:, 4:28].mean((0, 1)), [1, -1, -1], atol=0.05)


def test_antialias_downscale():
  # A 1-pixel checkerboard shrunk 3x. Without antialias, TF's bilinear samples source pixel 3i+1 exactly,
  # whose colour alternates with i: a full-contrast checkerboard (aliasing). With antialias, Pillow's
  # triangle filter of half-width 3 weights the pixels around each centre by 1/3, 2/3, 1, 2/3, 1/3:
  # 5/9 on the centre's parity and 4/9 on the other per axis, so interior outputs are 2*(5/9)(4/9) = 40/81
  # or 41/81 of white.
  board = ((np.arange(48)[:, None] + np.arange(48)[None]) % 2 * 255).astype(np.uint8)
  aliased = preprocess_image(board, 16, antialias=False)[..., 0]
  assert set(np.unique(aliased)) == {-1.0, 1.0}
  smooth = preprocess_image(board, 16)[..., 0]
  inner = (smooth[1:-1, 1:-1] + 1) / 2 * 81
  assert np.all((np.abs(inner - 40) < 1e-4) | (np.abs(inner - 41) < 1e-4))


def test_bilinear_without_antialias_by_hand():
  # Upscaling [0, 255] to width 4 samples source x = (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25,
  # clamped to [0, 1]: 0, 63.75, 191.25, 255.
  out = preprocess_image(np.array([[0, 255]], np.uint8), (1, 4), antialias=False)[0, :, 0]
  np.testing.assert_allclose(out, _scaled([0, 63.75, 191.25, 255]), atol=1e-6)


def test_upscaling_same_with_and_without_antialias():
  # Antialiasing only matters when shrinking: Pillow's filter and the numpy one must agree when growing.
  x = np.random.default_rng(1).integers(0, 256, (7, 9, 3), np.uint8)
  np.testing.assert_allclose(preprocess_image(x, (13, 20)), preprocess_image(x, (13, 20), antialias=False),
                             atol=1e-5)


def test_quantize_floors_after_resize():
  x = np.random.default_rng(2).integers(0, 256, (30, 40, 3), np.uint8)
  q = preprocess_image(x, 16, quantize=True)
  f = preprocess_image(x, 16)
  k = (q.astype(np.float64) + 1) * 127.5
  np.testing.assert_allclose(k, np.round(k), atol=1e-4)  # exactly 2k/255 - 1
  np.testing.assert_array_equal(np.round(k), np.floor((f.astype(np.float64) + 1) * 127.5 + 1e-4))


def test_numpy_inputs():
  rgb = np.random.default_rng(3).integers(0, 256, (5, 5, 3), np.uint8)
  rgba = np.concatenate([rgb, np.zeros((5, 5, 1), np.uint8)], -1)
  np.testing.assert_array_equal(preprocess_image(rgba, 5), preprocess_image(rgb, 5))
  np.testing.assert_allclose(preprocess_image(rgb, 5), _scaled(rgb), atol=1e-6)
  assert preprocess_image(np.full((4, 4), 65535, np.uint16), 2).min() == 1.0
  with pytest.raises(ImageError, match="float"):
    preprocess_image(rgb.astype(np.float32), 5)
  with pytest.raises(ImageError, match="shape"):
    preprocess_image(np.zeros((5, 5, 2), np.uint8), 5)


def test_file_object_input():
  buf = io.BytesIO()
  Image.new("RGB", (9, 9), (0, 255, 0)).save(buf, "PNG")
  buf.seek(0)
  np.testing.assert_allclose(load_image(buf, 3), np.broadcast_to([-1, 1, -1], (3, 3, 3)), atol=1e-6)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jpg"):
    load_image(tmp_path / "nope.jpg", 4)


def test_corrupt_file(tmp_path):
  (tmp_path / "junk.jpg").write_bytes(b"this is not an image at all")
  with pytest.raises(ImageError, match="junk.jpg"):
    load_image(tmp_path / "junk.jpg", 4)


def test_truncated_jpeg(tmp_path):
  noise = np.random.default_rng(4).integers(0, 256, (64, 64, 3), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(noise).save(buf, "JPEG", quality=90)
  (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
  with pytest.raises(ImageError, match=r"cut\.jpg.*truncated"):
    load_image(tmp_path / "cut.jpg", 4)


def test_decompression_bomb(tmp_path, monkeypatch):
  Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
  with pytest.raises(ImageError, match=r"big\.png.*400 pixels.*max_pixels=100"):
    load_image(tmp_path / "big.png", 4, max_pixels=100)
  # Pillow's own check: a warning above MAX_IMAGE_PIXELS (an error here too), an error above twice that.
  for limit in (300, 150):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ImageError, match=r"big\.png"):
      load_image(tmp_path / "big.png", 4, max_pixels=10**6)


def test_bad_arguments():
  x = np.zeros((4, 4, 3), np.uint8)
  with pytest.raises(ValueError, match="resample"):
    preprocess_image(x, 2, resample="area")
  with pytest.raises(ValueError, match="antialias=False"):
    preprocess_image(x, 2, resample="bicubic", antialias=False)
  with pytest.raises(ValueError, match="positive"):
    preprocess_image(x, 0)
  assert issubclass(images.ImageError, ValueError)


def test_image_of_every_kind(folder):
  path = folder / "images/0.jpg"
  want = load_image(path, SIZE)
  np.testing.assert_array_equal(images.image_of(str(path), SIZE), want)
  np.testing.assert_array_equal(images.image_of(path.read_bytes(), SIZE), want)
  with Image.open(path) as im:
    np.testing.assert_array_equal(images.image_of(im, SIZE), images.preprocess_image(im, SIZE))
  with pytest.raises(ImageError, match=r"row 3: cannot decode"):
    images.image_of(b"junk", SIZE, name="row 3")
  with pytest.raises(ImageError, match="unsupported image value of type int"):
    images.image_of(5, SIZE)


def test_decode_rgb_then_resize_and_scale(tmp_path):
  # The decode step alone keeps the image's size and the 8-bit scale; the rest gives image_of's result.
  x = np.array([[0, 255], [128, 64]], np.uint8)
  Image.fromarray(x).save(tmp_path / "g.png")
  for value in (tmp_path / "g.png", (tmp_path / "g.png").read_bytes(), x):
    rgb = images.decode_rgb(value)
    assert rgb.dtype == np.float32 and rgb.shape == (2, 2, 3)
    np.testing.assert_array_equal(rgb, np.repeat(x[..., None], 3, -1))
    np.testing.assert_array_equal(images.resize_and_scale(rgb, 2), images.image_of(value, 2))
  np.testing.assert_allclose(images.resize_and_scale(np.full((3, 3, 3), 255.0), (1, 2)), 1.0, atol=1e-6)
  with pytest.raises(ImageError, match=r"row 2: cannot decode"):
    images.decode_rgb(b"junk", name="row 2")


def test_verify_image_checks_without_decoding(tmp_path):
  noise = np.random.default_rng(4).integers(0, 256, (64, 64, 3), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(noise).save(buf, "JPEG", quality=90)
  (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
  images.verify_image(tmp_path / "cut.jpg")  # the header is intact: only decoding finds the truncation
  images.verify_image(buf.getvalue())
  with pytest.raises(ImageError, match=r"cut\.jpg.*truncated"):
    images.decode_rgb(tmp_path / "cut.jpg")
  with pytest.raises(ImageError, match=r"<image bytes>: cannot decode"):
    images.verify_image(b"not an image")
  Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
  with pytest.raises(ImageError, match=r"big\.png.*400 pixels.*max_pixels=100"):
    images.verify_image(tmp_path / "big.png", max_pixels=100)
