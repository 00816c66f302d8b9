"""Data: images in the model's input layout, JSONL and `datasets` sources, examples and batches.

Images follow PaliGemma's notebook (`tf.image.resize(bilinear, antialias=True)` then `/127.5 - 1`)
and big_vision's `decode|resize(res)|value_range(-1, 1)`, without TensorFlow:

  decode    any PIL mode -> float RGB in [0, 255]; grey replicated, alpha dropped WITHOUT compositing
            (as TF's `decode_image(channels=3)` and Pillow's `convert("RGB")`); 16-bit scaled, not
            clipped; EXIF orientation applied (TF's decoder, hence big_vision, ignores it: the one
            deliberate difference, so photos come out as viewers show them).
  resize    to size x size, per channel in float. Pillow's BILINEAR on 'F' images antialiases when
            shrinking and equals TF's antialiased bilinear to ~2e-5. antialias=False is TF's plain
            half-pixel bilinear (about half of big_vision's transfer configs use it).
  quantize  optional: floor to uint8 after the resize, as big_vision's pp does (its resize casts back
            to the input dtype by truncation), giving exactly 2k/255 - 1.
  scale     x / 127.5 - 1 -> float32 [H, W, 3] in [-1, 1].

Bad images raise `ImageError` (a ValueError) naming the file and the reason; a missing file raises
FileNotFoundError.

Sources give rows, dicts {"image", "prefix", "suffix" (absent for prompts only), any extra fields,
"_source": "file:line"}: `read_jsonl` (the Roboflow layout, paths relative to the file's folder) and
`from_hf_dataset`. Bad rows raise naming the file and line, or with skip_bad=True are dropped and listed
in `Rows.skipped`. `encode` turns a row into arrays; `train_batches` (seeded, infinite, resumable at
any step, multi-host) and `eval_batches` (in order, padded, flagged) decode images in a thread pool a
few batches ahead. `stats` is the token-length check. Only the multi-host defaults import jax.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import json
import math
import os
import re
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps

from pgjax.tokenizer import TRUNCATE_POLICIES

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
  """Reads an image file (path or binary file object) -> float32 [H, W, 3] in [-1, 1].

  `size` is an int (square) or (height, width). `max_pixels` (width * height) defaults to Pillow's
  `Image.MAX_IMAGE_PIXELS`; Pillow's decompression-bomb warning is an error here too, so a larger
  `max_pixels` only helps if `Image.MAX_IMAGE_PIXELS` is raised as well.
  """
  rgb_HW3 = _decode(path_or_file, max_pixels)
  return _resize_and_scale(rgb_HW3, size, antialias=antialias, resample=resample, quantize=quantize)


def _decode(path_or_file, max_pixels=None, *, name=None, verify_only=False):
  """File -> float32 [H, W, 3] on the 8-bit scale, or with verify_only just Pillow's cheap check."""
  name = name or _name(path_or_file)
  limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
  try:
    f = open(path_or_file, "rb") if isinstance(path_or_file, (str, os.PathLike)) else path_or_file
  except FileNotFoundError:
    raise FileNotFoundError(f"image not found: {name}") from None
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


def preprocess_image(image, size, *, antialias: bool = True, resample: str = "bilinear",
                     quantize: bool = False) -> np.ndarray:
  """`load_image` for an in-memory image: a PIL image (any mode; EXIF orientation applied) or a numpy
  uint8/uint16 array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (alpha dropped)."""
  rgb_HW3 = _pil_to_rgb(image, "<PIL image>") if isinstance(image, Image.Image) else _array_to_rgb(np.asarray(image))
  return _resize_and_scale(rgb_HW3, size, antialias=antialias, resample=resample, quantize=quantize)


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
  """Any PIL image -> float32 [H, W, 3] on the 8-bit scale [0, 255]."""
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


def _grey(x_HW: np.ndarray) -> np.ndarray:
  return np.repeat(x_HW[..., None], 3, axis=-1)


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


def _resize_and_scale(x_HWC, size, *, antialias, resample, quantize):
  H, W = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
  if H <= 0 or W <= 0:
    raise ValueError(f"image size must be positive, got {size}")
  if resample not in _RESAMPLE:
    raise ValueError(f"resample={resample!r}; expected one of {sorted(_RESAMPLE)}")
  if x_HWC.shape[0] == 0 or x_HWC.shape[1] == 0:
    raise ImageError(f"empty image of shape {x_HWC.shape}")
  if antialias or resample == "nearest":
    x_HWC = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(x_HWC[..., c], np.float32))
                                 .resize((W, H), _RESAMPLE[resample]))
                      for c in range(x_HWC.shape[-1])], axis=-1)
  elif resample == "bilinear":
    x_HWC = np.einsum("hH,HWC,wW->hwC", _bilinear_matrix(x_HWC.shape[0], H), x_HWC.astype(np.float32),
                      _bilinear_matrix(x_HWC.shape[1], W), optimize=True)
  else:
    raise ValueError(f"antialias=False is only implemented for bilinear (and nearest), not {resample!r}")
  # Bilinear stays within [0, 255]; bicubic and lanczos can overshoot.
  x_HWC = np.clip(x_HWC, 0, 255)
  if quantize:
    x_HWC = np.floor(x_HWC)
  return (x_HWC / np.float32(127.5) - 1).astype(np.float32)


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


def image_of(value, size, *, name: str | None = None, max_pixels: int | None = None, **resize_kw) -> np.ndarray:
  """A row's "image" -> float32 [H, W, 3]: a path (= `load_image`), encoded file bytes (a `datasets`
  Image cell), a PIL image or a uint8/uint16 array (= `preprocess_image`). `name` goes in errors."""
  return _resize_and_scale(_rgb_of(value, name, max_pixels), size, **_resize_defaults(resize_kw))


def _resize_defaults(kw):
  return dict(dict(antialias=True, resample="bilinear", quantize=False), **kw)


def _rgb_of(value, name, max_pixels):
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


# ------------------------------------------------------------------------------------------- sources


class Rows(list):
  """A list of row dicts, plus `skipped`: [(source, reason)] for the rows that skip_bad=True dropped."""

  def __init__(self, rows=(), skipped=()):
    super().__init__(rows)
    self.skipped = list(skipped)


class _BadRow(ValueError):
  pass


VALIDATE_IMAGES = ("none", "header", "full")


def read_jsonl(path, *, image_dir=None, skip_bad: bool = False, validate_images: str = "header",
               max_pixels: int | None = None, workers: int | None = None) -> Rows:
  """Rows of a JSONL file, one JSON object a line: {"image": path, "prefix": str, "suffix": str, ...}.

  "image" is relative to the JSONL's folder (the Roboflow layout), or to `image_dir` when given, and
  comes back absolute. "suffix" may be absent or null (prompts to evaluate or predict); training needs
  it. Other fields ("answers", ...) are kept; "_source" is "file:line". Blank lines are ignored.

  Problems found here: malformed JSON or UTF-8, a row that is not an object, "image" or "prefix"
  missing or empty, wrong types ("answers"/"references", when present, are lists of strings), text
  that is not valid Unicode (a lone surrogate escape), several images in one row (one image per
  example is supported), a missing image file and, by `validate_images`, unreadable images: "header"
  (default) opens each file and runs Pillow's verify (fast: catches non-images, wrong formats, bad PNG
  checksums, oversized images); "full" decodes every image (catches truncated JPEGs too, costs one epoch of decoding);
  "none" only checks that the files exist. An image that fails later, while training, raises there.
  All problems are collected; the first in file order raises ValueError "file:line: problem (and N
  more)". With skip_bad=True those rows are dropped and listed in `.skipped` instead.
  """
  path = os.fspath(path)
  base = os.path.abspath(os.fspath(image_dir) if image_dir is not None else os.path.dirname(path))

  def resolve(image):
    if not isinstance(image, str):
      raise _BadRow(f'"image" must be a path string, got {_json_type(image)}')
    return os.path.normpath(os.path.join(base, image))

  try:
    f = open(path, "rb")
  except FileNotFoundError:
    raise FileNotFoundError(f"JSONL file not found: {path}") from None
  rows, bad = [], []
  with f:
    for n, raw in enumerate(f, 1):
      source = f"{path}:{n}"
      try:
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise _BadRow(f"not UTF-8 ({e})") from None
        if n == 1:
          line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise _BadRow(f"malformed JSON ({e})") from None
        rows.append((n, _make_row(obj, source, resolve)))
      except _BadRow as e:
        bad.append((n, source, str(e)))
  return _finish_rows(rows, bad, skip_bad=skip_bad,
                      validate_images=validate_images, max_pixels=max_pixels, workers=workers, what=path)


def from_hf_dataset(ds, *, image_column: str = "image", prefix_column: str = "prefix",
                    suffix_column: str = "suffix", image_dir=None, name: str | None = None,
                    skip_bad: bool = False, validate_images: str = "header", max_pixels: int | None = None,
                    workers: int | None = None) -> Rows:
  """Rows of a Hugging Face `datasets.Dataset` with the JSONL's columns, checked the same way.

  The image column may be a `datasets.Image` feature (read undecoded: the row holds the encoded file
  bytes, or its path when the cell has no bytes, so decoding stays lazy and pixel-identical to
  reading the file) or strings (paths relative to `image_dir`, else to the working directory).
  The encoded bytes are held in memory: for datasets larger than RAM, export files and a JSONL.
  Other columns are kept under their names; "_source" is "{name}[index]" (0-based).
  """
  import datasets  # optional dependency; the caller already has it if it has a Dataset

  name = name or getattr(getattr(ds, "info", None), "dataset_name", None) or "dataset"
  if image_column not in ds.column_names or prefix_column not in ds.column_names:
    raise ValueError(f"{name}: needs columns {image_column!r} and {prefix_column!r}, has {ds.column_names}")
  if isinstance(ds.features[image_column], datasets.Image):
    ds = ds.cast_column(image_column, datasets.Image(decode=False))
  base = os.path.abspath(os.fspath(image_dir) if image_dir is not None else os.getcwd())

  def resolve(image):
    if isinstance(image, dict) and ("bytes" in image or "path" in image):  # an undecoded Image cell
      if image.get("bytes"):
        return image["bytes"]
      image = image.get("path")
      if not image:
        raise _BadRow('"image" cell has neither bytes nor a path')
    if isinstance(image, (str, os.PathLike)):
      return os.path.normpath(os.path.join(base, os.fspath(image)))
    if isinstance(image, (bytes, Image.Image, np.ndarray)):
      return image
    raise _BadRow(f'"image" must be a path, file bytes, a PIL image or an array, got {type(image).__name__}')

  rename = {image_column: "image", prefix_column: "prefix", suffix_column: "suffix"}
  rows, bad = [], []
  for i, ex in enumerate(ds):
    source = f"{name}[{i}]"
    try:
      rows.append((i, _make_row({rename.get(k, k): v for k, v in ex.items()}, source, resolve)))
    except _BadRow as e:
      bad.append((i, source, str(e)))
  return _finish_rows(rows, bad, skip_bad=skip_bad,
                      validate_images=validate_images, max_pixels=max_pixels, workers=workers, what=name)


def _json_type(x) -> str:
  return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
          int: "a number", float: "a number"}.get(type(x), type(x).__name__)


# Optional per-row targets that evaluate.py and viz.py read as lists of strings: VQA answers, caption references.
_TARGET_LISTS = ("answers", "references")


def _check_unicode(value, where: str) -> None:
  """Every string in a row (keys too, nested ones included) must be encodable as UTF-8. JSON can escape half a
  UTF-16 pair ("\\ud83d") into a str that cannot: sentencepiece (C++) then fails deep inside training naming no
  row, and so do printing it and writing it to a UTF-8 file. `where` names the field, e.g. '"answers"[2]'."""
  if isinstance(value, str):
    try:
      value.encode("utf-8")
    except UnicodeEncodeError as e:
      raise _BadRow(f"{where} is not valid Unicode: lone surrogate {_printable(value[e.start])} at character "
                    f"{e.start} (e.g. a JSON escape of half a UTF-16 pair)") from None
  elif isinstance(value, dict):
    for k, v in value.items():
      name = f'{where}."{_printable(k)}"' if where else f'"{_printable(k)}"'
      _check_unicode(k, f"key {name}")
      _check_unicode(v, name)
  elif isinstance(value, (list, tuple)):
    for i, v in enumerate(value):
      _check_unicode(v, f"{where}[{i}]")


def _printable(text) -> str:
  """`text` with surrogates written as \\udXXX escapes, so an error message naming it can itself be printed."""
  return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def _check_text_list(key: str, value) -> None:
  """null or absent, or a list of strings. Any other value would be iterated by the scorer (a dict's keys,
  a string's characters) and score wrong without an error."""
  if value is None:
    return
  if not isinstance(value, (list, tuple)):
    raise _BadRow(f'"{key}" must be a list of strings, got {_json_type(value)}')
  for i, item in enumerate(value):
    if not isinstance(item, str):
      raise _BadRow(f'"{key}"[{i}] must be a string, got {_json_type(item)}')


def _make_row(obj, source, resolve) -> dict:
  if not isinstance(obj, dict):
    raise _BadRow(f"expected a JSON object, got {_json_type(obj)}")
  image, prefix, suffix = obj.get("image"), obj.get("prefix"), obj.get("suffix")
  if isinstance(image, (list, tuple)):
    raise _BadRow(f'"image" holds {len(image)} images; one image per example is supported')
  if image is None or (isinstance(image, str) and not image):
    raise _BadRow('missing or empty "image"')
  if prefix is None or prefix == "":
    raise _BadRow('missing or empty "prefix"')
  if not isinstance(prefix, str):
    raise _BadRow(f'"prefix" must be a string, got {_json_type(prefix)}')
  if suffix is not None and not isinstance(suffix, str):
    raise _BadRow(f'"suffix" must be a string, got {_json_type(suffix)}')
  for key in _TARGET_LISTS:
    _check_text_list(key, obj.get(key))
  _check_unicode(obj, "")
  row = dict(obj, image=resolve(image), _source=source)
  if suffix is None:
    row.pop("suffix", None)  # null means "no suffix": a prompt only
  return row


def _finish_rows(rows, bad, *, skip_bad, validate_images, max_pixels, workers, what) -> Rows:
  """rows: [(position, row)] that passed the field checks; bad: [(position, source, reason)]."""
  if validate_images not in VALIDATE_IMAGES:
    raise ValueError(f"validate_images={validate_images!r}; expected one of {VALIDATE_IMAGES}")

  def check(item):
    row = item[1]
    try:
      _check_image(row["image"], row["_source"], validate_images, max_pixels)
    except (ImageError, OSError) as e:
      return str(e)

  with concurrent.futures.ThreadPoolExecutor(max(1, _workers(workers))) as pool:
    problems = list(pool.map(check, rows))
  bad = sorted(bad + [(n, r["_source"], p) for (n, r), p in zip(rows, problems) if p])
  if bad and not skip_bad:
    more = f" (and {len(bad) - 1} more bad rows; skip_bad=True drops and lists them)" if len(bad) > 1 else ""
    raise ValueError(f"{bad[0][1]}: {bad[0][2]}{more}")
  if not rows and not bad:
    warnings.warn(f"{what}: no rows", stacklevel=3)
  return Rows([r for (_, r), p in zip(rows, problems) if not p], [(s, reason) for _, s, reason in bad])


def _check_image(value, source, mode, max_pixels) -> None:
  if isinstance(value, (str, os.PathLike)) and not os.path.isfile(value):
    raise FileNotFoundError(f"image file not found: {value}")
  if mode == "none" or not isinstance(value, (str, os.PathLike, bytes)):
    return  # in-memory images are already decoded
  f = io.BytesIO(value) if isinstance(value, bytes) else value
  name = f"image of {source}" if isinstance(value, bytes) else None
  if mode == "header":
    _decode(f, max_pixels, name=name, verify_only=True)
  else:
    _decode(f, max_pixels, name=name)


def _workers(workers) -> int:
  return min(8, os.cpu_count() or 1) if workers is None else workers


# ---------------------------------------------------------------------------------------- examples


@dataclasses.dataclass(frozen=True, kw_only=True)
class Augment:
  """Training-time image augmentation; `None` (the default everywhere) means none.

  crop_scale: (lo, hi) fraction of the image area kept by a random crop of aspect ratio in
  crop_ratio, taken from the decoded image before the resize. flip: horizontal, with probability 1/2.
  brightness: adds a delta in [-b, b] of the full range. contrast: scales about the per-channel mean
  by a factor in [1 - c, 1 + c]. The result is clipped to [-1, 1].

  Crops and flips move things: they are WRONG for `<locNNNN>` boxes and `<segNNN>` masks, and flips
  for texts that say "left" or "right". Such examples (any of these in the prefix or suffix) get no
  crop and no flip, only the colour jitter; the pipeline counts them in stats["augment_limited"].
  Other position-dependent texts ("the first word is ...", OCR layout) are yours to judge.
  """

  crop_scale: tuple[float, float] | None = None
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = False
  brightness: float = 0.0
  contrast: float = 0.0

  def __post_init__(self):
    if self.crop_scale is not None and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
      raise ValueError(f"crop_scale={self.crop_scale}: need 0 < lo <= hi <= 1")
    if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
      raise ValueError(f"crop_ratio={self.crop_ratio}: need 0 < lo <= hi")
    if not (0 <= self.brightness and 0 <= self.contrast <= 1):
      raise ValueError(f"brightness={self.brightness}, contrast={self.contrast}: need b >= 0 and 0 <= c <= 1")


_NO_GEOMETRY = re.compile(r"<loc\d+>|<seg\d+>")
_NO_FLIP = re.compile(r"\b(left|right)", re.IGNORECASE)
BATCH_KEYS = ("image", "text", "mask_ar", "mask_loss", "mask_input")
LAYOUTS = ("auto", "train", "prompt")


def encode(row, tok, *, size, max_len: int, truncate: str = "error", layout: str = "auto",
           augment: Augment | None = None, rng: np.random.Generator | None = None,
           image_kw: dict | None = None) -> dict:
  """One row -> dict(image float32 [H, W, 3], text, mask_ar, mask_loss, mask_input int32 [max_len],
  num_truncated int), plus "augment_limited" (bool) when augmenting.

  layout "auto" is "train" ([bos] prefix "\\n" suffix [eos]) when the row has a suffix and "prompt"
  ([bos] prefix "\\n") otherwise. A train example must have >= 1 supervised token (the eos counts)
  and its loss only where mask_ar and mask_input are 1, else ValueError naming the row. `image_kw`
  goes to the image loader (antialias, resample, quantize, max_pixels); `rng` drives `augment`.
  """
  source = row.get("_source", "<row>")
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}; expected one of {LAYOUTS}")
  if layout == "auto":
    layout = "prompt" if row.get("suffix") is None else "train"
  suffix = row.get("suffix") if layout == "train" else None
  if layout == "train" and not isinstance(suffix, str):
    raise ValueError(f'{source}: a training example needs a "suffix" string')
  try:
    ex = tok.encode_example(row["prefix"], suffix, max_len=max_len, truncate=truncate)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{source}: {e}") from e
  if layout == "train":
    loss, ar, inp = ex["mask_loss"] == 1, ex["mask_ar"] == 1, ex["mask_input"] == 1
    if not loss.any() or np.any(loss & ~(ar & inp)):
      raise ValueError(f"{source}: bad masks: {loss.sum()} supervised tokens (need >= 1), loss outside "
                       f"mask_ar/mask_input at {np.flatnonzero(loss & ~(ar & inp)).tolist()}")
  kw = dict(image_kw or {})
  max_pixels = kw.pop("max_pixels", None)
  try:
    rgb_HW3 = _rgb_of(row["image"], f"image of {source}", max_pixels)
    if augment is None:
      ex["image"] = _resize_and_scale(rgb_HW3, size, **_resize_defaults(kw))
    else:
      text = row["prefix"] + (suffix or "")
      geometric = not _NO_GEOMETRY.search(text)
      flip_ok = geometric and not _NO_FLIP.search(text)
      ex["image"] = _augment(rgb_HW3, size, augment, rng or np.random.default_rng(), geometric=geometric,
                             flip_ok=flip_ok, kw=kw)
      ex["augment_limited"] = (augment.crop_scale is not None and not geometric) or (augment.flip and not flip_ok)
  except (ImageError, OSError) as e:
    raise type(e)(f"{e} ({source})") from e
  return ex


def _augment(rgb_HW3, size, aug: Augment, rng, *, geometric, flip_ok, kw):
  # Every draw is made whatever is enabled, so turning one option on does not shift the others.
  u_area, u_ratio, u_x, u_y, u_flip, u_bright, u_contrast = rng.random(7)
  if aug.crop_scale is not None and geometric:
    H, W = rgb_HW3.shape[:2]
    lo, hi = aug.crop_scale
    area = H * W * (lo + u_area * (hi - lo))
    ratio = math.exp(math.log(aug.crop_ratio[0]) + u_ratio * math.log(aug.crop_ratio[1] / aug.crop_ratio[0]))
    w = min(W, max(1, round(math.sqrt(area * ratio))))
    h = min(H, max(1, round(math.sqrt(area / ratio))))
    x0, y0 = int(u_x * (W - w + 1)), int(u_y * (H - h + 1))
    rgb_HW3 = rgb_HW3[y0:y0 + h, x0:x0 + w]
  x_HW3 = _resize_and_scale(rgb_HW3, size, **_resize_defaults(kw))
  if aug.flip and flip_ok and u_flip < 0.5:
    x_HW3 = x_HW3[:, ::-1]
  if aug.brightness:
    x_HW3 = x_HW3 + np.float32(2 * aug.brightness * (2 * u_bright - 1))  # [-1, 1] spans 2
  if aug.contrast:
    mean_3 = x_HW3.mean((0, 1), keepdims=True)
    x_HW3 = (x_HW3 - mean_3) * np.float32(1 + aug.contrast * (2 * u_contrast - 1)) + mean_3
  return np.ascontiguousarray(np.clip(x_HW3, -1, 1), np.float32)


# ----------------------------------------------------------------------------------------- batches


class Batches:
  """Iterator of batches (dicts of numpy arrays), each decoded by a thread pool up to `prefetch`
  batches ahead, so the accelerator does not wait on JPEG decoding. A worker's error is raised here,
  in the caller's thread, with the row and file in its message. `close()` (or a `with` block, or
  exhausting it) stops the workers; they finish at most the item in hand.

  `info` describes the batch last returned (step, row indices, sources, valid) and `stats` counts
  the examples so far: examples, truncated_examples, truncated_tokens (truncate="keep_eos") and
  augment_limited (crop/flip withheld, see `Augment`).
  """

  def __init__(self, jobs, make, collate, *, workers=None, prefetch=2):
    if prefetch < 1:
      raise ValueError(f"prefetch must be >= 1, got {prefetch}")
    self._jobs, self._make, self._collate, self._prefetch = iter(jobs), make, collate, prefetch
    workers = _workers(workers)
    self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="pgjax-data") if workers else None
    self._pending = collections.deque()
    self._closed = False
    self.info = None
    self.stats = dict(examples=0, truncated_examples=0, truncated_tokens=0, augment_limited=0)

  def _submit(self, item):
    if self._pool is None:  # workers=0: decode in the caller's thread, when asked (for debugging)
      return _Deferred(self._make, item)
    return self._pool.submit(self._make, item)

  def _fill(self):
    while len(self._pending) < self._prefetch:
      job = next(self._jobs, None)
      if job is None:
        return
      meta, items = job
      self._pending.append((meta, [self._submit(item) for item in items]))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._closed:
      raise StopIteration
    self._fill()
    if not self._pending:
      self.close()
      raise StopIteration
    meta, futures = self._pending.popleft()
    try:
      examples = [f.result() for f in futures]
    except BaseException:
      self.close()
      raise
    self._fill()  # keep the workers busy while the caller uses this batch
    for ex in examples:
      self.stats["examples"] += 1
      self.stats["truncated_examples"] += ex["num_truncated"] > 0
      self.stats["truncated_tokens"] += ex["num_truncated"]
      self.stats["augment_limited"] += ex.get("augment_limited", False)
    self.info = meta
    return self._collate(meta, examples)

  def close(self) -> None:
    self._closed = True
    self._pending.clear()
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    if getattr(self, "_pool", None) is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)


class _Deferred:

  def __init__(self, fn, item):
    self._fn, self._item = fn, item

  def result(self):
    return self._fn(self._item)


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # only for the defaults, so the data code runs without touching jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside 0..{process_count - 1}")
  return process_index, process_count


def _local_slice(batch_size, process_index, process_count) -> range:
  """This host's contiguous share of each global batch; the global order ignores the host count."""
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f"global batch_size={batch_size} must be a positive multiple of process_count={process_count}")
  local = batch_size // process_count
  return range(process_index * local, (process_index + 1) * local)


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
  """The row order of one training epoch: a permutation from np.random.default_rng([seed, epoch])."""
  return np.random.default_rng([seed, epoch]).permutation(num_rows)


def train_batches(rows, tok, *, batch_size: int, size, max_len: int, seed: int, start_step: int = 0,
                  num_steps: int | None = None, truncate: str = "error", augment: Augment | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  workers: int | None = None, prefetch: int = 2, image_kw: dict | None = None,
                  check_lengths: bool = True) -> Batches:
  """Training batches for steps start_step, start_step + 1, ... (forever, or `num_steps` of them).

  Step s holds examples s * batch_size .. (s + 1) * batch_size - 1 of the epoch orders laid end to
  end (`epoch_order(len(rows), seed, e)` for e = 0, 1, ...), so a batch may span two epochs and the
  same (seed, step) always gives the same batch: resuming at start_step=k costs nothing and decodes
  nothing before k. `batch_size` is global; this host yields its contiguous share (process_index,
  process_count default to jax's), and the global batches do not depend on the number of hosts.
  Augmentation (off by default) is seeded by (seed, step, position in the global batch).

  Each batch: image float32 [B, H, W, 3], text/mask_ar/mask_loss/mask_input int32 [B, max_len], B the
  local batch size. With check_lengths every row is tokenized once up front: over-long examples raise
  here with truncate="error" (not hours into training) and are counted in a warning with "keep_eos".
  """
  n = len(rows)
  if not n:
    raise ValueError("no training rows")
  if truncate not in TRUNCATE_POLICIES:
    raise ValueError(f"truncate={truncate!r}; expected one of {TRUNCATE_POLICIES}")
  if seed < 0 or start_step < 0:
    raise ValueError(f"seed={seed} and start_step={start_step} must be >= 0")
  no_suffix = [r.get("_source", f"row {i}") for i, r in enumerate(rows) if not isinstance(r.get("suffix"), str)]
  if no_suffix:
    raise ValueError(f'{len(no_suffix)} training row(s) have no "suffix" string: {no_suffix[:5]}')
  share = _local_slice(batch_size, *_process(process_index, process_count))
  if check_lengths:
    s = stats(rows, tok, max_len)
    if s["over_max_len"]:
      msg = (f"{s['over_max_len']} of {n} training examples need more than max_len={max_len} tokens (longest "
             f"{s['max']}), e.g. {s['over_sources'][:3]}")
      if truncate == "error":
        raise ValueError(msg + "; raise max_len or pass truncate='keep_eos'")
      warnings.warn(msg + f"; truncate={truncate!r} drops {s['over_tokens']} suffix tokens per epoch, keeping "
                    f"each eos", stacklevel=2)
  orders = {}

  def index(g):  # global example position -> row index; keeps the two latest epochs' orders
    e = g // n
    if e not in orders:
      orders[e] = epoch_order(n, seed, e)
      orders.pop(e - 2, None)
    return int(orders[e][g % n])

  def jobs():
    step = start_step
    while num_steps is None or step < start_step + num_steps:
      items = [(index(step * batch_size + j), step, j) for j in share]
      indices = [i for i, _, _ in items]
      yield dict(step=step, indices=indices, sources=[rows[i].get("_source") for i in indices]), items
      step += 1

  def make(item):
    i, step, j = item
    rng = None if augment is None else np.random.default_rng([seed, step, j, 1])
    return encode(rows[i], tok, size=size, max_len=max_len, truncate=truncate, layout="train",
                  augment=augment, rng=rng, image_kw=image_kw)

  return Batches(jobs(), make, _collate, workers=workers, prefetch=prefetch)


def eval_batches(rows, tok, *, batch_size: int, size, max_len: int, process_index: int | None = None,
                 process_count: int | None = None, workers: int | None = None, prefetch: int = 2,
                 image_kw: dict | None = None) -> Batches:
  """Prompt batches ([bos] prefix "\\n", suffixes ignored) covering every row once, in order.

  All batches have the same shape: the last is padded by repeating the last row. Besides the arrays
  of `train_batches`, each has valid bool [B] (False on padding) and index int32 [B] (the row's
  position in `rows`, -1 on padding), so each example is scored exactly once. Multi-host: as
  `train_batches`, each host gets its contiguous share of every global batch.
  """
  n = len(rows)
  share = _local_slice(batch_size, *_process(process_index, process_count))

  def jobs():
    for step in range(-(-n // batch_size)):
      items = [(min(g, n - 1), g < n) for g in (step * batch_size + j for j in share)]
      yield dict(step=step, indices=[i if ok else -1 for i, ok in items],
                 valid=[ok for _, ok in items], sources=[rows[i].get("_source") for i, _ in items]), items

  def make(item):
    return encode(rows[item[0]], tok, size=size, max_len=max_len, layout="prompt", image_kw=image_kw)

  def collate(meta, examples):
    return dict(_collate(meta, examples), valid=np.array(meta["valid"], bool),
                index=np.array(meta["indices"], np.int32))

  return Batches(jobs(), make, collate, workers=workers, prefetch=prefetch)


def _collate(meta, examples) -> dict:
  return {k: np.stack([ex[k] for ex in examples]) for k in BATCH_KEYS}


# ------------------------------------------------------------------------------------------- stats


def stats(rows, tok, max_len: int, *, layout: str = "auto") -> dict:
  """Token lengths as `encode` lays them out ([bos] prefix "\\n" [suffix eos]), for a data check.

  Returns count, max, mean, p50/p90/p99, over_max_len (rows longer than max_len), over_tokens (their
  excess, the suffix tokens keep_eos would drop), over_sources (the first 10), empty_suffix (rows
  whose only supervised token is the eos), and histogram: [(lo, hi, count)] in power-of-two bins.
  """
  lengths = np.array([_length(r, tok, layout) for r in rows], np.int64)
  over = np.flatnonzero(lengths > max_len)
  edges = [0] + [2**k for k in range(3, max(4, int(lengths.max(initial=1) - 1).bit_length() + 1))]
  hist = [(lo + 1, hi, int(((lengths > lo) & (lengths <= hi)).sum())) for lo, hi in zip(edges, edges[1:])]
  pct = np.percentile(lengths, [50, 90, 99]).tolist() if len(lengths) else [0, 0, 0]
  return dict(count=len(rows), max_len=max_len, max=int(lengths.max(initial=0)),
              mean=float(lengths.mean()) if len(lengths) else 0.0, p50=pct[0], p90=pct[1], p99=pct[2],
              over_max_len=len(over), over_tokens=int((lengths[over] - max_len).sum()),
              over_sources=[rows[i].get("_source", f"row {i}") for i in over[:10]],
              empty_suffix=sum(isinstance(r.get("suffix"), str) and not tok.encode(r["suffix"]) for r in rows)
              if layout != "prompt" else 0, histogram=hist)


def _length(row, tok, layout) -> int:
  suffix = None if layout == "prompt" else row.get("suffix")
  if layout == "train" and suffix is None:
    raise ValueError(f'{row.get("_source", "<row>")}: a training example needs a "suffix" string')
  return tok.example_len(row["prefix"], suffix)


def format_stats(s: dict) -> str:
  """`stats` as a few readable lines."""
  lines = [f"{s['count']} examples, tokens: max {s['max']}, mean {s['mean']:.1f}, p50 {s['p50']:.0f}, "
           f"p90 {s['p90']:.0f}, p99 {s['p99']:.0f}; max_len {s['max_len']}: {s['over_max_len']} longer "
           f"({s['over_tokens']} tokens over), {s['empty_suffix']} with an empty suffix"]
  width = max([c for _, _, c in s["histogram"]] + [1])
  lines += [f"  {lo:5d}-{hi:<5d} {c:7d} {'#' * round(40 * c / width)}" for lo, hi, c in s["histogram"]]
  lines += [f"  over max_len: {src}" for src in s["over_sources"]]
  return "\n".join(lines)
