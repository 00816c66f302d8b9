"""Row sources: a JSONL file or a Hugging Face `datasets.Dataset` -> checked rows.

A row is a dict {"image", "prefix", "suffix" (absent for prompts only), any extra fields,
"_source": "file:line"}. `read_jsonl` reads the Roboflow layout (one JSON object a line, image paths
relative to the file's folder); `from_hf_dataset` reads a dataset with the same columns. Every row is
checked up front: bad rows raise naming the file and line, or with skip_bad=True are dropped and
listed in `Rows.skipped`. Images are verified or decoded here only to check them, as
`validate_images` says (`images.verify_image`, `images.decode_rgb`); the batches decode them again.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import warnings

import numpy as np
from PIL import Image

from pgjax import annotations, files
from pgjax.images import ImageError, decode_rgb, decode_workers, verify_image


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
    f = open(files.regular_file(path, "JSONL"), "rb")
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
        except RecursionError:  # JSON nested deeper than Python's parser recurses
          raise _BadRow("JSON nested too deeply to read") from None
        except ValueError as e:  # an integer past Python's digit limit for str -> int
          raise _BadRow(f"unreadable JSON value ({e})") from None
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
  try:
    obj = annotations.check_fields(obj, resolve)
  except annotations.FieldError as e:
    raise _BadRow(str(e)) from None
  for m in obj.get("mask") or ():
    if not os.path.isfile(m):
      raise _BadRow(f"mask file not found: {m}")
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

  with concurrent.futures.ThreadPoolExecutor(max(1, decode_workers(workers))) as pool:
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
  name = f"image of {source}" if isinstance(value, bytes) else None
  check = verify_image if mode == "header" else decode_rgb
  check(value, name=name, max_pixels=max_pixels)
