"""pgjax.host: the allocator re-exec and the persistent compilation cache, each in fresh processes."""

import os
import subprocess
import sys
import textwrap

import pytest

from pgjax import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**changes):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host.TUNE_ENV)}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.update(changes)
  return env


def test_allocator_env_rules():
  on_glibc = sys.platform == "linux" and __import__("platform").libc_ver()[0] == "glibc"
  env = host.allocator_env({"PATH": "/bin"})
  if on_glibc:
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": host.MALLOC_TUNABLES}
  else:
    assert env is None
  # The user's own tunables win, and a re-executed process has them set: no second exec.
  assert host.allocator_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}) is None
  assert host.allocator_env({host.TUNE_ENV: "0"}) is None


def test_tune_allocator_reexecs_once_with_the_same_arguments(tmp_path):
  if host.allocator_env({}) is None:
    pytest.skip("not Linux with glibc: tune_allocator does nothing (checked in test_allocator_env_rules)")
  script = tmp_path / "prog.py"
  log = tmp_path / "starts.txt"
  script.write_text(textwrap.dedent(f"""
      import os, sys
      with open({str(log)!r}, "a") as f:
        f.write(os.environ.get("GLIBC_TUNABLES", "-") + "\\n")
      from pgjax import host
      host.tune_allocator()
      print(repr(sys.argv[1:]), os.environ["GLIBC_TUNABLES"])
  """))
  out = subprocess.run([sys.executable, "-u", str(script), "a b", "--x=1"], env=_env(), capture_output=True,
                       text=True, check=True).stdout
  assert out.strip() == f"['a b', '--x=1'] {host.MALLOC_TUNABLES}"
  assert log.read_text().splitlines() == ["-", host.MALLOC_TUNABLES]  # started twice: before and after the exec
  # Opted out: one start, glibc's defaults.
  log.unlink()
  r = subprocess.run([sys.executable, str(script)], env=_env(**{host.TUNE_ENV: "0"}), capture_output=True, text=True)
  assert r.returncode == 1 and "KeyError" in r.stderr and log.read_text().splitlines() == ["-"]


def test_tune_allocator_leaves_a_program_read_from_stdin_alone():
  code = "import os\nfrom pgjax import host\nhost.tune_allocator()\nprint(os.environ.get('GLIBC_TUNABLES', '-'))\n"
  out = subprocess.run([sys.executable, "-"], input=code, env=_env(), capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "-"  # ran once, as it was: stdin cannot be read a second time


def _faults_for_fresh_blocks(env):
  code = textwrap.dedent("""
      import ctypes, resource
      libc = ctypes.CDLL("libc.so.6")
      libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
      libc.free.argtypes = [ctypes.c_void_p]
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      for _ in range(5):  # a fresh 64 MiB block each time, written and freed, as XLA:CPU's temporaries are
        # (plain malloc: numpy madvises its own large arrays into hugepages, so it would hide the difference)
        p = libc.malloc(64 * 2**20)
        ctypes.memset(p, 1, 64 * 2**20)
        libc.free(p)
      print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  """)
  return int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            check=True).stdout)


def test_the_tunables_take_fresh_blocks_in_hugepages():
  thp = "/sys/kernel/mm/transparent_hugepage/enabled"
  if host.allocator_env({}) is None or not os.path.exists(thp) or "[never]" in open(thp).read():
    pytest.skip("needs glibc and transparent hugepages (madvise or always)")
  default = _faults_for_fresh_blocks(_env(**{host.TUNE_ENV: "0"}))
  tuned = _faults_for_fresh_blocks(_env(GLIBC_TUNABLES=host.MALLOC_TUNABLES))
  # 5 x 64 MiB in 4 KiB pages is 81,920 faults; in 2 MiB pages 160.
  assert default > 60_000, default
  assert tuned < default / 20, (tuned, default)


def test_compilation_cache_is_written_then_read(tmp_path):
  cache = tmp_path / "xla"
  code = textwrap.dedent(f"""
      from pgjax import host
      assert host.enable_compilation_cache({str(cache)!r}, min_compile_time_s=0) == {str(cache)!r}
      import jax, jax.numpy as jnp
      print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).sum()))
  """)
  first = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
  entries = sorted(os.listdir(cache))
  assert any(e.startswith("jit_") for e in entries), entries
  mtimes = {e: os.path.getmtime(cache / e) for e in entries}
  second = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
  assert second.stdout == first.stdout
  assert {e: os.path.getmtime(cache / e) for e in sorted(os.listdir(cache))} == mtimes  # read, not rewritten


def test_cache_dir_defaults(monkeypatch, tmp_path):
  monkeypatch.setenv(host.CACHE_ENV, "off")
  assert host.default_cache_dir() is None
  monkeypatch.setenv(host.CACHE_ENV, str(tmp_path))
  assert host.default_cache_dir() == str(tmp_path)
  monkeypatch.delenv(host.CACHE_ENV)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert host.default_cache_dir() == str(tmp_path / "pgjax" / "xla")
  assert host.enable_compilation_cache(None) is None
  # A flag's value comes before the environment, with the same "off".
  assert host.default_cache_dir("off") is None
  assert host.default_cache_dir(str(tmp_path / "flag")) == str(tmp_path / "flag")


def test_compiler_options_on_cpu_and_their_opt_outs(monkeypatch):
  import jax
  host.compiler_options.cache_clear()
  try:
    assert jax.default_backend() == "cpu"
    assert host.compiler_options() == {"xla_cpu_use_fusion_emitters": False}
    host.compiler_options.cache_clear()
    monkeypatch.setenv("PGJAX_CPU_COMPILER_OPTIONS", "0")
    assert host.compiler_options() == {}
    host.compiler_options.cache_clear()
    monkeypatch.delenv("PGJAX_CPU_COMPILER_OPTIONS")
    # An option this XLA does not know (as a later XLA may drop ours) is probed and left out, not an error.
    monkeypatch.setattr(host, "_CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option": True})
    assert host.compiler_options() == {}
  finally:
    host.compiler_options.cache_clear()
