"""The `pgjax` command.

  pgjax finetune   train (seed recipe by default), evaluate before/after, write checkpoints, metrics.jsonl,
                   summary.json and report.html; with no data flags it runs the embedded easy-vqa demo
  pgjax eval       decode a JSONL with a checkpoint and score it (+ an HTML view)
  pgjax predict    images + prompt -> text (boxes drawn for detect prompts with --html)
  pgjax show-data  a JSONL as an HTML sanity view, with token-length statistics
  pgjax inspect    a checkpoint's param tree: shapes, dtypes, counts, inferred config and shardings

Exit codes: 0 ok, 2 bad flags or input (the message names the file, line or key), 3 training diverged.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time

import numpy as np


class _Progress:
  """tqdm when installed and stderr is a terminal or forced; otherwise nothing."""

  def __init__(self, total, desc, unit="it"):
    try:
      from tqdm import tqdm
      self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
    except ImportError:
      self.bar = None

  def update(self, n=1, **postfix):
    if self.bar is not None:
      self.bar.update(n)
      if postfix:
        self.bar.set_postfix(postfix, refresh=False)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def _bar(desc, scale=1, unit="it"):
  """A progress(done, total) callback for checkpoint.load and evaluate: a bar made on the first call,
  closed when done reaches total (scale divides both, e.g. bytes -> MB)."""
  state = {}

  def progress(done, total):
    if "bar" not in state:
      state["bar"] = _Progress(total // scale, desc, unit)
      state["n"] = 0
    n = done // scale
    state["bar"].update(n - state["n"])
    state["n"] = n
    if done >= total:
      state["bar"].close()
  return progress


# ----------------------------------------------------------------------------------------- model args


def _add_model_args(p, required=False):
  p.add_argument("--checkpoint", required=required, help="an npz in the big_vision layout (or its .part0); "
                 "default: the embedded demo checkpoint")
  p.add_argument("--tokenizer", help="SentencePiece model (paligemma_tokenizer.model); default: the demo's")
  p.add_argument("--config", default=None, help="a preset name (default: inferred from the checkpoint's shapes)")


def _model(args, dtype=None):
  """(cfg, tokenizer, checkpoint path) from the flags, the demo's when no checkpoint is given."""
  from pgjax import checkpoint, config, demo, tokenizer
  if args.checkpoint is None:
    ckpt, tok_path, cfg = os.path.join(demo.DEMO_DIR, "demo.npz"), os.path.join(demo.DEMO_DIR, "tokenizer.model"), \
        demo.load_config()
    tok_path = args.tokenizer or tok_path
  else:
    if args.tokenizer is None:
      raise ValueError("--tokenizer is required with --checkpoint (e.g. weights/paligemma_tokenizer.model)")
    ckpt, tok_path = args.checkpoint, args.tokenizer
    cfg = config.get(args.config) if args.config else checkpoint.infer_config(ckpt)
  tok = tokenizer.Tokenizer(tok_path)
  if tok.vocab_size > cfg.llm.vocab_size:
    raise ValueError(f"tokenizer {tok_path} has {tok.vocab_size} pieces, more than the model's {cfg.llm.vocab_size}")
  return cfg, tok, ckpt


def _rows(path, image_dir, skip_bad, what, validate_images="header"):
  from pgjax import data
  if os.path.isdir(path):  # open() would fail with a bare IsADirectoryError
    flag = {"train": "--train", "val": "--val", "eval": "--data"}.get(what, "data")
    raise ValueError(f"{flag} {path}: is a folder; pass the JSONL file inside it")
  rows = data.read_jsonl(path, image_dir=image_dir, skip_bad=skip_bad, validate_images=validate_images)
  for source, reason in rows.skipped:
    print(f"skipped {source}: {reason}", file=sys.stderr)
  if rows.skipped:
    print(f"{what}: skipped {len(rows.skipped)} bad row(s) of {path}", file=sys.stderr)
  return rows


# --------------------------------------------------------------------------------------------- finetune


def _demo_defaults(args):
  """The embedded demo: easy-vqa questions, the demo checkpoint, settings measured to meet its target."""
  from pgjax import demo
  defaults = dict(steps=2400, batch_size=32, lr=0.7, clip=1.0, max_len=16, max_new_tokens=4, eval_every=400,
                  eval_examples=512, task="vqa", schedule="cosine", warmup=0.05)
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  return demo.questions("train"), demo.questions("test")


def lr_schedule(name: str, base: float, steps: int, warmup: float):
  """The learning rate for steps 1..`steps`. big_vision's recipe (the PaliGemma notebook) builds its
  schedule over total_steps = TRAIN_STEPS + 1 and evaluates it at steps 1..TRAIN_STEPS, so the decay
  reaches 0 one step after the last and the last step still learns; a schedule over `steps` would give
  the last step lr 0, a wasted step. Warmup steps are round(warmup * (steps + 1)), as big_vision's."""
  from pgjax import train
  return train.schedule(name, base, steps + 1, warmup)


def _data_identity(rows) -> dict:
  """The training data as state.json records it for resume: the example count and a SHA-256 of each
  row's prefix, suffix and image path relative to the images' common folder, in order. A resumed run
  must see the same examples in the same order; image bytes are not read (that is an epoch of I/O), and
  the relative paths let the data folder move."""
  images = [os.path.abspath(r["image"]) if isinstance(r["image"], str) else "" for r in rows]
  common = os.path.commonpath([os.path.dirname(i) for i in images]) if images and all(images) else ""
  h = hashlib.sha256()
  for r, image in zip(rows, images):
    name = os.path.relpath(image, common) if common else image
    h.update(json.dumps([name, r["prefix"], r.get("suffix")]).encode() + b"\n")
  return {"examples": len(rows), "sha256": h.hexdigest()}


def _out_dir(args) -> str:
  out = args.out or os.path.join("runs", time.strftime("finetune-%Y%m%d-%H%M%S"))
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out {out}: exists and is not a folder")
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--out {out}: cannot make the folder ({e.strerror})") from None
  return out


def _resume_point(out, args, identity):
  """The checkpoint this run continues (loop.resume_point), checked before anything is loaded or
  evaluated, with the flags that resolve a refusal; None for a fresh run."""
  from pgjax import loop
  if args.no_resume:
    return None
  try:
    point = loop.resume_point(out, num_steps=args.steps, expect=identity, resume_anyway=args.resume_anyway)
  except loop.SettingsChanged as e:
    raise ValueError(f"{e}\n--resume-anyway resumes all the same; --no-resume starts over (moving the old "
                     f"checkpoints aside to checkpoints.old-N)") from None
  except loop.NothingToTrain as e:
    raise ValueError(f"{e}\na larger --steps continues the run; --no-resume starts over (moving the old "
                     f"checkpoints aside to checkpoints.old-N)") from None
  if point is not None:
    changed = loop.changed_settings(point[1], identity)
    if changed:
      print("pgjax finetune: --resume-anyway: resuming with changed settings:\n  " + "\n  ".join(changed),
            file=sys.stderr)
    print(f"resuming from {point[0]} (step {point[1]['step']})", flush=True)
  return point


def cmd_finetune(args) -> int:
  import jax
  import jax.numpy as jnp
  from pgjax import checkpoint, data, evaluate, loop, sharding, train, viz

  if args.distributed:
    jax.distributed.initialize()  # coordinator, process count and id from the standard environment
  is_demo = args.train is None
  if is_demo:
    if args.checkpoint is not None:
      raise ValueError("--train is required when fine-tuning your own --checkpoint")
    train_rows, val_rows = _demo_defaults(args)
  else:
    train_rows = _rows(args.train, args.image_dir, args.skip_bad, "train", args.validate_images)
    val_rows = _rows(args.val, args.image_dir, args.skip_bad, "val", args.validate_images) if args.val else []
  if args.val_limit:
    val_rows = val_rows[:args.val_limit]
  for k, v in dict(steps=100, batch_size=8, lr=0.03, max_len=128, max_new_tokens=32, eval_every=0,
                   eval_examples=64, schedule="cosine", warmup=0.1).items():
    if getattr(args, k) is None:
      setattr(args, k, v)

  cfg, tok, ckpt = _model(args)
  cfg = dataclasses.replace(cfg, remat=args.remat)
  if cfg.llm.final_logits_softcap and not args.keep_final_softcap:
    # big_vision's fine-tuning recipes set Gemma 2's final soft cap to 0 ("better for transfer").
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, final_logits_softcap=0.0))
  out = _out_dir(args)
  predicate = train.make_predicate(args.trainable)
  optimizer = train.Optimizer(name=args.optimizer, weight_decay=args.weight_decay)
  # What a resume must match besides the seed and optimizer (loop.resume_identity), in state.json.
  identity = loop.resume_identity(args.seed, optimizer, {
      "checkpoint": os.path.abspath(ckpt), "trainable": args.trainable or ["llm/layers/attn/.*"],
      "batch_size": args.batch_size, "train_data": _data_identity(train_rows)})
  frozen_dtype = jnp.dtype(args.frozen_dtype)
  mesh = sharding.make_mesh(model=args.model_parallel)
  if args.batch_size % mesh.shape["data"]:  # else shard_batch fails after the model has loaded, naming no flag
    raise ValueError(f"--batch-size {args.batch_size} does not split over the {mesh.shape['data']} data-parallel "
                     f"devices ({jax.device_count()} devices, --model-parallel {args.model_parallel}): use a multiple "
                     f"of {mesh.shape['data']}")
  print(f"pgjax finetune: {'demo (easy-vqa), ' if is_demo else ''}{len(train_rows)} train / {len(val_rows)} val "
        f"examples; {jax.device_count()} device(s) {dict(mesh.shape)}; frozen params {frozen_dtype}, trainable "
        f"float32; out {out}", flush=True)
  resuming = _resume_point(out, args, identity) is not None  # refused here, before the checkpoint loads

  t0 = time.time()
  params = checkpoint.load(ckpt, cfg, dtype=lambda key, _: jnp.float32 if predicate(key) else frozen_dtype,
                           sharding=sharding.leaf_sharding(mesh), progress=_bar("load", 2**20, "MB"))
  trainable, frozen = train.split(params, predicate, frozen_dtype=frozen_dtype)
  del params
  n_train = sum(x.size for x in jax.tree.leaves(trainable))
  n_all = n_train + sum(x.size for x in jax.tree.leaves(frozen))
  print(f"loaded {ckpt} in {time.time() - t0:.1f}s: {n_train:,} of {n_all:,} params train", flush=True)

  eval_kw = dict(task=args.task, batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens)
  val_subset = val_rows[:args.eval_examples] if args.eval_examples else val_rows

  def run_eval(rows, label, trainable):
    if not rows:
      return None
    t = time.time()
    res = evaluate.evaluate(train.merge(trainable, frozen), cfg, tok, rows, **eval_kw,
                            progress=_bar(f"eval {label}", unit="ex"))
    res["metrics"]["seconds"] = round(time.time() - t, 1)
    main = {k: v for k, v in res["metrics"].items() if isinstance(v, float)}
    print(f"eval {label} ({len(rows)} examples): {json.dumps(main)}", flush=True)
    return res

  # A resumed run appends to its log; a fresh one starts it anew.
  metrics_log = open(os.path.join(out, "metrics.jsonl"), "a" if resuming else "w")

  def log(record):
    metrics_log.write(json.dumps(record) + "\n")
    metrics_log.flush()

  before = run_eval(val_rows, "before", trainable)
  if before:
    log({"step": 0, "eval": before["metrics"]})
  schedule = lr_schedule(args.schedule, args.lr, args.steps, args.warmup)
  bar = _Progress(args.steps, "train")
  eval_points = []

  def on_step(step, m):
    log({"step": step, **m})
    bar.update(1, loss=f"{m['loss']:.4f}")

  def eval_fn(step, current):
    res = run_eval(val_subset, f"step {step}", current)
    if res:
      log({"step": step, "eval": res["metrics"]})
      eval_points.append((step, res["metrics"].get("accuracy", res["metrics"]["exact_match"])))

  batches = lambda start: (sharding.shard_batch(b, mesh) for b in data.train_batches(
      train_rows, tok, batch_size=args.batch_size, size=cfg.vision.image_size, max_len=args.max_len, seed=args.seed,
      start_step=start, truncate=args.truncate))
  t_train = time.time()
  try:
    trainable, _, history = loop.fit(
        cfg, trainable, frozen, batches, num_steps=args.steps, lr_schedule=schedule, out_dir=out,
        optimizer=optimizer, clip_norm=args.clip, accum_steps=args.accum, mesh=mesh,
        save_every=args.save_every or args.steps, resume=not args.no_resume, seed=args.seed, on_step=on_step,
        eval_fn=eval_fn if val_subset else None, eval_every=args.eval_every, resume_anyway=args.resume_anyway,
        extra_state={k: v for k, v in identity.items() if k not in ("seed", "optimizer")})
  except loop.Diverged as e:
    print(f"pgjax finetune: {e}", file=sys.stderr)
    return 3
  finally:
    bar.close()
  train_seconds = time.time() - t_train
  after = run_eval(val_rows, "after", trainable)
  if after:
    log({"step": args.steps, "eval": after["metrics"]})
  metrics_log.close()
  if args.save_full:
    checkpoint.save(os.path.join(out, "final.npz"), train.merge(trainable, frozen))
  if args.safetensors:  # the same trees, pgjax keys ("/"-joined), for tools that read safetensors
    from pgjax import hf
    hf.save_safetensors(os.path.join(out, "final_trainable.safetensors"), trainable)
    if args.save_full:
      hf.save_safetensors(os.path.join(out, "final.safetensors"), train.merge(trainable, frozen))

  summary = {
      "demo": is_demo, "checkpoint": ckpt, "train_examples": len(train_rows), "val_examples": len(val_rows),
      "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "schedule": args.schedule,
      "optimizer": args.optimizer, "trainable_params": n_train, "total_params": n_all,
      "train_seconds": round(train_seconds, 1), "seconds_per_step": round(train_seconds / max(len(history.steps), 1), 4),
      "final_loss": history.loss[-1] if history.loss else None, "devices": jax.device_count(),
      "before": before["metrics"] if before else None, "after": after["metrics"] if after else None,
      "config": dataclasses.asdict(cfg),
  }
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  shown = {k: v for k, v in summary.items() if k not in ("config", "before", "after")}
  grid = viz.predictions_grid(val_rows[:args.report_examples], after["predictions"][:args.report_examples]) if after else ""
  table = {name: {k: v for k, v in res["metrics"].items() if isinstance(v, (int, float))}
           for name, res in (("before", before), ("after", after)) if res}
  viz.write_html(os.path.join(out, "report.html"), viz.report_html(
      shown, viz.loss_curve_svg(history.steps, history.loss, {"val": eval_points} if eval_points else None),
      table, grid, title=f"pgjax fine-tuning report: {out}"))
  print(f"done in {time.time() - t0:.0f}s. Outputs in {out}: summary.json, metrics.jsonl, report.html, "
        f"checkpoints/{', final.npz' if args.save_full else ''}")
  return 0


# ------------------------------------------------------------------------------------- other commands


def cmd_eval(args) -> int:
  import jax.numpy as jnp
  from pgjax import checkpoint, evaluate, viz
  cfg, tok, ckpt = _model(args)
  rows = _rows(args.data, args.image_dir, args.skip_bad, "eval", args.validate_images)
  params = checkpoint.load(ckpt, cfg, dtype=jnp.dtype(args.dtype), progress=_bar("load", 2**20, "MB"))
  res = evaluate.evaluate(params, cfg, tok, rows, task=args.task, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, progress=_bar("eval", unit="ex"))
  print(json.dumps(res["metrics"], indent=1))
  if args.html:  # every row is an embedded image: the page shows the first --report-examples, the metrics all
    n = min(args.report_examples, len(rows))
    title = f"pgjax eval: {args.data}" + (f" (the first {n} of {len(rows)} rows)" if n < len(rows) else "")
    viz.write_html(args.html, viz.predictions_html(rows[:n], res["predictions"][:n], title=title,
                                                   metrics=res["metrics"]))
  if args.predictions:
    with open(args.predictions, "w") as f:
      for r, p in zip(rows, res["predictions"]):
        f.write(json.dumps({"source": r.get("_source"), **p}) + "\n")
  return 0


def cmd_predict(args) -> int:
  import jax.numpy as jnp
  from pgjax import checkpoint, evaluate, viz
  try:  # bytes the shell passed that are not UTF-8 arrive as lone surrogates, which SentencePiece cannot take
    args.prompt.encode("utf-8")
  except UnicodeEncodeError:
    raise ValueError(f"--prompt {args.prompt.encode('utf-8', 'backslashreplace').decode()!r} is not valid "
                     f"UTF-8 text") from None
  cfg, tok, ckpt = _model(args)
  params = checkpoint.load(ckpt, cfg, dtype=jnp.dtype(args.dtype), progress=_bar("load", 2**20, "MB"))
  preds = evaluate.predict(params, cfg, tok, args.image, [args.prompt] * len(args.image),
                           batch_size=min(8, len(args.image)), max_new_tokens=args.max_new_tokens,
                           progress=_bar("predict", unit="ex"))
  for path, p in zip(args.image, preds):
    print(f"{path}\t{p['prediction']}" + ("" if p["hit_eos"] else "\t(cut at --max-new-tokens)"))
  if args.html:  # detect prompts get their <loc> boxes drawn on the images
    rows = [{"image": path, "prefix": args.prompt} for path in args.image]
    viz.write_html(args.html, viz.predictions_html(rows, preds))
  return 0


def cmd_show_data(args) -> int:
  from pgjax import data, viz
  rows = _rows(args.data, args.image_dir, True, "show-data")
  if args.tokenizer:
    from pgjax import tokenizer
    print(data.format_stats(data.stats(rows, tokenizer.Tokenizer(args.tokenizer), args.max_len)))
  viz.write_html(args.html, viz.data_html(rows[:args.limit], title=f"pgjax data: {args.data}"))
  print(f"{len(rows)} rows ({len(rows.skipped)} bad, skipped); view: {args.html}")
  return 0


def cmd_inspect(args) -> int:
  import jax
  from pgjax import checkpoint, sharding
  shapes = checkpoint.read_shapes(args.checkpoint)
  try:
    cfg = checkpoint.infer_config(args.checkpoint)
  except ValueError as e:
    cfg, why = None, e
  mesh = sharding.make_mesh(model=args.model_parallel)
  total = 0
  print(f"{'key':70s} {'shape':24s} {'dtype':9s} {'params':>13s} {'spec':32s} per-device")
  leaves = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}
  for key, shape, dtype, spec, nbytes, problem in sharding.describe(leaves, mesh):
    n = int(np.prod(shape, dtype=np.int64))
    total += n
    per_dev = f"({problem})" if problem else f"{nbytes:,d} B"
    print(f"{key:70s} {str(shape):24s} {dtype:9s} {n:>13,d} {spec:32s} {per_dev}")
  print(f"{len(shapes)} leaves, {total:,d} parameters; mesh {dict(mesh.shape)} over {jax.device_count()} device(s)")
  print(f"config: {cfg}" if cfg else f"config: not inferred ({why})")
  return 0


# ----------------------------------------------------------------------------------------------- main


def _checked(kind, ok, need):
  """An argparse type: kind(text), refused unless ok(value). Refusing here, before anything loads, lets
  argparse name the flag ("argument --steps: expected an integer >= 1, got 0") and exit 2. A negative
  count would otherwise slice lists from the end (dropping rows silently) or make no sense at all."""
  def parse(text):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected {need}, got {text!r}") from None
    if not ok(value):
      raise argparse.ArgumentTypeError(f"expected {need}, got {text}")
    return value
  return parse


_AT_LEAST_1 = _checked(int, lambda v: v >= 1, "an integer >= 1")
_AT_LEAST_0 = _checked(int, lambda v: v >= 0, "an integer >= 0")
_POSITIVE = _checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
_NON_NEGATIVE = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
_FRACTION = _checked(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
_DTYPES = ("float32", "float16", "bfloat16")


def _regex(text):
  """An argparse type: a pattern that compiles (a typo is named with the flag, not a traceback)."""
  try:
    re.compile(text)
  except re.error as e:
    raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression ({e})") from None
  return text


def _add_validate_images(p):
  from pgjax import data  # the choices are data.read_jsonl's own
  p.add_argument("--validate-images", default="header", choices=data.VALIDATE_IMAGES,
                 help="how images are checked before anything runs: header (default: open each file and verify "
                      "its header; fast), full (decode every image: also catches truncated JPEGs, at the cost of "
                      "an epoch of decoding), none (only that the files exist)")


def _parser():
  parser = argparse.ArgumentParser(prog="pgjax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--compile-cache", metavar="DIR|off", default=None,
                      help="JAX's persistent compilation cache: a second run loads its compiled steps instead of "
                           "compiling them (default $PGJAX_COMPILE_CACHE, else ~/.cache/pgjax/xla; off: none)")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("finetune", help="fine-tune (no data flags: the embedded demo)")
  _add_model_args(p)
  p.add_argument("--out", help="output folder (default runs/finetune-DATE-TIME)")
  p.add_argument("--train", help="training JSONL of {image, prefix, suffix}")
  p.add_argument("--val", help="validation JSONL (suffix, or answers for VQA)")
  p.add_argument("--image-dir", help="resolve image paths against this folder instead of the JSONL's")
  p.add_argument("--skip-bad", action="store_true", help="skip (and report) malformed rows instead of failing")
  _add_validate_images(p)
  p.add_argument("--steps", type=_AT_LEAST_1)
  p.add_argument("--batch-size", type=_AT_LEAST_1)
  p.add_argument("--lr", type=_POSITIVE)
  p.add_argument("--schedule", choices=("cosine", "linear", "constant"),
                 help="learning rate (default cosine): linear warmup to --lr, then cosine or linear decay, laid "
                      "out over steps + 1 as big_vision's recipe, so the last step still learns")
  p.add_argument("--warmup", type=_FRACTION, help="warmup fraction of the steps, in [0, 1)")
  p.add_argument("--optimizer", default="sgd", choices=("sgd", "momentum", "adamw"))
  p.add_argument("--weight-decay", type=_NON_NEGATIVE, default=0.0)
  p.add_argument("--clip", type=_POSITIVE, default=None, help="clip the gradient's global norm")
  p.add_argument("--accum", type=_AT_LEAST_1, default=1, help="gradient accumulation micro-batches per step")
  p.add_argument("--trainable", nargs="+", type=_regex, help="regexes of trainable params (default llm/layers/attn/.*)")
  p.add_argument("--frozen-dtype", default="float16", choices=("float16", "bfloat16", "float32"))
  p.add_argument("--remat", default="none", choices=("none", "full", "dots"))
  p.add_argument("--max-len", type=_AT_LEAST_1, help="token sequence length (prefix + suffix + eos)")
  p.add_argument("--truncate", default="error", choices=("error", "keep_eos"))
  p.add_argument("--task", choices=("vqa", "caption", "exact", "detect"), help="eval metric (default: from the data)")
  p.add_argument("--max-new-tokens", type=_AT_LEAST_1)
  p.add_argument("--eval-every", type=_AT_LEAST_0, help="evaluate on --eval-examples val rows every N steps (0: never)")
  p.add_argument("--eval-examples", type=_AT_LEAST_0, help="val rows for the evaluations during training (0: all)")
  p.add_argument("--val-limit", type=_AT_LEAST_1, help="use only the first N val rows (before/after evaluation too)")
  p.add_argument("--eval-batch-size", type=_AT_LEAST_1, default=64)
  p.add_argument("--report-examples", type=_AT_LEAST_0, default=24)
  p.add_argument("--save-every", type=_AT_LEAST_0, default=0, help="checkpoint every N steps (default: at the end)")
  p.add_argument("--save-full", action="store_true", help="also write the merged params as final.npz")
  p.add_argument("--safetensors", action="store_true",
                 help="also write final_trainable.safetensors (and final.safetensors with --save-full)")
  p.add_argument("--no-resume", action="store_true",
                 help="start over: move checkpoints already in --out aside (to checkpoints.old-N) instead of resuming")
  p.add_argument("--resume-anyway", action="store_true",
                 help="resume even if the checkpoint in --out was saved with another seed, batch size, optimizer, "
                      "base --checkpoint, --trainable or training data (refused by default: the result would not "
                      "be a faithful continuation)")
  p.add_argument("--seed", type=_AT_LEAST_0, default=0)
  p.add_argument("--model-parallel", type=_AT_LEAST_1, default=1, help="devices per model group (2-D mesh)")
  p.add_argument("--keep-final-softcap", action="store_true", help="keep Gemma 2's final logit soft cap")
  p.add_argument("--distributed", action="store_true", help="multi-host: jax.distributed.initialize() from the environment")
  p.set_defaults(fn=cmd_finetune)

  p = sub.add_parser("eval", help="decode a JSONL and score it")
  _add_model_args(p)
  p.add_argument("--data", required=True)
  p.add_argument("--image-dir")
  p.add_argument("--skip-bad", action="store_true")
  _add_validate_images(p)
  p.add_argument("--task", choices=("vqa", "caption", "exact", "detect"))
  p.add_argument("--batch-size", type=_AT_LEAST_1, default=16)
  p.add_argument("--max-new-tokens", type=_AT_LEAST_1, default=32)
  p.add_argument("--dtype", default="float32", choices=_DTYPES, help="params dtype")
  p.add_argument("--html", help="write an HTML view of the predictions here")
  p.add_argument("--report-examples", type=_AT_LEAST_0, default=200,
                 help="rows shown in the --html page (default 200; the metrics cover every row)")
  p.add_argument("--predictions", help="write the predictions as JSONL here (every row)")
  p.set_defaults(fn=cmd_eval)

  p = sub.add_parser("predict", help="greedy-decode a prompt for each image")
  _add_model_args(p)
  p.add_argument("--image", nargs="+", required=True)
  p.add_argument("--prompt", required=True, help='the prefix, e.g. "caption en" or "detect cat ; dog"')
  p.add_argument("--max-new-tokens", type=_AT_LEAST_1, default=32)
  p.add_argument("--dtype", default="float32", choices=_DTYPES, help="params dtype")
  p.add_argument("--html", help="write an HTML view (with <loc> boxes drawn) here")
  p.set_defaults(fn=cmd_predict)

  p = sub.add_parser("show-data", help="an HTML sanity view of a JSONL")
  p.add_argument("data")
  p.add_argument("--image-dir")
  p.add_argument("--tokenizer", help="also print token-length statistics")
  p.add_argument("--max-len", type=_AT_LEAST_1, default=128)
  p.add_argument("--limit", type=_AT_LEAST_0, default=100)
  p.add_argument("--html", default="data.html")
  p.set_defaults(fn=cmd_show_data)

  p = sub.add_parser("inspect", help="list a checkpoint's leaves, shapes, dtypes, counts and shardings")
  p.add_argument("checkpoint")
  p.add_argument("--model-parallel", type=_AT_LEAST_1, default=1)
  p.set_defaults(fn=cmd_inspect)
  return parser


def main(argv=None) -> int:
  try:
    args = _parser().parse_args(argv)
  except SystemExit as e:  # bad flags (argparse printed why, naming the flag) or --help: returned like the others
    return 0 if e.code is None else e.code if isinstance(e.code, int) else 2
  from pgjax import host
  host.enable_compilation_cache(host.default_cache_dir(args.compile_cache))
  try:
    return args.fn(args)
  except (FileNotFoundError, ValueError, KeyError, ImportError) as e:
    print(f"pgjax {args.command}: error: {e}", file=sys.stderr)
    for note in getattr(e, "__notes__", ()):  # e.g. where a stopped fine-tune saved what it had trained
      print(note, file=sys.stderr)
    return 2


def run() -> None:
  """The program's entry (`pgjax`, `python -m pgjax.cli`): glibc's allocator tuned for XLA:CPU (see
  pgjax/host.py; PGJAX_TUNE_MALLOC=0 to keep the default), then `main`."""
  from pgjax import host
  host.tune_allocator()
  sys.exit(main())


if __name__ == "__main__":
  run()
