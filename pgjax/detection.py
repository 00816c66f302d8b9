"""PaliGemma's detection text: `<loc>` boxes <-> text, box IoU, matching, and corpus precision/recall/F1.

The format (big_vision's, PaliGemma paper appendix): per object four tokens `<locYMIN><locXMIN><locYMAX><locXMAX>`,
each round(c * 1023) of a coordinate normalised to [0, 1] by the ORIGINAL image's height or width (not the resized
model input), then " label"; objects are joined by " ; ". big_vision's evaluators decode a bin as bin / 1023.

Plain Python and numpy, no model: viz draws and scores boxes with it without importing jax. COCO mAP comes
from pycocotools.
"""

from __future__ import annotations

import re

import numpy as np

NUM_BINS = 1024

_LOC_RUN = re.compile(r"(?:<loc\d+>)+")
_LOC = re.compile(r"<loc(\d+)>")
_SEG = re.compile(r"<seg\d+>")


def encode_detections(boxes, labels, width, height) -> str:
  """xyxy pixel boxes of an image of size (width, height) -> "<locY0><locX0><locY1><locX1> label ; ...".

  Coordinates outside the image are clipped to it (the format cannot say more). A label may not be
  empty or contain ";" or "<loc", which would make the text ambiguous to parse back.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  if len(boxes) != len(labels):
    raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
  if width <= 0 or height <= 0:
    raise ValueError(f"image size must be positive, got width={width} height={height}")
  parts = []
  for (x0, y0, x1, y1), label in zip(boxes, labels):
    if not (x0 <= x1 and y0 <= y1):
      raise ValueError(f"box {(x0, y0, x1, y1)} is not x0 <= x1, y0 <= y1 (xyxy pixels expected)")
    if not isinstance(label, str) or not label.strip() or ";" in label or "<loc" in label:
      raise ValueError(f"label {label!r} is empty or holds ';' or '<loc'")
    # Python's round is half-to-even, like tf.round in big_vision's pp.
    bins = [round(min(max(c / s, 0.0), 1.0) * (NUM_BINS - 1))
            for c, s in ((y0, height), (x0, width), (y1, height), (x1, width))]
    parts.append("".join(f"<loc{b:04d}>" for b in bins) + " " + label.strip())
  return " ; ".join(parts)


def parse_detections(text: str, width, height, *, return_malformed: bool = False):
  """Model text -> [dict(box=(x0, y0, x1, y1) in pixels of the original image, label)].

  Tolerant: a run of loc tokens that is not exactly four, a bin over 1023, an inverted box (ymax <
  ymin or xmax < xmin) or a group without a label is skipped and counted as malformed (a truncated
  output usually ends in one). `<segNNN>` tokens between box and label (segmentation output) are
  ignored. With return_malformed, returns (detections, number of malformed groups).
  """
  dets, malformed = [], 0
  runs = list(_LOC_RUN.finditer(text))
  for i, run in enumerate(runs):
    # The label is the text up to the next loc run or ";" (whichever comes first).
    end = runs[i + 1].start() if i + 1 < len(runs) else len(text)
    label = _SEG.sub("", text[run.end():end]).split(";")[0].strip()
    bins = [int(b) for b in _LOC.findall(run.group())]
    if len(bins) != 4 or max(bins) >= NUM_BINS or not label:
      malformed += 1
      continue
    y0, x0, y1, x1 = (b / (NUM_BINS - 1) for b in bins)
    if y1 < y0 or x1 < x0:
      malformed += 1
      continue
    dets.append(dict(box=(x0 * width, y0 * height, x1 * width, y1 * height), label=label))
  return (dets, malformed) if return_malformed else dets


def box_iou(a, b) -> float:
  """IoU of two xyxy boxes. Two zero-area boxes (a one-bin-thin object: y0 == y1 or x0 == x1 in <loc> bins)
  have no area to overlap: they match (1.0) when they are the same box, else 0."""
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  if union <= 0:
    return float(tuple(a) == tuple(b))
  return inter / union


def match_detections(pred, target, iou_threshold: float = 0.5) -> int:
  """Number of true positives: predictions and targets of the same label paired one-to-one, greedily by
  highest IoU, counting pairs with IoU >= threshold. Duplicates of one object count once; the rest are
  false positives, so repeated boxes (a common failure) lower the precision visibly."""
  pairs = sorted(((box_iou(p["box"], t["box"]), i, j) for i, p in enumerate(pred) for j, t in enumerate(target)
                  if p["label"] == t["label"]), reverse=True)
  used_p, used_t = set(), set()
  for iou, i, j in pairs:
    if iou < iou_threshold:
      break
    if i not in used_p and j not in used_t:
      used_p.add(i)
      used_t.add(j)
  return len(used_p)


def coco_map(predictions, targets) -> dict:
  """COCO box mAP over lists of <loc> texts, by pycocotools (the maintained reference, not a re-implementation):
  "map" is AP averaged over IoU 0.50:0.05:0.95 and the labels, "map50" AP at IoU 0.5, 101-point interpolated,
  at most 100 boxes an image. A label is a category; boxes are in normalised coordinates (IoU does not depend
  on the image's size). PaliGemma gives no confidences, so every predicted box scores 1.0: pycocotools' stable
  sort then ranks them in the order generated, row by row, so an earlier false positive costs more than a
  later one. Malformed groups are skipped (detection_metrics counts them). Both are None when no target has a
  box (COCO's AP is undefined there)."""
  import contextlib
  import io
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval

  preds = [parse_detections(p, 1.0, 1.0) for p in predictions]
  gts = [parse_detections(t, 1.0, 1.0) for t in targets]
  if len(preds) != len(gts):
    raise ValueError(f"{len(preds)} predictions but {len(gts)} targets")
  labels = sorted({d["label"] for ds in gts + preds for d in ds})
  cat = {name: i + 1 for i, name in enumerate(labels)}
  if not any(gts):
    return {"map": None, "map50": None}

  def xywh(b):
    return [b[0], b[1], b[2] - b[0], b[3] - b[1]]

  gt = {"images": [{"id": i + 1} for i in range(len(gts))], "categories": [{"id": c} for c in cat.values()],
        "annotations": [{"id": n + 1, "image_id": i + 1, "category_id": cat[d["label"]], "bbox": xywh(d["box"]),
                         "area": (d["box"][2] - d["box"][0]) * (d["box"][3] - d["box"][1]), "iscrowd": 0}
                        for n, (i, d) in enumerate((i, d) for i, ds in enumerate(gts) for d in ds)]}
  dets = [{"image_id": i + 1, "category_id": cat[d["label"]], "bbox": xywh(d["box"]), "score": 1.0}
          for i, ds in enumerate(preds) for d in ds]
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and its table
    coco_gt = COCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    if not dets:
      return {"map": 0.0, "map50": 0.0}
    ev = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return {"map": max(float(ev.stats[0]), 0.0), "map50": max(float(ev.stats[1]), 0.0)}


def detection_metrics(predictions, targets, iou_threshold: float = 0.5) -> dict:
  """Corpus precision, recall and F1 at one IoU threshold over lists of <loc> texts, the count of malformed
  groups in the predictions, and COCO's "map" and "map50" (`coco_map`). IoU does not depend on the image
  size, so boxes are parsed in normalised coordinates."""
  tp = n_pred = n_target = malformed = 0
  for p_text, t_text in zip(predictions, targets):
    pred, bad = parse_detections(p_text, 1.0, 1.0, return_malformed=True)
    target = parse_detections(t_text, 1.0, 1.0)
    tp += match_detections(pred, target, iou_threshold)
    n_pred, n_target, malformed = n_pred + len(pred), n_target + len(target), malformed + bad
  # No boxes on one side: perfect if there are none on the other either (a correct "nothing here").
  precision = tp / n_pred if n_pred else float(n_target == 0)
  recall = tp / n_target if n_target else float(n_pred == 0)
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"precision": precision, "recall": recall, "f1": f1, "iou_threshold": iou_threshold,
          "num_predicted_boxes": n_pred, "num_target_boxes": n_target, "malformed": malformed,
          **coco_map(predictions, targets)}
