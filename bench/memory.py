"""Compiled memory and compile time of the full-size attention-only train step, without any weights.

  python bench/memory.py              # default subset (under a minute on 2 CPU cores): 3B-224 batch 8 with
                                      # and without remat; with remat 3B-224 batch 16, 3B-448, PG2 3B and 10B
  python bench/memory.py --all        # the grid: presets x batch (1, 8, 16) x remat (none, full)
  python bench/memory.py --config tiny-gemma1-mqa --batches 2 --text-len 16     # a smoke run

The param tree comes from `jax.eval_shape` (frozen float16, trainable float32, as the fine-tuning recipe);
the step is lowered on ShapeDtypeStructs and compiled for the default device (one device), and XLA's
`memory_analysis()` gives the argument, output, alias (donated) and temp sizes. Peak = argument + output -
alias + temp. The compile is for this machine's backend: a CPU compile estimates a GPU's buffers, a GPU
compile measures them. One JSON line per case, then a table of what fits which GPU on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from pgjax import config, host, lora, paligemma, quant, train  # noqa: E402

# Memory as the devices report it (nvidia-smi's total), GiB.
DEVICES = {"T4-16GB": 15.0, "A10G-24GB": 22.5, "H100-80GB": 79.6}
# JAX preallocates 75% of a GPU by default; XLA_PYTHON_CLIENT_MEM_FRACTION=.9 raises it. Above 90% we call
# it no fit: the CUDA context, cuDNN/cuBLAS workspaces and fragmentation need the rest.
DEFAULT_FRACTION, MAX_FRACTION = 0.75, 0.90

# (preset, text length) pairs.
ALL_MODELS = [("paligemma-3b-224", 128), ("paligemma-3b-448", 128), ("paligemma-3b-448", 512),
              ("paligemma-3b-896", 128), ("paligemma-3b-896", 512), ("paligemma2-3b-224", 128),
              ("paligemma2-10b-224", 128)]
DEFAULT_CASES = [("paligemma-3b-224", 128, 8, "none"), ("paligemma-3b-224", 128, 8, "full"),
                 ("paligemma-3b-224", 128, 16, "full"), ("paligemma-3b-448", 128, 8, "full"),
                 ("paligemma-3b-896", 128, 8, "full"),
                 ("paligemma2-3b-224", 128, 8, "full"), ("paligemma2-10b-224", 128, 8, "full")]


def fits(peak_bytes: float) -> dict:
  """Per device: "yes" within JAX's default 75% preallocation, "yes (mem fraction .9)" within 90%, else "no"."""
  out = {}
  for name, gib in DEVICES.items():
    frac = peak_bytes / (gib * common.GiB)
    out[name] = "yes" if frac <= DEFAULT_FRACTION else "yes (mem fraction .9)" if frac <= MAX_FRACTION else "no"
  return out


def measure(name: str, text_len: int, batch: int, remat: str, compute_dtype: str = "float32", lora_rank: int = 0,
            quantize: int = 0) -> dict:
  cfg = dataclasses.replace(config.get(name), remat=remat).with_compute_dtype(compute_dtype)
  sds = jax.ShapeDtypeStruct
  params = jax.eval_shape(lambda key: paligemma.init(key, cfg), jax.random.key(0))
  frozen_dtype = "float16"  # as the recipe keeps them (TrainConfig.frozen_dtype), whatever the compute dtype
  if lora_rank:  # every param frozen; adapters on the LLM attention (lora.TARGETS), float32
    frozen = jax.tree.map(lambda x: sds(x.shape, jnp.dtype(frozen_dtype)), params)
    trainable = jax.eval_shape(lambda p: lora.init(jax.random.key(0), p, rank=lora_rank), params)
  else:
    trainable, frozen = jax.eval_shape(lambda p: train.split(p, frozen_dtype=jnp.dtype(frozen_dtype)), params)
  if quantize:
    frozen = quant.quantize_shapes(frozen, quantize)
  s = cfg.vision.image_size
  batch_sds = {"image": sds((batch, s, s, 3), jnp.float32),
               **{k: sds((batch, text_len), jnp.int32) for k in ("text", "mask_ar", "mask_loss", "mask_input")}}
  step = train.make_train_step(cfg, lora_alpha=2.0 * lora_rank if lora_rank else None)
  opt_state = jax.eval_shape(lambda t: train.init_opt_state(train.Optimizer(), t, cfg), trainable)
  lower_s, lowered = common.timed(lambda: step.lower(trainable, frozen, batch_sds, sds((), jnp.float32), opt_state))
  compile_s, compiled = common.timed(lowered.compile)
  ma = compiled.memory_analysis()
  arg, out, alias, temp = (int(getattr(ma, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp"))
  peak = arg + out - alias + temp
  nbytes = lambda tree: sum(x.size * (x.dtype.itemsize if x.dtype != jnp.int4 else 0.5) for x in jax.tree.leaves(tree))
  return {"config": {"name": name, "batch": batch, "text_len": text_len, "remat": remat, "image_tokens":
                     cfg.num_image_tokens, "frozen_dtype": f"int{quantize}" if quantize else frozen_dtype,
                     "trainable_dtype": "float32", "compute_dtype": compute_dtype, "lora_rank": lora_rank},
          "argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
          "generated_code_bytes": int(getattr(ma, "generated_code_size_in_bytes", 0)),
          "peak_bytes": peak, "peak_gib": peak / common.GiB, "trainable_bytes": nbytes(trainable),
          "frozen_bytes": nbytes(frozen), "lower_s": lower_s, "compile_s": compile_s, "fits": fits(peak)}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--all", action="store_true", help="the full grid (tens of minutes on 2 cores)")
  ap.add_argument("--compute-dtypes", default="float32",
                  help="comma-separated: each case at each (float32, bfloat16, float16)")
  ap.add_argument("--config", action="append", help="preset(s) instead of the default subset")
  ap.add_argument("--batches", default="1,8,16", help="with --config or --all")
  ap.add_argument("--text-len", type=int, default=128, help="with --config")
  ap.add_argument("--remat", default="none,full", help="with --config or --all")
  ap.add_argument("--lora", type=int, default=0, help="LoRA adapters of this rank on the attention instead of "
                  "attention-only training")
  ap.add_argument("--quantize", type=int, default=0, choices=(0, 8, 4), help="the frozen matmul weights in int8/int4")
  args = ap.parse_args(argv)
  batches = [int(b) for b in args.batches.split(",")]
  remats = args.remat.split(",")
  if args.config:
    cases = [(n, args.text_len, b, r) for n in args.config for b in batches for r in remats]
  elif args.all:
    cases = [(n, t, b, r) for n, t in ALL_MODELS for b in batches for r in remats]
  else:
    cases = DEFAULT_CASES
  rows = []
  for name, text_len, batch, remat in cases:
    for compute_dtype in args.compute_dtypes.split(","):
      common.note(f"compiling {name} text {text_len} batch {batch} remat {remat} compute {compute_dtype}")
      rec = measure(name, text_len, batch, remat, compute_dtype, args.lora, args.quantize)
      rows.append(common.emit("memory", rec.pop("config"), **rec))
  # The table: what fits, per case.
  devs = list(DEVICES)
  head = f"{'config':<20} {'train':>9} {'text':>4} {'batch':>5} {'remat':>5} {'compute':>8} {'peak GiB':>8} {'temp GiB':>8} {'compile s':>9}  "
  common.note("\n" + head + "  ".join(f"{d:>12}" for d in devs))
  for r in rows:
    c = r["config"]
    what = (f"lora{c['lora_rank']}" if c["lora_rank"] else "attn") + "/" + c["frozen_dtype"].replace("float", "f")
    common.note(f"{c['name']:<20} {what:>9} {c['text_len']:>4} {c['batch']:>5} {c['remat']:>5} {c['compute_dtype']:>8} "
                f"{r['peak_gib']:>8.2f} "
                f"{r['temp_bytes'] / common.GiB:>8.2f} {r['compile_s']:>9.1f}  "
                + "  ".join(f"{r['fits'][d].replace(' (mem fraction .9)', '*'):>12}" for d in devs))
  common.note(f"fits: peak <= {DEFAULT_FRACTION:.0%} of device memory (JAX's default preallocation); "
              f"*: <= {MAX_FRACTION:.0%}, needs XLA_PYTHON_CLIENT_MEM_FRACTION=.9")


if __name__ == "__main__":
  host.tune_allocator()  # as the `pgjax` command runs: see pgjax/host.py (PGJAX_TUNE_MALLOC=0 to compare)
  main()
