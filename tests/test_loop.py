"""Training loop: resume is bit-identical, saves are atomic, divergence stops with the last good checkpoint."""

import os
import shutil
import signal

import jax
import numpy as np
import pytest

from helpers import prefix_lm_batch, random_params
from pgjax import checkpoint, config, finetune, loop, rundir, train, tree
CFG = config.get("tiny-gemma1-mqa")


def batches_from(step, seed=0):
  """A deterministic stream: the batch for step s depends only on (seed, s)."""
  while True:
    step += 1
    rng = np.random.default_rng([seed, step])
    lengths = [(int(rng.integers(2, 5)), int(rng.integers(2, 6))) for _ in range(4)]
    yield prefix_lm_batch(CFG, lengths, 10, seed=int(rng.integers(1 << 30)))


@pytest.fixture(scope="module")
def params():
  return random_params(CFG, seed=5)

_TC_FIELDS = ("save_every", "optimizer", "seed")


def _run(params, out_dir, num_steps=6, **kw):
  trainable, frozen = train.split(params, train.is_trainable)
  kw.setdefault("lr_schedule", train.schedule("cosine", 0.05, num_steps))
  tc = finetune.TrainConfig(steps=num_steps, **{k: kw.pop(k) for k in _TC_FIELDS if k in kw})
  return loop.fit(CFG, tc, trainable, frozen, batches_from, out_dir=out_dir, **kw)


@pytest.mark.parametrize("optimizer", [train.Optimizer(), train.Optimizer(name="adamw")])
def test_kill_and_resume_is_bit_identical(params, tmp_path, optimizer):
  full, _, hist = _run(params, tmp_path / "a", save_every=2, optimizer=optimizer)

  class Killed(Exception):
    pass

  def kill(step, metrics):
    if step == 3:
      raise Killed

  # on_step sees step 3's metrics once step 4 has run: the stop saves the state after step 4.
  with pytest.raises(Killed) as stopped:
    _run(params, tmp_path / "b", save_every=2, optimizer=optimizer, on_step=kill)
  assert rundir.latest(tmp_path / "b").endswith("step_000004")
  assert "saved the state after step 4" in stopped.value.__notes__[0]
  resumed, _, hist_b = _run(params, tmp_path / "b", save_every=2, optimizer=optimizer)
  assert hist_b.steps == [5, 6]
  assert hist_b.loss == hist.loss[4:]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, resumed), jax.tree.map(np.asarray, full))

  # A crash that runs no handler (SIGKILL) resumes from the last periodic save: as if killed before the stop's
  # save, the step-4 checkpoint gone and LATEST still at step 2.
  with pytest.raises(Killed):
    _run(params, tmp_path / "c", save_every=2, optimizer=optimizer, on_step=kill)
  root = tmp_path / "c" / "checkpoints"
  shutil.rmtree(root / "step_000004")
  (root / "LATEST").write_text("step_000002\n")
  resumed, _, hist_c = _run(params, tmp_path / "c", save_every=2, optimizer=optimizer)
  assert hist_c.steps == [3, 4, 5, 6]
  assert hist_c.loss == hist.loss[2:]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, resumed), jax.tree.map(np.asarray, full))


def test_checkpoint_is_loadable_in_the_official_layout(params, tmp_path):
  trainable, _, _ = _run(params, tmp_path, num_steps=2, save_every=2)
  path = os.path.join(rundir.latest(tmp_path), "trainable.npz")
  loaded = checkpoint.load(path)
  assert set(tree.flatten(loaded)) == {k for k in tree.flatten(params) if k.startswith("llm/layers/attn/")}
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded), jax.tree.map(np.asarray, trainable))


def test_crash_mid_save_leaves_the_previous_checkpoint(params, tmp_path, monkeypatch):
  _run(params, tmp_path, num_steps=2, save_every=2)
  good = rundir.latest(tmp_path)
  before = checkpoint.load(os.path.join(good, "trainable.npz"))
  real_save = checkpoint.save

  def failing_save(path, params):
    real_save(path, {k: v for i, (k, v) in enumerate(tree.flatten(params).items()) if i < 1})
    raise OSError("disk full (injected)")

  monkeypatch.setattr(checkpoint, "save", failing_save)
  with pytest.raises(OSError, match="injected"):
    _run(params, tmp_path, num_steps=4, save_every=2)
  assert rundir.latest(tmp_path) == good
  after = checkpoint.load(os.path.join(good, "trainable.npz"))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, after), jax.tree.map(np.asarray, before))


def test_divergence_stops_and_keeps_the_last_good_checkpoint(params, tmp_path):
  lrs = {1: 0.01, 2: 0.01}
  with pytest.raises(loop.Diverged, match="step"):
    _run(params, tmp_path, num_steps=6, save_every=2, lr_schedule=lambda s: lrs.get(s, 1e30))
  good = rundir.latest(tmp_path)
  assert good.endswith("step_000002")
  assert train.all_finite(checkpoint.load(os.path.join(good, "trainable.npz")))


def test_history_is_read_one_step_late_but_complete(params, tmp_path):
  seen = []
  _, _, hist = _run(params, None, num_steps=5, on_step=lambda s, m: seen.append(s))
  assert seen == hist.steps == [1, 2, 3, 4, 5]
  assert all(np.isfinite(hist.loss))


def _steps_in(folder):
  return sorted(d for d in os.listdir(folder) if d.startswith("step_"))


def test_fresh_run_keeps_its_checkpoint_and_sets_the_old_run_aside(params, tmp_path):
  # The audited repro: 4 steps saving every 2, then a fresh 1-step run into the same folder used to
  # prune its own step_000001 (sorted last-but-keep) while LATEST named it.
  first, _, _ = _run(params, tmp_path, num_steps=4, save_every=2)
  _run(params, tmp_path, num_steps=1, save_every=1, resume=False)
  root = tmp_path / "checkpoints"
  assert (root / "LATEST").read_text() == "step_000001\n"
  assert rundir.latest(tmp_path).endswith("step_000001") and _steps_in(root) == ["step_000001"]
  # The earlier run is kept whole, untouched, beside it.
  old = tmp_path / "checkpoints.old-1"
  assert _steps_in(old) == ["step_000002", "step_000004"] and (old / "LATEST").read_text() == "step_000004\n"
  kept = checkpoint.load(old / "step_000004" / "trainable.npz")
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, kept), jax.tree.map(np.asarray, first))
  # The next run resumes the fresh run's step 1; keep=2 prunes only its older steps.
  _, _, hist = _run(params, tmp_path, num_steps=3, save_every=1)
  assert hist.steps == [2, 3] and _steps_in(root) == ["step_000002", "step_000003"]
  _run(params, tmp_path, num_steps=1, save_every=1, resume=False)
  assert _steps_in(tmp_path / "checkpoints.old-2") == ["step_000002", "step_000003"]


def test_resume_refuses_other_settings_unless_asked(params, tmp_path):
  _run(params, tmp_path, num_steps=2, save_every=2, seed=0, extra_state={"batch_size": 4, "data": {"n": 10}})
  with pytest.raises(rundir.SettingsChanged) as e:
    _run(params, tmp_path, num_steps=4, save_every=2, seed=1, optimizer=train.Optimizer(weight_decay=0.5),
         extra_state={"batch_size": 8, "data": {"n": 10}})
  assert str(tmp_path / "checkpoints" / "step_000002") in str(e.value)
  changed = str(e.value).splitlines()[1:]
  assert [l.strip() for l in changed] == ["batch_size: 4 in the checkpoint, 8 now",
                                          "optimizer.weight_decay: 0.0 in the checkpoint, 0.5 now",
                                          "seed: 0 in the checkpoint, 1 now"]
  with pytest.raises(rundir.SettingsChanged, match=r"data\.n: 10 in the checkpoint, 11 now"):
    _run(params, tmp_path, num_steps=4, save_every=2, extra_state={"batch_size": 4, "data": {"n": 11}})
  _, _, hist = _run(params, tmp_path, num_steps=4, save_every=2, seed=1, resume_anyway=True,
                    extra_state={"batch_size": 8, "data": {"n": 10}})
  assert hist.steps == [3, 4]
  state = rundir.read_state(rundir.latest(tmp_path))
  assert state["step"] == 4 and state["seed"] == 1 and state["batch_size"] == 8  # the new settings, recorded


def test_resume_with_nothing_left_to_train_says_so(params, tmp_path):
  _run(params, tmp_path, num_steps=2, save_every=2)
  for steps in (2, 1):
    with pytest.raises(rundir.NothingToTrain, match=f"step_000002 is at step 2, which already reaches the {steps} steps"):
      _run(params, tmp_path, num_steps=steps, save_every=2)
  assert rundir.latest(tmp_path).endswith("step_000002")


@pytest.mark.parametrize("text, message", [
    ('{"step": 2, ', "not valid JSON"),
    ('{"seed": 0}', 'key "step" is missing'),
    ('{"step": "2"}', "key \"step\" must be a non-negative integer, found '2'"),
    ('[2]', "expected a JSON object, found list"),
])


def test_damaged_state_json_is_named(params, tmp_path, text, message):
  _run(params, tmp_path, num_steps=2, save_every=2)
  path = tmp_path / "checkpoints" / "step_000002" / "state.json"
  path.write_text(text)
  with pytest.raises(checkpoint.CheckpointError) as e:
    _run(params, tmp_path, num_steps=4, save_every=2)
  assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def _reshape_one(file, key, shape):
  flat = tree.flatten(checkpoint.load(file))
  flat[key] = np.zeros(shape, np.asarray(flat[key]).dtype)
  checkpoint.save(file, tree.unflatten(flat))


def test_mis_shaped_trainable_npz_is_named(params, tmp_path):
  _run(params, tmp_path, num_steps=2, save_every=2)
  file = tmp_path / "checkpoints" / "step_000002" / "trainable.npz"
  key = "llm/layers/attn/q_einsum/w"
  expected = tree.flatten(params)[key].shape  # the run's own param, as the config builds it
  _reshape_one(file, key, (3, 5))
  with pytest.raises(checkpoint.CheckpointError) as e:
    _run(params, tmp_path, num_steps=4, save_every=2)
  assert str(e.value).startswith(f"{file}: does not match this run's trainable params")
  assert f"shape mismatch {key}: expected {tuple(expected)}, found (3, 5)" in str(e.value)


def test_mis_shaped_or_missing_opt_state_is_named(params, tmp_path):
  adamw = train.Optimizer(name="adamw")
  _run(params, tmp_path, num_steps=2, save_every=2, optimizer=adamw)
  file = tmp_path / "checkpoints" / "step_000002" / "opt_state.npz"
  # optax's adam state is (count, mu, nu): leaf 0000 is the step count, 0001 the first moment of the first
  # trainable param in tree order (sorted keys), so it has that param's shape.
  first = sorted(k for k in tree.flatten(params) if k.startswith("llm/layers/attn/"))[0]
  key, expected = "0001", tree.flatten(params)[first].shape
  _reshape_one(file, key, (7,))
  with pytest.raises(checkpoint.CheckpointError) as e:
    _run(params, tmp_path, num_steps=4, save_every=2, optimizer=adamw)
  assert str(e.value).startswith(f"{file}: does not match this run's optimizer state")
  assert f"shape mismatch {key}: expected {tuple(expected)}, found (7,)" in str(e.value)
  os.remove(file)
  with pytest.raises(checkpoint.CheckpointError, match=f"{file}: missing"):
    _run(params, tmp_path, num_steps=4, save_every=2, optimizer=adamw)


def test_a_data_error_keeps_what_was_trained(params, tmp_path):
  """An error in the data at step 4 (no periodic saves) stops the run with the state after step 3 saved;
  the same call then resumes there and ends where an uninterrupted run does, bit for bit."""
  full, _, hist = _run(params, tmp_path / "a")

  def bad_from(step, seed=0):
    for s, batch in enumerate(batches_from(step, seed), start=step + 1):
      if s == 4 and not (tmp_path / "fixed").exists():
        raise ValueError("data.jsonl:4: cannot decode image (injected)")
      yield batch

  trainable, frozen = train.split(params, train.is_trainable)
  fit = lambda: loop.fit(CFG, finetune.TrainConfig(steps=6), trainable, frozen, bad_from, out_dir=tmp_path / "b",
                         lr_schedule=train.schedule("cosine", 0.05, 6))
  with pytest.raises(ValueError, match="injected") as stopped:
    fit()
  assert rundir.latest(tmp_path / "b").endswith("step_000003")
  assert "saved the state after step 3" in stopped.value.__notes__[0]
  (tmp_path / "fixed").touch()
  resumed, _, hist_b = fit()
  assert hist_b.steps == [4, 5, 6]
  assert hist_b.loss == hist.loss[3:]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, resumed), jax.tree.map(np.asarray, full))


def test_a_stop_after_divergence_saves_nothing(params, tmp_path):
  """Divergence is not a stop to save from: the loop raises Diverged and no checkpoint appears."""
  with pytest.raises(loop.Diverged):
    _run(params, tmp_path, lr_schedule=lambda step: float("nan"))
  assert rundir.latest(tmp_path) is None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stop_signal_saves_and_logs_the_last_completed_step(params, tmp_path, signum):
  """SIGTERM (what `timeout`, Slurm and preemptible VMs send), SIGHUP and Ctrl-C stop the run between steps
  (never inside a step, whose jitted call has donated the params): the step in flight finishes, its metrics go
  into the log (which runs one step late) and the checkpoint holds that same step; the previous handler is back
  afterwards. The same call then resumes bit for bit."""
  full, _, hist = _run(params, tmp_path / "a")
  logged = []

  def on_step(step, metrics):
    logged.append(step)
    if step == 3 and not (tmp_path / "resumed").exists():
      os.kill(os.getpid(), signum)  # the handler runs as soon as this returns, inside the callback

  before = signal.getsignal(signum)
  with pytest.raises(loop.Stopped) as stopped:
    _run(params, tmp_path / "b", on_step=on_step)
  assert stopped.value.signum == signum and isinstance(stopped.value, KeyboardInterrupt)
  assert signal.getsignal(signum) is before
  assert logged == [1, 2, 3, 4] and rundir.latest(tmp_path / "b").endswith("step_000004")
  (tmp_path / "resumed").touch()
  resumed, _, hist_b = _run(params, tmp_path / "b", on_step=on_step)
  assert logged == [1, 2, 3, 4, 5, 6] and hist_b.loss == hist.loss[4:]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, resumed), jax.tree.map(np.asarray, full))


def test_ctrl_c_during_a_step_logs_the_step_before_and_saves_it(params, tmp_path):
  """An interrupt while step 4 is being fed abandons it: step 3, completed, is logged and saved."""
  logged = []

  def interrupted_from(step, seed=0):
    for s, batch in enumerate(batches_from(step, seed), start=step + 1):
      if s == 4:
        raise KeyboardInterrupt
      yield batch

  trainable, frozen = train.split(params, train.is_trainable)
  with pytest.raises(KeyboardInterrupt):
    loop.fit(CFG, finetune.TrainConfig(steps=6), trainable, frozen, interrupted_from, out_dir=tmp_path,
             on_step=lambda s, m: logged.append(s))
  assert logged == [1, 2, 3] and rundir.latest(tmp_path).endswith("step_000003")


def test_lost_latest_resumes_from_the_newest_complete_step_and_says_so(params, tmp_path, capsys):
  _run(params, tmp_path, num_steps=4, save_every=2)
  root = tmp_path / "checkpoints"
  (root / "LATEST").unlink()
  # The newest step folder is damaged (its npz cut short): it is not complete, so step 2 is where the run goes on.
  npz = root / "step_000004" / "trainable.npz"
  npz.write_bytes(npz.read_bytes()[:100])
  assert not rundir.complete(root / "step_000004") and rundir.complete(root / "step_000002")
  _, _, hist = _run(params, tmp_path, num_steps=6, save_every=2)
  assert hist.steps == [3, 4, 5, 6]
  assert f"LATEST is missing; resuming from the newest complete checkpoint, {root / 'step_000002'}" in capsys.readouterr().err
  # No complete folder at all: refused naming LATEST and the folders, never a silent start from step 0.
  (root / "LATEST").unlink()
  for d in root.iterdir():
    (d / "state.json").unlink()
  with pytest.raises(checkpoint.CheckpointError, match=r"LATEST is missing and no step folder there is complete"):
    _run(params, tmp_path, num_steps=8, save_every=2)

