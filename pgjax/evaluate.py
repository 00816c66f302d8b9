"""Evaluation: batched prediction over a dataset, task metrics, and PaliGemma's `<loc>` boxes.

`predict` runs `decode.generate` (greedy by default; a `decode.Decoding` says otherwise) over fixed-shape batches: the last batch is padded by repeating its
last example and the padding is flagged in `valid_B`, so there is one compilation per
(batch_size, max_len, max_new_tokens) and padded rows neither delay the early stop nor get scored
(the PaliGemma notebook's "pad the batch by repeating examples"). `score` turns predictions into task
metrics and `evaluate` is the two together. Every result also counts the predictions that ran into
`max_new_tokens` without an eos ("truncated"), so a too-small limit shows instead of hiding.

Detection text (`<loc>` boxes) is parsed and scored in detection.py, the string metrics are metrics.py's;
their public names are re-exported here, where they have always been importable.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np

from pgjax import decode, grammar, segmentation, train
from pgjax.detection import (NUM_BINS, box_iou, detection_metrics, encode_detections,  # noqa: F401 (public)
                             match_detections, parse_detections)
from pgjax.images import load_image, preprocess_image
from pgjax.metrics import (TASKS, caption_metrics, detect_task, exact_match, vqa_accuracy,  # noqa: F401 (public)
                           vqa_accuracy_batch)


def prompt_for(task: str, question=None, lang: str = "en") -> str:
  """The paper's task prefixes: "caption en", "answer en {q}", "detect cat ; dog", "ocr"."""
  if task == "caption":
    return f"caption {lang}"
  if task in ("vqa", "answer"):
    if not question:
      raise ValueError("prompt_for('vqa') needs a question")
    return f"answer {lang} {question}"
  if task == "detect":
    things = [question] if isinstance(question, str) else list(question or ())
    if not things or not all(isinstance(t, str) and t.strip() for t in things):
      raise ValueError(f"prompt_for('detect') needs one or more object names, got {question!r}")
    return "detect " + " ; ".join(t.strip() for t in things)
  if task == "ocr":
    return "ocr"
  raise ValueError(f"unknown task {task!r}: use caption, vqa, detect or ocr")


# ---------------------------------------------------------------------------------------------------
# Prediction.


def _image(x, size: int, i: int) -> np.ndarray:
  """A path, PIL image, uint8/uint16 array or float array in [-1, 1] -> float32 [size, size, 3]."""
  if isinstance(x, (str, os.PathLike)):  # load_image's errors name the file
    return load_image(x, size)
  a = x if hasattr(x, "mode") else np.asarray(x)
  if hasattr(a, "mode") or a.dtype in (np.uint8, np.uint16):
    return preprocess_image(a, size)
  if a.shape != (size, size, 3):
    raise ValueError(f"example {i}: a float image must be preprocessed to [{size}, {size}, 3] in [-1, 1], got "
                     f"shape {a.shape} (pass a path or a uint8 array to have it resized)")
  return a.astype(np.float32)


def prompt_len(tok, prefixes, suffixes=None) -> int:
  """The shortest prompt length ([bos] prefix "\\n") that fits every prefix, rounded up to a multiple
  of 8 so that similar datasets share one compilation. With suffixes (one per prefix), the length of
  whole examples ([bos] prefix "\\n" suffix [eos]) instead."""
  suffixes = [None] * len(prefixes) if suffixes is None else suffixes
  return -(-max(tok.example_len(p, s) for p, s in zip(prefixes, suffixes)) // 8) * 8


def view_fits(params, cfg=None, *, headroom: float = 2.0) -> bool:
  """Whether `predict` decodes over `decode.make_view` (why it is faster: pgjax/decode_view.py) when not
  told. On CPU always. On an accelerator when every local device has `headroom` times the view's size free:
  the view is a second copy of the LLM's weights in the compute dtype (`cfg`'s; float32 without one), which
  a small GPU may not hold beside the model (bench/README.md has the sizes and speed-ups). A device that
  reports no memory statistics gets no view, nor do quantized or adapted weights (the view is a float copy)."""
  if not decode.plain_weights(params):
    return False
  if jax.default_backend() == "cpu":
    return True
  itemsize = jnp.dtype(cfg.llm.compute_dtype if cfg is not None else jnp.float32).itemsize
  view_bytes = itemsize * sum(x.size for x in jax.tree.leaves(params["llm"]))
  for device in jax.local_devices():
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
      return False
    if stats["bytes_limit"] - stats.get("bytes_in_use", 0) < headroom * view_bytes:
      return False
  return True


def predict(params, cfg, tok, images, prefixes, *, batch_size: int = 8, max_len: int | None = None,
            max_new_tokens: int = 64, cache_dtype=None, decode_view: bool | None = None,
            progress=None, decoding: decode.Decoding | None = None) -> list[dict]:
  """Predictions for every (image, prefix), in order, each exactly once.

  images: an array [N, H, W, 3] (float in [-1, 1] at the model's size, or uint8 of any size), a
  list of paths / arrays / PIL images, or a callable i -> one of those (to load lazily).
  max_len: prompt length in tokens (None: `prompt_len` of these prefixes).
  Returns [dict(prediction, num_tokens, hit_eos, score)] with num_tokens counting the eos when there is one;
  hit_eos False means the text was cut at max_new_tokens; score is the summed log-prob of the tokens.
  decoding: how tokens are chosen (None: greedy). Sampling draws example i from fold_in(key(seed), i), so
  an example's text does not depend on the batch size or on the other examples.
  decode_view: decode over `decode.make_view`, made once for all batches (None: `view_fits(params, cfg)`).
  cache_dtype: the KV cache's (None: the compute dtype, see `decode.greedy`).
  progress: None, or called as progress(examples_done, N) as each batch's tokens arrive.
  """
  prefixes = list(prefixes)
  N, size = len(prefixes), cfg.vision.image_size
  if not callable(images) and len(images) != N:
    raise ValueError(f"{len(images)} images but {N} prefixes")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not N:
    return []
  batch_size = min(batch_size, N)  # a batch larger than the data would decode (and allocate for) padding alone
  max_len = prompt_len(tok, prefixes) if max_len is None else max_len
  if tok.vocab_size > cfg.llm.vocab_size:
    raise ValueError(f"tokenizer has {tok.vocab_size} pieces but the model's vocabulary is {cfg.llm.vocab_size}")
  if decode_view is None:
    decode_view = view_fits(params, cfg)
  view = decode.make_view(params, cfg=cfg) if decode_view else None
  decoding = decode.Decoding() if decoding is None else decoding
  constraint = None
  if decoding.constrain:  # built and put on the device once, for every batch
    constraint = jax.tree.map(jnp.asarray, grammar.for_task(tok, cfg.llm.vocab_size, decoding.constrain))
  base_key = jax.random.key(decoding.seed)

  def make_batch(start):
    # The last batch repeats its last example: fixed shapes (one compilation), and padded rows are
    # real inputs, so nothing odd (NaN from an all-zero image) can happen in them.
    idx = [min(i, N - 1) for i in range(start, start + batch_size)]
    ex = [tok.encode_example(prefixes[i], None, max_len=max_len) for i in idx]
    image = np.stack([_image(images(i) if callable(images) else images[i], size, i) for i in idx])
    return (image, np.stack([e["text"] for e in ex]), np.stack([e["mask_input"] for e in ex]),
            np.arange(start, start + batch_size) < N, start)

  def launch(batch):
    image, text, mask_input, valid, start = batch
    keys = jax.vmap(jax.random.fold_in, (None, 0))(base_key, jnp.arange(start, start + batch_size))
    tokens, info = decode.generate(params, image, text, mask_input, cfg=cfg, decoding=decoding,
                                   max_new_tokens=max_new_tokens, eos_id=tok.eos_id, key=keys, valid_B=valid,
                                   cache_dtype=cache_dtype, decode_view=view, grammar=constraint)
    return tokens, info["num_tokens"], info["hit_eos"], info["score"], valid

  out, pending = [], None
  for start in range(0, N, batch_size):
    # Dispatch is asynchronous: batch k is loaded and launched while batch k-1 still decodes, and
    # only then are k-1's tokens fetched.
    running = launch(make_batch(start))
    if pending is not None:
      out += _collect(tok, *pending)
      if progress is not None:
        progress(len(out), N)
    pending = running
  if pending is not None:
    out += _collect(tok, *pending)
    if progress is not None:
      progress(len(out), N)
  assert len(out) == N, (len(out), N)
  return out


def _collect(tok, tokens, num_tokens, hit_eos, score, valid):
  tokens, num_tokens, hit_eos, score = jax.device_get((tokens, num_tokens, hit_eos, score))
  return [dict(prediction=tok.decode(tokens[b, :num_tokens[b]]), num_tokens=int(num_tokens[b]),
               hit_eos=bool(hit_eos[b]), score=float(score[b])) for b in np.flatnonzero(valid)]


def score_candidates(params, cfg, tok, images, prefixes, candidates, *, batch_size: int = 8,
                     max_len: int | None = None) -> list[list[float]]:
  """Scoring without generating: the log-likelihood of each candidate suffix (its tokens and the eos) given
  the image and prefix, for multiple choice or ranking answers. candidates: one list of strings per example.
  Returns one list of floats per example, in the candidates' order (the model's choice is the argmax).
  Every (example, candidate) pair is one row of a teacher-forced forward (`train.suffix_logp`), batched in
  fixed shapes (the last batch padded by repeating its last row). max_len: tokens per row (None: the longest
  row, rounded up to a multiple of 8). images: as in `predict`."""
  prefixes, candidates = list(prefixes), [list(c) for c in candidates]
  if len(candidates) != len(prefixes) or (not callable(images) and len(images) != len(prefixes)):
    raise ValueError(f"{len(prefixes)} prefixes, {len(candidates)} candidate lists and "
                     f"{'some' if callable(images) else len(images)} images: one of each per example")
  for i, c in enumerate(candidates):
    if not c or not all(isinstance(x, str) for x in c):
      raise ValueError(f"example {i}: candidates must be a non-empty list of strings, got {c!r}")
  pairs = [(i, c) for i, cs in enumerate(candidates) for c in cs]
  max_len = max_len or prompt_len(tok, [prefixes[i] for i, _ in pairs], [c for _, c in pairs])
  size, out = cfg.vision.image_size, []
  batch_size = max(1, min(batch_size, len(pairs)))
  for start in range(0, len(pairs), batch_size):
    chunk = [pairs[min(j, len(pairs) - 1)] for j in range(start, start + batch_size)]
    ex = [tok.encode_example(prefixes[i], c, max_len=max_len) for i, c in chunk]
    batch = {k: np.stack([e[k] for e in ex]) for k in ("text", "mask_ar", "mask_loss")}
    batch["image"] = np.stack([_image(images(i) if callable(images) else images[i], size, i) for i, _ in chunk])
    logp_B, _ = train.suffix_logp(params, batch, cfg=cfg)
    out += np.asarray(logp_B)[:min(batch_size, len(pairs) - start)].tolist()
  scores, k = [], 0
  for cs in candidates:
    scores.append(out[k:k + len(cs)])
    k += len(cs)
  return scores


# ---------------------------------------------------------------------------------------------------
# Scoring.


def _where(row: dict, i: int) -> str:
  """How an error names a row: its "file:line" when it came from a JSONL (read_jsonl's "_source"), else row i."""
  return row.get("_source") or f"row {i}"


def _reference(row: dict, i: int):
  """Row i's target for exact match: its suffix, else its list of answers or references."""
  if isinstance(row.get("suffix"), str):
    return row["suffix"]
  for key in ("answers", "references"):
    if refs := row.get(key):
      if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
        raise ValueError(f"{_where(row, i)}: {key!r} must be a list of strings, got {refs!r}")
      return list(refs)
  raise ValueError(f"{_where(row, i)} has no target: it needs 'suffix', 'answers' or 'references' "
                   f"(keys: {sorted(row)})")


def _check(rows, task, vae=None) -> list[str]:
  """Each row's task, after checking that it has what that task is scored against (before any decoding)."""
  if task is not None and task not in TASKS:
    raise ValueError(f"unknown task {task!r}: use one of {TASKS} or None")
  tasks = []
  for i, r in enumerate(rows):
    _reference(r, i)
    tasks.append(task or detect_task(r))
    if tasks[-1] == "detect":
      if not isinstance(r.get("suffix"), str):
        raise ValueError(f"{_where(r, i)}: detection needs a string 'suffix' holding the target boxes "
                         f"(keys: {sorted(r)})")
      # A broken target box would drop out of the count and raise the recall: refused instead.
      if bad := parse_detections(r["suffix"], 1.0, 1.0, return_malformed=True)[1]:
        raise ValueError(f"{_where(r, i)}: {bad} target box(es) in 'suffix' are malformed (fewer than 4 <loc> "
                         f"tokens, no label, or y1 < y0 / x1 < x0; <loc> order is y0 x0 y1 x1): {r['suffix']!r}")
    if tasks[-1] == "segment":
      if vae is None:
        raise ValueError(f"{_where(r, i)}: a segmentation row is scored with the segmentation VAE that decodes "
                         "<seg> tokens (vae=, --vae: vae-oid.npz), or as text with task='exact'")
      if not isinstance(r.get("suffix"), str) or not all(o["valid"] for o in segmentation.parse_objects(r["suffix"])) \
          or not segmentation.parse_objects(r["suffix"]):
        raise ValueError(f"{_where(r, i)}: segmentation needs a 'suffix' of whole objects (4 <loc>, 16 <seg>) or a "
                         f"'mask': got {r.get('suffix')!r}")
  return tasks


def _segment_targets(rows, vae) -> list[dict]:
  """Each segmentation row's target: its mask files at full size when it has them (else the masks its suffix
  decodes to) and its first object's box, normalised, from the suffix's <loc> (what the model is taught)."""
  from pgjax import annotations, images
  out = []
  for r in rows:
    w, h = images.image_size(r["image"])
    if r.get("mask"):
      masks = [annotations.read_mask(m, r.get("_source", "row"), (w, h)) for m in r["mask"]]
    else:
      masks = [o["mask"] for o in segmentation.text_to_masks(vae, r["suffix"], h, w)]
    loc = segmentation.parse_objects(r["suffix"])[0]["loc"]
    out.append({"masks": masks, "box": tuple(b / (segmentation.NUM_LOC_BINS - 1) for b in loc)})
  return out


def _task_metrics(task: str, rows, preds: list[str], vae=None) -> dict:
  # A row's own list for the task, else its suffix, else whichever list it has (_check made sure of one).
  targets = lambda key: [r.get(key) or ([r["suffix"]] if isinstance(r.get("suffix"), str) else  # noqa: E731
                                        r.get("answers") or r.get("references")) for r in rows]
  if task == "vqa":
    return {"accuracy": vqa_accuracy_batch(preds, targets("answers"))}
  if task == "caption":
    with warnings.catch_warnings():
      # The Python tokenizer fallback is reported in the result ("tokenizer"); no need to warn twice.
      warnings.simplefilter("ignore", UserWarning)
      return caption_metrics(preds, targets("references"))
  if task == "detect":
    return detection_metrics(preds, [r["suffix"] for r in rows])
  if task == "segment":
    vae = segmentation.load_vae_cached(vae) if isinstance(vae, (str, os.PathLike)) else vae
    return segmentation.segmentation_metrics(vae, preds, _segment_targets(rows, vae))
  return {}


def score(rows, predictions, task: str | None = None, *, vae=None) -> dict:
  """Task metrics of `predictions` (strings or `predict` dicts) against `rows`' targets. vae: the
  segmentation VAE (a path or `segmentation.load_vae`'s dict), which segmentation rows need.

  task None detects it per row (`detect_task`); a dataset mixing tasks gets each task's metrics under
  "task/name". Always: "exact_match" (against "suffix", else any of the answers/references),
  "truncated" (predictions without an eos; needs `predict` dicts), "count" and "task".
  """
  rows, predictions = list(rows), list(predictions)
  if len(rows) != len(predictions):
    raise ValueError(f"{len(rows)} rows but {len(predictions)} predictions")
  if not rows:
    raise ValueError("no predictions to score")
  tasks = _check(rows, task, vae)
  texts = [p if isinstance(p, str) else p["prediction"] for p in predictions]
  metrics, groups = {}, Counter(tasks)
  for t in groups:
    idx = [i for i, ti in enumerate(tasks) if ti == t]
    m = _task_metrics(t, [rows[i] for i in idx], [texts[i] for i in idx], vae)
    metrics.update(m if len(groups) == 1 else {f"{t}/{k}": v for k, v in m.items()})
  metrics["exact_match"] = exact_match(texts, [_reference(r, i) for i, r in enumerate(rows)])
  metrics["truncated"] = sum(isinstance(p, dict) and not p.get("hit_eos", True) for p in predictions)
  metrics["count"] = len(rows)
  metrics["task"] = tasks[0] if len(groups) == 1 else "mixed"
  return metrics


def evaluate(params, cfg, tok, rows, *, task: str | None = None, batch_size: int = 8,
             max_len: int | None = None, max_new_tokens: int = 64, cache_dtype=None,
             decode_view: bool | None = None, progress=None, decoding: decode.Decoding | None = None,
             vae=None) -> dict:
  """Predicts every row (dicts with "image" path or array, "prefix", and targets "suffix" and/or
  "answers" (VQA) / "references" (captions), or a "mask" / pixel "boxes" (pgjax/annotations.py)) and scores
  it. Returns dict(metrics, predictions), the predictions as `predict` gives them plus each row's "prefix";
  metrics["decoding"] records how they were decoded (`decode.Decoding.describe`). progress, decoding: as in
  `predict`. vae: the segmentation VAE's npz path, which "segment ..." rows need (`score`)."""
  from pgjax import annotations
  rows = annotations.build_suffixes(list(rows), vae_path=vae)
  if not rows:
    raise ValueError("no rows to evaluate")
  for i, r in enumerate(rows):
    if "image" not in r or not isinstance(r.get("prefix"), str):
      raise ValueError(f"{_where(r, i)} needs 'image' and a string 'prefix' (keys: {sorted(r)})")
  _check(rows, task, vae)  # a row without targets fails now, not after the decoding
  preds = predict(params, cfg, tok, [r["image"] for r in rows], [r["prefix"] for r in rows],
                  batch_size=batch_size, max_len=max_len, max_new_tokens=max_new_tokens, cache_dtype=cache_dtype,
                  decode_view=decode_view, progress=progress, decoding=decoding)
  for r, p in zip(rows, preds):
    p["prefix"] = r["prefix"]
  metrics = score(rows, preds, task, vae=vae)
  metrics["decoding"] = (decoding or decode.Decoding()).describe()
  return {"metrics": metrics, "predictions": preds}
