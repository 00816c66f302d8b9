"""Test setup: 8 fake CPU devices (for sharding tests), float32 matmuls at full precision, offline HF, no
compilation cache."""

import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The CLI's persistent compilation cache stays out of the home folder; tests/test_host.py checks it.
os.environ["PGJAX_COMPILE_CACHE"] = "off"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops every test module's compiled programs after it. XLA:CPU maps each executable's code into the
  process (about three mappings apiece); kept for the whole suite they passed Linux's default
  vm.max_map_count (65,530) about 70% of the way through, and the next compilation's mmap failed inside
  LLVM as a segmentation fault. Freed per module, the count stays at one module's worth."""
  yield
  jax.clear_caches()
