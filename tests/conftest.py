"""Test setup: 8 fake CPU devices (for sharding tests), float32 matmuls at full precision, offline HF, and
one persistent compilation cache for the session (a temp folder) that the test process and every CLI run
it starts share."""

import atexit
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere.
_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The same small models compile the same programs in many tests (each module's programs are dropped after
# it, below) and in every CLI run a test starts in a subprocess: one session-wide persistent cache compiles
# each once. It lives in a temp folder, never the home folder's default (tests/test_host.py checks the
# defaults with its own environment); PGJAX_TEST_XLA_CACHE names another (to reuse one between sessions).
if "PGJAX_TEST_XLA_CACHE" not in os.environ:
  os.environ["PGJAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="pgjax-tests-xla-")
  atexit.register(shutil.rmtree, os.environ["PGJAX_TEST_XLA_CACHE"], True)
os.environ["PGJAX_COMPILE_CACHE"] = os.environ["PGJAX_TEST_XLA_CACHE"]  # what the CLI reads

import jax  # noqa: E402

from pgjax import host  # noqa: E402

# This process's backend starts now with the devices asked for; the processes tests start (the CLI, the README's
# snippets, benchmarks) get the flags as they were: one device, as a user's CPU run has. 8 fake devices on 2
# cores made the README's fine-tune snippet 3x slower.
jax.devices()
os.environ["XLA_FLAGS"] = _XLA_FLAGS

jax.config.update("jax_default_matmul_precision", "highest")
host.enable_compilation_cache(os.environ["PGJAX_TEST_XLA_CACHE"], min_compile_time_s=0.5)

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops every test module's compiled programs after it. XLA:CPU maps each executable's code into the
  process (about three mappings apiece); kept for the whole suite they passed Linux's default
  vm.max_map_count (65,530) about 70% of the way through, and the next compilation's mmap failed inside
  LLVM as a segmentation fault. Freed per module, the count stays at one module's worth."""
  yield
  jax.clear_caches()
