"""The training loop: steps, metrics one step late, atomic checkpoints, resume, divergence stop.

Checkpoints live in `out_dir/checkpoints/step_NNNNNN/`: `trainable.npz` (the trainable subtree in the
official layout, loadable by `checkpoint.load`), `opt_state.npz` (optimizer state leaves, if any) and
`state.json` (step, examples seen, seed, config). Each is written into `step_NNNNNN.tmp/` and renamed
into place, and `checkpoints/LATEST` names the newest complete one (replaced atomically last), so a
crash mid-save leaves the previous checkpoint intact and current.

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
import shutil
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from pgjax import checkpoint, train
from pgjax.config import PaliGemmaConfig


class Diverged(RuntimeError):
  """The loss or the params became NaN/Inf; the last good checkpoint was left in place."""


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
  path = os.path.join(root, name)
  if not os.path.isfile(os.path.join(path, "state.json")):
    raise FileNotFoundError(f"{root}/LATEST names {name!r}, which is missing or incomplete")
  return path


def _atomic_write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _to_host(tree):
  """numpy leaves; a leaf with shards on other processes is gathered first (a collective: all processes call it)."""
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
                      if isinstance(x, jax.Array) and not x.is_fully_addressable else np.asarray(x), tree)


def save_checkpoint(out_dir, step: int, trainable, opt_state, state: dict, *, keep: int = 2) -> str:
  """Writes checkpoint `step` atomically and prunes all but the newest `keep`. Returns its folder.

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
  _atomic_write_text(os.path.join(tmp, "state.json"), json.dumps(state, indent=1))
  shutil.rmtree(final, ignore_errors=True)
  os.replace(tmp, final)
  _atomic_write_text(os.path.join(root, "LATEST"), name + "\n")
  done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
  for old in done[:-keep] if keep else []:
    shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def load_checkpoint(path: str, trainable_like, opt_state_like):
  """(trainable, opt_state, state) from a checkpoint folder, placed like the given trees. Multi-process:
  every process reads the files (device_put of the same host value to a global sharding)."""
  with open(os.path.join(path, "state.json")) as f:
    state = json.load(f)
  flat_like = checkpoint.flatten(trainable_like)
  loaded = checkpoint.flatten(checkpoint.load(os.path.join(path, "trainable.npz")))
  if set(loaded) != set(flat_like):
    raise ValueError(f"{path}: trainable leaves differ from this run's: missing {sorted(set(flat_like) - set(loaded))}, "
                     f"unexpected {sorted(set(loaded) - set(flat_like))}")
  put = lambda x, like: jax.device_put(jnp.asarray(x, like.dtype), like.sharding)
  trainable = checkpoint.unflatten({k: put(loaded[k], v) for k, v in flat_like.items()})
  leaves, treedef = jax.tree.flatten(opt_state_like)
  if leaves:
    saved = checkpoint.load(os.path.join(path, "opt_state.npz"))
    leaves = [put(saved[f"{i:04d}"], like) for i, like in enumerate(leaves)]
  return trainable, jax.tree.unflatten(treedef, leaves), state


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
        eval_fn: Callable | None = None, eval_every: int = 0, train_step=None):
  """Trains for `num_steps` steps (counted from 1). Returns (trainable, opt_state, history).

  batches_from(step) yields the batches for steps step+1, step+2, ... (the data position is the step).
  With out_dir and resume, an existing checkpoint there is restored first and the run continues after
  it. save_every > 0 saves every that many steps and at the end. on_step(step, metrics_dict) is called
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
  start = 0
  if out_dir is not None and resume and (path := latest(out_dir)) is not None:
    trainable, opt_state, state = load_checkpoint(path, trainable, opt_state)
    start = int(state["step"])
  history = History()
  state_info = {"seed": seed, "config": dataclasses.asdict(cfg), **(extra_state or {})}

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
  batches = batches_from(start)
  try:
    for step in range(start + 1, num_steps + 1):
      batch = next(batches)
      t0 = time.perf_counter()
      trainable, opt_state, metrics = train_step(trainable, frozen, batch, lr_schedule(step), opt_state)
      if pending is not None:  # the previous step's metrics: done by now, so reading them costs no sync
        report(*pending)
      pending = (step, metrics, time.perf_counter() - t0)
      if out_dir is not None and save_every and (step % save_every == 0 or step == num_steps):
        report(*pending)
        pending = None
        save(step)
      if eval_fn is not None and eval_every and step % eval_every == 0 and step < num_steps:
        history.evals.append((step, eval_fn(step, trainable)))
    if pending is not None:
      report(*pending)
  finally:
    close = getattr(batches, "close", None)
    if close is not None:
      close()
  return trainable, opt_state, history
