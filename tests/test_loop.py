"""Training loop: resume is bit-identical, saves are atomic, divergence stops with the last good checkpoint."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import prefix_lm_batch, random_params
from pgjax import checkpoint, config, loop, train

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


def _run(params, out_dir, num_steps=6, **kw):
  trainable, frozen = train.split(params, train.is_trainable)
  kw.setdefault("lr_schedule", train.schedule("cosine", 0.05, num_steps))
  return loop.fit(CFG, trainable, frozen, batches_from, num_steps=num_steps, out_dir=out_dir, **kw)


@pytest.mark.parametrize("optimizer", [train.Optimizer(), train.Optimizer(name="adamw")])
def test_kill_and_resume_is_bit_identical(params, tmp_path, optimizer):
  full, _, hist = _run(params, tmp_path / "a", save_every=2, optimizer=optimizer)

  class Killed(Exception):
    pass

  def kill(step, metrics):
    if step == 3:
      raise Killed

  with pytest.raises(Killed):
    _run(params, tmp_path / "b", save_every=2, optimizer=optimizer, on_step=kill)
  assert loop.latest(tmp_path / "b").endswith("step_000002")
  resumed, _, hist_b = _run(params, tmp_path / "b", save_every=2, optimizer=optimizer)
  assert hist_b.steps == [3, 4, 5, 6]
  assert hist_b.loss == hist.loss[2:]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, resumed), jax.tree.map(np.asarray, full))


def test_checkpoint_is_loadable_in_the_official_layout(params, tmp_path):
  trainable, _, _ = _run(params, tmp_path, num_steps=2, save_every=2)
  path = os.path.join(loop.latest(tmp_path), "trainable.npz")
  loaded = checkpoint.load(path)
  assert set(checkpoint.flatten(loaded)) == {k for k in checkpoint.flatten(params) if k.startswith("llm/layers/attn/")}
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded), jax.tree.map(np.asarray, trainable))


def test_crash_mid_save_leaves_the_previous_checkpoint(params, tmp_path, monkeypatch):
  _run(params, tmp_path, num_steps=2, save_every=2)
  good = loop.latest(tmp_path)
  before = checkpoint.load(os.path.join(good, "trainable.npz"))
  real_save = checkpoint.save

  def failing_save(path, tree):
    real_save(path, {k: v for i, (k, v) in enumerate(checkpoint.flatten(tree).items()) if i < 1})
    raise OSError("disk full (injected)")

  monkeypatch.setattr(checkpoint, "save", failing_save)
  with pytest.raises(OSError, match="injected"):
    _run(params, tmp_path, num_steps=4, save_every=2)
  assert loop.latest(tmp_path) == good
  after = checkpoint.load(os.path.join(good, "trainable.npz"))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, after), jax.tree.map(np.asarray, before))


def test_divergence_stops_and_keeps_the_last_good_checkpoint(params, tmp_path):
  lrs = {1: 0.01, 2: 0.01}
  with pytest.raises(loop.Diverged, match="step"):
    _run(params, tmp_path, num_steps=6, save_every=2, lr_schedule=lambda s: lrs.get(s, 1e30))
  good = loop.latest(tmp_path)
  assert good.endswith("step_000002")
  assert train.all_finite(checkpoint.load(os.path.join(good, "trainable.npz")))


def test_history_is_read_one_step_late_but_complete(params, tmp_path):
  seen = []
  _, _, hist = _run(params, None, num_steps=5, on_step=lambda s, m: seen.append(s))
  assert seen == hist.steps == [1, 2, 3, 4, 5]
  assert all(np.isfinite(hist.loss))
