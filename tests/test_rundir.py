"""The run folder: pruning, LATEST (refused outside checkpoints/, unreadable), the folder lock, setting aside."""

import os

import numpy as np
import pytest

from pgjax import checkpoint, rundir

TREE = {"llm": {"layers": {"attn": {"w": np.arange(3, dtype=np.float32)}}}}


def _steps_in(folder):
  return sorted(d for d in os.listdir(folder) if d.startswith("step_"))


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
  tree = TREE
  root = tmp_path / "checkpoints"
  for later in (5, 9):  # later steps in the folder (e.g. a save that crashed before LATEST moved on)
    rundir.save_checkpoint(tmp_path, later, tree, None, {}, keep=0)
  for step in (1, 2, 3):
    rundir.save_checkpoint(tmp_path, step, tree, None, {}, keep=2)
    assert (root / "LATEST").read_text() == f"step_{step:06d}\n"
    assert rundir.read_state(rundir.latest(tmp_path))["step"] == step
  assert _steps_in(root) == ["step_000002", "step_000003", "step_000005", "step_000009"]
  rundir.save_checkpoint(tmp_path, 4, tree, None, {}, keep=1)
  assert _steps_in(root) == ["step_000004", "step_000005", "step_000009"]


@pytest.mark.parametrize("name", ["../..", "/tmp", "step_000001/../../elsewhere", "step_x"])
def test_latest_refuses_a_name_outside_checkpoints(tmp_path, name):
  """LATEST can only name a step_NNNNNN folder inside checkpoints/: a resume never follows it elsewhere, even
  where that place holds a state.json."""
  root = tmp_path / "run" / "checkpoints"
  (root / "step_000001").mkdir(parents=True)
  (root / "step_000001" / "state.json").write_text('{"step": 1}')
  (tmp_path / "state.json").write_text('{"step": 5}')
  (root / "LATEST").write_text(name + "\n")
  with pytest.raises(checkpoint.CheckpointError, match="not a step_NNNNNN folder"):
    rundir.latest(tmp_path / "run")
  (root / "LATEST").write_text("step_000001\n")
  assert rundir.latest(tmp_path / "run") == str(root / "step_000001")


@pytest.mark.parametrize("damage", ["binary", "folder"])
def test_unreadable_latest_is_named(tmp_path, damage):
  rundir.save_checkpoint(tmp_path, 2, TREE, None, {})
  latest = tmp_path / "checkpoints" / "LATEST"
  latest.unlink()
  if damage == "binary":
    latest.write_bytes(b"\xff\xfe step")
  else:
    latest.mkdir()
  with pytest.raises(checkpoint.CheckpointError, match=f"{latest}: cannot be read"):
    rundir.latest(tmp_path)


def test_one_run_per_folder(tmp_path, capsys):
  import socket
  me = f"{os.getpid()}@{socket.gethostname()}"
  with rundir.hold(tmp_path):
    assert (tmp_path / rundir.LOCK_FILE).read_text() == me
    with pytest.raises(rundir.FolderBusy, match=f"{tmp_path} is in use by another run \\({me}\\)"):
      with rundir.hold(tmp_path):
        pass
  assert (tmp_path / rundir.LOCK_FILE).read_text() == ""  # a clean release empties it
  # A lock file still naming a process after that process died (kill -9): taken over, and said.
  (tmp_path / rundir.LOCK_FILE).write_text("999999999@elsewhere")
  with rundir.hold(tmp_path):
    pass
  assert "took over the lock on" in capsys.readouterr().err
  # A live process named on this host although the flock is free (a filesystem that ignores flock): refused.
  (tmp_path / rundir.LOCK_FILE).write_text(f"{os.getppid()}@{socket.gethostname()}")
  with pytest.raises(rundir.FolderBusy, match=f"process {os.getppid()} on this host"):
    with rundir.hold(tmp_path):
      pass


def test_set_aside_moves_checkpoints_and_logs_with_one_number(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "checkpoints" / "LATEST").write_text("step_000001\n")
  (tmp_path / "metrics.jsonl").write_text("{}\n")
  (tmp_path / "report.html").write_text("this run's")
  (tmp_path / "report.old-1.html").write_text("an earlier run's")  # N=1 is taken for one of them
  assert rundir.set_aside(tmp_path) == 2
  assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints.old-2", "metrics.old-2.jsonl",
                                                         "report.old-1.html", "report.old-2.html"]
  assert rundir.set_aside(tmp_path) is None
