"""Self-contained HTML views: the data sanity check, predictions with their boxes drawn, loss curves.

Every page is one file: images are embedded as base64 data URIs and the loss curve is inline SVG, so
a report can be mailed or opened from a bucket without its folder. All text is escaped. Images may
be paths, uint8 arrays or float arrays in [-1, 1] (the model's input); they are shrunk to
`max_side` pixels. A detection text (`<loc>` groups, see `detection.parse_detections`) is drawn on its
image, scaled to the image as shown, which is the original image scaled (the boxes are relative to
the original image, not to the model's resized input). An image that cannot be read shows as a note
instead of failing the whole report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw

from pgjax import files
from pgjax.detection import match_detections, parse_detections
from pgjax.metrics import detect_task, vqa_accuracy

PRED_COLOR, TARGET_COLOR = (230, 40, 200), (20, 200, 60)

_CSS = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:20px} h2{font-size:16px;margin-top:24px}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.card{display:flex;gap:8px;border:1px solid #ccc;border-radius:6px;padding:8px}
.card img{object-fit:contain;flex:none;background:#eee}
.card .t{font-size:13px;overflow-wrap:anywhere;width:300px}
.k{color:#777;font-size:11px;text-transform:uppercase}
pre{white-space:pre-wrap;margin:0 0 6px 0;font-family:ui-monospace,monospace}
.ok{border-left:6px solid #2a2} .bad{border-left:6px solid #d33}
table.m{border-collapse:collapse} table.m td,table.m th{border:1px solid #ccc;padding:3px 8px;text-align:right}
table.m th:first-child,table.m td:first-child{text-align:left}
.note{color:#a40}
"""


def _e(x) -> str:
  return html.escape(str(x), quote=True)


def to_pil(image) -> Image.Image:
  """A path, PIL image, uint8/uint16 array or float array in [-1, 1] ([H, W], [H, W, 1|3|4]) -> RGB PIL image,
  decoded as the model's input is (`images`' rules: 16-bit scaled to 8, not clipped; EXIF orientation applied)."""
  from pgjax import images
  if isinstance(image, Image.Image):
    return _rgb8(images.decode_rgb(image))
  if isinstance(image, (str, os.PathLike)):
    with Image.open(image) as im:
      im.load()
      return _rgb8(images.decode_rgb(im, name=os.fspath(image)))
  a = np.asarray(image)
  if np.issubdtype(a.dtype, np.floating):
    if a.ndim == 3 and a.shape[-1] in (1, 3, 4):
      a = a[..., :3] if a.shape[-1] != 1 else a[..., 0]
    if a.ndim not in (2, 3):
      raise ValueError(f"image array must be [H, W] or [H, W, C], got shape {a.shape}")
    # The model's input range; clipping keeps a slightly-out-of-range float from wrapping around.
    return Image.fromarray(np.clip((np.nan_to_num(a) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)).convert("RGB")
  if a.dtype not in (np.uint8, np.uint16):
    raise ValueError(f"image array must be uint8, uint16 or float in [-1, 1], got {a.dtype}")
  return _rgb8(images.decode_rgb(a))


def _rgb8(rgb_HW3: np.ndarray) -> Image.Image:
  """float RGB on the 8-bit scale [0, 255] -> an RGB PIL image."""
  return Image.fromarray(np.clip(rgb_HW3, 0, 255).round().astype(np.uint8), "RGB")


def draw_detections(im: Image.Image, text: str, color=PRED_COLOR) -> int:
  """Draws the `<loc>` boxes of `text` on `im` in place (boxes scaled to `im`); returns how many."""
  dets = parse_detections(text, im.width, im.height)
  draw = ImageDraw.Draw(im)
  for d in dets:
    x0, y0, x1, y1 = d["box"]
    draw.rectangle([x0, y0, x1, y1], outline=color, width=2)
    draw.text((x0 + 3, y0 + 2), d["label"], fill=color)
  return len(dets)


def draw_masks(im: Image.Image, objects, size, color=PRED_COLOR, alpha: float = 0.45) -> int:
  """Blends each object's mask (`segmentation.text_to_masks` of the original image, whose (width, height) is
  `size`) in `color` onto `im` in place, scaled to it, with its box and label; an object without a mask shows
  its box alone. Returns how many masks were drawn."""
  sx, sy = im.width / size[0], im.height / size[1]
  base, n = np.asarray(im, np.float32).copy(), 0
  for o in objects:
    if o.get("mask") is not None:
      m = np.asarray(Image.fromarray(o["mask"]).resize(im.size, Image.Resampling.NEAREST))
      base[m] = (1 - alpha) * base[m] + alpha * np.asarray(color, np.float32)
      n += 1
  im.paste(Image.fromarray(base.round().astype(np.uint8)))
  draw = ImageDraw.Draw(im)
  for o in objects:
    if o.get("box") is not None:
      x0, y0, x1, y1 = o["box"]
      draw.rectangle([x0 * sx, y0 * sy, x1 * sx, y1 * sy], outline=color, width=2)
      draw.text((x0 * sx + 3, y0 * sy + 2), o.get("label") or "", fill=color)
  return n


def image_uri(image, *, max_side: int = 256, boxes: tuple = (), fmt: str = "JPEG", vae=None) -> str:
  """A data URI of `image` shrunk to `max_side`, with (text, color) pairs in `boxes` drawn on it: `<loc>`
  boxes, and with `vae` (the segmentation VAE's params) the masks of texts with `<seg>` as coloured overlays."""
  im = to_pil(image)
  size = im.size
  im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
  for text, color in boxes:
    if not text:
      continue
    if vae is not None and "<seg" in text:
      from pgjax import segmentation  # jax: only when masks are drawn
      draw_masks(im, segmentation.text_to_masks(vae, text, size[1], size[0]), size, color)
    else:
      draw_detections(im, text, color)
  buf = io.BytesIO()
  im.save(buf, format=fmt, **({"quality": 88} if fmt == "JPEG" else {}))
  return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _img_tag(image, boxes=(), max_side=256, vae=None) -> str:
  try:
    # Shown in a max_side box whatever the size, so small inputs (the model's 224 px) stay legible.
    uri = image_uri(image, boxes=boxes, max_side=max_side, vae=vae)
    return f'<img src="{uri}" alt="" style="width:{max_side}px;height:{max_side}px">'
  except Exception as e:  # a report should survive one bad image (Pillow raises many types)
    return f'<div class="note">image unavailable: {_e(type(e).__name__)}: {_e(e)}</div>'


def _field(name, value) -> str:
  return f'<div class="k">{_e(name)}</div><pre>{_e(value)}</pre>'


def _page(title: str, body: str) -> str:
  return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
          f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>\n{body}\n</body></html>\n")


def _targets(row) -> str | None:
  for key in ("answers", "references"):
    if row.get(key):
      return " | ".join(row[key])
  return row.get("suffix")


def data_grid(rows, *, max_side: int = 256, vae=None) -> str:
  """Cards of image | prefix, suffix (and answers/references); a suffix with `<loc>` boxes is drawn, and with
  `vae` its `<seg>` masks as decoded from the text (what the model will be taught)."""
  cards = []
  for i, r in enumerate(rows):
    suffix = r.get("suffix")
    body = _field(f"#{i} prefix", r.get("prefix", ""))
    if suffix is not None:
      body += _field("suffix", suffix)
    for key in ("answers", "references"):
      if r.get(key):
        body += _field(key, " | ".join(r[key]))
    boxes = ((suffix, TARGET_COLOR),) if isinstance(suffix, str) else ()
    cards.append(f'<div class="card">{_img_tag(r.get("image"), boxes, max_side, vae)}<div class="t">{body}</div></div>')
  return f'<div class="grid">{"".join(cards)}</div>'


def data_html(rows, title: str = "pgjax data", *, max_side: int = 256, vae=None) -> str:
  """The dataset sanity view: each image beside its prefix and suffix, as the model will see them (with `vae`,
  the `<seg>` masks too)."""
  rows = list(rows)
  return _page(title, f"<p>{len(rows)} examples</p>" + data_grid(rows, max_side=max_side, vae=vae))


def _verdict(row, pred: str) -> tuple[str, str]:
  """(css class, note) for a prediction against the row's targets; ("", "") where right/wrong has no
  meaning (no target, or a caption, which is judged by the corpus metrics instead)."""
  task = detect_task(row)
  if task == "vqa":
    acc = vqa_accuracy(pred, row["answers"])
    return ("ok" if acc > 0 else "bad"), f"VQA accuracy {acc:.2f}"
  suffix = row.get("suffix")
  if task == "caption" or not isinstance(suffix, str):
    return "", ""
  ok = pred.strip() == suffix.strip()
  note = "exact match" if ok else "differs from the target"
  if "<loc" in suffix + pred:
    p, t = parse_detections(pred, 1, 1), parse_detections(suffix, 1, 1)
    note += f"; boxes: {match_detections(p, t)} of {len(t)} target(s) matched at IoU 0.5, {len(p)} predicted"
  return ("ok" if ok else "bad"), note


def predictions_grid(rows, predictions, *, max_side: int = 256, vae=None) -> str:
  """Cards of image | prefix, prediction, target; green/red edge for right/wrong where comparable.
  Predicted boxes are drawn in magenta, target boxes in green. With `vae`, `<seg>` masks are overlaid, the
  target's image next to the prediction's. `predictions`: strings or `predict` dicts."""
  rows, predictions = list(rows), list(predictions)
  if len(rows) != len(predictions):
    raise ValueError(f"{len(rows)} rows but {len(predictions)} predictions")
  cards = []
  for i, (r, p) in enumerate(zip(rows, predictions)):
    text = p if isinstance(p, str) else p["prediction"]
    cls, note = _verdict(r, text)
    body = _field(f"#{i} prefix", r.get("prefix", "")) + _field("prediction", text)
    target = _targets(r)
    if target is not None:
      body += _field("target", target)
    if isinstance(p, dict) and p.get("hit_eos") is False:
      note = (note + "; " if note else "") + f"TRUNCATED at {p.get('num_tokens')} tokens (no eos)"
    if note:
      body += f'<div class="k">{_e(note)}</div>'
    suffix = r.get("suffix") if isinstance(r.get("suffix"), str) else ""
    if vae is not None and "<seg" in suffix + text:  # two overlays on one image would hide each other
      img = (_img_tag(r.get("image"), ((suffix, TARGET_COLOR),), max_side, vae)
             + _img_tag(r.get("image"), ((text, PRED_COLOR),), max_side, vae))
    else:
      img = _img_tag(r.get("image"), ((suffix, TARGET_COLOR), (text, PRED_COLOR)), max_side)
    cards.append(f'<div class="card {cls}">{img}<div class="t">{body}</div></div>')
  return f'<div class="grid">{"".join(cards)}</div>'


def metrics_table(columns: dict) -> str:
  """{column name: {metric: value}} -> an HTML table, one row per metric (e.g. before / after)."""
  columns = {k: v for k, v in columns.items() if v}
  names = list(dict.fromkeys(k for m in columns.values() for k in m))
  head = "".join(f"<th>{_e(c)}</th>" for c in columns)
  body = "".join(f"<tr><td>{_e(n)}</td>" + "".join(f"<td>{_e(_fmt(m.get(n, '')))}</td>" for m in columns.values())
                 + "</tr>" for n in names)
  return f'<table class="m"><tr><th>metric</th>{head}</tr>{body}</table>'


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  if isinstance(v, (dict, list)):
    return json.dumps(v)
  return str(v)


def predictions_html(rows, predictions, title: str = "pgjax predictions", metrics: dict | None = None, *,
                     max_side: int = 256, vae=None) -> str:
  """A page of `predictions_grid`, with a metrics table on top when given."""
  top = metrics_table({"value": metrics}) if metrics else ""
  return _page(title, top + predictions_grid(rows, predictions, max_side=max_side, vae=vae))


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
  """About n round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
  if hi <= lo:
    return [lo]
  raw = (hi - lo) / n
  mag = 10 ** math.floor(math.log10(raw))
  step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
  first = math.ceil(lo / step - 1e-9) * step
  return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def loss_curve_svg(steps, losses, eval_points=None, *, width: int = 640, height: int = 320,
                   title: str = "training loss") -> str:
  """Inline SVG: the loss per step as one polyline (one point per finite loss), axes with ticks and
  labels. `eval_points`: [(step, value)] or {name: [(step, value)]} drawn as markers (e.g. val loss)."""
  steps, losses = [float(s) for s in steps], [float(v) for v in losses]
  if len(steps) != len(losses):
    raise ValueError(f"{len(steps)} steps but {len(losses)} losses")
  if eval_points is not None and not isinstance(eval_points, dict):
    eval_points = {"eval": eval_points}
  evals = {k: [(float(s), float(v)) for s, v in pts] for k, pts in (eval_points or {}).items()}
  pts = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
  dropped = len(losses) - len(pts)
  every = pts + [p for e in evals.values() for p in e if math.isfinite(p[1])]
  L, R, T, B = 56, 16, 28, 40  # margins: room for tick labels on the left and bottom
  pw, ph = width - L - R, height - T - B
  out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
         f'<text x="{L}" y="16" font-size="13">{_e(title)}</text>']
  if every:
    x_lo, x_hi = min(p[0] for p in every), max(p[0] for p in every)
    y_lo, y_hi = min(p[1] for p in every), max(p[1] for p in every)
    if x_hi == x_lo:
      x_lo, x_hi = x_lo - 1, x_hi + 1
    if y_hi == y_lo:
      y_lo, y_hi = y_lo - 1, y_hi + 1
    X = lambda s: L + (s - x_lo) / (x_hi - x_lo) * pw  # noqa: E731
    Y = lambda v: T + (y_hi - v) / (y_hi - y_lo) * ph  # noqa: E731
    for t in _ticks(x_lo, x_hi):
      out.append(f'<line x1="{X(t):.1f}" y1="{T + ph}" x2="{X(t):.1f}" y2="{T + ph + 4}" stroke="#444"/>'
                 f'<text x="{X(t):.1f}" y="{T + ph + 16}" text-anchor="middle">{_e(f"{t:g}")}</text>')
    for t in _ticks(y_lo, y_hi):
      out.append(f'<line x1="{L - 4}" y1="{Y(t):.1f}" x2="{L + pw}" y2="{Y(t):.1f}" stroke="#ddd"/>'
                 f'<text x="{L - 6}" y="{Y(t) + 4:.1f}" text-anchor="end">{_e(f"{t:.3g}")}</text>')
    if pts:
      line = " ".join(f"{X(s):.2f},{Y(v):.2f}" for s, v in pts)
      out.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{line}"/>')
    colors = ("#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
    for k, (name, e) in enumerate(evals.items()):
      c = colors[k % len(colors)]
      out += [f'<circle cx="{X(s):.2f}" cy="{Y(v):.2f}" r="3.5" fill="{c}"><title>{_e(name)} {v:.4g} at step '
              f'{s:g}</title></circle>' for s, v in e if math.isfinite(v)]
      out.append(f'<text x="{L + pw - 4}" y="{T + 14 + 14 * k}" text-anchor="end" fill="{c}">● {_e(name)}</text>')
  else:
    out.append(f'<text x="{L + pw / 2}" y="{T + ph / 2}" text-anchor="middle">no data</text>')
  out.append(f'<line x1="{L}" y1="{T}" x2="{L}" y2="{T + ph}" stroke="#444"/>'
             f'<line x1="{L}" y1="{T + ph}" x2="{L + pw}" y2="{T + ph}" stroke="#444"/>'
             f'<text x="{L + pw / 2}" y="{height - 6}" text-anchor="middle">step</text>'
             f'<text x="14" y="{T + ph / 2}" text-anchor="middle" transform="rotate(-90 14 {T + ph / 2})">loss</text>')
  if dropped:
    # A NaN/inf loss cannot be drawn; saying so keeps a diverged run from looking healthy.
    out.append(f'<text x="{L + 4}" y="{T + 12}" fill="#d33">{dropped} non-finite loss value(s) not drawn</text>')
  out.append("</svg>")
  return "\n".join(out)


def report_html(summary: dict, loss_svg: str = "", before_after: dict | None = None, predictions: str = "", *,
                title: str = "pgjax fine-tuning report") -> str:
  """The run report: summary (key/value), loss curve (an SVG from `loss_curve_svg`), metrics table
  (`before_after` = {"before": {...}, "after": {...}}, any columns) and a predictions grid (HTML from
  `predictions_grid`). Only `loss_svg` and `predictions` are taken as HTML; they come from this module."""
  rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(_fmt(v))}</td></tr>" for k, v in (summary or {}).items())
  body = f'<h2>Summary</h2><table class="m">{rows}</table>'
  if loss_svg:
    body += f"<h2>Loss</h2>{loss_svg}"
  if before_after:
    body += f"<h2>Metrics</h2>{metrics_table(before_after)}"
  if predictions:
    body += f"<h2>Predictions</h2>{predictions}"
  return _page(title, body)


def write_html(path, text: str) -> str:
  """Writes `text` to `path` atomically (temp file + rename: a reader never sees half a report)."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with files.atomic_write(path, "w") as f:
    f.write(text)
  return path
