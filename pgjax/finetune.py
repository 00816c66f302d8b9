"""The fine-tuning job as a library: `TrainConfig` holds every setting of a run, `finetune` runs the whole job.

  from pgjax import finetune
  tc = finetune.TrainConfig(steps=64, batch_size=8, lr=0.03, max_len=128)
  run = finetune.finetune(tc, train="train.jsonl", val="val.jsonl", checkpoint="paligemma-3b-pt-224.f16.npz",
                          tokenizer="paligemma_tokenizer.model", out="runs/x")
  run.summary["after"]                     # the eval metrics after fine-tuning; run.params is the trained tree

`pgjax finetune` maps its flags onto a TrainConfig and calls `finetune`; the embedded demo's fine-tune and
its two pretraining stages are TrainConfig presets (pgjax/demo.py) that go through the same path.

One batch from JSONL to an SGD update, in the order the job calls them:
  data.read_jsonl (rows) -> data.train_batches (tokenizer.encode_example, images) -> loop.fit (the step
  loop, checkpoints, resume) -> train.make_train_step -> train.loss_fn (paligemma.forward) -> the optimizer's
  update of the trainable subtree.

The recipe is big_vision's: only the LLM's attention layers train, in float32; everything else is frozen in
float16 (bfloat16 on hardware that has it); SGD with warmup + cosine laid out over steps + 1 (see
`TrainConfig.lr_schedule`); Gemma 2's final logit soft cap set to 0 as its transfer configs do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp

from pgjax import config as config_lib
from pgjax import lora, tree
from pgjax import train as train_lib
from pgjax.config import PaliGemmaConfig, is_int, is_real

SCHEDULES = ("cosine", "linear", "constant")
REMATS = ("none", "full", "dots")
FROZEN_DTYPES = ("float16", "bfloat16", "float32")
COMPUTE_DTYPES = ("auto",) + config_lib.COMPUTE_DTYPES


class SettingError(ValueError):
  """A TrainConfig setting that cannot work (out of range, or not fitting the devices); `field` names it."""

  def __init__(self, field: str, detail: str):
    super().__init__(f"{field} {detail}")
    self.field, self.detail = field, detail


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Every setting of a fine-tuning run. Frozen and hashable; `dataclasses.replace` derives variants.

  The defaults are big_vision's recipe for a real checkpoint (the notebook's lr, batch and text length); the
  demo's presets are in pgjax/demo.py. The fields a resume must match are RESUME_FIELDS.
  """

  # The optimisation.
  steps: int = 100
  batch_size: int = 8
  lr: float = 0.03
  schedule: str = "cosine"  # linear warmup to lr, then cosine (or linear) decay; "constant": lr throughout
  warmup: float = 0.1  # warmup steps: round(warmup * (steps + 1)), as big_vision's
  optimizer: train_lib.Optimizer = train_lib.Optimizer()  # plain SGD (the seed's); momentum and AdamW use optax
  clip: float | None = None  # clip the gradient's global norm to this
  accum: int = 1  # gradient accumulation: micro-batches per step
  # What trains, and in what precision.
  trainable: tuple[str, ...] = ("llm/layers/attn/.*",)  # regexes over "/"-joined param paths
  # The matmuls' dtype (both operands cast, float32 accumulation; layers.dot): "float32" is exact, big_vision's
  # numerics; "auto" takes bfloat16 where the machine runs it faster (host.auto_compute_dtype says why);
  # "float16" scales the loss (train.LossScale), for GPUs without bfloat16.
  compute_dtype: str = "auto"
  # float16 under every compute dtype: a bfloat16 dot casts a float16 weight per layer inside the step (a view
  # the backward recomputes), while weights stored in bfloat16 compiled on XLA:CPU to a 6.7 GiB larger step for
  # the 3B (bench/README.md, "Compute dtype"); "bfloat16" or "float32" by choice.
  frozen_dtype: str = "float16"
  # LoRA (pgjax/lora.py): with lora_rank > 0, adapters of that rank on the weights lora_targets matches train
  # (float32) in place of `trainable`, and every param stays frozen; their update is scaled by lora_alpha / rank.
  lora_rank: int = 0
  lora_alpha: float | None = None  # None: 2 * lora_rank
  lora_targets: tuple[str, ...] = lora.TARGETS
  quantize: int = 0  # 8 or 4: the frozen matmul weights in int8 / int4 (pgjax/quant.py); 0: in frozen_dtype
  remat: str = "none"  # "full" or "dots" trade compute for memory (bench/README.md has the table)
  keep_final_softcap: bool = False  # big_vision's transfer sets Gemma 2's final soft cap to 0 ("better for transfer")
  # The data.
  max_len: int = 128  # tokens per example: [bos] prefix "\n" suffix [eos], padded
  truncate: str = "error"  # or "keep_eos": cut over-long suffixes but keep their eos (reported)
  seed: int = 0  # the data order and augmentation: every step is a function of (seed, step)
  # Evaluation: before and after training on every val row, during training on the first eval_examples.
  task: str | None = None  # vqa, caption, exact, detect or segment; None: from the data (evaluate.detect_task)
  max_new_tokens: int = 32
  eval_every: int = 0  # steps between evaluations during training; 0: none
  eval_examples: int = 64  # val rows for the evaluations during training; 0: all
  eval_batch_size: int = 64
  # Checkpoints.
  save_every: int = 0  # steps between checkpoints; 0: at the end only
  keep_checkpoints: int = 2  # the newest this many are kept; 0: all

  # The settings a resumed run must share with its checkpoint to continue it faithfully (the data order, the
  # optimizer, what trains, the batch). The others (steps, lr, cadence) may change on resume.
  RESUME_FIELDS: ClassVar[tuple[str, ...]] = ("seed", "optimizer", "trainable", "batch_size", "lora_rank", "lora_alpha",
                                              "lora_targets", "quantize")

  def __post_init__(self):
    object.__setattr__(self, "trainable", tuple(self.trainable))  # a list would make the config unhashable
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    checks = [
        ("steps", self.steps, is_int(self.steps, 1), "an integer >= 1"),
        ("batch_size", self.batch_size, is_int(self.batch_size, 1), "an integer >= 1"),
        ("lr", self.lr, is_real(self.lr) and self.lr > 0, "a finite number > 0"),
        ("schedule", self.schedule, self.schedule in SCHEDULES, f"one of {SCHEDULES}"),
        ("warmup", self.warmup, is_real(self.warmup) and 0 <= self.warmup < 1, "a fraction in [0, 1)"),
        ("clip", self.clip, self.clip is None or (is_real(self.clip) and self.clip > 0), "None or a finite number > 0"),
        ("accum", self.accum, is_int(self.accum, 1), "an integer >= 1"),
        ("trainable", self.trainable, all(isinstance(p, str) for p in self.trainable), "a tuple of regexes"),
        ("compute_dtype", self.compute_dtype, self.compute_dtype in COMPUTE_DTYPES, f"one of {COMPUTE_DTYPES}"),
        ("frozen_dtype", self.frozen_dtype, self.frozen_dtype in FROZEN_DTYPES, f"one of {FROZEN_DTYPES}"),
        ("remat", self.remat, self.remat in REMATS, f"one of {REMATS}"),
        ("lora_rank", self.lora_rank, is_int(self.lora_rank, 0), "an integer >= 0"),
        ("lora_alpha", self.lora_alpha, self.lora_alpha is None or (is_real(self.lora_alpha) and self.lora_alpha > 0),
         "None or a finite number > 0"),
        ("lora_targets", self.lora_targets, all(isinstance(p, str) for p in self.lora_targets) and self.lora_targets,
         "a non-empty tuple of regexes"),
        ("quantize", self.quantize, self.quantize in (0, 4, 8), "0 (none), 8 or 4"),
        ("max_len", self.max_len, is_int(self.max_len, 1), "an integer >= 1"),
        ("truncate", self.truncate, self.truncate in ("error", "keep_eos"), "'error' or 'keep_eos'"),
        ("seed", self.seed, is_int(self.seed, 0), "an integer >= 0"),
        ("max_new_tokens", self.max_new_tokens, is_int(self.max_new_tokens, 1), "an integer >= 1"),
        ("eval_every", self.eval_every, is_int(self.eval_every, 0), "an integer >= 0"),
        ("eval_examples", self.eval_examples, is_int(self.eval_examples, 0), "an integer >= 0"),
        ("eval_batch_size", self.eval_batch_size, is_int(self.eval_batch_size, 1), "an integer >= 1"),
        ("save_every", self.save_every, is_int(self.save_every, 0), "an integer >= 0"),
        ("keep_checkpoints", self.keep_checkpoints, is_int(self.keep_checkpoints, 0), "an integer >= 0"),
    ]
    for name, value, ok, need in checks:
      if not ok:
        raise SettingError(name, f"must be {need}, got {value!r}")
    for field in ("trainable", "lora_targets"):  # a pattern that does not compile is named now, not after loading
      for pattern in getattr(self, field):
        try:
          re.compile(pattern)
        except re.error as e:
          raise SettingError(field, f"pattern {pattern!r} is not a valid regular expression ({e})") from None

  @property
  def adapter_alpha(self) -> float | None:
    """The LoRA alpha the step scales the adapters by (None without LoRA)."""
    if not self.lora_rank:
      return None
    return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank

  def lr_schedule(self) -> Callable[[int], float]:
    """The learning rate for steps 1..steps. big_vision's recipe (the PaliGemma notebook) builds its schedule
    over total_steps = TRAIN_STEPS + 1 and evaluates it at steps 1..TRAIN_STEPS, so the decay reaches 0 one
    step after the last and the last step still learns; a schedule over `steps` would give the last step lr 0,
    a wasted step. Warmup steps are round(warmup * (steps + 1)), as big_vision's."""
    return train_lib.schedule(self.schedule, self.lr, self.steps + 1, self.warmup)

  def resume_identity(self) -> dict:
    """RESUME_FIELDS as state.json records them (JSON values: tuples become lists)."""
    return json.loads(json.dumps({k: _jsonable(getattr(self, k)) for k in self.RESUME_FIELDS}))

  def model_config(self, cfg: PaliGemmaConfig) -> PaliGemmaConfig:
    """The model config this run trains: `remat` and the compute dtype ("auto" resolved for this machine,
    `host.resolve_compute_dtype`) applied, Gemma 2's final soft cap removed unless kept."""
    from pgjax import host
    cfg = dataclasses.replace(cfg, remat=self.remat).with_compute_dtype(host.resolve_compute_dtype(self.compute_dtype)[0])
    if cfg.llm.final_logits_softcap and not self.keep_final_softcap:
      cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, final_logits_softcap=0.0))
    return cfg


def _jsonable(x):
  return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x


def data_identity(rows) -> dict:
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


def load_tokenizer(tok, cfg: PaliGemmaConfig):
  """A Tokenizer from a path (or the Tokenizer given), refused when it has more pieces than the model's vocab."""
  from pgjax import tokenizer
  path = getattr(tok, "path", tok)
  if not isinstance(tok, tokenizer.Tokenizer):
    tok = tokenizer.Tokenizer(tok)
  if tok.vocab_size > cfg.llm.vocab_size:
    raise ValueError(f"tokenizer {path} has {tok.vocab_size} pieces, more than the model's {cfg.llm.vocab_size}")
  return tok


def check_mesh(tc: TrainConfig, mesh) -> None:
  """The batch must split evenly over the mesh's data-parallel devices; refused before anything loads."""
  n = mesh.shape["data"]
  if tc.batch_size % n:
    raise SettingError("batch_size", f"{tc.batch_size} does not split over the {n} data-parallel devices "
                       f"({mesh.size} devices, {mesh.shape.get('model', 1)} per model group): use a multiple of {n}")


@dataclasses.dataclass
class Run:
  """What `finetune` returns: the trained params (merged) and the run's record."""

  params: dict
  history: object  # loop.History: per-step loss, grad_norm, lr, seconds; eval results by step
  before: dict | None  # evaluate.evaluate's result before training (None without val rows)
  after: dict | None
  summary: dict  # what summary.json holds
  out: str | None


def _rows(x):
  if isinstance(x, (str, os.PathLike)):
    from pgjax import data
    return data.read_jsonl(x)
  return list(x)


def finetune(tc: TrainConfig, *, train, val=(), checkpoint=None, tokenizer=None, model: PaliGemmaConfig | None = None,
             params=None, out=None, mesh=None, resume: bool = True, resume_anyway: bool = False,
             save_full: bool = False, safetensors: bool = False, report_examples: int = 24,
             summary_extra: dict | None = None, on_step: Callable | None = None, quiet: bool = False,
             vae=None) -> Run:
  """Runs a whole fine-tuning job: load, train, evaluate before and after, save, report; resumes in `out`.

  Inputs: `train` and `val` are lists of rows (data.read_jsonl, demo.questions, ...) or JSONL paths. The
  model is `checkpoint` (an npz path; its config inferred from its shapes unless `model` is given) or
  `params` (a tree in memory, with `model`); `tokenizer` a path or a Tokenizer. Rows that give a "mask" or
  pixel "boxes" instead of a suffix (pgjax/annotations.py) get their text built first; masks need `vae`, the
  segmentation VAE's npz (vae-oid.npz; the demo's is weights/demo/vae.npz).
  Outputs in `out` (None: nothing is written and nothing resumes): checkpoints/ (rundir.py), metrics.jsonl,
  summary.json, report.html, and with save_full final.npz, with safetensors final_trainable.safetensors
  (and final.safetensors with save_full). A run in an `out` that holds checkpoints resumes from the newest
  (refused with rundir.SettingsChanged when RESUME_FIELDS, the checkpoint or the training data differ, unless
  resume_anyway; rundir.NothingToTrain when it already reached tc.steps); resume=False starts over, moving
  them aside. `mesh`: default all devices on the "data" axis. on_step(step, metrics) sees every step's
  host metrics, one step late. Raises loop.Diverged on a NaN/Inf loss (the last good checkpoint stays).
  """
  from pgjax import checkpoint as ckpt_lib, data, evaluate, host, loop, progress, rundir, sharding
  say = (lambda *a, **k: None) if quiet else (lambda *a, **k: print(*a, **k, flush=True))
  bar = (lambda *a, **k: None) if quiet else progress.callback
  train_rows, val_rows = _rows(train), _rows(val)
  from pgjax import annotations
  train_rows = annotations.build_suffixes(train_rows, vae_path=vae)
  val_rows = annotations.build_suffixes(val_rows, vae_path=vae)
  if params is None:
    if checkpoint is None:
      raise ValueError("finetune needs a checkpoint= path, or params= and model=")
    cfg = model or ckpt_lib.infer_config(checkpoint)
  elif model is None:
    raise ValueError("finetune with params= needs model= (their config)")
  else:
    cfg = model
  cfg = tc.model_config(cfg)
  if tokenizer is None:
    raise ValueError("finetune needs a tokenizer= (a SentencePiece model path or a Tokenizer)")
  tok = load_tokenizer(tokenizer, cfg)
  if tc.batch_size > len(train_rows):  # every batch would repeat examples; a typo'd size would allocate for nothing
    raise SettingError("batch_size", f"{tc.batch_size} is more than the {len(train_rows)} training examples")
  mesh = sharding.make_mesh() if mesh is None else mesh
  check_mesh(tc, mesh)
  with contextlib.ExitStack() as stack:  # one run per folder, for the life of the run
    if out is not None:
      out = make_out_dir(out)
      stack.enter_context(rundir.hold(out))
    # With LoRA nothing of the checkpoint trains: every leaf loads in the frozen dtype.
    predicate = (lambda _: False) if tc.lora_rank else train_lib.make_predicate(list(tc.trainable))
    frozen_dtype = jnp.dtype(tc.frozen_dtype)
    # What a resume must match (state.json): the config's RESUME_FIELDS, the base checkpoint (by content: a copy
    # elsewhere is the same base, a file replaced at the same path is not) and the data.
    extra_state = {"base_checkpoint": ckpt_lib.fingerprint(checkpoint) if params is None else None,
                   "train_data": data_identity(train_rows)}
    identity = {**tc.resume_identity(), **extra_state}
    compute_why = host.resolve_compute_dtype(tc.compute_dtype)[1]  # what model_config applied, and why
    say(f"pgjax finetune: {len(train_rows)} train / {len(val_rows)} val examples; {jax.device_count()} device(s) "
        f"{dict(mesh.shape)}; matmuls in {cfg.compute_dtype} ({compute_why}); "
        f"frozen params {frozen_dtype}, trainable float32; out {out}")
    point = None
    if out is not None and not resume:
      moved = rundir.set_aside(out)
      if moved:
        say(f"moved the earlier run in {out} aside: checkpoints.old-{moved}/ and its logs as NAME.old-{moved}.EXT")
    if out is not None and resume:  # refused here, before the checkpoint loads
      point = rundir.resume_point(out, num_steps=tc.steps, expect=identity, resume_anyway=resume_anyway)
      if point is not None:
        changed = rundir.changed_settings(point[1], identity)
        if changed:
          print("pgjax finetune: resuming with changed settings:\n  " + "\n  ".join(changed), file=sys.stderr)
        say(f"resuming from {point[0]} (step {point[1]['step']})")

    t0 = time.time()
    if params is None:
      # With quantize, each frozen matmul weight is quantized as it is read: the host never holds the float model.
      params = ckpt_lib.load(checkpoint, cfg, dtype=lambda key, _: jnp.float32 if predicate(key) else frozen_dtype,
                             sharding=sharding.leaf_sharding(mesh), progress=bar("load", 2**20, "MB"),
                             quantize=tc.quantize or None, quantize_skip=predicate)
    if tc.lora_rank:
      frozen = tree.unflatten({k: v if hasattr(v, "matmul") else v.astype(frozen_dtype)  # a QArray stays
                               for k, v in tree.flatten(params).items()})
      trainable = lora.init(jax.random.key(tc.seed), frozen, rank=tc.lora_rank, targets=tc.lora_targets)
      trainable = jax.device_put(trainable, sharding.param_shardings(trainable, mesh))
    else:
      trainable, frozen = train_lib.split(params, predicate, frozen_dtype=frozen_dtype)
    del params
    if tc.quantize:  # params given in memory (a checkpoint file was quantized as it loaded: no-op then)
      from pgjax import quant
      frozen = quant.quantize(frozen, bits=tc.quantize)
      frozen = jax.device_put(frozen, sharding.param_shardings(frozen, mesh))
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    n_all = (0 if tc.lora_rank else n_train) + sum(math.prod(x.shape) for x in tree.flatten(frozen).values())
    say(f"loaded {checkpoint or 'params'} in {time.time() - t0:.1f}s: {n_train:,} of {n_all:,} params train")

    val_subset = val_rows[:tc.eval_examples] if tc.eval_examples else val_rows

    def run_eval(rows, label, trainable):
      if not rows:
        return None
      t = time.time()
      res = evaluate.evaluate(_eval_params(tc, trainable, frozen), cfg, tok, rows, task=tc.task,
                              batch_size=tc.eval_batch_size, max_new_tokens=tc.max_new_tokens, vae=vae,
                              progress=bar(f"eval {label}", unit="ex"))
      res["metrics"]["seconds"] = round(time.time() - t, 1)
      say(f"eval {label} ({len(rows)} examples): {json.dumps({k: v for k, v in res['metrics'].items() if isinstance(v, float)})}")
      return res

    # A resumed run continues its log from the resumed step (lines past it, from steps the checkpoint does not
    # hold, are cut, so no step appears twice); a fresh one starts it anew.
    log_path = os.path.join(out, "metrics.jsonl") if out is not None else None
    logged_before = point is not None and cut_log(log_path, point[1]["step"])
    metrics_log = stack.enter_context(open(log_path, "a" if point else "w")) if out is not None else None

    def log(record):
      if metrics_log is not None:
        try:
          metrics_log.write(json.dumps(record) + "\n")
          metrics_log.flush()
        except OSError as e:  # a full disk: name the file (a write to an open file names none)
          raise OSError(e.errno, e.strerror, log_path) from e

    before = run_eval(val_rows, "before", trainable)
    if before and not logged_before:  # a resumed run's log already holds the base model's evaluation
      log({"step": 0, "eval": before["metrics"]})
    steps_bar = progress.Bar(tc.steps, "train") if not quiet else None
    eval_points = []

    def step_done(step, m):
      log({"step": step, **m})
      if steps_bar is not None:
        steps_bar.update(1, loss=f"{m['loss']:.4f}")
      if on_step is not None:
        on_step(step, m)

    def eval_fn(step, current):
      res = run_eval(val_subset, f"step {step}", current)
      if res:
        log({"step": step, "eval": res["metrics"]})
        eval_points.append((step, res["metrics"].get("accuracy", res["metrics"]["exact_match"])))

    batches = lambda start: (sharding.shard_batch(b, mesh) for b in data.train_batches(
        train_rows, tok, batch_size=tc.batch_size, size=cfg.vision.image_size, max_len=tc.max_len, seed=tc.seed,
        start_step=start, truncate=tc.truncate))
    t_train = time.time()
    try:
      trainable, _, history = loop.fit(cfg, tc, trainable, frozen, batches, out_dir=out, mesh=mesh, resume=resume,
                                       resume_anyway=resume_anyway, extra_state=extra_state, on_step=step_done,
                                       eval_fn=eval_fn if val_subset else None)
    finally:
      if steps_bar is not None:
        steps_bar.close()
    train_seconds = time.time() - t_train
    after = run_eval(val_rows, "after", trainable)
    if after:
      log({"step": tc.steps, "eval": after["metrics"]})
    params = _final_params(tc, trainable, frozen)
    summary = {
        **(summary_extra or {}), "checkpoint": checkpoint, "train_examples": len(train_rows),
        "val_examples": len(val_rows), "steps": tc.steps, "batch_size": tc.batch_size, "lr": tc.lr,
        "schedule": tc.schedule, "optimizer": tc.optimizer.name, "trainable_params": n_train, "total_params": n_all,
        "trained": _what_trained(tc),
        "compute_dtype": cfg.compute_dtype, "compute_dtype_why": compute_why,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / max(len(history.steps), 1), 4),
        "final_loss": history.loss[-1] if history.loss else None, "devices": jax.device_count(),
        "before": before["metrics"] if before else None, "after": after["metrics"] if after else None,
        "train_config": _jsonable(tc), "config": dataclasses.asdict(cfg),
    }
    if out is not None:
      _write_outputs(out, params, trainable, summary, history, eval_points, before, after, val_rows,
                     save_full=save_full, safetensors=safetensors, report_examples=report_examples, vae=vae)
      say(f"done in {time.time() - t0:.0f}s. Outputs in {out}: summary.json, metrics.jsonl, report.html, "
          f"checkpoints/{', final.npz' if save_full else ''}")
    return Run(params=params, history=history, before=before, after=after, summary=summary, out=out)


def _what_trained(tc: TrainConfig) -> str:
  """One line for the summary and the report: what trained, and the base's precision."""
  base = f"int{tc.quantize}" if tc.quantize else tc.frozen_dtype
  if tc.lora_rank:
    return (f"LoRA rank {tc.lora_rank}, alpha {tc.adapter_alpha:g}, on {', '.join(tc.lora_targets)} (float32); "
            f"the base frozen in {base}")
  return f"{', '.join(tc.trainable)} (float32 masters); the rest frozen in {base}"


def _eval_params(tc: TrainConfig, trainable, frozen) -> dict:
  """The params evaluations decode with. LoRA on a float base: the adapted weights merged in float32 (the same
  function the step trains, and plain arrays, so decoding keeps its fast weight view); on a quantized base,
  the adapters stay on (lora.apply), as in the step."""
  if not tc.lora_rank:
    return train_lib.merge(trainable, frozen)
  if tc.quantize:
    return lora.apply(frozen, trainable, alpha=tc.adapter_alpha)
  adapted = lora.adapted_paths(trainable)
  f32 = {p: frozen_leaf.astype(jnp.float32) for p, frozen_leaf in tree.flatten(frozen).items() if p in adapted}
  return lora.merge(tree.unflatten({**tree.flatten(frozen), **f32}), trainable, alpha=tc.adapter_alpha)


def _final_params(tc: TrainConfig, trainable, frozen) -> dict:
  """The run's result as a plain tree of arrays (the checkpoint final.npz holds): adapters merged, a quantized
  base dequantized to float32."""
  params = lora.merge(frozen, trainable, alpha=tc.adapter_alpha) if tc.lora_rank else train_lib.merge(trainable, frozen)
  if tc.quantize:
    from pgjax import quant
    params = quant.dequantize_tree(params)
  return params


def cut_log(path, step: int) -> bool:
  """Cuts a metrics.jsonl back to the records of steps <= `step` (a resumed run logs the later ones again),
  dropping a line that does not parse (a process killed mid-write). Returns whether a step-0 evaluation
  (the base model's) is among the records kept. A missing log is left missing."""
  try:
    with open(path, "rb") as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    return False
  kept, has_base = [], False
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
      kept.append(line)
      has_base |= record["step"] == 0 and "eval" in record
  from pgjax import files
  with files.atomic_write(path) as f:
    f.write(b"".join(line + b"\n" for line in kept))
  return has_base


def make_out_dir(out, *, name: str = "out") -> str:
  """The output folder, made if needed; refused (naming it as `name`) when it is a file or cannot be made."""
  out = os.fspath(out)
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"{name} {out}: exists and is not a folder")
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise ValueError(f"{name} {out}: cannot make the folder ({e.strerror})") from None
  return out


def _write_outputs(out, params, trainable, summary, history, eval_points, before, after, val_rows, *,
                   save_full, safetensors, report_examples, vae=None):
  """final.npz / safetensors as asked, summary.json and report.html (with `vae`, masks drawn)."""
  from pgjax import checkpoint, viz
  if save_full:
    checkpoint.save(os.path.join(out, "final.npz"), params)
  if safetensors:  # the same trees, pgjax keys ("/"-joined), for tools that read safetensors
    from pgjax import hf
    hf.save_safetensors(os.path.join(out, "final_trainable.safetensors"), trainable)
    if save_full:
      hf.save_safetensors(os.path.join(out, "final.safetensors"), params)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  shown = {k: v for k, v in summary.items() if k not in ("config", "train_config", "before", "after")}
  from pgjax import segmentation
  vae = segmentation.load_vae_cached(vae) if vae is not None else None
  grid = viz.predictions_grid(val_rows[:report_examples], after["predictions"][:report_examples],
                              vae=vae) if after else ""
  table = {name: {k: v for k, v in res["metrics"].items() if isinstance(v, (int, float))}
           for name, res in (("before", before), ("after", after)) if res}
  viz.write_html(os.path.join(out, "report.html"), viz.report_html(
      shown, viz.loss_curve_svg(history.steps, history.loss, {"val": eval_points} if eval_points else None),
      table, grid, title=f"pgjax fine-tuning report: {out}"))
