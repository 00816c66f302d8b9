"""Times LoRA and quantized-base training steps against the plain attention-only step, in one run.

  python bench/adapters.py                        # bench-small, batch 4, text 64; LoRA rank 16
  python bench/adapters.py --config tiny-gemma1-mqa --reps 2     # a smoke run

The variants, each one jitted step (train.make_train_step, SGD, the same batch):
  plain       attention-only SGD, frozen float16 (the recipe)
  int8, int4  attention-only SGD, the other matmul weights quantized
  lora        LoRA on the attention, every param frozen in float16
  qlora8, qlora4  LoRA on an int8 / int4 base
The steps are timed round-robin (plain, then each variant, --reps times), so drift in the machine's speed
hits all alike; each variant's figure is its median over the plain step's median. One JSON line.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from train_step import make_batch  # noqa: E402

from pgjax import config, host, lora, paligemma, quant, train, tree  # noqa: E402

VARIANTS = ("plain", "int8", "int4", "lora", "qlora8", "qlora4")


def setup(variant: str, params, cfg, rank: int):
  """(trainable, frozen, step) of one variant."""
  bits = {"int8": 8, "int4": 4, "qlora8": 8, "qlora4": 4}.get(variant, 0)
  if variant in ("lora", "qlora8", "qlora4"):
    frozen = tree.unflatten({k: v.astype(jnp.float16) for k, v in tree.flatten(params).items()})
    trainable = lora.init(jax.random.key(0), params, rank=rank)
    alpha = 2.0 * rank
  else:
    trainable, frozen = train.split(params, frozen_dtype=jnp.float16)
    alpha = None
  if bits:
    frozen = jax.device_put(quant.quantize(frozen, bits=bits))
  return trainable, frozen, train.make_train_step(cfg, lora_alpha=alpha)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="bench-small")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--text-len", type=int, default=64)
  ap.add_argument("--prefix-len", type=int, default=16)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32")
  ap.add_argument("--variants", default=",".join(VARIANTS))
  args = ap.parse_args(argv)
  cfg = config.get(args.config).with_compute_dtype(args.compute_dtype)
  params = jax.jit(paligemma.init, static_argnums=1)(jax.random.key(0), cfg)
  batch = make_batch(cfg, args.batch, args.text_len, args.prefix_len)
  variants = args.variants.split(",")
  if variants[0] != "plain":
    raise SystemExit("--variants must start with plain, the reference")
  state, first = {}, {}
  for v in variants:
    trainable, frozen, step = setup(v, params, cfg, args.rank)
    opt = train.init_opt_state(train.Optimizer(), trainable, cfg)
    state[v] = [trainable, frozen, step, opt]

  def run(v):
    trainable, frozen, step, opt = state[v]
    trainable, opt, metrics = step(trainable, frozen, batch, 1e-3, opt)
    jax.block_until_ready((trainable, metrics))
    state[v][0], state[v][3] = trainable, opt
    return metrics

  for v in variants:
    first[v] = common.timed(run, v)[0]
    run(v)  # warm
  times = {v: [] for v in variants}
  for _ in range(args.reps):
    for v in variants:
      times[v].append(common.timed(run, v)[0])
  st = {v: common.stats(t) for v, t in times.items()}
  ratios = {f"{v}_to_plain_ratio": st[v]["median_s"] / st["plain"]["median_s"] for v in variants[1:]}
  rec = common.emit("adapters", {"name": args.config, "batch": args.batch, "text_len": args.text_len,
                                 "rank": args.rank, "compute_dtype": args.compute_dtype, "reps": args.reps},
                    steps=st, first_step_s=first, **ratios)
  for k, r in ratios.items():
    common.note(f"{k}: {r:.3f}")
  return rec


if __name__ == "__main__":
  host.tune_allocator()
  main()
