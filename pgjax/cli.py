"""The `pgjax` command.

  pgjax finetune   train (seed recipe by default), evaluate before/after, write checkpoints, metrics.jsonl,
                   summary.json and report.html; with no data flags it runs the embedded easy-vqa demo
  pgjax eval       decode a JSONL with a checkpoint and score it (+ an HTML view)
  pgjax predict    images + prompt -> text (boxes drawn for detect prompts with --html)
  pgjax show-data  a JSONL as an HTML sanity view, with token-length statistics
  pgjax inspect    a checkpoint's param tree: shapes, dtypes, counts, inferred config and shardings

Exit codes: 0 ok, 2 bad flags or input (the message names the file, line or key), 3 training diverged,
128 + the signal when stopped (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP; finetune saves its last completed step first).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import signal
import sys
import time



# ----------------------------------------------------------------------------------------- model args


def _add_model_args(p, required=False):
  p.add_argument("--checkpoint", required=required, help="an npz in the big_vision layout (or its .part0); "
                 "default: the embedded demo checkpoint")
  p.add_argument("--tokenizer", help="SentencePiece model (paligemma_tokenizer.model); default: the demo's")
  p.add_argument("--config", default=None, help="a preset name (default: inferred from the checkpoint's shapes)")


def _model(args, dtype=None):
  """(cfg, tokenizer, checkpoint path) from the flags, the demo's when no checkpoint is given."""
  from pgjax import checkpoint, config, demo, finetune
  if args.checkpoint is None:
    ckpt, tok_path, cfg = os.path.join(demo.DEMO_DIR, "demo.npz"), os.path.join(demo.DEMO_DIR, "tokenizer.model"), \
        demo.load_config()
    tok_path = args.tokenizer or tok_path
  else:
    if args.tokenizer is None:
      raise ValueError("--tokenizer is required with --checkpoint (e.g. weights/paligemma_tokenizer.model)")
    ckpt, tok_path = args.checkpoint, args.tokenizer
    cfg = config.get(args.config) if args.config else checkpoint.infer_config(ckpt)
  return cfg, finetune.load_tokenizer(tok_path, cfg), ckpt


def _adapter(path, cfg):
  """(LoRA adapters, alpha) from --adapter: a PEFT adapter directory (adapter_config.json), a pgjax run folder
  (its newest checkpoint) or one of its checkpoint folders (trainable.npz + state.json)."""
  from pgjax import checkpoint, hf, lora, rundir
  if os.path.exists(os.path.join(path, "adapter_config.json")):
    return hf.import_peft(path, cfg)
  step = path if os.path.exists(os.path.join(path, "trainable.npz")) else rundir.latest(path)
  if step is None:
    raise ValueError(f"--adapter {path}: neither a PEFT adapter (adapter_config.json) nor a pgjax run or "
                     f"checkpoint folder (trainable.npz)")
  tc = rundir.read_state(step).get("train_config", {})
  if not tc.get("lora_rank"):
    raise ValueError(f"--adapter {step}: this run trained no LoRA adapters (its train_config has no lora_rank)")
  adapters = checkpoint.load(os.path.join(step, "trainable.npz"))  # the one npz reader: its checks, its errors
  lora.adapted_paths(adapters)  # every leaf an a or b of a pair
  return adapters, float(tc["lora_alpha"] or 2 * tc["lora_rank"])


def _params(args, cfg, ckpt):
  """The checkpoint's params as --dtype, --quantize and --adapter say (adapters merged over a float base, put on
  a quantized one)."""
  import jax.numpy as jnp
  from pgjax import checkpoint, lora, progress
  params = checkpoint.load(ckpt, cfg, dtype=jnp.dtype(args.dtype), progress=progress.callback("load", 2**20, "MB"),
                           quantize=args.quantize)
  if not args.adapter:
    return params
  adapters, alpha = _adapter(args.adapter, cfg)
  return lora.apply(params, adapters, alpha=alpha) if args.quantize else lora.merge(params, adapters, alpha=alpha)


def _vae(args):
  """The --vae file's params (segmentation.load_vae), or None."""
  if not args.vae:
    return None
  from pgjax import segmentation
  return segmentation.load_vae_cached(args.vae)


def _rows(path, image_dir, skip_bad, what, validate_images="header"):
  from pgjax import sources
  if os.path.isdir(path):  # open() would fail with a bare IsADirectoryError
    flag = {"train": "--train", "val": "--val", "eval": "--data"}.get(what, "data")
    raise ValueError(f"{flag} {path}: is a folder; pass the JSONL file inside it")
  rows = sources.read_jsonl(path, image_dir=image_dir, skip_bad=skip_bad, validate_images=validate_images)
  for source, reason in rows.skipped:
    print(f"skipped {source}: {reason}", file=sys.stderr)
  if rows.skipped:
    print(f"{what}: skipped {len(rows.skipped)} bad row(s) of {path}", file=sys.stderr)
  return rows


# --------------------------------------------------------------------------------------------- finetune


# Flags that set a TrainConfig field of the same name; unset (None), they keep the preset's value.
_TRAIN_FLAGS = ("steps", "batch_size", "lr", "schedule", "warmup", "clip", "accum", "trainable", "compute_dtype",
                "frozen_dtype", "lora_rank", "lora_alpha", "lora_targets", "quantize",
                "remat", "keep_final_softcap", "max_len", "truncate", "seed", "task", "max_new_tokens", "eval_every",
                "eval_examples", "eval_batch_size", "save_every")


# With --lora and neither --lr nor --optimizer: AdamW at 1e-3, which gave the demo's best LoRA result (SGD at the
# recipe's lr 0.7 reached 0.810, AdamW 3e-3 0.846, 1e-2 0.728; README).
LORA_DEFAULTS = {"lr": 1e-3}


def train_config(args):
  """The run's TrainConfig: the preset (the demo's without --train, else the recipe's defaults) with every
  flag that was given."""
  from pgjax import demo, finetune
  base = demo.PRESETS[args.demo or "vqa"] if args.train is None else finetune.TrainConfig()
  given = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None}
  if args.lora_rank and args.lr is None and args.optimizer is None:  # LoRA's defaults (README, "LoRA and ...")
    given.update(LORA_DEFAULTS)
  optimizer = {k: v for k, v in (("name", args.optimizer), ("weight_decay", args.weight_decay)) if v is not None}
  if args.lora_rank and args.lr is None and args.optimizer is None:
    optimizer = {"name": "adamw"}
  if optimizer:
    given["optimizer"] = dataclasses.replace(base.optimizer, **optimizer)
  return dataclasses.replace(base, **given)


def _flag(field: str) -> str:
  return "--" + field.replace("_", "-")


def cmd_finetune(args) -> int:
  import jax
  from pgjax import demo, finetune, loop, rundir, sharding

  if args.distributed:
    jax.distributed.initialize()  # coordinator, process count and id from the standard environment
  is_demo = args.train is None
  vae = args.vae
  if args.demo is not None and not is_demo:
    raise ValueError("--demo picks the embedded demo's task; it runs without --train")
  if is_demo:
    if args.checkpoint is not None:
      raise ValueError("--train is required when fine-tuning your own --checkpoint")
    train_rows, val_rows = demo.rows(args.demo or "vqa", "train"), demo.rows(args.demo or "vqa", "test")
    vae = vae or (demo.VAE if args.demo == "segment" else None)
  else:
    train_rows = _rows(args.train, args.image_dir, args.skip_bad, "train", args.validate_images)
    val_rows = _rows(args.val, args.image_dir, args.skip_bad, "val", args.validate_images) if args.val else []
  if args.val_limit:
    val_rows = val_rows[:args.val_limit]
  cfg, tok, ckpt = _model(args)
  mesh = sharding.make_mesh(model=args.model_parallel)
  out = None
  try:
    tc = train_config(args)
    out = finetune.make_out_dir(args.out or os.path.join("runs", time.strftime("finetune-%Y%m%d-%H%M%S")),
                                name="--out")
    with loop.stop_on_signals():  # SIGTERM / SIGHUP anywhere in the job behave as Ctrl-C
      finetune.finetune(tc, train=train_rows, val=val_rows, checkpoint=ckpt, tokenizer=tok, model=cfg, out=out,
                        mesh=mesh, resume=not args.no_resume, resume_anyway=args.resume_anyway,
                        save_full=args.save_full, safetensors=args.safetensors,
                        report_examples=args.report_examples,
                        summary_extra={"demo": (args.demo or "vqa") if is_demo else False}, vae=vae)
  except finetune.SettingError as e:
    extra = f" (--model-parallel {args.model_parallel})" if e.field == "batch_size" else ""
    raise ValueError(f"{_flag(e.field)} {e.detail}{extra}") from None
  except rundir.SettingsChanged as e:
    raise ValueError(f"{e}\n--resume-anyway resumes all the same; --no-resume starts over (moving the old "
                     f"checkpoints aside to checkpoints.old-N)") from None
  except rundir.NothingToTrain as e:
    raise ValueError(f"{e}\na larger --steps continues the run; --no-resume starts over (moving the old "
                     f"checkpoints aside to checkpoints.old-N)") from None
  except loop.Diverged as e:
    print(f"pgjax finetune: {e}", file=sys.stderr)
    return 3
  except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP (loop.Stopped): the conventional 128 + signal
    signum = getattr(e, "signum", signal.SIGINT)
    saved = rundir.latest(out) if out is not None and os.path.isdir(os.path.join(out, "checkpoints")) else None
    where = (f"; {saved} holds the last saved step, and the same command resumes there" if saved else
             "; nothing was saved")
    print(f"pgjax finetune: stopped by {signal.Signals(signum).name}{where}", file=sys.stderr)
    for note in getattr(e, "__notes__", ()):
      if "could not" in note:  # a save or log that failed on the way out says why
        print(note, file=sys.stderr)
    return 128 + signum
  return 0


# ------------------------------------------------------------------------------------- other commands


def cmd_eval(args) -> int:
  import jax.numpy as jnp
  from pgjax import checkpoint, evaluate, files, progress, viz
  for flag, path in (("--html", args.html), ("--predictions", args.predictions)):
    if path:
      files.check_writable(path, flag)  # before the evaluation, not after it
  decoding = _decoding(args)
  cfg, tok, ckpt = _model(args)
  cfg = _with_compute_dtype(cfg, args.compute_dtype)
  rows = _rows(args.data, args.image_dir, args.skip_bad, "eval", args.validate_images)
  params = _params(args, cfg, ckpt)
  res = evaluate.evaluate(params, cfg, tok, rows, task=args.task, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, progress=progress.callback("eval", unit="ex"),
                          decoding=decoding, vae=args.vae)
  print(json.dumps(res["metrics"], indent=1))
  if args.html:  # every row is an embedded image: the page shows the first --report-examples, the metrics all
    n = min(args.report_examples, len(rows))
    title = f"pgjax eval: {args.data}" + (f" (the first {n} of {len(rows)} rows)" if n < len(rows) else "")
    viz.write_html(args.html, viz.predictions_html(rows[:n], res["predictions"][:n], title=title,
                                                   metrics=res["metrics"], vae=_vae(args)))
  if args.predictions:
    with open(args.predictions, "w") as f:
      for r, p in zip(rows, res["predictions"]):
        f.write(json.dumps({"source": r.get("_source"), **p}) + "\n")
  return 0


def cmd_predict(args) -> int:
  import jax.numpy as jnp
  from pgjax import checkpoint, evaluate, files, progress, viz
  try:  # bytes the shell passed that are not UTF-8 arrive as lone surrogates, which SentencePiece cannot take
    args.prompt.encode("utf-8")
  except UnicodeEncodeError:
    raise ValueError(f"--prompt {args.prompt.encode('utf-8', 'backslashreplace').decode()!r} is not valid "
                     f"UTF-8 text") from None
  if args.html:
    files.check_writable(args.html, "--html")
  decoding = _decoding(args)
  cfg, tok, ckpt = _model(args)
  cfg = _with_compute_dtype(cfg, args.compute_dtype)
  params = _params(args, cfg, ckpt)
  preds = evaluate.predict(params, cfg, tok, args.image, [args.prompt] * len(args.image),
                           batch_size=min(8, len(args.image)), max_new_tokens=args.max_new_tokens,
                           progress=progress.callback("predict", unit="ex"), decoding=decoding)
  for path, p in zip(args.image, preds):
    print(f"{path}\t{p['prediction']}" + ("" if p["hit_eos"] else "\t(cut at --max-new-tokens)"))
  if args.html:  # detect prompts get their <loc> boxes drawn on the images
    rows = [{"image": path, "prefix": args.prompt} for path in args.image]
    viz.write_html(args.html, viz.predictions_html(rows, preds, metrics={"decoding": decoding.describe()},
                                                   vae=_vae(args)))
  return 0


def cmd_show_data(args) -> int:
  from pgjax import annotations, data, viz
  rows = _rows(args.data, args.image_dir, True, "show-data")
  # Rows that give masks or boxes are shown with the text built for them: what the model will be taught.
  built = annotations.build_suffixes(rows, vae_path=args.vae)
  if args.tokenizer:
    from pgjax import tokenizer
    print(data.format_stats(data.stats(built, tokenizer.Tokenizer(args.tokenizer), args.max_len)))
  viz.write_html(args.html, viz.data_html(built[:args.limit], title=f"pgjax data: {args.data}", vae=_vae(args)))
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
    n = math.prod(shape)  # Python ints: a header whose shape product overflows int64 still counts right
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


def _QUANTIZE(text):  # noqa: N802 (a type, like the others)
  if text not in ("int8", "int4"):
    raise argparse.ArgumentTypeError(f"expected int8 or int4, got {text!r}")
  return int(text[3:])
_TOP_P = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _add_adapter_args(p):
  p.add_argument("--adapter", help="LoRA adapters to decode with: a PEFT adapter directory, or a pgjax run folder "
                 "(or one of its checkpoint folders) that trained with --lora")
  p.add_argument("--quantize", type=_QUANTIZE, help="int8 or int4: quantize the matmul weights as they load")


def _add_decoding(p):
  """eval's and predict's decoding flags: one decode.Decoding (`_decoding`)."""
  from pgjax import decode
  g = p.add_argument_group("decoding")
  g.add_argument("--decode", choices=decode.MODES, default="greedy", help="how tokens are chosen (default greedy)")
  # No defaults here: a flag given is a field set, and one that does not apply to --decode is refused.
  g.add_argument("--temperature", type=_NON_NEGATIVE, help="sample: divides the logits (default 1; 0: greedy)")
  g.add_argument("--top-k", type=_AT_LEAST_1, help="sample: keep the k most likely tokens (and ties)")
  g.add_argument("--top-p", type=_TOP_P, help="sample: keep the nucleus of mass p (big_vision's rule)")
  g.add_argument("--num-samples", type=_AT_LEAST_1, help="sample: best of n by summed log-prob (default 1)")
  g.add_argument("--beam-size", type=_AT_LEAST_1, help="beam: beams per example (default 4)")
  g.add_argument("--seed", type=_AT_LEAST_0, help="sample: example i draws from fold_in(key(seed), i) (default 0)")
  g.add_argument("--constrain", choices=decode.CONSTRAINTS,
                 help="keep the output in the <loc>/<seg> grammar of detection or segmentation")


def _decoding(args):
  """The Decoding the flags describe; a flag that does not apply to --decode is refused, naming both."""
  from pgjax import decode
  fields = {k for ks in decode.MODE_FIELDS.values() for k in ks}
  given = {k: getattr(args, k) for k in sorted(fields) if getattr(args, k) is not None}
  wrong = [k for k in given if k not in decode.MODE_FIELDS[args.decode]]
  if wrong:
    flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
    raise ValueError(f"{flags} do(es) not apply to --decode {args.decode}")
  return decode.Decoding(mode=args.decode, constrain=args.constrain, **given)


def _regex(text):
  """An argparse type: a pattern that compiles (a typo is named with the flag, not a traceback)."""
  try:
    re.compile(text)
  except re.error as e:
    raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression ({e})") from None
  return text


def _add_compute_dtype(p, default="auto"):
  from pgjax import config  # TrainConfig's choices (finetune.COMPUTE_DTYPES) without importing jax to parse flags
  p.add_argument("--compute-dtype", choices=("auto",) + config.COMPUTE_DTYPES, default=default,
                 help="the matmuls' dtype, accumulated in float32 (default auto: bfloat16 on TPUs, on GPUs with "
                      "bfloat16 and on CPUs where a probe finds it faster, else float32); float32 gives "
                      "big_vision's exact numerics; float16 (a T4, a V100) trains with loss scaling")


def _with_compute_dtype(cfg, name):
  """cfg with the --compute-dtype of eval and predict, "auto" resolved for this machine."""
  from pgjax import host
  return cfg.with_compute_dtype(host.resolve_compute_dtype(name)[0])


def _add_validate_images(p):
  from pgjax import sources  # the choices are sources.read_jsonl's own
  p.add_argument("--validate-images", default="header", choices=sources.VALIDATE_IMAGES,
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
  p.add_argument("--train", help="training JSONL of {image, prefix, suffix}; a row may give a \"mask\" PNG or "
                 "pixel \"boxes\" + \"labels\" instead of the suffix")
  p.add_argument("--val", help="validation JSONL (suffix, or answers for VQA)")
  p.add_argument("--vae", help="the segmentation VAE (vae-oid.npz) that turns rows' masks into <seg> text")
  p.add_argument("--demo", choices=("vqa", "detect", "segment"),
                 help="without --train: the embedded demo's task (default vqa; detect reports COCO mAP, segment mIoU)")
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
  p.add_argument("--optimizer", choices=("sgd", "momentum", "adamw"), help="default sgd (the recipe's)")
  p.add_argument("--weight-decay", type=_NON_NEGATIVE, help="decoupled weight decay (AdamW); default 0")
  p.add_argument("--clip", type=_POSITIVE, default=None, help="clip the gradient's global norm")
  p.add_argument("--accum", type=_AT_LEAST_1, help="gradient accumulation micro-batches per step (default 1)")
  p.add_argument("--trainable", nargs="+", type=_regex, help="regexes of trainable params (default llm/layers/attn/.*)")
  p.add_argument("--lora", dest="lora_rank", type=_AT_LEAST_1, metavar="RANK",
                 help="train LoRA adapters of this rank instead of --trainable (every param frozen)")
  p.add_argument("--lora-alpha", type=_POSITIVE, help="the adapters' update is scaled by alpha / rank (default 2 * rank)")
  p.add_argument("--lora-targets", nargs="+", type=_regex, help="regexes of the weights that get adapters (default "
                 "the LLM attention's einsums)")
  p.add_argument("--quantize", type=_QUANTIZE, help="int8 or int4: the frozen matmul weights quantized (with --lora: "
                 "QLoRA)")
  _add_compute_dtype(p, default=None)
  p.add_argument("--frozen-dtype", choices=("float16", "bfloat16", "float32"),
                 help="default float16")
  p.add_argument("--remat", choices=("none", "full", "dots"), help="default none")
  p.add_argument("--max-len", type=_AT_LEAST_1, help="token sequence length (prefix + suffix + eos)")
  p.add_argument("--truncate", choices=("error", "keep_eos"), help="over-long examples: error (default) or cut "
                 "the suffix but keep its eos")
  p.add_argument("--task", choices=("vqa", "caption", "exact", "detect", "segment"), help="eval metric (default: from the data)")
  p.add_argument("--max-new-tokens", type=_AT_LEAST_1)
  p.add_argument("--eval-every", type=_AT_LEAST_0, help="evaluate on --eval-examples val rows every N steps (0: never)")
  p.add_argument("--eval-examples", type=_AT_LEAST_0, help="val rows for the evaluations during training (0: all)")
  p.add_argument("--val-limit", type=_AT_LEAST_1, help="use only the first N val rows (before/after evaluation too)")
  p.add_argument("--eval-batch-size", type=_AT_LEAST_1, help="default 64")
  p.add_argument("--report-examples", type=_AT_LEAST_0, default=24)
  p.add_argument("--save-every", type=_AT_LEAST_0, help="checkpoint every N steps (default 0: at the end)")
  p.add_argument("--save-full", action="store_true", help="also write the merged params as final.npz")
  p.add_argument("--safetensors", action="store_true",
                 help="also write final_trainable.safetensors (and final.safetensors with --save-full)")
  p.add_argument("--no-resume", action="store_true",
                 help="start over: move checkpoints already in --out aside (to checkpoints.old-N) instead of resuming")
  p.add_argument("--resume-anyway", action="store_true",
                 help="resume even if the checkpoint in --out was saved with another seed, batch size, optimizer, "
                      "base --checkpoint, --trainable or training data (refused by default: the result would not "
                      "be a faithful continuation)")
  p.add_argument("--seed", type=_AT_LEAST_0, help="data order and augmentation (default 0)")
  p.add_argument("--model-parallel", type=_AT_LEAST_1, default=1, help="devices per model group (2-D mesh)")
  p.add_argument("--keep-final-softcap", action="store_true", default=None, help="keep Gemma 2's final logit soft cap")
  p.add_argument("--distributed", action="store_true", help="multi-host: jax.distributed.initialize() from the environment")
  p.set_defaults(fn=cmd_finetune)

  p = sub.add_parser("eval", help="decode a JSONL and score it")
  _add_model_args(p)
  p.add_argument("--data", required=True)
  p.add_argument("--image-dir")
  p.add_argument("--skip-bad", action="store_true")
  _add_validate_images(p)
  p.add_argument("--task", choices=("vqa", "caption", "exact", "detect", "segment"), help="metric (default: from the data)")
  p.add_argument("--vae", help="the segmentation VAE (vae-oid.npz): segment rows need it to decode <seg> tokens")
  p.add_argument("--batch-size", type=_AT_LEAST_1, default=16)
  p.add_argument("--max-new-tokens", type=_AT_LEAST_1, default=32)
  p.add_argument("--dtype", default="float32", choices=_DTYPES, help="params dtype")
  _add_compute_dtype(p)
  p.add_argument("--html", help="write an HTML view of the predictions here")
  p.add_argument("--report-examples", type=_AT_LEAST_0, default=200,
                 help="rows shown in the --html page (default 200; the metrics cover every row)")
  p.add_argument("--predictions", help="write the predictions as JSONL here (every row)")
  _add_decoding(p)
  _add_adapter_args(p)
  p.set_defaults(fn=cmd_eval)

  p = sub.add_parser("predict", help="decode a prompt for each image (greedy unless --decode says otherwise)")
  _add_model_args(p)
  p.add_argument("--image", nargs="+", required=True)
  p.add_argument("--prompt", required=True, help='the prefix, e.g. "caption en" or "detect cat ; dog"')
  p.add_argument("--max-new-tokens", type=_AT_LEAST_1, default=32)
  p.add_argument("--dtype", default="float32", choices=_DTYPES, help="params dtype")
  _add_compute_dtype(p)
  p.add_argument("--html", help="write an HTML view (with <loc> boxes drawn) here")
  p.add_argument("--vae", help="the segmentation VAE (vae-oid.npz): --html draws <seg> outputs as masks")
  _add_decoding(p)
  _add_adapter_args(p)
  p.set_defaults(fn=cmd_predict)

  p = sub.add_parser("show-data", help="an HTML sanity view of a JSONL")
  p.add_argument("data")
  p.add_argument("--image-dir")
  p.add_argument("--tokenizer", help="also print token-length statistics")
  p.add_argument("--max-len", type=_AT_LEAST_1, default=128)
  p.add_argument("--limit", type=_AT_LEAST_0, default=100)
  p.add_argument("--html", default="data.html")
  p.add_argument("--vae", help="the segmentation VAE (vae-oid.npz): mask rows get their <seg> text, and every "
                 "<seg> text is drawn as the mask it decodes to")
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
  except (OSError, ValueError, KeyError, ImportError) as e:
    # OSError: a full disk, a read-only or missing folder, a folder where a file belongs: one line, the path and
    # the errno's words (the last good checkpoint stays: every write is atomic).
    what = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else e
    print(f"pgjax {args.command}: error: {what}", file=sys.stderr)
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
