"""Two processes on localhost (jax.distributed, CPU collectives over gloo) train exactly like one process.

tests/multihost_worker.py runs in fresh subprocesses, never in this one (whose XLA_FLAGS ask for 8 devices):
once as one process with 4 CPU devices, once as two processes with 2 each, so both meshes have 4 devices.
Both train the same steps: the train step alone, then loop.fit with the real data pipeline, checkpoints and a
resume, then a run that a signal to one process stops. The two-process run must end where the one-process run ends, and that where one plain device ends.
"""

import os
import random
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers import assert_close_f32, prefix_lm_batch, random_params
from pgjax import checkpoint, config, train
from pgjax.tokenizer import make_sentencepiece

pytestmark = pytest.mark.slow
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
TIMEOUT_S = 240  # a hung collective fails the test instead of blocking CI
WORDS = "the a cat dog sits on mat runs in park red blue big small bird caption en answer".split()


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _workdir(path):
  """The params (made once, here: random_params compiles for ~30 s), 12 examples (JSONL, PNGs) and a tokenizer
  whose 300 text ids fit the tiny config's vocabulary of 384 (its <loc>/<seg> pieces come after, unused)."""
  checkpoint.save(path / "params.npz", random_params(config.get("tiny-gemma1-mqa"), seed=3))
  rng = random.Random(0)
  texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) for _ in range(200)]
  make_sentencepiece(texts, path / "tok.model", 300)
  (path / "images").mkdir()
  lines = []
  for i in range(12):
    pixels = np.random.default_rng(i).integers(0, 256, (20 + i, 30 - i, 3), np.uint8)
    Image.fromarray(pixels).save(path / "images" / f"{i}.png")
    suffix = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(i % 4 + 1))
    lines.append(f'{{"image": "images/{i}.png", "prefix": "caption en", "suffix": "{suffix}"}}\n')
  (path / "train.jsonl").write_text("".join(lines))
  return path


def _start(workdir, num, port):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={4 // num}"}
  procs = []
  for pid in range(num):
    log = open(workdir / f"log_{num}_{pid}.txt", "w")
    procs.append((subprocess.Popen([sys.executable, WORKER, str(workdir), str(num), str(pid), str(port)], env=env,
                                   stdout=log, stderr=subprocess.STDOUT), log))
  return procs


def _wait(procs):
  """Waits for all; the first failure or the timeout kills the rest. Fails with every process's log tail."""
  deadline, failed = time.monotonic() + TIMEOUT_S, None
  try:
    while failed is None and any(p.poll() is None for p, _ in procs):
      failed = next((f"exit code {p.returncode}" for p, _ in procs if p.poll() not in (None, 0)), None)
      if time.monotonic() > deadline:
        failed = f"timeout after {TIMEOUT_S}s"
      time.sleep(0.2)
    failed = failed or next((f"exit code {p.returncode}" for p, _ in procs if p.returncode), None)
  finally:
    for p, log in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
      log.close()
  if failed:
    tails = "\n".join(f"--- {os.path.basename(log.name)}\n" + open(log.name).read()[-3000:] for _, log in procs)
    pytest.fail(f"multihost worker failed ({failed}):\n{tails}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  workdir = _workdir(tmp_path_factory.mktemp("multihost"))
  t0 = time.monotonic()
  _wait(_start(workdir, 1, 0) + _start(workdir, 2, _free_port()))  # all three at once: less wall time
  print(f"multihost runs: {time.monotonic() - t0:.1f}s")
  return workdir, *(dict(np.load(workdir / f"result_{n}.npz")) for n in (1, 2))


def _close(a, b, prefix):
  keys = sorted(k for k in a if k.startswith(prefix))
  assert keys and keys == sorted(k for k in b if k.startswith(prefix))
  for k in keys:
    # Per array 64 eps32 * max|a|: params, optimizer moments and losses after a few steps whose gradients the
    # two meshes all-reduce in other orders; a step moves a weight far less than its size, so the gradients'
    # reordering (a few eps32 of max|g|) reaches the params scaled down. Seen: <= 10 eps32 * max|a|.
    assert_close_f32(b[k], a[k], ulps_of_max=64, what=k)


def test_two_processes_take_the_same_steps_as_one(runs):
  workdir, one, two = runs
  _close(one, two, "manual")
  # And both equal the plain single-device step, an independent computation with no mesh at all.
  cfg = config.get("tiny-gemma1-mqa")
  trainable, frozen = train.split(checkpoint.load(workdir / "params.npz", cfg), frozen_dtype=jnp.float32)
  lengths = [(4, 6), (6, 2), (3, 5), (5, 5), (2, 9), (7, 3), (4, 4), (3, 8)]
  for s in range(3):
    trainable, metrics = train.train_step(trainable, frozen, prefix_lm_batch(cfg, lengths, 12, seed=10 + s), 0.1,
                                          cfg=cfg)
    # 64 eps32 of the loss: the same logits, reordered by the mesh (the tiny model's logits < the loss, ~log V).
    assert_close_f32(two["manual_loss"][s], metrics["loss"], ulps_of_max=64, what="manual_loss")
  for k, v in jax.tree_util.tree_flatten_with_path(trainable)[0]:
    name = "manual/" + "/".join(p.key for p in k)
    assert_close_f32(two[name], np.asarray(v), ulps_of_max=64, what=name)  # as in _close
    assert np.abs(np.asarray(v) - one[name.replace("manual/", "init/")]).max() > 1e-4, name  # it did train


def test_fit_checkpoints_and_resumes_across_processes(runs):
  workdir, one, two = runs
  for prefix in ("fit/", "fit_opt/", "fit_loss", "resumed/", "resumed_loss"):
    _close(one, two, prefix)
  # The checkpoint process 0 wrote holds the gathered global params, not one process's shards.
  for k in (k for k in two if k.startswith("fit/")):
    np.testing.assert_array_equal(two["saved/" + k[4:]], two[k], err_msg=k)
  names = sorted(os.listdir(workdir / "run_2" / "checkpoints"))
  assert names == ["LATEST", "step_000003", "step_000004"], names  # keep=2, no temporary folders left


def test_a_signal_to_one_process_stops_all_after_the_same_step(runs):
  # The workers check that every process stopped after the same step, logged it and saved it (one process: step
  # 3, the boundary after the signal; two: step 4, a boundary later). Saved is the state an unbroken run has
  # there: fit's after step 3, and the resumed run's after step 4, bit for bit (same mesh, same steps).
  workdir, one, two = runs
  for result, expected in ((one, "fit/"), (two, "resumed/")):
    keys = [k for k in result if k.startswith("stopped/")]
    assert keys and len(keys) == len([k for k in result if k.startswith(expected)])
    for k in keys:
      np.testing.assert_array_equal(result[k], result[expected + k[len("stopped/"):]], err_msg=k)
  assert sorted(os.listdir(workdir / "stop_2" / "checkpoints")) == ["LATEST", "step_000004"]


def test_each_process_reads_its_contiguous_share(runs):
  workdir = runs[0]
  full = np.load(workdir / "share_1_0.npz")
  shares = [np.load(workdir / f"share_2_{pid}.npz") for pid in range(2)]
  assert sorted(full.files) == sorted(shares[0].files) == sorted(shares[1].files) and len(full.files) == 4 * 5
  for k in full.files:
    assert shares[0][k].shape[0] == shares[1][k].shape[0] == full[k].shape[0] // 2 == 4, k
    np.testing.assert_array_equal(np.concatenate([shares[0][k], shares[1][k]]), full[k], err_msg=k)
