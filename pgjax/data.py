"""Examples and batches: rows -> arrays in the model's input layout, augmented, batched, checked.

`encode` lays one row out as `Tokenizer.encode_example` and `images.image_of` do (big_vision's
text layout and image preprocessing), optionally through `Augment`. `train_batches` (seeded,
infinite, resumable at any step, multi-host) and `eval_batches` (in order, padded, flagged) decode
images in a thread pool a few batches ahead. `stats` is the token-length check. Only the multi-host
defaults import jax.

Images are in `pgjax/images.py` and row sources in `pgjax/sources.py`; `load_image` and `read_jsonl`
are here too, as the public API has them.

axes: see pgjax/__init__.py
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import re
import warnings

import numpy as np

from pgjax.images import ImageError, decode_rgb, decode_workers, resize_and_scale
from pgjax.images import load_image  # noqa: F401 (the public API's data.load_image)
from pgjax.sources import read_jsonl  # noqa: F401 (the public API's data.read_jsonl)
from pgjax.tokenizer import TRUNCATE_POLICIES


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
  """One row -> dict(image float32 [Y, X, 3], text, mask_ar, mask_loss, mask_input int32 [max_len],
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
    rgb_YX3 = decode_rgb(row["image"], name=f"image of {source}", max_pixels=max_pixels)
    if augment is None:
      ex["image"] = resize_and_scale(rgb_YX3, size, **kw)
    else:
      text = row["prefix"] + (suffix or "")
      geometric = not _NO_GEOMETRY.search(text)
      flip_ok = geometric and not _NO_FLIP.search(text)
      ex["image"] = _augment(rgb_YX3, size, augment, rng or np.random.default_rng(), geometric=geometric,
                             flip_ok=flip_ok, kw=kw)
      ex["augment_limited"] = (augment.crop_scale is not None and not geometric) or (augment.flip and not flip_ok)
  except (ImageError, OSError) as e:
    raise type(e)(f"{e} ({source})") from e
  return ex


def _augment(rgb_YX3, size, aug: Augment, rng, *, geometric, flip_ok, kw):
  # Every draw is made whatever is enabled, so turning one option on does not shift the others.
  u_area, u_ratio, u_x, u_y, u_flip, u_bright, u_contrast = rng.random(7)
  if aug.crop_scale is not None and geometric:
    height, width = rgb_YX3.shape[:2]
    lo, hi = aug.crop_scale
    area = height * width * (lo + u_area * (hi - lo))
    ratio = math.exp(math.log(aug.crop_ratio[0]) + u_ratio * math.log(aug.crop_ratio[1] / aug.crop_ratio[0]))
    w = min(width, max(1, round(math.sqrt(area * ratio))))
    h = min(height, max(1, round(math.sqrt(area / ratio))))
    x0, y0 = int(u_x * (width - w + 1)), int(u_y * (height - h + 1))
    rgb_YX3 = rgb_YX3[y0:y0 + h, x0:x0 + w]
  x_YX3 = resize_and_scale(rgb_YX3, size, **kw)
  if aug.flip and flip_ok and u_flip < 0.5:
    x_YX3 = x_YX3[:, ::-1]
  if aug.brightness:
    x_YX3 = x_YX3 + np.float32(2 * aug.brightness * (2 * u_bright - 1))  # [-1, 1] spans 2
  if aug.contrast:
    mean_3 = x_YX3.mean((0, 1), keepdims=True)
    x_YX3 = (x_YX3 - mean_3) * np.float32(1 + aug.contrast * (2 * u_contrast - 1)) + mean_3
  return np.ascontiguousarray(np.clip(x_YX3, -1, 1), np.float32)


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
    workers = decode_workers(workers)
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

  Each batch: image float32 [B, Y, X, 3], text/mask_ar/mask_loss/mask_input int32 [B, max_len], B the
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
