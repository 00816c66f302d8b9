"""Process-level settings for the host: glibc's allocator, JAX's persistent compilation cache, XLA:CPU's
compile options for the train step, and what compute dtype "auto" means on this machine.

Nothing here imports jax at module level, so a program can call `tune_allocator()` first thing.

Why the allocator: XLA:CPU allocates an executable's temporaries afresh on every call and frees them after
(hundreds of MB for bench-small's train step). glibc serves blocks over its mmap threshold with fresh `mmap`s
and returns them with `munmap`, so every step faults every page of them in again, 4 KiB at a time, a large
share of a step's time spent in the kernel on a small CPU. Hugepages for those blocks (glibc's `hugetlb=1`:
it madvises them, used where THP is "madvise" or "always"), and keeping blocks under 32 MiB on the heap
rather than unmapping them, remove nearly all of those faults (the figures: bench/README.md, "Why the code
is laid out as it is"). glibc reads its tunables only when a process starts, so `tune_allocator`
re-executes the program once with them set.
"""

from __future__ import annotations

import functools
import os
import platform
import sys

# hugetlb=1: madvise(MADV_HUGEPAGE) on mmapped blocks. mmap_threshold (32 MiB, glibc's maximum) and
# trim_threshold: blocks up to 32 MiB come from the heap and freed heap memory is kept, not returned.
MALLOC_TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"

# Opt-outs: PGJAX_TUNE_MALLOC=0 keeps the process's allocator as it is; PGJAX_COMPILE_CACHE=off (or a path).
TUNE_ENV = "PGJAX_TUNE_MALLOC"
CACHE_ENV = "PGJAX_COMPILE_CACHE"


def allocator_env(environ=None) -> dict | None:
  """The environment to re-execute with, or None where there is nothing to do: not Linux with glibc, the
  user set GLIBC_TUNABLES themselves (theirs win, and it marks a process already re-executed), or
  PGJAX_TUNE_MALLOC=0."""
  environ = os.environ if environ is None else environ
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return None
  if "GLIBC_TUNABLES" in environ or environ.get(TUNE_ENV, "1") == "0":
    return None
  return {**environ, "GLIBC_TUNABLES": MALLOC_TUNABLES}


def tune_allocator() -> None:
  """Re-executes this program (same interpreter, flags and arguments) with MALLOC_TUNABLES, once; does
  nothing where `allocator_env` says so. Call it before any work: the process is replaced."""
  env = allocator_env()
  if env is None or sys.argv[:1] in ([""], ["-"]):  # interactive, or a script read from stdin: cannot restart
    return
  argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], env)


# XLA:CPU's legacy fusion emitters compile the train step in well under the time of the default (MLIR) ones,
# with the same step time and the same numbers (measured: bench/README.md, "Why the code is laid out as it is").
_CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


@functools.cache
def compiler_options() -> dict:
  """Compile options for jitted training steps: `_CPU_COMPILER_OPTIONS` where JAX's default backend is the
  CPU and this XLA still knows them (a probe compile says so; an unknown option is an error, and a later
  XLA may drop this one), else none. PGJAX_CPU_COMPILER_OPTIONS=0 turns them off."""
  import jax
  if jax.default_backend() != "cpu" or os.environ.get("PGJAX_CPU_COMPILER_OPTIONS", "1") == "0":
    return {}
  try:
    jax.jit(lambda x: x + 1).lower(1.0).compile(compiler_options=_CPU_COMPILER_OPTIONS)
  except Exception:  # noqa: BLE001 - XLA reports an unknown option as a runtime error of its own type
    return {}
  return dict(_CPU_COMPILER_OPTIONS)


# "auto" takes bfloat16 on a CPU only where its bf16 dots beat float32's by this much: a CPU with AVX-512 BF16
# but no AMX runs XLA's bf16 dots slower than float32 (bench/README.md has the figures), one with AMX 4-5x faster.
AUTO_BF16_MIN_SPEEDUP = 1.25
# NVIDIA GPUs from Ampere (compute capability 8.0: A100, A10G, L4, H100) have bf16 tensor cores; a T4 (7.5) or a
# V100 (7.0) does not, and float16 there needs loss scaling, which "auto" never picks unasked.
_GPU_BF16_CAPABILITY = 8.0


@functools.cache
def auto_compute_dtype() -> tuple[str, str]:
  """(dtype, why) for compute dtype "auto": bfloat16 on TPUs and on GPUs with bf16 tensor cores; on a CPU,
  bfloat16 where a probe (a jitted 1024^3 dot, both ways, a few times each; about a second, once per
  process) finds its bf16 dots at least AUTO_BF16_MIN_SPEEDUP times float32's; float32 otherwise."""
  import jax
  device = jax.devices()[0]
  if device.platform == "tpu":
    return "bfloat16", f"a TPU ({device.device_kind})"
  if device.platform == "gpu":
    capability = getattr(device, "compute_capability", None)
    try:
      ok = capability is not None and float(capability) >= _GPU_BF16_CAPABILITY
    except ValueError:
      ok = False
    kind = f"{device.device_kind}, compute capability {capability}"
    return ("bfloat16", f"a GPU with bfloat16 ({kind})") if ok else ("float32", f"a GPU without bfloat16 ({kind})")
  if device.platform != "cpu":
    return "float32", f"an unknown platform {device.platform!r}"
  speedup = cpu_bf16_speedup()
  verdict = "bfloat16" if speedup >= AUTO_BF16_MIN_SPEEDUP else "float32"
  return verdict, f"this CPU's bfloat16 dots ran {speedup:.2f}x float32's (bfloat16 from {AUTO_BF16_MIN_SPEEDUP}x)"


def cpu_bf16_speedup(n: int = 1024, repeats: int = 5) -> float:
  """float32's time over bfloat16's (inputs cast in the dot, float32 accumulation) for a jitted n^3 dot,
  the best of `repeats` after a warm-up call each."""
  import time

  import jax
  import jax.numpy as jnp
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)

  def best(f):
    f(x, x).block_until_ready()
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      f(x, x).block_until_ready()
      times.append(time.perf_counter() - t)
    return min(times)

  f32 = jax.jit(lambda a, b: jnp.dot(a, b))
  bf16 = jax.jit(lambda a, b: jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                                      preferred_element_type=jnp.float32))
  return best(f32) / best(bf16)


def resolve_compute_dtype(name: str) -> tuple[str, str]:
  """(dtype, why) for a compute-dtype setting: "auto" as `auto_compute_dtype` decides, anything else as asked."""
  return auto_compute_dtype() if name == "auto" else (name, "asked for")


def allocator_state() -> str:
  """What the benchmarks record: the tunables this process started with ("" for glibc's defaults)."""
  return os.environ.get("GLIBC_TUNABLES", "")


def default_cache_dir(value: str | None = None) -> str | None:
  """`value` (e.g. a --compile-cache flag), else $PGJAX_COMPILE_CACHE, else $XDG_CACHE_HOME/pgjax/xla
  (~/.cache/pgjax/xla); "off" (or "", "0", "none") for none."""
  value = os.environ.get(CACHE_ENV) if value is None else value
  if value is not None:
    return None if value.lower() in ("", "0", "off", "none") else value
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "pgjax", "xla")


def enable_compilation_cache(path: str | None, *, min_compile_time_s: float = 0.5) -> str | None:
  """Points JAX's persistent compilation cache at `path` (None: leaves it off), so a second run of the same
  program loads its executables instead of compiling them (bench/README.md has the figures).
  Executables that compiled faster than `min_compile_time_s` are not stored. Returns the path used."""
  if not path:
    return None
  import jax
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
  return path
