"""Smoke tests of bench/: each script runs on a tiny config and prints well-formed JSON lines.

Each run is a fresh process (as users run them), so jax and torch imports dominate: marked slow.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from pgjax import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
TINY = "tiny-gemma1-mqa"


def _has_hf():
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    return True
  except ImportError:
    return False


def run(script, *args):
  """Runs bench/<script> and returns its JSON lines as dicts."""
  env = dict(os.environ)
  # conftest's 8 fake devices are for the sharding tests; the benchmarks use one device, as users run them.
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  env["PGJAX_BENCH_COMPILE_CACHE"] = os.environ["PGJAX_TEST_XLA_CACHE"]  # conftest's: compile each program once
  out = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert lines, out.stderr[-3000:]
  records = [json.loads(line) for line in lines]  # every stdout line is one JSON object
  for r in records:
    assert r["bench"] == script.removesuffix(".py")
    assert {"platform", "cpu", "cores"} <= r["machine"].keys() and r["machine"]["cores"] >= 1
    assert r["device"].startswith("cpu:")
    assert r["versions"]["jax"] and r["versions"]["jaxlib"] and r["versions"]["numpy"]
    assert r["compile_cache"] == env["PGJAX_BENCH_COMPILE_CACHE"]
    assert isinstance(r["config"], dict) and r["config"]["name"] == TINY
    # The scripts run as the pgjax command does: re-executed with glibc's tunables (pgjax/host.py).
    tuned = host.allocator_env(env)
    assert r["machine"]["malloc_tunables"] == (tuned or env).get("GLIBC_TUNABLES", "")
  return records


def positive(*xs):
  for x in xs:
    assert isinstance(x, (int, float)) and math.isfinite(x) and x > 0, x


def ratios(r):
  return {k: v for k, v in r.items() if "ratio" in k}


@pytest.mark.slow
def test_train_step():
  vs = ["--vs", "hf"] if _has_hf() else []
  (r,) = run("train_step.py", "--config", TINY, "--reps", "2", "--warmup", "0", "--batch", "2", "--text-len", "16",
             "--prefix-len", "4", "--breakdown", *vs)
  assert r["step"]["reps"] == 2
  positive(r["step"]["median_s"], r["step"]["min_s"], r["first_step_s"], r["compile_s"], r["examples_per_s"],
           r["text_tokens_per_s"], r["flops_hand_step"], r["flops_xla_hlo"], r["achieved_flops_per_s"],
           r["peak_flops_per_s"], r["mfu"], r["loss_first_step"])
  assert r["step"]["min_s"] <= r["step"]["median_s"] <= r["step"]["max_s"]
  # The hand count of what XLA sees (each scanned layer once) agrees with XLA's own count; XLA also counts
  # elementwise ops, a few percent on this tiny config.
  assert 0.95 < r["xla_hlo_vs_hand_scan_once_ratio"] < 1.15
  assert set(r["breakdown"]) >= {"image_tower_s", "forward_loss_s", "forward_backward_s", "backward_s"}
  if vs:
    positive(r["hf"]["median_s"], *ratios(r).values())
    assert "hf_to_pgjax_step_ratio" in r
    # Same weights, same batch, same loss: the first-step losses agree to float32 precision.
    assert r["hf_loss_first_step"] == pytest.approx(r["loss_first_step"], rel=1e-4)


@pytest.mark.slow
def test_train_step_in_bfloat16_against_its_float32_step():
  (r,) = run("train_step.py", "--config", TINY, "--reps", "2", "--warmup", "0", "--batch", "2", "--text-len", "16",
             "--prefix-len", "4", "--compute-dtype", "bfloat16", "--vs", "f32")
  assert r["config"]["compute_dtype"] == "bfloat16" and r["config"]["compute_dtype_why"] == "asked for"
  positive(r["step"]["median_s"], r["f32"]["median_s"], r["f32_to_pgjax_step_ratio"])
  assert isinstance(r["machine"]["cpu_flags"], list)
  # The same weights and batch: the first losses agree to bfloat16's rounding (u = 2^-8), not to float32's.
  assert r["f32_loss_first_step"] == pytest.approx(r["loss_first_step"], rel=2.0 ** -8)
  assert r["f32_loss_first_step"] != r["loss_first_step"]


@pytest.mark.slow
def test_decode():
  vs = ["--vs", "hf"] if _has_hf() else []
  records = run("decode.py", "--config", TINY, "--reps", "2", "--warmup", "0", "--new-tokens", "4",
                "--batches", "1,2", *vs)
  assert [r["config"]["batch"] for r in records] == [1, 2]
  for r in records:
    positive(r["prefill"]["median_s"], r["greedy"]["median_s"], r["tokens_per_s"], r["greedy_first_s"],
             r["decode_view_s"])
    assert r["config"]["decode_view"]  # the default: decode over decode.make_view
    assert math.isfinite(r["per_token_s"])  # a difference of two medians: noise can make it tiny or negative
    if vs:
      positive(r["hf_generate"]["median_s"], r["hf_to_pgjax_greedy_ratio"], r["hf_to_pgjax_prefill_ratio"])
      assert r["tokens_match_fraction"] == 1.0


@pytest.mark.slow
def test_decode_beam_and_sample():
  vs = ["--vs", "hf"] if _has_hf() else []
  for mode in ("beam", "sample"):
    (r,) = run("decode.py", "--config", TINY, "--reps", "1", "--warmup", "0", "--new-tokens", "3", "--batches", "2",
               "--decode", mode, *vs)
    assert r["config"]["decode"] == mode
    positive(r[mode]["median_s"], r[f"{mode}_to_greedy_ratio"], r[f"{mode}_first_s"])
    if vs:
      positive(r[f"hf_to_pgjax_{mode}_ratio"])
      assert r["hf_generate_kwargs"] == ({"num_beams": 4, "length_penalty": 0.0} if mode == "beam" else
                                         {"do_sample": True, "top_p": 0.9, "top_k": 0, "temperature": 1.0})


@pytest.mark.slow
def test_memory():
  records = run("memory.py", "--config", TINY, "--batches", "2", "--text-len", "16", "--remat", "none,full",
                "--compute-dtypes", "float32,bfloat16")
  assert [(r["config"]["remat"], r["config"]["compute_dtype"]) for r in records] == [
      ("none", "float32"), ("none", "bfloat16"), ("full", "float32"), ("full", "bfloat16")]
  assert all(r["config"]["frozen_dtype"] == "float16" for r in records)
  for r in records:
    positive(r["argument_bytes"], r["temp_bytes"], r["peak_bytes"], r["compile_s"])
    assert r["peak_bytes"] == r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
    assert r["alias_bytes"] == r["trainable_bytes"]  # the trainable params are donated
    assert r["argument_bytes"] >= r["trainable_bytes"] + r["frozen_bytes"]
    assert set(r["fits"]) == {"T4-16GB", "A10G-24GB", "H100-80GB"}
  none, _, full, _ = records
  assert full["temp_bytes"] < none["temp_bytes"]  # remat keeps fewer activations


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [0, 4])
def test_load(tmp_path, quantize):
  records = run("load.py", "--config", TINY, "--path", str(tmp_path), "--quantize", str(quantize))
  assert [r["config"]["page_cache"] for r in records] in (["dropped (fadvise)", "warm"], ["cold", "warm"])
  for r in records:
    positive(r["load_s"], r["peak_rss_bytes"], r["params_bytes"], r["write_s"])
    assert r["peak_rss_bytes"] >= r["rss_before_bytes"] and r["config"]["quantize"] == quantize
    # tiny Gemma 1 MQA: 32 leaves in the checkpoint layout; int4 splits its 13 matmul weights (8 in SigLIP, 5 in Gemma) in codes + scales
    assert r["num_leaves"] == 32 + (13 if quantize else 0)
    if quantize:  # codes at half a byte, a float32 scale per 64: under half the float16 file's bytes
      assert r["params_bytes"] < 0.5 * r["config"]["file_bytes"] and "within_budget" in r
  assert not list(tmp_path.iterdir())  # deleted without --keep


def test_flop_count_matches_design():
  """The design (bench/README.md): one bench-small attention-only step is about 117 GFLOP (matmuls, 2 per multiply-add)."""
  sys.path.insert(0, BENCH)
  try:
    import train_step
  finally:
    sys.path.remove(BENCH)
  from pgjax import config
  flops = train_step.matmul_flops(config.get("bench-small"), batch=4, text_len=64)
  assert flops["straightforward"] / 1e9 == pytest.approx(117, abs=1.5)
  # The last layer runs its queries, output projection and MLP at the 63 text positions only: each of the
  # 4 x 256 image rows saves, in multiply-adds, forward q and out (2 x 512 x 512) and MLP (3 x 512 x 2048)
  # and its attention row (2 x 8 heads x 319 keys x 64); backward the same projections' and MLP's input
  # gradients, q's and out's weight gradients (2 x 512 x 512) and twice the attention row.
  proj, mlp, row = 2 * 512 * 512, 3 * 512 * 2048, 2 * 8 * 319 * 64
  saved = 2 * 4 * 256 * ((proj + mlp + row) + (proj + mlp + 2 * row + proj))
  assert flops["straightforward"] - flops["step"] == saved
  assert flops["step"] / 1e9 == pytest.approx(99.6, abs=0.1)


def _dot_flops(jaxpr, scan_multiplier: bool) -> int:
  """2 x multiply-adds of every dot_general in a jaxpr and the jaxprs inside it; a scan's body times its
  length (or once, as XLA's cost analysis counts it)."""
  from helpers import jaxpr_eqns
  total = 0
  for eqn, times in jaxpr_eqns(jaxpr, scan_lengths=scan_multiplier):
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval
      total += times * 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[i] for i in contract)
  return total


@pytest.mark.parametrize("name", [TINY, "tiny-gemma2-gqa"])
@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_flop_count_matches_traced_step(name, remat):
  """The hand count of what the step executes (remat's recompute included, which JAX trims: "full" drops the
  MLP output projection unless a post-norm reads it) equals the matmuls in the traced step, counted from its
  jaxpr; and the scan-once count, what XLA's cost analysis is compared with, equals them with each scan
  body counted once. The model's FLOPs ("step") do not depend on remat."""
  import dataclasses

  import jax
  import jax.numpy as jnp

  from pgjax import config, paligemma, train
  sys.path.insert(0, BENCH)
  try:
    import train_step
  finally:
    sys.path.remove(BENCH)
  cfg = dataclasses.replace(config.get(name), remat=remat)
  params = jax.eval_shape(lambda k: paligemma.init(k, cfg), jax.random.key(0))
  trainable, frozen = jax.eval_shape(lambda p: train.split(p, frozen_dtype=jnp.float32), params)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), train_step.make_batch(cfg, 2, 16, 4))
  lr = jax.ShapeDtypeStruct((), jnp.float32)
  jaxpr = train.make_train_step(cfg).trace(trainable, frozen, batch, lr, None).jaxpr.jaxpr
  flops = train_step.matmul_flops(cfg, batch=2, text_len=16)
  assert flops["executed"] == _dot_flops(jaxpr, scan_multiplier=True)
  assert flops["scan_once"] == _dot_flops(jaxpr, scan_multiplier=False)
  assert flops["step"] == train_step.matmul_flops(dataclasses.replace(cfg, remat="none"), 2, 16)["step"]
  if remat == "none":
    assert flops["executed"] == flops["step"] < flops["straightforward"]
  else:
    assert flops["executed"] > flops["straightforward"]


def test_gpu_peaks_match_whole_words():
  """Each device kind jax reports gets its own datasheet row: variants before their family, no substring
  matches (an L40S is not an L4, an A100 not an A10), and none for an unknown device."""
  sys.path.insert(0, BENCH)
  try:
    import common
  finally:
    sys.path.remove(BENCH)
  expected = {"NVIDIA H100 80GB HBM3": "H100", "NVIDIA H100 PCIe": "H100 PCIe", "NVIDIA H100 NVL": "H100 NVL",
              "NVIDIA H200": "H200", "NVIDIA A100-SXM4-80GB": "A100", "NVIDIA A10G": "A10G", "NVIDIA A10": "A10",
              "NVIDIA L40S": "L40S", "NVIDIA L4": "L4", "Tesla T4": "T4", "Tesla V100-SXM2-16GB": "V100",
              "NVIDIA GeForce RTX 4090": None}
  assert {kind: common.gpu_peaks(kind)[0] for kind in expected} == expected
  # TF32 datasheet rates are 8x (Ampere, Hopper) the plain FP32 ones, up to the datasheets' rounding.
  for key in ("A100", "H100", "H100 PCIe"):
    peaks = dict(common.GPU_PEAKS)[key]
    assert 7 < peaks["tf32"] / peaks["f32"] < 8.5
  # Without TF32 cores, float32 matmuls at JAX's default precision run at the FP32 rate: MFU is not left null.
  assert common.gpu_peak("Tesla T4", "tf32")[0] == 8.1e12
  assert common.gpu_peak("NVIDIA H100 80GB HBM3", "tf32")[0] == 495e12
  assert common.gpu_peak("NVIDIA GeForce RTX 4090", "tf32")[0] is None



@pytest.mark.slow
def test_memory_lora_on_quantized_bases():
  plain, = run("memory.py", "--config", TINY, "--batches", "2", "--text-len", "16", "--remat", "none")
  recs = {bits: run("memory.py", "--config", TINY, "--batches", "2", "--text-len", "16", "--remat", "none",
                    "--lora", "4", "--quantize", str(bits))[0] for bits in (8, 4)}
  for bits, r in recs.items():
    assert (r["config"]["lora_rank"], r["config"]["frozen_dtype"]) == (4, f"int{bits}")
    assert r["alias_bytes"] == r["trainable_bytes"]  # the adapters are donated
    assert r["trainable_bytes"] < plain["trainable_bytes"] / 4  # rank 4 of width-64/128 attention
  # int4 codes are half int8's bytes; both far below the float16 base (the float embedding is in all three)
  assert recs[4]["frozen_bytes"] < recs[8]["frozen_bytes"] < plain["frozen_bytes"]


@pytest.mark.slow
def test_adapters():
  (r,) = run("adapters.py", "--config", TINY, "--reps", "1", "--batch", "2", "--text-len", "16", "--prefix-len", "4",
             "--rank", "2", "--variants", "plain,int4,qlora8")
  assert set(r["steps"]) == {"plain", "int4", "qlora8"}
  for v in ("int4", "qlora8"):
    positive(r[f"{v}_to_plain_ratio"], r["steps"][v]["median_s"], r["first_step_s"][v])
