"""Shared by the benchmarks: machine and version info, timing statistics, one JSON line per measurement.

Every script prints lines of the form
  {"bench": name, "machine": {...}, "device": ..., "versions": {...}, "config": {...}, <figures>, <*ratio*>}
so that runs on different machines can be collected and compared by a program.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import sys
import time

import jax

from pgjax import host

GiB = 1 << 30

# Off unless asked for: the first-call figures ("*_first_s") time compilation, and a cache would make them time
# loading. The test suite sets it (one cache shared by every script it runs) so that the programs two scripts
# have in common compile once. Every record says which cache, if any, it ran with.
CACHE_ENV = "PGJAX_BENCH_COMPILE_CACHE"
COMPILE_CACHE = host.enable_compilation_cache(os.environ.get(CACHE_ENV) or None)

# Dense peaks by device kind, in FLOP/s, from the vendors' datasheets (no sparsity). Keys are matched as whole
# words of jax's device_kind ("NVIDIA H100 PCIe", "NVIDIA L40S", "Tesla T4"), first match wins, so the
# specific variants come before the family. "f32" is the plain (non-tensor-core) rate, "tf32" what float32
# matmuls reach where XLA/cuBLAS use TF32 tensor cores (JAX's default precision on Ampere and later); devices
# without TF32 (T4, V100) run float32 matmuls at the "f32" rate whatever the precision.
GPU_PEAKS = [
    ("H100 PCIe", {"bf16": 756e12, "f16": 756e12, "tf32": 378e12, "f32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "f16": 835e12, "tf32": 418e12, "f32": 60e12}),
    ("H200 NVL", {"bf16": 835e12, "f16": 835e12, "tf32": 418e12, "f32": 60e12}),
    ("H200", {"bf16": 989e12, "f16": 989e12, "tf32": 495e12, "f32": 67e12}),  # SXM
    ("H100", {"bf16": 989e12, "f16": 989e12, "tf32": 495e12, "f32": 67e12}),  # SXM
    ("A100", {"bf16": 312e12, "f16": 312e12, "tf32": 156e12, "f32": 19.5e12}),
    # The A10G has no public datasheet; these are the A10's rates (same GA102 chip).
    ("A10G", {"bf16": 125e12, "f16": 125e12, "tf32": 62.5e12, "f32": 31.2e12}),
    ("A10", {"bf16": 125e12, "f16": 125e12, "tf32": 62.5e12, "f32": 31.2e12}),
    ("L40S", {"bf16": 366e12, "f16": 366e12, "tf32": 183e12, "f32": 91.6e12}),
    ("L4", {"bf16": 121e12, "f16": 121e12, "tf32": 60e12, "f32": 30.3e12}),
    ("T4", {"f16": 65e12, "f32": 8.1e12}),  # no bf16, no TF32
    ("V100", {"f16": 125e12, "f32": 15.7e12}),  # no bf16, no TF32
]


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


# The CPU features that decide whether low-precision dots are fast (host.auto_compute_dtype probes the speed).
CPU_DOT_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "avx_vnni", "avx512f", "avx2")


def cpu_flags() -> list[str]:
  """Which of CPU_DOT_FLAGS /proc/cpuinfo lists (empty where it cannot be read)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          have = set(line.split(":", 1)[1].split())
          return [flag for flag in CPU_DOT_FLAGS if flag in have]
  except OSError:
    pass
  return []


def _cpu_snapshot():
  """(machine busy seconds, machine total seconds, CPU seconds of this process and its waited-for children),
  or None off Linux."""
  try:
    with open("/proc/stat") as f:
      user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
  except (OSError, ValueError):
    return None
  hz = os.sysconf("SC_CLK_TCK")
  busy = user + nice + system + irq + softirq + steal
  t = os.times()
  return busy / hz, (busy + idle + iowait) / hz, t.user + t.system + t.children_user + t.children_system


_SNAPSHOT = _cpu_snapshot()


def others_cpu_share() -> float | None:
  """The share of the machine's CPU time that other processes used since the last call (first: since this
  module was imported): 0 on a quiet machine; on a shared one, a warning that timings are inflated."""
  global _SNAPSHOT
  now = _cpu_snapshot()
  if now is None or _SNAPSHOT is None or now[1] <= _SNAPSHOT[1]:
    return None
  busy, total, own = (a - b for a, b in zip(now, _SNAPSHOT))
  _SNAPSHOT = now
  return round(max(0.0, busy - own) / total, 3)


def machine() -> dict:
  return {"platform": platform.platform(), "cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
          "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
          "others_cpu_share": others_cpu_share(), "malloc_tunables": host.allocator_state()}


def device_kind() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{d.device_kind}"


def versions(*extra: str) -> dict:
  out = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "numpy", *extra):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def stats(seconds: list[float]) -> dict:
  """Median and spread (min, max, interquartile range) of repeated timings, in seconds."""
  s = sorted(seconds)
  q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
  return {"median_s": statistics.median(s), "min_s": s[0], "max_s": s[-1], "iqr_s": q[2] - q[0], "reps": len(s)}


def timed(fn, *args, **kw):
  """(seconds, result) of one call; the result must already be synced by `fn` (block_until_ready)."""
  t0 = time.perf_counter()
  out = fn(*args, **kw)
  return time.perf_counter() - t0, out


def emit(bench: str, config: dict, extra_versions: tuple = (), device: str | None = None, **figures) -> dict:
  """Prints one JSON line and returns it as a dict. Non-finite floats become null (JSON has no NaN).
  `device`: as `device_kind()` says it, from a process that measured on it (so this one need not start a
  backend, which on a GPU would take most of its memory)."""
  def clean(x):
    if isinstance(x, float) and not math.isfinite(x):
      return None
    if isinstance(x, dict):
      return {k: clean(v) for k, v in x.items()}
    return x
  record = {"bench": bench, "machine": machine(), "device": device or device_kind(), "versions": versions(*extra_versions),
            "compile_cache": jax.config.jax_compilation_cache_dir or None, "config": config,
            **{k: clean(v) for k, v in figures.items()}}
  print(json.dumps(record), flush=True)
  return record


def note(msg: str) -> None:
  """Human-readable progress goes to stderr, so stdout stays one JSON object per line."""
  print(msg, file=sys.stderr, flush=True)


def cpu_matmul_peak(n: int = 2048, reps: int = 10) -> float:
  """Median FLOP/s of a jitted float32 n x n @ n x n matmul on the default device: the CPU's practical peak."""
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(lambda a, b: a @ b)
  mm(a, b).block_until_ready()
  times = [timed(lambda: mm(a, b).block_until_ready())[0] for _ in range(reps)]
  return 2 * n ** 3 / statistics.median(times)


def gpu_peaks(device_kind: str) -> tuple[str | None, dict | None]:
  """(GPU_PEAKS key, its rates) of the first key that stands as whole words in `device_kind`, else (None, None)."""
  for key, peaks in GPU_PEAKS:
    if re.search(rf"(?<![\w]){re.escape(key)}(?![\w])", device_kind):
      return key, peaks
  return None, None


def device_peak(dtype: str) -> tuple[float | None, str]:
  """(peak FLOP/s, where it comes from) for matmuls of `dtype` ("f32", "tf32", "bf16", "f16") on device 0."""
  d = jax.devices()[0]
  if d.platform == "cpu":
    return cpu_matmul_peak(), "measured: jitted 2048^3 float32 matmul, median of 10"
  return gpu_peak(d.device_kind, dtype)


def gpu_peak(device_kind: str, dtype: str) -> tuple[float | None, str]:
  """(peak FLOP/s, where it comes from) for matmuls of `dtype` on a GPU of that kind, from GPU_PEAKS."""
  key, peaks = gpu_peaks(device_kind)
  if peaks is None:
    return None, f"no known peak for {device_kind}"
  if dtype == "tf32" and "tf32" not in peaks:
    return peaks["f32"], f"datasheet: {key} dense f32 (no TF32 cores: float32 matmuls run at the FP32 rate)"
  if dtype in peaks:
    return peaks[dtype], f"datasheet: {key} dense {dtype}"
  return None, f"datasheet: {key} has no {dtype} rate"


def torch_setup():
  """Imports torch with one intra-op thread per CPU core (its default can be lower in containers)."""
  import torch
  torch.set_num_threads(os.cpu_count())
  return torch
