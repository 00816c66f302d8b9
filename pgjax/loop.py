"""The training loop: steps, metrics one step late, atomic checkpoints, resume, divergence stop.

Checkpoints live in `out_dir/checkpoints/step_NNNNNN/`: `trainable.npz` (the trainable subtree in the
official layout, loadable by `checkpoint.load`), `opt_state.npz` (optimizer state leaves, if any) and
`state.json` (step, seed, optimizer, config, the caller's `extra_state`). Each is written into
`step_NNNNNN.tmp/` and renamed into place, and `checkpoints/LATEST` names the newest complete one
(replaced atomically last), so a crash mid-save leaves the previous checkpoint intact and current.
Pruning keeps the newest `keep` steps up to the one just written and never touches that one.

A fresh run (resume=False) into a folder that already holds checkpoints first moves that
`checkpoints/` folder aside to `checkpoints.old-N/` (N = 1, 2, ...), whole and untouched: nothing of
the earlier run is deleted, and the new run's steps never mix with (or overwrite) the old run's, so
LATEST and pruning only ever see one run.

A resume checks that the settings a faithful continuation depends on (seed, optimizer and
`extra_state`: the CLI's base checkpoint, trainable patterns, batch size and training data) equal
the saved state.json's, and refuses otherwise unless `resume_anyway`.

Multi-process (jax.distributed): every process runs `fit` alike; a save gathers the sharded params to
every host (a collective), process 0 alone writes, and all wait for it. `out_dir` must be one folder
that every process sees (a shared filesystem): all of them read it to resume.

Everything a step depends on is a function of (seed, step): the data order (`batches_from(step)`),
augmentation and the learning rate (`lr_schedule(step)`, steps counted from 1). So resuming at the
saved step continues exactly where an uninterrupted run would be, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from pgjax import checkpoint, files, train, tree
from pgjax.config import PaliGemmaConfig


class Diverged(RuntimeError):
  """The loss or the params became NaN/Inf; the last good checkpoint was left in place."""


class ResumeError(ValueError):
  """The checkpoint to resume from cannot continue this run."""


class SettingsChanged(ResumeError):
  """The checkpoint was saved with other settings than this run's (see resume_identity)."""


class NothingToTrain(ResumeError):
  """The checkpoint's step already reaches the steps asked."""


def _ckpt_root(out_dir) -> str:
  return os.path.join(os.fspath(out_dir), "checkpoints")


def latest(out_dir) -> str | None:
  """The newest complete checkpoint folder under out_dir, or None."""
  root = _ckpt_root(out_dir)
  try:
    with open(os.path.join(root, "LATEST")) as f:
      name = f.read().strip()
  except FileNotFoundError:
    return None
  # The writer only ever names a step_NNNNNN folder of its own; anything else ("../..", an absolute path)
  # would lead the resume outside checkpoints/.
  if _step_of(name) is None:
    raise checkpoint.CheckpointError(f"{root}/LATEST names {name!r}, not a step_NNNNNN folder of {root}")
  path = os.path.join(root, name)
  if not os.path.isfile(os.path.join(path, "state.json")):
    raise FileNotFoundError(f"{root}/LATEST names {name!r}, which is missing or incomplete")
  return path


_STEP_DIR = re.compile(r"step_(\d+)")


def _step_of(name: str) -> int | None:
  """The step of a complete checkpoint folder's name ("step_000012" -> 12); None for anything else (.tmp)."""
  m = _STEP_DIR.fullmatch(name)
  return int(m.group(1)) if m else None


def set_aside(out_dir) -> str | None:
  """Moves out_dir's checkpoints/ (if it holds anything) to checkpoints.old-N/, the first free N, and
  returns that path. A fresh run calls it so that it neither deletes nor mixes with an earlier run's
  checkpoints. Multi-process: every process calls it; process 0 moves, the others wait."""
  root = _ckpt_root(out_dir)
  moved = None
  if jax.process_index() == 0 and os.path.isdir(root) and os.listdir(root):
    n = 1
    while os.path.exists(f"{root}.old-{n}"):
      n += 1
    moved = f"{root}.old-{n}"
    os.replace(root, moved)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"pgjax set aside {root}")
  return moved


def _to_host(tree):
  """numpy leaves; a leaf with shards on other processes is gathered first (a collective: all processes call it)."""
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
                      if isinstance(x, jax.Array) and not x.is_fully_addressable else np.asarray(x), tree)


def save_checkpoint(out_dir, step: int, trainable, opt_state, state: dict, *, keep: int = 2) -> str:
  """Writes checkpoint `step` atomically, makes LATEST name it, then deletes the checkpoints of earlier
  steps beyond the newest `keep` (counting this one; keep=0 deletes none). Returns its folder.

  Multi-process: every process must call it (the gather is a collective); process 0 writes, the others
  wait at a barrier until the checkpoint and LATEST are in place.
  """
  root = _ckpt_root(out_dir)
  name = f"step_{step:06d}"
  final = os.path.join(root, name)
  trainable, opt_state = _to_host(trainable), _to_host(opt_state)
  if jax.process_index() == 0:
    _write_checkpoint(root, name, trainable, opt_state, {**state, "step": step}, keep)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"pgjax checkpoint {final}")
  return final


def _write_checkpoint(root, name, trainable, opt_state, state, keep):
  os.makedirs(root, exist_ok=True)
  final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  checkpoint.save(os.path.join(tmp, "trainable.npz"), trainable)
  leaves = jax.tree.leaves(opt_state)
  if leaves:
    checkpoint.save(os.path.join(tmp, "opt_state.npz"), {f"{i:04d}": x for i, x in enumerate(leaves)})
  files.atomic_write_text(os.path.join(tmp, "state.json"), json.dumps(state, indent=1))
  shutil.rmtree(final, ignore_errors=True)
  os.replace(tmp, final)
  files.atomic_write_text(os.path.join(root, "LATEST"), name + "\n")
  _prune(root, state["step"], keep)


def _prune(root, step: int, keep: int) -> None:
  """Deletes checkpoints of steps before `step` beyond the newest keep - 1 of them. The one just written
  (`step`, which LATEST names) is never a candidate, whatever else the folder holds; later steps are left
  alone too (a save that crashed before LATEST moved on: the run overwrites them when it gets there)."""
  if not keep:
    return
  older = sorted((s, d) for d in os.listdir(root) if (s := _step_of(d)) is not None and s < step)
  for _, d in older[:max(len(older) - (keep - 1), 0)]:
    shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def read_state(path) -> dict:
  """A checkpoint folder's state.json, checked: a JSON object whose "step" is a non-negative integer."""
  file = os.path.join(path, "state.json")
  try:
    with open(file, "rb") as f:
      state = json.loads(f.read())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise checkpoint.CheckpointError(f"{file}: not valid JSON ({e}); the checkpoint is damaged") from None
  if not isinstance(state, dict):
    raise checkpoint.CheckpointError(f"{file}: expected a JSON object, found {type(state).__name__}")
  if "step" not in state:
    raise checkpoint.CheckpointError(f'{file}: key "step" is missing')
  if type(state["step"]) is not int or state["step"] < 0:  # type(): a JSON true is no step either
    raise checkpoint.CheckpointError(f'{file}: key "step" must be a non-negative integer, found {state["step"]!r}')
  return state


def load_checkpoint(path: str, trainable_like, opt_state_like):
  """(trainable, opt_state, state) from a checkpoint folder, placed like the given trees. Keys and shapes
  are checked against them first. Multi-process: every process reads the files (device_put of the same
  host value to a global sharding)."""
  state = read_state(path)
  put = lambda x, like: jax.device_put(jnp.asarray(x, like.dtype), like.sharding)
  file = os.path.join(path, "trainable.npz")
  flat_like = tree.flatten(trainable_like)
  # Keys and shapes from the .npy headers alone, so a mismatch is named before any data is read.
  shapes_of = lambda npz: {k: shape for k, (shape, _) in checkpoint.read_shapes(npz).items()}
  checkpoint.check_shapes(file, shapes_of(file), {k: v.shape for k, v in flat_like.items()},
                          "this run's trainable params", hint=False)
  loaded = tree.flatten(checkpoint.load(file))
  trainable = tree.unflatten({k: put(loaded[k], v) for k, v in flat_like.items()})
  leaves, treedef = jax.tree.flatten(opt_state_like)
  if leaves:
    file = os.path.join(path, "opt_state.npz")
    if not os.path.isfile(file):
      raise checkpoint.CheckpointError(f"{file}: missing, and this run's optimizer has {len(leaves)} state arrays "
                                       f"to restore (was the checkpoint saved with another optimizer?)")
    checkpoint.check_shapes(file, shapes_of(file), {f"{i:04d}": np.shape(x) for i, x in enumerate(leaves)},
                            "this run's optimizer state", hint=False)
    saved = checkpoint.load(file)
    leaves = [put(saved[f"{i:04d}"], like) for i, like in enumerate(leaves)]
  return trainable, jax.tree.unflatten(treedef, leaves), state


def _as_json(x):
  """x as state.json holds it after a round trip (tuples become lists), so that values compare alike."""
  return json.loads(json.dumps(x))


def resume_identity(seed: int, optimizer: train.Optimizer, extra_state: dict | None = None) -> dict:
  """The settings a resumed run must share with its checkpoint to continue it faithfully, as state.json
  records them: the seed (data order, augmentation), the optimizer and its settings, and `extra_state`."""
  return _as_json({"seed": seed, "optimizer": dataclasses.asdict(optimizer), **(extra_state or {})})


def changed_settings(saved: dict, expect: dict) -> list[str]:
  """One line "key: saved value in the checkpoint, value now" per setting of `expect` that the saved state
  records differently; dicts are compared key by key ("optimizer.weight_decay"). A key the saved state
  lacks (a checkpoint from before it was recorded) is not compared: there is nothing to compare it with."""
  lines = []

  def compare(was, now, name):
    if isinstance(was, dict) and isinstance(now, dict):
      for k in now.keys() & was.keys():
        compare(was[k], now[k], f"{name}.{k}")
    elif was != now:
      lines.append(f"{name}: {json.dumps(was)} in the checkpoint, {json.dumps(now)} now")

  for k, v in _as_json(expect).items():
    if k in saved:
      compare(saved[k], v, k)
  return sorted(lines)


def resume_point(out_dir, *, num_steps: int, expect: dict, resume_anyway: bool = False):
  """(path, state) of the checkpoint a run in out_dir would continue from, or None when there is none.

  Raises SettingsChanged when the checkpoint's settings differ from `expect` (see resume_identity), unless
  resume_anyway, and NothingToTrain when its step already reaches num_steps: there is nothing left to train, and
  carrying on would look like a finished run that trained nothing.
  """
  path = latest(out_dir)
  if path is None:
    return None
  state = read_state(path)
  changed = changed_settings(state, expect)
  if changed and not resume_anyway:
    raise SettingsChanged(f"{path} was saved with other settings than this run's, so resuming would not continue "
                      f"it faithfully:\n  " + "\n  ".join(changed))
  if state["step"] >= num_steps:
    raise NothingToTrain(f"{path} is at step {state['step']}, which already reaches the {num_steps} steps asked: "
                      f"nothing is left to train")
  return path, state


def _place_opt_state(opt_state, mesh):
  """Optimizer state on `mesh`: leaves already there keep their sharding (optax builds moments with
  zeros_like, so they are split like their params); the rest (step counts) are replicated."""
  on_mesh = lambda x: isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
  return jax.tree.map(lambda x: x if on_mesh(x) else jax.device_put(x, NamedSharding(mesh, P())), opt_state)


@dataclasses.dataclass
class History:
  """Metrics per step (host floats), read one step late; eval results by step."""

  steps: list = dataclasses.field(default_factory=list)
  loss: list = dataclasses.field(default_factory=list)
  grad_norm: list = dataclasses.field(default_factory=list)
  lr: list = dataclasses.field(default_factory=list)
  seconds: list = dataclasses.field(default_factory=list)
  evals: list = dataclasses.field(default_factory=list)  # (step, result of eval_fn)


def fit(cfg: PaliGemmaConfig, trainable, frozen, batches_from: Callable[[int], Iterator[dict]], *, num_steps: int,
        lr_schedule: Callable[[int], float], out_dir=None, optimizer: train.Optimizer = train.Optimizer(),
        clip_norm: float | None = None, accum_steps: int = 1, mesh=None, save_every: int = 0, keep: int = 2,
        resume: bool = True, seed: int = 0, on_step: Callable | None = None, extra_state: dict | None = None,
        eval_fn: Callable | None = None, eval_every: int = 0, train_step=None, resume_anyway: bool = False):
  """Trains for `num_steps` steps (counted from 1). Returns (trainable, opt_state, history).

  batches_from(step) yields the batches for steps step+1, step+2, ... (the data position is the step).
  With out_dir and resume, an existing checkpoint there is restored first and the run continues after
  it; its state.json must record the same seed, optimizer and `extra_state` (JSON values: the caller
  records there what else the run depends on) unless resume_anyway, and a step below num_steps (see
  resume_point). With out_dir and not resume, checkpoints already there are moved aside first (see
  set_aside). save_every > 0 saves every that many steps and at the end. on_step(step, metrics_dict) is called
  with host metrics one step late (and may raise to stop the run). eval_fn(step, trainable) runs after
  every `eval_every` steps (not after the last: callers evaluate the result) on the current params and
  its result is kept in history.evals. A NaN/Inf loss raises Diverged;
  params are checked finite before every save, so a checkpoint never holds a diverged state.
  """
  opt_state = optimizer.init(trainable)
  if mesh is not None:
    opt_state = _place_opt_state(opt_state, mesh)
  if train_step is None:
    shardings = {}
    if mesh is not None:
      from pgjax import sharding
      shardings = dict(trainable_shardings=sharding.param_shardings(trainable, mesh),
                       frozen_shardings=sharding.param_shardings(frozen, mesh),
                       opt_state_shardings=jax.tree.map(lambda x: x.sharding, opt_state))
    train_step = train.make_train_step(cfg, optimizer=optimizer, clip_norm=clip_norm, accum_steps=accum_steps,
                                       mesh=mesh, **shardings)
  identity = resume_identity(seed, optimizer, extra_state)
  start = 0
  if out_dir is not None and not resume:
    set_aside(out_dir)
  elif out_dir is not None and (point := resume_point(out_dir, num_steps=num_steps, expect=identity,
                                                      resume_anyway=resume_anyway)) is not None:
    trainable, opt_state, state = load_checkpoint(point[0], trainable, opt_state)
    start = state["step"]
  history = History()
  state_info = {**identity, "config": dataclasses.asdict(cfg)}

  def report(step, metrics, t):
    m = {k: float(v) for k, v in metrics.items()}
    if not np.isfinite(m["loss"]) or not np.isfinite(m["grad_norm"]):
      raise Diverged(f"step {step}: loss {m['loss']}, gradient norm {m['grad_norm']}; stopping. The last good "
                     f"checkpoint ({latest(out_dir) if out_dir else 'none'}) is left in place.")
    history.steps.append(step)
    history.loss.append(m["loss"])
    history.grad_norm.append(m["grad_norm"])
    history.lr.append(m["lr"])
    history.seconds.append(t)
    if on_step is not None:
      on_step(step, m)

  def save(step):
    if not train.all_finite(trainable):
      raise Diverged(f"step {step}: params are not finite; not saving. The last good checkpoint "
                     f"({latest(out_dir)}) is left in place.")
    save_checkpoint(out_dir, step, trainable, opt_state, {**state_info, "lr": lr_schedule(step)}, keep=keep)

  pending = None
  done = saved = start  # the last step whose update `trainable` holds; the last step saved
  batches = batches_from(start)
  try:
    for step in range(start + 1, num_steps + 1):
      batch = next(batches)
      t0 = time.perf_counter()
      trainable, opt_state, metrics = train_step(trainable, frozen, batch, lr_schedule(step), opt_state)
      done = step
      if pending is not None:  # the previous step's metrics: done by now, so reading them costs no sync
        report(*pending)
      pending = (step, metrics, time.perf_counter() - t0)
      if out_dir is not None and save_every and (step % save_every == 0 or step == num_steps):
        report(*pending)
        pending = None
        save(step)
        saved = step
      if eval_fn is not None and eval_every and step % eval_every == 0 and step < num_steps:
        history.evals.append((step, eval_fn(step, trainable)))
    if pending is not None:
      report(*pending)
  except (Exception, KeyboardInterrupt) as e:
    # A run stopped by an error in its data (an image that fails to decode at step 5,000), a callback or
    # Ctrl-C keeps what it trained: the state after the last completed step is saved (checked finite, as
    # every save), and the same command resumes there. Not after a divergence (nothing good to save), and
    # not with several processes (a save is a collective the others are not in).
    if out_dir is not None and done > saved and not isinstance(e, Diverged) and jax.process_count() == 1:
      try:
        save(done)
      except Exception as failed:
        e.add_note(f"pgjax: the state after step {done} could not be saved ({type(failed).__name__}: {failed})")
      else:
        e.add_note(f"pgjax: saved the state after step {done} to {latest(out_dir)}; the same command resumes there")
    raise
  finally:
    close = getattr(batches, "close", None)
    if close is not None:
      close()
  return trainable, opt_state, history
