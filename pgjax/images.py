"""Images in the model's input layout: decode any file or in-memory image, resize, scale to [-1, 1].

Follows PaliGemma's notebook (`tf.image.resize(bilinear, antialias=True)` then `/127.5 - 1`) and
big_vision's `decode|resize(res)|value_range(-1, 1)`, without TensorFlow:

  decode    any PIL mode -> float RGB in [0, 255]; grey replicated, alpha dropped WITHOUT compositing
            (as TF's `decode_image(channels=3)` and Pillow's `convert("RGB")`); 16-bit scaled, not
            clipped; EXIF orientation applied (TF's decoder, hence big_vision, ignores it: the one
            deliberate difference, so photos come out as viewers show them).
  resize    to size x size, per channel in float. Pillow's BILINEAR on 'F' images antialiases when
            shrinking and equals TF's antialiased bilinear to ~2e-5. antialias=False is TF's plain
            half-pixel bilinear (about half of big_vision's transfer configs use it).
  quantize  optional: floor to uint8 after the resize, as big_vision's pp does (its resize casts back
            to the input dtype by truncation), giving exactly 2k/255 - 1.
  scale     x / 127.5 - 1 -> float32 [Y, X, 3] in [-1, 1].

`decode_rgb` is the first step alone and `resize_and_scale` the rest, for callers that change the
decoded pixels in between (augmentation) or show them (viz). Bad images raise `ImageError` (a
ValueError) naming the file and the reason; a missing file raises FileNotFoundError.

axes: see pgjax/__init__.py
"""

from __future__ import annotations

import io
import os
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps

from pgjax import files

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST,
}
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# warnings.catch_warnings swaps process-wide filters and is not thread-safe; decoding runs in worker
# threads, so the (short) header read that needs it is serialised.
_OPEN_LOCK = threading.Lock()


class ImageError(ValueError):
  """An image that cannot be used: corrupt, truncated, too large or of an unusable mode."""


def load_image(path_or_file, size, *, antialias: bool = True, resample: str = "bilinear",
               quantize: bool = False, max_pixels: int | None = None) -> np.ndarray:
  """Reads an image file (path or binary file object) -> float32 [Y, X, 3] in [-1, 1].

  `size` is an int (square) or (height, width). `max_pixels` (width * height) defaults to Pillow's
  `Image.MAX_IMAGE_PIXELS`; Pillow's decompression-bomb warning is an error here too, so a larger
  `max_pixels` only helps if `Image.MAX_IMAGE_PIXELS` is raised as well.
  """
  rgb_YX3 = _decode(path_or_file, max_pixels)
  return resize_and_scale(rgb_YX3, size, antialias=antialias, resample=resample, quantize=quantize)


def preprocess_image(image, size, *, antialias: bool = True, resample: str = "bilinear",
                     quantize: bool = False) -> np.ndarray:
  """`load_image` for an in-memory image: a PIL image (any mode; EXIF orientation applied) or a numpy
  uint8/uint16 array [Y, X], [Y, X, 1], [Y, X, 3] or [Y, X, 4] (alpha dropped)."""
  rgb_YX3 = _pil_to_rgb(image, "<PIL image>") if isinstance(image, Image.Image) else _array_to_rgb(np.asarray(image))
  return resize_and_scale(rgb_YX3, size, antialias=antialias, resample=resample, quantize=quantize)


def image_of(value, size, *, name: str | None = None, max_pixels: int | None = None, **resize_kw) -> np.ndarray:
  """A row's "image" -> float32 [Y, X, 3]: a path (= `load_image`), encoded file bytes (a `datasets`
  Image cell), a PIL image or a uint8/uint16 array (= `preprocess_image`). `name` goes in errors."""
  return resize_and_scale(decode_rgb(value, name=name, max_pixels=max_pixels), size, **resize_kw)


def decode_rgb(value, *, name: str | None = None, max_pixels: int | None = None) -> np.ndarray:
  """The decode step alone: what `image_of` takes -> float32 [Y, X, 3] on the 8-bit scale [0, 255],
  at the image's own size. `name` goes in errors (a path names itself)."""
  if isinstance(value, (str, os.PathLike)):
    return _decode(value, max_pixels)
  if isinstance(value, (bytes, bytearray, memoryview)):
    return _decode(io.BytesIO(bytes(value)), max_pixels, name=name or "<image bytes>")
  if isinstance(value, Image.Image):
    return _pil_to_rgb(value, name or "<PIL image>")
  if isinstance(value, np.ndarray):
    return _array_to_rgb(value)
  raise ImageError(f"{name or 'image'}: unsupported image value of type {type(value).__name__} (expected a path, "
                   f"file bytes, a PIL image or a uint8/uint16 array)")


def verify_image(value, *, name: str | None = None, max_pixels: int | None = None) -> None:
  """Pillow's cheap check of an image file (path, file object or encoded bytes) without decoding its
  pixels: catches non-images, wrong formats, bad PNG checksums and oversized images, raising as
  `decode_rgb` would. Truncated JPEGs pass; only decoding finds them."""
  if isinstance(value, (bytes, bytearray, memoryview)):
    value, name = io.BytesIO(bytes(value)), name or "<image bytes>"
  _decode(value, max_pixels, name=name, verify_only=True)


def image_size(value) -> tuple[int, int]:
  """(width, height) of the image the model sees (after the EXIF orientation `decode_rgb` applies), from the
  file's header where it is a file: path, file bytes, a PIL image or an array."""
  if isinstance(value, np.ndarray):
    return value.shape[1], value.shape[0]
  if isinstance(value, Image.Image):
    im, close = value, False
  else:
    f = io.BytesIO(bytes(value)) if isinstance(value, (bytes, bytearray, memoryview)) else value
    try:
      with _OPEN_LOCK:
        im, close = Image.open(f), True
    except FileNotFoundError:
      raise FileNotFoundError(f"image not found: {_name(value)}") from None
    except Exception as e:
      raise ImageError(f"{_name(value) if not isinstance(value, bytes) else '<image bytes>'}: cannot read the image "
                       f"header ({type(e).__name__}: {e})") from e
  try:
    w, h = im.size
    # EXIF orientations 5-8 turn the image a quarter: exif_transpose swaps width and height.
    return (h, w) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)
  finally:
    if close:
      im.close()


def decode_workers(workers: int | None) -> int:
  """Threads that decode images: `workers`, or by default one per core, at most 8."""
  return min(8, os.cpu_count() or 1) if workers is None else workers


def _decode(path_or_file, max_pixels=None, *, name=None, verify_only=False):
  """File -> float32 [Y, X, 3] on the 8-bit scale, or with verify_only just Pillow's cheap check."""
  name = name or _name(path_or_file)
  limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
  try:
    f = (open(files.regular_file(path_or_file, "image"), "rb") if isinstance(path_or_file, (str, os.PathLike))
         else path_or_file)
  except FileNotFoundError:
    raise FileNotFoundError(f"image not found: {name}") from None
  except files.NotARegularFile as e:
    raise ImageError(str(e)) from None
  try:
    with _OPEN_LOCK, warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      im = Image.open(f)
    if limit is not None and im.width * im.height > limit:
      raise ImageError(f"{name}: {im.width}x{im.height} = {im.width * im.height} pixels is more than "
                       f"max_pixels={limit} (a decompression bomb?)")
    if verify_only:
      im.verify()
      return None
    # Image.open only reads the header; truncation and most corruption show up in load().
    im.load()
    return _to_rgb(ImageOps.exif_transpose(im), name)
  except ImageError:
    raise
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise ImageError(f"{name}: image too large: {e}") from e
  except Exception as e:  # Pillow's plugins raise many types on bad bytes (OSError, SyntaxError, ...).
    raise ImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e
  finally:
    if f is not path_or_file:
      f.close()


def _pil_to_rgb(image: Image.Image, name: str) -> np.ndarray:
  try:
    return _to_rgb(ImageOps.exif_transpose(image), name)
  except ImageError:
    raise
  except Exception as e:
    raise ImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e


def _name(path_or_file) -> str:
  if isinstance(path_or_file, (str, os.PathLike)):
    return os.fspath(path_or_file)
  return str(getattr(path_or_file, "name", "<file object>"))


def _to_rgb(im: Image.Image, name: str) -> np.ndarray:
  """Any PIL image -> float32 [Y, X, 3] on the 8-bit scale [0, 255]."""
  mode = im.mode
  if mode in _UINT16_MODES:
    # 65535 -> 255 (TF's uint16 -> uint8 cast is x >> 8 instead: at most one step lower).
    return _grey(np.asarray(im).astype(np.float32) / 257.0)
  if mode == "I":
    # 32-bit signed, but in practice it mostly holds 16-bit data (older Pillow opens 16-bit PNGs as
    # "I"), so 0..65535 is read as 16-bit and anything beyond as the 0..2**31-1 range.
    x = np.asarray(im).astype(np.float64)
    scale = 257.0 if x.size == 0 or (x.min() >= 0 and x.max() <= 65535) else (2**31 - 1) / 255
    return _grey(np.clip(x / scale, 0, 255).astype(np.float32))
  if mode == "F":
    # Pillow's own convention for 'F' (its F -> L conversion) is the 8-bit scale; clip outside it.
    return _grey(np.clip(np.asarray(im, np.float32), 0, 255))
  if mode == "P" and "transparency" in im.info:
    # Via RGBA, then drop alpha: same RGB as the palette, without Pillow's transparency warning.
    return np.asarray(im.convert("RGBA"), np.float32)[..., :3]
  try:
    return np.asarray(im.convert("RGB"), np.float32)
  except ValueError:
    pass
  try:  # Rare alpha modes with no direct RGB conversion (e.g. "La").
    return np.asarray(im.convert("RGBA"), np.float32)[..., :3]
  except ValueError:
    raise ImageError(f"{name}: unsupported image mode {mode!r}") from None


def _grey(x_YX: np.ndarray) -> np.ndarray:
  return np.repeat(x_YX[..., None], 3, axis=-1)


def _array_to_rgb(x: np.ndarray) -> np.ndarray:
  if x.dtype == np.uint8 or x.dtype == bool:
    x = x.astype(np.float32) * (255.0 if x.dtype == bool else 1.0)
  elif x.dtype == np.uint16:
    x = x.astype(np.float32) / 257.0
  else:
    raise ImageError(f"image array of dtype {x.dtype}: expected uint8 or uint16 (a float array's value "
                     f"range is ambiguous; convert it first)")
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
    raise ImageError(f"image array of shape {x.shape}: expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]")
  return _grey(x[..., 0]) if x.shape[-1] == 1 else x[..., :3]


def resize_and_scale(x_YXC: np.ndarray, size, *, antialias: bool = True, resample: str = "bilinear",
                     quantize: bool = False) -> np.ndarray:
  """The steps after `decode_rgb`: float [Y, X, C] on the 8-bit scale -> float32 [height, width, C] in
  [-1, 1], `size` an int (square) or (height, width): resized, optionally quantized, then scaled."""
  height, width = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
  if height <= 0 or width <= 0:
    raise ValueError(f"image size must be positive, got {size}")
  if resample not in _RESAMPLE:
    raise ValueError(f"resample={resample!r}; expected one of {sorted(_RESAMPLE)}")
  if x_YXC.shape[0] == 0 or x_YXC.shape[1] == 0:
    raise ImageError(f"empty image of shape {x_YXC.shape}")
  if antialias or resample == "nearest":
    x_YXC = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(x_YXC[..., c], np.float32))
                                 .resize((width, height), _RESAMPLE[resample]))
                      for c in range(x_YXC.shape[-1])], axis=-1)
  elif resample == "bilinear":
    # Y, X: the input's height and width; y, x: the output's.
    x_YXC = np.einsum("yY,YXC,xX->yxC", _bilinear_matrix(x_YXC.shape[0], height), x_YXC.astype(np.float32),
                      _bilinear_matrix(x_YXC.shape[1], width), optimize=True)
  else:
    raise ValueError(f"antialias=False is only implemented for bilinear (and nearest), not {resample!r}")
  # Bilinear stays within [0, 255]; bicubic and lanczos can overshoot.
  x_YXC = np.clip(x_YXC, 0, 255)
  if quantize:
    x_YXC = np.floor(x_YXC)
  return (x_YXC / np.float32(127.5) - 1).astype(np.float32)


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of TF's bilinear resize without antialias (half-pixel centres, edges
  clamped): output i samples input coordinate (i + 0.5) * n_in / n_out - 0.5 from its two neighbours."""
  src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = (src - lo).astype(np.float32)
  m = np.zeros((n_out, n_in), np.float32)
  np.add.at(m, (np.arange(n_out), lo), 1 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m
