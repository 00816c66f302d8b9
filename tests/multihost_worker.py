"""One process of tests/test_multihost.py's runs:  python multihost_worker.py WORKDIR NUM_PROCESSES PROCESS_ID [PORT]

With NUM_PROCESSES > 1 it joins jax.distributed on localhost:PORT (CPU collectives: gloo, jax 0.10's default).
All devices of all processes form one "data" mesh. From the params in WORKDIR/params.npz (the tiny config) it trains:
  manual  3 SGD steps of train.make_train_step on fixed prefix-LM batches, each process feeding its rows;
  fit     loop.fit for 3 AdamW steps on WORKDIR/train.jsonl through data.train_batches (each process's share by
          jax.process_index), checkpointing at steps 2 and 3; then loop.fit to step 4, resuming from step 3.
Process 0 writes WORKDIR/result_{NUM_PROCESSES}.npz; each process writes the batches it was fed to
WORKDIR/share_{NUM_PROCESSES}_{PROCESS_ID}.npz. A failed check exits non-zero.
"""

import dataclasses
import os
import signal
import sys

import jax

WORKDIR, NUM, PID = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if NUM > 1:
  jax.distributed.initialize(coordinator_address=f"localhost:{sys.argv[4]}", num_processes=NUM, process_id=PID,
                             initialization_timeout=120)
jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from helpers import prefix_lm_batch  # noqa: E402  (tests/ is this script's sys.path[0])
from pgjax import checkpoint, config, data, finetune, loop, rundir, sharding, train  # noqa: E402
from pgjax.tokenizer import Tokenizer  # noqa: E402

CFG = config.get("tiny-gemma1-mqa")
B, MAX_LEN = 8, 24
LENGTHS = [(4, 6), (6, 2), (3, 5), (5, 5), (2, 9), (7, 3), (4, 4), (3, 8)]

assert (jax.process_index(), jax.process_count()) == (PID, NUM), (jax.process_index(), jax.process_count())
assert jax.device_count() == 4 and jax.local_device_count() == 4 // NUM, (jax.devices(), jax.local_devices())


def place(host_tree, shardings):
  """Host numpy leaves -> global arrays: each process fills only its own devices' shards."""
  sh = checkpoint.flatten(shardings)
  return checkpoint.unflatten({k: jax.make_array_from_callback(v.shape, sh[k], lambda idx, v=v: v[idx])
                               for k, v in checkpoint.flatten(host_tree).items()})


def gather(tree, prefix):
  """Global arrays -> {prefix/path: numpy}, on every process (a collective: all processes call it)."""
  return {f"{prefix}/{k}": np.asarray(multihost_utils.process_allgather(v, tiled=True))
          for k, v in checkpoint.flatten(tree).items()}


def local_rows(batch):
  n = B // NUM
  return {k: v[PID * n:(PID + 1) * n] for k, v in batch.items()}


mesh = sharding.make_mesh()
params = checkpoint.load(os.path.join(WORKDIR, "params.npz"), CFG)  # random_params would compile for 30 s
host = jax.tree.map(np.asarray, train.split(params, frozen_dtype=jnp.float32))
tr_sh, fr_sh = (sharding.param_shardings(t, mesh) for t in host)
frozen = place(host[1], fr_sh)
out = {f"init/{k}": v for k, v in checkpoint.flatten(host[0]).items()}

# manual: the train step alone, fed through sharding.shard_batch.
step = train.make_train_step(CFG, mesh=mesh, trainable_shardings=tr_sh, frozen_shardings=fr_sh)
trainable, losses = place(host[0], tr_sh), []
for s in range(3):
  batch = sharding.shard_batch(local_rows(prefix_lm_batch(CFG, LENGTHS, 12, seed=10 + s)), mesh)
  trainable, _, metrics = step(trainable, frozen, batch, 0.1, None)
  losses.append(float(metrics["loss"]))
out.update(gather(trainable, "manual"), manual_loss=np.array(losses))

# fit: the loop with the real data pipeline, checkpoints and resume.
tok, rows = Tokenizer(os.path.join(WORKDIR, "tok.model")), data.read_jsonl(os.path.join(WORKDIR, "train.jsonl"))
fed = {}


def batches_from(start):
  with data.train_batches(rows, tok, batch_size=B, size=CFG.vision.image_size, max_len=MAX_LEN, seed=0,
                          start_step=start) as it:
    for s, b in enumerate(it, start + 1):
      assert b["text"].max() < CFG.llm.vocab_size
      fed[s] = b
      yield sharding.shard_batch(b, mesh)


# eps=1e-3, not 1e-8: Adam's first step is g / (|g| + eps), about sign(g), so a gradient that is float noise around 0
# (the two runs all-reduce in different orders) would move a weight by +-lr; a larger eps keeps the update
# Lipschitz in the gradient, so float32 tolerances apply.
kw = dict(lr_schedule=train.schedule("cosine", 0.05, 4), out_dir=os.path.join(WORKDIR, f"run_{NUM}"), mesh=mesh)
tc = finetune.TrainConfig(steps=3, optimizer=train.Optimizer(name="adamw", eps=1e-3), save_every=2)
trainable, opt_state, hist = loop.fit(CFG, tc, place(host[0], tr_sh), frozen, batches_from, **kw)
assert hist.steps == [1, 2, 3] and rundir.latest(kw["out_dir"]).endswith("step_000003"), hist.steps
out.update(gather(trainable, "fit"), fit_loss=np.array(hist.loss))
out.update(gather({f"{i:04d}": x for i, x in enumerate(jax.tree.leaves(opt_state))}, "fit_opt"))
saved = checkpoint.load(os.path.join(rundir.latest(kw["out_dir"]), "trainable.npz"))
out.update({f"saved/{k}": np.asarray(v) for k, v in checkpoint.flatten(saved).items()})
trainable, _, hist = loop.fit(CFG, dataclasses.replace(tc, steps=4), place(host[0], tr_sh), frozen, batches_from, **kw)
assert hist.steps == [4], hist.steps
out.update(gather(trainable, "resumed"), resumed_loss=np.array(hist.loss))

# stop: a signal to one process stops every process after the same step, saved and logged.
def signalled_batches(start):
  for s, b in zip(range(start + 1, 100), batches_from(start)):
    if s == 3 and PID == NUM - 1:
      os.kill(os.getpid(), signal.SIGTERM)
    yield b


logged, expect = [], 3 if NUM == 1 else 4
kw["out_dir"] = os.path.join(WORKDIR, f"stop_{NUM}")
try:
  loop.fit(CFG, dataclasses.replace(tc, steps=6, save_every=0), place(host[0], tr_sh), frozen, signalled_batches,
           on_step=lambda step, m: logged.append(step), **kw)
  raise AssertionError("no Stopped")
except loop.Stopped as e:
  assert (e.signum, e.step, logged) == (signal.SIGTERM, expect, list(range(1, expect + 1))), (e, e.step, logged)
assert rundir.latest(kw["out_dir"]).endswith(f"step_{expect:06d}"), rundir.latest(kw["out_dir"])
stopped = checkpoint.load(os.path.join(rundir.latest(kw["out_dir"]), "trainable.npz"))
out.update({f"stopped/{k}": np.asarray(v) for k, v in checkpoint.flatten(stopped).items()})

np.savez(os.path.join(WORKDIR, f"share_{NUM}_{PID}.npz"),
         **{f"{s}/{k}": v for s, b in sorted(fed.items()) for k, v in b.items()})
if PID == 0:
  np.savez(os.path.join(WORKDIR, f"result_{NUM}.npz"), **out)
print(f"process {PID} of {NUM}: done, losses {losses}", flush=True)
