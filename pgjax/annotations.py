"""Rows whose target is an annotation, not text: masks (segmentation) and pixel boxes (detection).

A row may give, instead of a "suffix":
  segmentation  "mask": "m.png" (one object) or ["a.png", "b.png"] (several), paths like "image"'s; optional
                "box" ([x0, y0, x1, y1] pixels of the image, or one per mask; default the mask's tight box)
                and "label" / "labels" (text after each object, as PaliGemma's multi-object outputs have;
                default none, as big_vision's RefCOCO suffix).
  detection     "boxes": [[x0, y0, x1, y1], ...] pixels and "labels": [str, ...], one per box.
`check_fields` (run by pgjax.sources on every row, so a wrong type names file:line at once) checks the shapes
of these fields; `build_suffixes` writes each such row's suffix: `segmentation.mask_to_text` per object (a
mask PNG of the image's size, channel 0, > 0 inside) joined by " ; ", or `detection.encode_detections`.

The 16 codes of each (mask file content, box) are cached on disk, under the VAE file's hash: building the
suffixes once per run costs no VAE time for masks seen before, and the epochs reuse the built text.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from pgjax import files

SEGMENT_KEYS = ("mask", "box", "label", "labels")
DETECT_KEYS = ("boxes",)


class FieldError(ValueError):
  pass


def _is_box(b) -> bool:
  return (isinstance(b, (list, tuple)) and len(b) == 4
          and all(isinstance(c, (int, float)) and not isinstance(c, bool) and np.isfinite(c) for c in b))


def check_fields(obj: dict, resolve_path) -> dict:
  """The annotation fields of one row, checked (FieldError names the field) and with mask paths resolved by
  `resolve_path`; the row itself if it has none."""
  has_mask, has_boxes = obj.get("mask") is not None, obj.get("boxes") is not None
  if not has_mask and not has_boxes:
    for k in ("box", "label"):
      if obj.get(k) is not None:
        raise FieldError(f'"{k}" is given without a "mask"')
    return obj
  if obj.get("suffix") is not None:
    raise FieldError(f'both "suffix" and "{"mask" if has_mask else "boxes"}": give the text or the annotation, '
                     'not both')
  if has_mask and has_boxes:
    raise FieldError('both "mask" and "boxes": one task per row')
  out = dict(obj)
  if has_mask:
    masks = obj["mask"] if isinstance(obj["mask"], list) else [obj["mask"]]
    if not masks or not all(isinstance(m, str) and m for m in masks):
      raise FieldError('"mask" must be a path string or a non-empty list of them')
    out["mask"] = [resolve_path(m) for m in masks]
    box = obj.get("box")
    if box is not None:
      boxes = [box] if _is_box(box) else box
      if not isinstance(boxes, list) or len(boxes) != len(masks) or not all(_is_box(b) for b in boxes):
        raise FieldError(f'"box" must be [x0, y0, x1, y1] in pixels, or one such per mask ({len(masks)}), got {box!r}')
      out["box"] = [list(map(float, b)) for b in boxes]
    labels = obj.get("labels", [obj["label"]] if obj.get("label") is not None else None)
    if obj.get("label") is not None and obj.get("labels") is not None:
      raise FieldError('both "label" and "labels"')
    if labels is not None:
      if not isinstance(labels, list) or len(labels) != len(masks) or not all(isinstance(x, str) for x in labels):
        raise FieldError(f'"labels" must be a list of {len(masks)} strings (one per mask), got {labels!r}')
      out["labels"] = labels
      out.pop("label", None)
  else:
    boxes, labels = obj["boxes"], obj.get("labels")
    if not isinstance(boxes, list) or not all(_is_box(b) for b in boxes):
      raise FieldError(f'"boxes" must be a list of [x0, y0, x1, y1] pixel boxes, got {boxes!r}')
    if not isinstance(labels, list) or len(labels) != len(boxes) or not all(isinstance(x, str) for x in labels):
      raise FieldError(f'"boxes" needs "labels": a list of {len(boxes)} strings, one per box, got {labels!r}')
  return out


def build_suffixes(rows, *, vae_path: str | None = None, cache_dir: str | None = None) -> list[dict]:
  """`rows` with every annotation row's "suffix" built (other rows unchanged). Masks need `vae_path` (the
  segmentation VAE, e.g. vae-oid.npz); a missing, unreadable, empty or mis-sized mask raises naming the row
  (file:line) and the mask file. cache_dir: where the codes are cached (default $XDG_CACHE_HOME/pgjax/seg;
  "off": none)."""
  from pgjax import detection, images
  out = [dict(r) for r in rows]
  seg_rows = [r for r in out if r.get("mask") is not None and r.get("suffix") is None]
  for r in out:
    if r.get("boxes") is not None and r.get("suffix") is None:
      w, h = images.image_size(r["image"])
      try:
        r["suffix"] = detection.encode_detections([_xyxy(b) for b in r["boxes"]], r["labels"], w, h)
      except ValueError as e:
        raise ValueError(f"{r.get('_source', 'row')}: {e}") from None
  if seg_rows:
    if vae_path is None:
      raise ValueError(f"{seg_rows[0].get('_source', 'a row')}: the row gives a mask; building its text needs the "
                       "segmentation VAE (vae_path=, --vae: vae-oid.npz, or weights/demo/vae.npz for the demo)")
    _build_masks(seg_rows, vae_path, cache_dir)
  return out


def _xyxy(b):
  x0, y0, x1, y1 = b
  return (x0, y0, x1, y1)


def _cache_root(cache_dir):
  if cache_dir is not None:
    return None if str(cache_dir).lower() in ("off", "", "0", "none") else str(cache_dir)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "pgjax", "seg")


def _sha256(path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def read_mask(path, source, size):
  """A mask PNG -> bool [H, W] (channel 0 > 0); ValueError naming `source` and the file if it is missing,
  unreadable, not of `size` (width, height) or empty."""
  import PIL.Image
  try:
    with PIL.Image.open(path) as im:
      m = np.asarray(im)  # palette masks: their indices (0 the background), as the file stores them
  except FileNotFoundError:
    raise ValueError(f"{source}: mask file not found: {path}") from None
  except (OSError, ValueError) as e:
    raise ValueError(f"{source}: cannot read mask {path} ({e})") from None
  if m.ndim == 3:
    m = m[..., 0]  # channel 0, as big_vision reads its masks
  m = m > 0
  if (m.shape[1], m.shape[0]) != size:
    raise ValueError(f"{source}: mask {path} is {m.shape[1]}x{m.shape[0]}, its image is {size[0]}x{size[1]} "
                     "(a mask must have the image's size)")
  if not m.any():
    raise ValueError(f"{source}: mask {path} is empty (no pixel > 0)")
  return m


def _build_masks(rows, vae_path, cache_dir):
  from pgjax import images, segmentation
  root = _cache_root(cache_dir)
  vae_sha = _sha256(vae_path)
  where = os.path.join(root, vae_sha[:32]) if root else None
  vae = None
  todo = []  # (row, object index, crop, cache file)
  texts = {}
  for r in rows:
    source = r.get("_source", "row")
    w, h = images.image_size(r["image"])
    for i, path in enumerate(r["mask"]):
      m = read_mask(path, source, (w, h))
      if r.get("box") is not None:
        x0, y0, x1, y1 = r["box"][i]
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
          raise ValueError(f"{source}: box {r['box'][i]} is not inside the {w}x{h} image with x0 < x1, y0 < y1")
        box = (y0 / h, x0 / w, y1 / h, x1 / w)
      else:
        box = segmentation.mask_box(m)
      loc = segmentation.loc_text(box)
      cache = os.path.join(where, f"{_sha256(path)}-{''.join(f'{c:.9g},' for c in box)}.json") if where else None
      codes = _read_cached(cache)
      if codes is None:
        try:
          crop = segmentation.crop_to_64(m, box)
        except ValueError as e:
          raise ValueError(f"{source}: mask {path}: {e}") from None
        todo.append((id(r), i, crop, cache))
      texts[(id(r), i)] = [loc, codes]
  if todo:
    vae = segmentation.load_vae_cached(vae_path)
    crops = np.stack([t[2] for t in todo])
    codes = _encode_batched(segmentation, vae, crops)
    for (rid, i, _, cache), c in zip(todo, codes):
      texts[(rid, i)][1] = [int(x) for x in c]
      if cache:
        _write_cached(cache, texts[(rid, i)][1])
  for r in rows:
    labels = r.get("labels") or [None] * len(r["mask"])
    parts = []
    for i, label in enumerate(labels):
      loc, codes = texts[(id(r), i)]
      parts.append(loc + segmentation.seg_text(codes) + (f" {label.strip()}" if label and label.strip() else ""))
    r["suffix"] = " ; ".join(parts)


def _encode_batched(segmentation, vae, crops, batch: int = 256):
  """Fixed-size batches (the last one padded), so that the encoder compiles once."""
  out = []
  for s in range(0, len(crops), batch):
    chunk = crops[s:s + batch]
    n = len(chunk)
    if n < batch and len(crops) > batch:
      chunk = np.concatenate([chunk, np.zeros((batch - n,) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(segmentation.encode(vae, chunk))[:n])
  return np.concatenate(out)


def _read_cached(path):
  if not path:
    return None
  try:
    with open(path) as f:
      codes = json.load(f)
  except (OSError, ValueError):
    return None
  if isinstance(codes, list) and len(codes) == 16 and all(isinstance(c, int) for c in codes):
    return codes
  return None  # a damaged entry is recomputed and rewritten


def _write_cached(path, codes):
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.atomic_write_text(path, json.dumps(codes))
  except OSError:
    pass  # a read-only or full cache only costs the encode next time
