"""Checkpoint load time and peak host memory, on a full-size synthetic float16 checkpoint.

  python bench/load.py                          # paligemma-3b-224, ~5.5 GiB written to a temp dir, then deleted
  python bench/load.py --path /big/disk --keep  # write there and keep the file (reused if it is already there)
  python bench/load.py --config tiny-gemma1-mqa # a smoke run
  python bench/load.py --scale 0.25             # a quarter of the layers and of the vocabulary (~1.4 GiB)
  python bench/load.py --config paligemma2-10b-224 --quantize 4   # int4 while reading (checkpoint.load(quantize=))

The file is written by `checkpoint.save` from leaves that make their random data only when save asks for
them, so the whole tree is never in memory. Each measurement runs `checkpoint.load` in a fresh Python
process, which reports its peak resident memory from /proc/self/status VmHWM (ru_maxrss would carry over a
forking parent's peak). Two runs: "cold" after asking the kernel to drop the file's cached pages
(posix_fadvise DONTNEED; other files' cache is left alone), then "warm" with the file in the page cache.
One JSON line per run. On a GPU the params land in device memory, so host RSS excludes them.
With --quantize the matmul weights are quantized leaf by leaf as they are read; the record then also gives
the budget the load should stay within, the quantized tree + the largest leaf as stored (float16) + 1 GiB
(`rss_budget_bytes`, `within_budget`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402


def scaled_config(name: str, scale: float):
  """The preset, or with `scale` < 1 fewer layers in both towers and a smaller vocabulary (per-layer leaf
  shapes unchanged), for machines without room for the full file."""
  from pgjax import config
  cfg = config.get(name)
  if scale == 1.0:
    return cfg
  if not 0 < scale < 1:
    raise SystemExit(f"--scale must be in (0, 1], got {scale}")
  v, t = cfg.vision, cfg.llm
  return dataclasses.replace(cfg, vision=dataclasses.replace(v, depth=max(1, round(v.depth * scale))),
                             llm=dataclasses.replace(t, depth=max(1, round(t.depth * scale)),
                                                     vocab_size=max(256, round(t.vocab_size * scale))))


class RandomLeaf:
  """A leaf whose data is made when `checkpoint.save` reads it (through `__array__`), then dropped."""

  CHUNK = 1 << 24  # elements drawn at a time, so drawing never holds a float32 copy of a whole leaf

  def __init__(self, shape, dtype, seed):
    self.shape, self.dtype, self.seed = tuple(shape), np.dtype(dtype), seed

  def __array__(self, dtype=None, copy=None):
    out = np.empty(self.shape, self.dtype)
    flat = out.reshape(-1)
    rng = np.random.default_rng(self.seed)
    for i in range(0, flat.size, self.CHUNK):
      n = min(self.CHUNK, flat.size - i)
      flat[i:i + n] = rng.standard_normal(n, np.float32) * 0.02
    return out if dtype is None else out.astype(dtype)


def write_checkpoint(path: str, cfg) -> tuple[float, int]:
  from pgjax import checkpoint
  shapes = checkpoint.manifest(cfg)
  leaves = {k: RandomLeaf(s, np.float16, i) for i, (k, s) in enumerate(sorted(shapes.items()))}
  t0 = time.perf_counter()
  checkpoint.save(path, leaves)
  return time.perf_counter() - t0, sum(math.prod(s) * 2 for s in shapes.values())


def status_bytes(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024  # reported in kB
  raise RuntimeError(f"{field} not in /proc/self/status")


def child(path: str, name: str, scale: float, quantize: int) -> None:
  """Runs in the fresh process: load, then report timings and memory as one JSON object."""
  import jax
  from pgjax import checkpoint
  cfg = scaled_config(name, scale)
  jax.devices()  # start the backend before the baseline, so it is not counted as loading
  before = status_bytes("VmRSS")
  t0 = time.perf_counter()
  params = checkpoint.load(path, cfg, quantize=quantize or None)
  load_s = time.perf_counter() - t0
  leaves = jax.tree.leaves(params)  # a quantized weight's codes and scales are two leaves
  params_bytes = sum(x.nbytes for x in leaves)
  stored = max(math.prod(s) * 2 for s in checkpoint.manifest(cfg).values())  # float16 in the file
  budget = {} if not quantize else {"largest_stored_leaf_bytes": stored, "rss_budget_bytes": params_bytes + stored + common.GiB,
                                    "within_budget": status_bytes("VmHWM") <= params_bytes + stored + common.GiB}
  print(json.dumps({"load_s": load_s, "peak_rss_bytes": status_bytes("VmHWM"), "rss_before_bytes": before,
                    "rss_after_bytes": status_bytes("VmRSS"), "num_leaves": len(leaves),
                    "params_bytes": params_bytes, "largest_leaf_bytes": max(x.nbytes for x in leaves), **budget,
                    "params_device": str(leaves[0].devices().pop().platform), "device": common.device_kind()}))


def drop_page_cache(path: str) -> bool:
  if not hasattr(os, "posix_fadvise"):
    return False
  fd = os.open(path, os.O_RDONLY)
  try:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
  finally:
    os.close(fd)
  return True


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="paligemma-3b-224")
  ap.add_argument("--scale", type=float, default=1.0, help="fraction of layers and vocabulary to keep (smoke tests)")
  ap.add_argument("--path", help="directory for the checkpoint (default: a new temp dir)")
  ap.add_argument("--keep", action="store_true", help="keep the file (and reuse it next time)")
  ap.add_argument("--quantize", type=int, choices=(0, 8, 4), default=0,
                  help="quantize the matmul weights to int8 / int4 while loading (0: float16 as stored)")
  ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: the measuring subprocess
  args = ap.parse_args(argv)
  if args.child:
    return child(args.child, args.config, args.scale, args.quantize)

  cfg = scaled_config(args.config, args.scale)
  from pgjax import checkpoint
  need = sum(math.prod(s) * 2 for s in checkpoint.manifest(cfg).values())
  directory = args.path or tempfile.mkdtemp(prefix="pgjax-bench-load-")
  os.makedirs(directory, exist_ok=True)
  tag = args.config + ("" if args.scale == 1.0 else f"-scale{args.scale:g}")
  path = os.path.join(directory, f"{tag}.f16.npz")
  try:
    if os.path.exists(path) and args.keep:
      write_s = None
      common.note(f"reusing {path}")
    else:
      free = shutil.disk_usage(directory).free
      margin = 256 << 20  # zip headers, and room for everything else on the disk
      if free < need + margin:
        raise SystemExit(f"not enough free disk in {directory}: the checkpoint needs {need / common.GiB:.2f} GiB "
                         f"(+0.25 GiB margin), {free / common.GiB:.2f} GiB is free. Use --path on a bigger disk or "
                         f"--scale to write a smaller file.")
      common.note(f"writing {need / common.GiB:.2f} GiB to {path}")
      write_s, _ = write_checkpoint(path, cfg)
    size = os.path.getsize(path)
    for cache in ("cold", "warm"):
      dropped = drop_page_cache(path) if cache == "cold" else False
      common.note(f"loading ({cache}) in a fresh process")
      out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", path, "--config", args.config,
                            "--scale", str(args.scale), "--quantize", str(args.quantize)], capture_output=True, text=True, check=False)
      if out.returncode:
        raise SystemExit(f"the loading process failed ({out.returncode}):\n{out.stderr[-4000:]}")
      r = json.loads(out.stdout.strip().splitlines()[-1])
      # The device as the child saw it: this process never starts a backend, which on a GPU would preallocate
      # most of its memory while the next child loads.
      device = r.pop("device")
      over = r["peak_rss_bytes"] - r["params_bytes"]
      common.emit("load", {"name": args.config, "scale": args.scale, "dtype": "float16", "file_bytes": size,
                           "quantize": args.quantize,
                           "page_cache": "dropped (fadvise)" if dropped else cache}, device=device,
                  write_s=write_s, write_gib_per_s=size / common.GiB / write_s if write_s else None,
                  **r, load_gib_per_s=size / common.GiB / r["load_s"], peak_rss_gib=r["peak_rss_bytes"] / common.GiB,
                  params_gib=r["params_bytes"] / common.GiB, rss_over_params_gib=over / common.GiB,
                  rss_over_baseline_gib=(r["peak_rss_bytes"] - r["rss_before_bytes"]) / common.GiB)
  finally:
    if not args.keep:
      if args.path:
        with contextlib.suppress(FileNotFoundError):
          os.unlink(path)
      else:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
  common.host.tune_allocator()  # as the `pgjax` command runs: see pgjax/host.py (PGJAX_TUNE_MALLOC=0 to compare)
  main()
