"""The run folder: atomic checkpoints, LATEST, what a resume must match, the lock, setting an earlier run aside.

Checkpoints live in `out_dir/checkpoints/step_NNNNNN/`: `trainable.npz` (the trainable subtree in the
official layout, loadable by `checkpoint.load`), `opt_state.npz` (optimizer state leaves, if any) and
`state.json` (step, the TrainConfig, the model config, the caller's `extra_state`, the files written). Each is
written into `step_NNNNNN.tmp/` and renamed into place, and `checkpoints/LATEST` names the newest complete one
(replaced atomically last), so a crash mid-save leaves the previous checkpoint intact and current. Pruning
keeps the newest `keep` steps up to the one just written and never touches that one. A lost LATEST is
recovered from the newest complete step folder (`latest`).

A fresh run moves an earlier run's checkpoints/ and logs aside (`set_aside`: checkpoints.old-N/,
NAME.old-N.EXT), whole and untouched: nothing of it is deleted, and the new run's steps never mix with the
old run's, so LATEST and pruning only ever see one run. A run holds the folder's lock (`hold`) while it lives.

A resume checks that the settings a faithful continuation depends on (`TrainConfig.RESUME_FIELDS`: seed,
optimizer, trainable patterns, batch size; and the caller's `extra_state`: the job's base checkpoint and
training data) equal the saved state.json's, and refuses otherwise unless `resume_anyway` (`resume_point`).

Multi-process (jax.distributed): a save gathers the sharded params to every host (a collective), process 0
alone writes, and all wait for it. `out_dir` must be one folder that every process sees (a shared
filesystem): all of them read it to resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from pgjax import checkpoint, files, tree


class ResumeError(ValueError):
  """The checkpoint to resume from cannot continue this run."""


class SettingsChanged(ResumeError):
  """The checkpoint was saved with other settings than this run's (finetune.TrainConfig.RESUME_FIELDS and the caller's extra_state)."""


class NothingToTrain(ResumeError):
  """The checkpoint's step already reaches the steps asked."""


def _ckpt_root(out_dir) -> str:
  return os.path.join(os.fspath(out_dir), "checkpoints")


def latest(out_dir) -> str | None:
  """The newest complete checkpoint folder under out_dir, or None when there is none.

  It is the one checkpoints/LATEST names. LATEST missing while step folders exist (deleted by hand, or lost
  in a copy) is not a fresh start: the newest complete step folder (see `complete`) is taken, and a line on
  stderr says so. A LATEST that cannot be read, or that names anything but a complete step folder of its
  own, is refused naming it.
  """
  root = _ckpt_root(out_dir)
  marker = os.path.join(root, "LATEST")
  try:
    with open(marker, "rb") as f:
      name = f.read(256).decode("utf-8").strip()
  except FileNotFoundError:
    return _recover_latest(root)
  except (IsADirectoryError, UnicodeDecodeError, OSError) as e:
    raise checkpoint.CheckpointError(f"{marker}: cannot be read ({e.__class__.__name__}: {e}); it should hold the "
                                     f"name of the newest step_NNNNNN folder. Write that name into it, or delete it "
                                     f"to resume from the newest complete step folder") from None
  # The writer only ever names a step_NNNNNN folder of its own; anything else ("../..", an absolute path)
  # would lead the resume outside checkpoints/.
  if _step_of(name) is None:
    raise checkpoint.CheckpointError(f"{root}/LATEST names {name!r}, not a step_NNNNNN folder of {root}")
  path = os.path.join(root, name)
  if not os.path.isfile(os.path.join(path, "state.json")):
    raise FileNotFoundError(f"{root}/LATEST names {name!r}, which is missing or incomplete")
  return path


def complete(path) -> bool:
  """Whether a step folder holds a whole checkpoint: a state.json of its own step, and every file it lists
  (checkpoints before the list: trainable.npz) present with a readable npz header."""
  try:
    state = read_state(path)
  except (OSError, checkpoint.CheckpointError):
    return False
  if state["step"] != _step_of(os.path.basename(os.path.normpath(path))):
    return False
  try:
    for name in state.get("files", ["trainable.npz"]):
      checkpoint.read_shapes(os.path.join(path, name))
  except (OSError, ValueError):
    return False
  return True


def _recover_latest(root) -> str | None:
  steps = sorted(((s, d) for d in (os.listdir(root) if os.path.isdir(root) else ())
                  if (s := _step_of(d)) is not None), reverse=True)
  for _, d in steps:
    path = os.path.join(root, d)
    if complete(path):
      print(f"pgjax: {root}/LATEST is missing; resuming from the newest complete checkpoint, {path}",
            file=sys.stderr, flush=True)
      return path
  if steps:
    raise checkpoint.CheckpointError(f"{root}/LATEST is missing and no step folder there is complete "
                                     f"({', '.join(d for _, d in steps)}); move the folder aside to start over")
  return None


_STEP_DIR = re.compile(r"step_(\d+)")


def _step_of(name: str) -> int | None:
  """The step of a complete checkpoint folder's name ("step_000012" -> 12); None for anything else (.tmp)."""
  m = _STEP_DIR.fullmatch(name)
  return int(m.group(1)) if m else None


RUN_LOGS = ("metrics.jsonl", "summary.json", "report.html")


def set_aside(out_dir, logs=RUN_LOGS) -> int | None:
  """Moves an earlier run in out_dir aside, whole and untouched: checkpoints/ (if it holds anything) to
  checkpoints.old-N/ and each of `logs` there to NAME.old-N.EXT, with the first N free for all of them.
  Returns N, or None when there was nothing to move. A fresh run calls it so that it neither deletes nor
  mixes with an earlier run. Multi-process: every process calls it; process 0 moves, the others wait."""
  out_dir = os.fspath(out_dir)
  root = _ckpt_root(out_dir)
  moves = [(root, lambda n: f"{root}.old-{n}")] if os.path.isdir(root) and os.listdir(root) else []
  for name in logs:
    stem, ext = os.path.splitext(os.path.join(out_dir, name))
    if os.path.exists(stem + ext):
      moves.append((stem + ext, lambda n, stem=stem, ext=ext: f"{stem}.old-{n}{ext}"))
  n = None
  if jax.process_index() == 0 and moves:
    n = 1
    while any(os.path.exists(to(n)) for _, to in moves):
      n += 1
    for path, to in moves:
      os.replace(path, to(n))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"pgjax set aside {root}")
  return n


class FolderBusy(ValueError):
  """Another run holds the output folder."""


LOCK_FILE = "pgjax.lock"


@contextlib.contextmanager
def hold(out_dir):
  """An exclusive lock on out_dir for the life of a run: a second run on the same folder is refused with
  FolderBusy naming the holder (pid and host), instead of the two overwriting each other's checkpoints and log.

  The lock is `flock` on out_dir/pgjax.lock, which the kernel releases when its process dies, however it
  dies; the file holds the holder's "pid@host" while held and is emptied on a clean release. So a file still
  naming a process when the lock is free was left by a run that was killed: it is taken over, and a line on
  stderr says so. Local disks honour flock, and so do NFS (Linux maps it to NFS locks) and Lustre/GPFS with
  their lock managers on; on a filesystem that ignores it (some FUSE mounts), the pid@host check still
  refuses a second run on the same host whose first is alive, but not one on another host.
  Multi-process: only process 0 takes it (the others are the same run).
  """
  if jax.process_index() != 0:
    yield
    return
  import fcntl
  import socket
  path = os.path.join(os.fspath(out_dir), LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  me = f"{os.getpid()}@{socket.gethostname()}"
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise FolderBusy(f"{out_dir} is in use by another run ({_holder(fd) or 'a process that holds its lock'}); "
                       f"wait for it, or give this run another --out") from None
    holder = _holder(fd)
    if holder and holder != me:
      pid, _, host = holder.partition("@")
      if host == socket.gethostname() and pid.isdigit() and _alive(int(pid)):
        raise FolderBusy(f"{out_dir} is in use by another run (process {pid} on this host, which this filesystem's "
                         f"locks do not show); wait for it, or give this run another --out")
      print(f"pgjax: took over the lock on {out_dir} left by process {pid} on {host or 'an unknown host'}, "
            f"which is no longer running", file=sys.stderr, flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, me.encode(), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)
  finally:
    os.close(fd)  # closing releases the flock


def _holder(fd) -> str:
  try:
    return os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
  except OSError:
    return ""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


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
  written = ["trainable.npz"] + (["opt_state.npz"] if leaves else [])  # what `complete` checks
  files.atomic_write_text(os.path.join(tmp, "state.json"), json.dumps({**state, "files": written}, indent=1))
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


def as_json(x):
  """x as state.json holds it after a round trip (tuples become lists), so that values compare alike."""
  return json.loads(json.dumps(x))


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

  for k, v in as_json(expect).items():
    if k in saved:
      compare(saved[k], v, k)
  return sorted(lines)


def resume_point(out_dir, *, num_steps: int, expect: dict, resume_anyway: bool = False):
  """(path, state) of the checkpoint a run in out_dir would continue from, or None when there is none.

  Raises SettingsChanged when the checkpoint's settings differ from `expect` (finetune.TrainConfig.RESUME_FIELDS and the caller's extra_state), unless
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
