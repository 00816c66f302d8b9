"""The training loop: steps, metrics one step late, stops on signals, divergence stop; checkpoints through rundir.

`fit` runs the jitted train step over a TrainConfig's steps. Everything a step depends on is a function of
(seed, step): the data order (`batches_from(step)`), augmentation and the learning rate (`lr_schedule(step)`,
steps counted from 1). So resuming at a saved step (pgjax/rundir.py keeps the folder) continues exactly
where an uninterrupted run would be, bit for bit. A run stopped by an error, Ctrl-C or a termination signal
logs and saves its last completed step first. Multi-process (jax.distributed): every process runs `fit` alike,
and a stop signal that reaches any of them stops all after the same step (StopVote).
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pgjax import rundir, train
from pgjax.config import PaliGemmaConfig

if TYPE_CHECKING:  # the job's settings; fit reads them, nothing here builds one
  from pgjax.finetune import TrainConfig


class Diverged(RuntimeError):
  """The loss or the params became NaN/Inf; the last good checkpoint was left in place."""


class Stopped(KeyboardInterrupt):
  """A stop signal arrived: SIGTERM (from `timeout`, Slurm, Kubernetes or a preemptible VM), SIGHUP, or during
  `fit` Ctrl-C. A KeyboardInterrupt, so it is handled as Ctrl-C is: `fit` finishes the step in flight, logs
  and saves it, then raises this."""

  def __init__(self, signum: int, *, agreed: bool = False):
    super().__init__(f"stopped by {signal.Signals(signum).name}")
    self.signum = signum
    self.agreed = agreed  # raised by every process after the same step (StopVote): the save can be a collective


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_on_signals(signals=STOP_SIGNALS, *, deferred: list | None = None):
  """Within the block, the signals raise Stopped in the main thread; the previous handlers come back after.
  With `deferred` (a list), a first signal is only appended to it, for the caller to raise Stopped at a safe
  point; a second one raises at once. `fit` defers: a step interrupted inside its jitted call has already
  donated its params, so raising there would lose the state the stop is meant to save. Outside the main
  thread (where Python cannot install handlers) it does nothing."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handler(signum, frame):
    if deferred is None or deferred:
      raise Stopped(signum)
    deferred.append(signum)

  previous = {s: signal.signal(s, handler) for s in signals}
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


class StopVote:
  """Agreement on a stop between processes (jax.distributed). A signal reaches the processes at different
  steps, or only one of them (a Ctrl-C in one terminal), and the save that keeps the run is a collective
  every process must join after the same step. So at each step boundary every process puts the signal it
  has seen (0: none) into an all-reduce (max) over all devices, which runs asynchronously on the devices; its
  result is read at the next boundary, after the step between has been dispatched, so reading it costs no
  wait and the train step's pipelining is kept. Every process reads the same value at the same boundary, so
  all stop after the same step: one step after the first process saw the signal."""

  def __init__(self):
    mesh = Mesh(np.array(jax.devices()), ("p",))  # jax.devices() lists each process's devices together
    self._votes = NamedSharding(mesh, P("p"))
    self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
    self._pending = None

  def _launch(self, signum: int):
    local = np.full((jax.local_device_count(),), signum, np.int32)
    return self._max(jax.make_array_from_process_local_data(self._votes, local))

  def poll(self, signum: int) -> int:
    """The signal agreed on at the previous boundary (0: none, or the first boundary); casts this one's vote."""
    agreed = 0 if self._pending is None else int(self._pending)
    self._pending = self._launch(signum)
    return agreed

  def last(self, signum: int) -> int:
    """At the end of the run: the votes of the previous boundary and of this one, waited for."""
    agreed = self.poll(signum)
    return max(agreed, int(self._pending))


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


def fit(cfg: PaliGemmaConfig, tc: "TrainConfig", trainable, frozen, batches_from: Callable[[int], Iterator[dict]], *,
        out_dir=None, mesh=None, resume: bool = True, resume_anyway: bool = False, extra_state: dict | None = None,
        on_step: Callable | None = None, eval_fn: Callable | None = None,
        lr_schedule: Callable[[int], float] | None = None, train_step=None):
  """Trains for `tc.steps` steps (counted from 1) with tc's optimizer, clip, accum, save and eval cadence
  (finetune.TrainConfig). Returns (trainable, opt_state, history).

  batches_from(step) yields the batches for steps step+1, step+2, ... (the data position is the step).
  lr_schedule(step) defaults to `tc.lr_schedule()`. With out_dir and resume, an existing checkpoint there is
  restored first and the run continues after it; its state.json must record the same tc.RESUME_FIELDS and
  `extra_state` (JSON values: the caller records there what else the run depends on, e.g. the data) unless
  resume_anyway, and a step below tc.steps (see resume_point). With out_dir and not resume, checkpoints
  already there are moved aside first (see set_aside). With out_dir, a checkpoint is saved every
  tc.save_every steps and at the end (tc.save_every 0: at the end only), the newest tc.keep_checkpoints
  kept. on_step(step, metrics_dict) is called with host metrics one step late (and may raise to stop the
  run). eval_fn(step, trainable) runs after every `tc.eval_every` steps (not after the last: callers evaluate
  the result) on the current params and its result is kept in history.evals. A NaN/Inf loss raises
  Diverged; params are checked finite before every save, so a checkpoint never holds a diverged state.
  """
  num_steps, optimizer, eval_every = tc.steps, tc.optimizer, tc.eval_every
  save_every = tc.save_every or num_steps
  lr_schedule = tc.lr_schedule() if lr_schedule is None else lr_schedule
  opt_state = train.init_opt_state(optimizer, trainable, cfg)
  if mesh is not None:
    opt_state = _place_opt_state(opt_state, mesh)
  if train_step is None:
    shardings = {}
    if mesh is not None:
      from pgjax import sharding
      shardings = dict(trainable_shardings=sharding.param_shardings(trainable, mesh),
                       frozen_shardings=sharding.param_shardings(frozen, mesh),
                       opt_state_shardings=jax.tree.map(lambda x: x.sharding, opt_state))
    train_step = train.make_train_step(cfg, optimizer=optimizer, clip_norm=tc.clip, accum_steps=tc.accum,
                                       mesh=mesh, lora_alpha=getattr(tc, "adapter_alpha", None), **shardings)
  identity = {**tc.resume_identity(), **rundir.as_json(extra_state or {})}
  start = 0
  if out_dir is not None and not resume:
    rundir.set_aside(out_dir, logs=())  # the job (finetune) moves its own logs aside before it opens them
  elif out_dir is not None and (point := rundir.resume_point(out_dir, num_steps=num_steps, expect=identity,
                                                      resume_anyway=resume_anyway)) is not None:
    trainable, opt_state, state = rundir.load_checkpoint(point[0], trainable, opt_state)
    start = state["step"]
  history = History()
  state_info = {**identity, "train_config": rundir.as_json(dataclasses.asdict(tc)), "config": dataclasses.asdict(cfg)}

  def report(step, metrics, t):
    m = {k: float(v) for k, v in metrics.items()}
    # A step the float16 loss scale skipped has a non-finite gradient by design (and changed nothing).
    if not np.isfinite(m["loss"]) or not (np.isfinite(m["grad_norm"]) or m.get("skipped")):
      raise Diverged(f"step {step}: loss {m['loss']}, gradient norm {m['grad_norm']}; stopping. The last good "
                     f"checkpoint ({rundir.latest(out_dir) if out_dir else 'none'}) is left in place.")
    if not np.isfinite(m["grad_norm"]):  # a skipped step's: logged as null (JSON has no Infinity)
      m["grad_norm"] = None
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
                     f"({rundir.latest(out_dir)}) is left in place.")
    rundir.save_checkpoint(out_dir, step, trainable, opt_state, {**state_info, "lr": lr_schedule(step)},
                    keep=tc.keep_checkpoints)

  pending = last = None  # the last completed step's metrics, not yet read (the log runs one step late)
  done = saved = start  # the last step whose update `trainable` holds; the last step saved
  batches = batches_from(start)
  requested = []  # a stop signal (SIGTERM, SIGHUP, Ctrl-C) that arrived: acted on between steps
  vote = StopVote() if jax.process_count() > 1 else None

  def agreed(last=False) -> int:  # the signal all processes stop on now, or 0
    seen = requested[0] if requested else 0
    if vote is None:
      return seen
    return vote.last(seen) if last else vote.poll(seen)

  try:
    with stop_on_signals(STOP_SIGNALS + (signal.SIGINT,), deferred=requested):
      for step in range(start + 1, num_steps + 1):
        if signum := agreed():
          raise Stopped(signum, agreed=True)
        batch = next(batches)
        t0 = time.perf_counter()
        trainable, opt_state, metrics = train_step(trainable, frozen, batch, lr_schedule(step), opt_state)
        done, last = step, (step, metrics, t0)
        if pending is not None:  # the previous step's metrics: done by now, so reading them costs no sync
          previous, pending = pending, None
          report(*previous)
        pending = (step, metrics, time.perf_counter() - t0)
        if out_dir is not None and (step % save_every == 0 or step == num_steps):
          previous, pending = pending, None
          report(*previous)
          save(step)
          saved = step
        if eval_fn is not None and eval_every and step % eval_every == 0 and step < num_steps:
          history.evals.append((step, eval_fn(step, trainable)))
      if pending is not None:
        previous, pending = pending, None
        report(*previous)
      if signum := agreed(last=True):  # during the last step: it is saved (with out_dir) and logged
        raise Stopped(signum, agreed=True)
  except (Exception, KeyboardInterrupt) as e:
    # A run stopped by an error in its data (an image that fails to decode at step 5,000), a callback,
    # Ctrl-C or a termination signal (Stopped) keeps what it trained: the completed step's metrics still
    # pending are logged, then the state after it is saved (checked finite, as every save), and the same
    # command resumes there. Not after a divergence (nothing good to save), and with several processes only
    # after a stop they voted on: a save is a collective, and an error in one process is not in the others.
    if (isinstance(e, Diverged) or out_dir is None
        or (jax.process_count() > 1 and not getattr(e, "agreed", False))):
      raise
    # Unlogged completed steps: the one pending, and the one just run if a callback stopped the run before
    # its metrics were queued. Logging them means the log ends at the step the checkpoint holds.
    unlogged = [pending] if pending is not None else []
    if done > max([start, *history.steps, *(p[0] for p in unlogged)]):
      unlogged.append((last[0], last[1], time.perf_counter() - last[2]))
    pending = None
    for previous in unlogged:
      try:
        report(*previous)
      except Diverged as diverged:  # the completed step's loss was NaN: there is nothing good to save
        raise diverged from e
      except Exception as failed:
        e.add_note(f"pgjax: step {previous[0]}'s metrics could not be logged ({type(failed).__name__}: {failed})")
        break
    if done > saved:
      try:
        save(done)
      except Exception as failed:
        e.add_note(f"pgjax: the state after step {done} could not be saved ({type(failed).__name__}: {failed})")
      else:
        e.add_note(f"pgjax: saved the state after step {done} to {rundir.latest(out_dir)}; the same command resumes there")
    if isinstance(e, KeyboardInterrupt):
      e.step, e.checkpoint = done, rundir.latest(out_dir)  # for the one line the command prints
    raise
  finally:
    close = getattr(batches, "close", None)
    if close is not None:
      close()
  return trainable, opt_state, history
