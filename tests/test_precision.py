"""The compute dtype: `layers.dot` exactly, the model in bfloat16 against float32 and against transformers under
bfloat16 autocast, float16's loss scaling, the decode view in the compute dtype, and what "auto" picks.

Bounds come from bfloat16's unit roundoff u = 2^-8 (8 significand bits, round to nearest): each operand of a
dot is rounded once, by at most u relative, and the products are summed in float32.
"""

import functools
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from helpers import prefix_lm_batch, random_params
from pgjax import config, decode, host, layers, paligemma, train

U_BF16 = 2.0 ** -8
EPS32 = float(np.finfo(np.float32).eps)


def _round(x, dtype):
  return np.asarray(np.asarray(x, np.float32).astype(dtype), np.float64)


# ---------------------------------------------------------------------------------------------- layers.dot


@pytest.mark.parametrize("spec,xs,ws", [("BTD,NDH->BTNH", (3, 5, 16), (4, 16, 8)),
                                        ("BTD,JKDH->JBTKH", (2, 7, 32), (2, 3, 32, 4)),
                                        ("BKTGS,BSKH->BTKGH", (2, 2, 5, 3, 6), (2, 6, 2, 8))])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_dot_and_its_gradients_are_rounded_operands_summed_exactly(spec, xs, ws, dtype):
  """Forward: the float64 einsum of the operands rounded to the compute dtype. Backward: the same for the
  two gradient dots, with the cotangent rounded too; the float32 backward JAX would derive on its own
  (an unrounded cotangent) differs from this by about u, far outside the bound. The bound: float32
  accumulation, n eps32 of the sum of |products| (n the summed length)."""
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=xs).astype(np.float32), rng.normal(size=ws).astype(np.float32)
  low = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
  y, vjp = jax.vjp(lambda a, b: layers.dot(spec, a, b, dtype), x, w)
  g = rng.normal(size=y.shape).astype(np.float32)
  gx, gw = vjp(g)
  assert y.dtype == gx.dtype == gw.dtype == jnp.float32

  inputs, out = spec.split("->")
  xsp, wsp = inputs.split(",")
  xr, wr, gr = _round(x, low), _round(w, low), _round(g, low)
  cases = [(np.asarray(y), f"{xsp},{wsp}->{out}", xr, wr), (np.asarray(gx), f"{out},{wsp}->{xsp}", gr, wr),
           (np.asarray(gw), f"{out},{xsp}->{wsp}", gr, xr)]
  for got, sp, a, b in cases:
    expected, bound = np.einsum(sp, a, b), _f32_sum_bound(sp, a, b)
    assert np.all(np.abs(got - expected) <= bound), (sp, np.max(np.abs(got - expected) / bound))
  # JAX's own backward (float32 dots on the unrounded cotangent) lands outside that bound: the check can fail.
  sp = f"{out},{wsp}->{xsp}"
  naive = np.einsum(sp, np.asarray(g, np.float64), wr)
  assert np.max(np.abs(naive - np.einsum(sp, gr, wr)) / _f32_sum_bound(sp, gr, wr)) > 10


def _f32_sum_bound(spec, a, b):
  """The worst case of float32 accumulation: n eps32 sum|a b| per output, n the number of summed terms."""
  (sa, sb), out = spec.split("->")[0].split(","), spec.split("->")[1]
  sizes = {**dict(zip(sa, a.shape)), **dict(zip(sb, b.shape))}
  n = int(np.prod([sizes[c] for c in set(sa + sb) - set(out)]))
  return n * EPS32 * np.einsum(spec, np.abs(a), np.abs(b)) + 1e-300


def test_float32_dot_is_the_plain_einsum():
  rng = np.random.default_rng(1)
  x, w = rng.normal(size=(3, 4, 8)).astype(np.float32), rng.normal(size=(8, 5)).astype(np.float16)
  got = layers.dot("BTD,DF->BTF", x, w, "float32")
  np.testing.assert_array_equal(got, jnp.einsum("BTD,DF->BTF", x, w.astype(np.float32)))
  gx = jax.grad(lambda a: jnp.sum(jnp.sin(layers.dot("BTD,DF->BTF", a, w, "float32"))))(x)
  ref = jax.grad(lambda a: jnp.sum(jnp.sin(jnp.einsum("BTD,DF->BTF", a, w.astype(np.float32)))))(x)
  np.testing.assert_array_equal(gx, ref)


def test_a_dot_without_a_transpose_is_refused():
  with pytest.raises(ValueError, match="summed over it alone"):
    jax.grad(lambda x: layers.dot("ab,c->c", x, jnp.ones(3), "bfloat16").sum())(jnp.ones((2, 2)))


def test_compute_dtype_is_validated():
  with pytest.raises(ValueError, match="compute_dtype must be one of"):
    config.GemmaConfig(compute_dtype="int8")
  cfg = config.get("tiny-gemma1-mqa").with_compute_dtype("bfloat16")
  assert cfg.vision.compute_dtype == cfg.llm.compute_dtype == cfg.compute_dtype == "bfloat16"


# ------------------------------------------------------------------------------- the model in bfloat16

CONFIGS = ["tiny-gemma1-mqa", "tiny-gemma1-mha", "tiny-gemma2-gqa"]
LENGTHS = [(4, 6), (6, 2), (3, 9)]
SEQ_LEN = 13
# Norm-wise relative error of the logits: each matmul's rounded operands carry at most u each, and the tiny
# configs' path has two layers per tower; 4u leaves the rounding of every level room to add up, while a
# matmul left in the wrong dtype or a missing cast back to float32 (the residual stream rounded to bf16)
# moves logits by far more. Measured (2026-12-02, both CPUs' figures alike): 1.3u-1.6u.
LOGITS_BOUND = 4 * U_BF16
# The per-example loss averages many tokens' log-probs, and its rounding errors average out: u.
LOSS_BOUND = U_BF16


@functools.cache
def _setup(name):
  cfg = config.get(name)
  return cfg, random_params(cfg, seed=len(name)), prefix_lm_batch(cfg, LENGTHS, SEQ_LEN)


# Jitted, as training and decoding run the model (op by op these tests took twice as long).
@functools.partial(jax.jit, static_argnames="cfg")
def _jit_logits(params, batch, cfg):
  return paligemma.forward(params, batch["image"], batch["text"], batch["mask_ar"], cfg=cfg)[0]


def _logits(params, batch, cfg):
  return np.asarray(_jit_logits(params, batch, cfg=cfg))


_loss_B = jax.jit(lambda params, batch, cfg: train.loss_fn(params, batch, cfg=cfg)[1], static_argnames="cfg")


def _rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", CONFIGS)
def test_bfloat16_logits_and_loss_are_within_bf16_rounding_of_float32(name):
  cfg, params, batch = _setup(name)
  bf = cfg.with_compute_dtype("bfloat16")
  l32, lbf = _logits(params, batch, cfg), _logits(params, batch, bf)
  assert lbf.dtype == np.float32
  rel = _rel(lbf, l32)
  # Far above float32's noise (the compute dtype is in effect), within bf16's rounding.
  assert 1e3 * EPS32 < rel <= LOGITS_BOUND, rel
  loss32 = np.asarray(_loss_B(params, batch, cfg=cfg))
  lossbf = np.asarray(_loss_B(params, batch, cfg=bf))
  assert np.max(np.abs(lossbf - loss32)) <= LOSS_BOUND * np.max(np.abs(loss32))


@pytest.mark.parametrize("name", CONFIGS)
def test_bfloat16_gradients_point_where_float32_ones_do(name):
  cfg, params, batch = _setup(name)
  trainable, frozen = train.split(params, frozen_dtype=jnp.float32)

  def grads(c):
    g = jax.jit(jax.grad(lambda t: train.loss_fn(train.merge(t, frozen), batch, cfg=c)[0]))(trainable)
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])

  g32, gbf = grads(cfg), grads(cfg.with_compute_dtype("bfloat16"))
  cosine = g32 @ gbf / (np.linalg.norm(g32) * np.linalg.norm(gbf))
  assert cosine >= 0.999, cosine
  assert not np.array_equal(g32, gbf)


@pytest.mark.parametrize("name", CONFIGS)
def test_bfloat16_against_transformers_under_bf16_autocast(name):
  """transformers' bf16 autocast and pgjax's bf16 compute round at different places (autocast keeps some ops
  in float32 that pgjax casts, and the other way round), so they agree to bf16's rounding, the same order as
  each against float32."""
  torch = pytest.importorskip("torch")
  hf_reference = pytest.importorskip("hf_reference")
  cfg, params, batch = _setup(name)
  model = hf_reference.to_hf(params, cfg)
  inputs = hf_reference.inputs(batch["image"], batch["text"], batch["mask_ar"], cfg)
  T = batch["text"].shape[1]  # transformers returns logits at the image positions too
  with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    ref = model(**inputs).logits.float().numpy()[:, -T:]
  with torch.no_grad():
    ref32 = model(**inputs).logits.numpy()[:, -T:]
  lbf = _logits(params, batch, cfg.with_compute_dtype("bfloat16"))
  assert _rel(ref, ref32) <= LOGITS_BOUND  # the reference's own bf16 error: the same order
  assert _rel(lbf, ref) <= LOGITS_BOUND, _rel(lbf, ref)


def test_backward_dots_run_in_the_compute_dtype():
  """The train step's dots: in bfloat16 compute every one of them reads bfloat16 operands (the backward's
  included), in float32 none does. The traced step of bfloat16 also has each frozen weight's gradient dot
  (`layers.dot`'s backward returns both), which the compiler drops: the compiled steps run as many dots."""
  from helpers import jaxpr_eqns
  sds = jax.ShapeDtypeStruct

  def dots(compute_dtype):
    cfg = config.get("tiny-gemma1-mqa").with_compute_dtype(compute_dtype)
    params = jax.eval_shape(lambda k: paligemma.init(k, cfg), jax.random.key(0))
    trainable, frozen = jax.eval_shape(lambda p: train.split(p), params)
    batch = {"image": sds((2, cfg.vision.image_size, cfg.vision.image_size, 3), jnp.float32),
             **{k: sds((2, 12), jnp.int32) for k in ("text", "mask_ar", "mask_loss", "mask_input")}}
    traced = train.make_train_step(cfg).trace(trainable, frozen, batch, sds((), jnp.float32), None)
    operands = [tuple(v.aval.dtype for v in eqn.invars) for eqn, _ in jaxpr_eqns(traced.jaxpr.jaxpr)
                if eqn.primitive.name == "dot_general"]
    compiled = traced.lower().compile().as_text()
    return operands, sum(" dot(" in line for line in compiled.splitlines())

  (bf, bf_compiled), (f32, f32_compiled) = dots("bfloat16"), dots("float32")
  assert len(f32) > 40  # forward and backward, both towers
  assert all(d == (jnp.bfloat16, jnp.bfloat16) for d in bf), [d for d in bf if d != (jnp.bfloat16, jnp.bfloat16)]
  assert all(d == (jnp.float32, jnp.float32) for d in f32)
  assert bf_compiled == f32_compiled > 40


# ------------------------------------------------------------------------------------ float16 loss scaling


def test_loss_scale_halves_on_overflow_and_grows_after_good_steps():
  ls = train.LossScale(init_scale=8.0, growth_interval=3)
  s = ls.init()
  trace = []
  for finite in (True, True, False, True, True, True, True):
    s = ls.update(s, jnp.asarray(finite))
    trace.append((float(s["scale"]), int(s["good_steps"])))
  assert trace == [(8.0, 1), (8.0, 2), (4.0, 0), (4.0, 1), (4.0, 2), (8.0, 0), (8.0, 1)]
  s = train.LossScale(init_scale=1.0).update(train.LossScale(init_scale=1.0).init(), jnp.asarray(False))
  assert float(s["scale"]) == 1.0  # never below min_scale


def _f16_setup():
  cfg = config.get("tiny-gemma1-mqa")
  params = random_params(cfg, seed=3)
  batch = prefix_lm_batch(cfg, LENGTHS, SEQ_LEN)
  trainable, frozen = train.split(params, frozen_dtype=jnp.float16)
  return cfg, trainable, frozen, batch


def test_float16_step_skips_an_overflowing_step_and_halves_the_scale():
  cfg, trainable, frozen, batch = _f16_setup()
  cfg16 = cfg.with_compute_dtype("float16")
  ls = train.LossScale(init_scale=2.0 ** 100)  # the scaled cotangents overflow float16 at once
  step = train.make_train_step(cfg16, loss_scale=ls)
  state = train.init_opt_state(train.Optimizer(), trainable, cfg16, ls)
  before = jax.tree.map(np.asarray, trainable)
  new, state, metrics = step(jax.tree.map(jnp.copy, trainable), frozen, batch, 0.1, state)
  assert int(metrics["skipped"]) == 1 and np.isfinite(float(metrics["loss"]))
  assert float(state["loss_scale"]["scale"]) == 2.0 ** 99
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, new), before)


def test_float16_step_with_loss_scaling_follows_the_float32_update():
  cfg, trainable, frozen, batch = _f16_setup()
  cfg16 = cfg.with_compute_dtype("float16")
  state = train.init_opt_state(train.Optimizer(), trainable, cfg16)
  new16, state, m16 = train.make_train_step(cfg16)(jax.tree.map(jnp.copy, trainable), frozen, batch, 0.1, state)
  assert int(m16["skipped"]) == 0 and float(m16["loss_scale"]) == 2.0 ** 15
  assert int(state["loss_scale"]["good_steps"]) == 1
  new32, _, m32 = train.make_train_step(cfg)(jax.tree.map(jnp.copy, trainable), frozen, batch, 0.1, None)
  flat = lambda t, base: np.concatenate([np.ravel(np.asarray(a) - np.asarray(b))
                                         for a, b in zip(jax.tree.leaves(t), jax.tree.leaves(base))])
  d16, d32 = flat(new16, trainable), flat(new32, trainable)
  assert d16 @ d32 / (np.linalg.norm(d16) * np.linalg.norm(d32)) >= 0.999
  # float16 has 11 significand bits: u = 2^-11, tighter than bfloat16's.
  assert abs(float(m16["loss"]) - float(m32["loss"])) <= 2.0 ** -11 * abs(float(m32["loss"]))


def test_plain_train_step_refuses_float16_compute():
  cfg, trainable, frozen, batch = _f16_setup()
  with pytest.raises(ValueError, match="loss scaling"):
    train.train_step(trainable, frozen, batch, 0.1, cfg=cfg.with_compute_dtype("float16"))


# ------------------------------------------------------------------------------------------ decoding


def test_decode_view_and_cache_follow_the_compute_dtype():
  cfg = config.get("tiny-gemma2-gqa")
  params = random_params(cfg, seed=5)
  bf = cfg.with_compute_dtype("bfloat16")
  view = decode.make_view(params, cfg=bf)
  weights = [x for k, x in jax.tree_util.tree_leaves_with_path(view) if "scale" not in jax.tree_util.keystr(k)]
  assert weights and all(x.dtype == jnp.bfloat16 for x in weights)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(decode.make_view(params, cfg=cfg))
             if x.ndim > 1)
  rng = np.random.default_rng(0)
  image = rng.uniform(-1, 1, (2, 56, 56, 3)).astype(np.float32)
  prompt = rng.integers(3, 300, (2, 5)).astype(np.int32)
  mask = np.ones((2, 5), bool)
  _, cache = decode.prefill(params, image, prompt, mask, cfg=bf, cache_size=cfg.num_image_tokens + 8)
  assert cache["k"].dtype == cache["v"].dtype == jnp.bfloat16
  # Without and with the view, the same bf16 compute: the same tokens (the view fuses the projections,
  # which changes the float32 sums' order, not the bf16 roundings of the operands).
  t0, l0 = decode.greedy(params, image, prompt, mask, cfg=bf, max_new_tokens=6, eos_id=None)
  t1, l1 = decode.greedy(params, image, prompt, mask, cfg=bf, max_new_tokens=6, eos_id=None, decode_view=view)
  np.testing.assert_array_equal(t0, t1)
  t32, l32 = decode.greedy(params, image, prompt, mask, cfg=cfg, max_new_tokens=1, eos_id=None)
  assert _rel(np.asarray(l0[:, 0]), np.asarray(l32[:, 0])) <= LOGITS_BOUND


# ------------------------------------------------------------------------------------------ "auto"


def test_auto_follows_the_probe(monkeypatch):
  import jax as jax_module
  if jax_module.default_backend() != "cpu":
    pytest.skip("the CPU probe")
  for speedup, expected in ((3.0, "bfloat16"), (host.AUTO_BF16_MIN_SPEEDUP, "bfloat16"), (1.0, "float32")):
    host.auto_compute_dtype.cache_clear()
    monkeypatch.setattr(host, "cpu_bf16_speedup", lambda: speedup)
    name, why = host.auto_compute_dtype()
    assert name == expected and f"{speedup:.2f}x" in why
  host.auto_compute_dtype.cache_clear()
  assert host.resolve_compute_dtype("float16") == ("float16", "asked for")


def test_cpu_probe_measures_a_ratio():
  host.auto_compute_dtype.cache_clear()
  speedup = host.cpu_bf16_speedup(n=256, repeats=2)
  assert np.isfinite(speedup) and speedup > 0
  name, why = host.auto_compute_dtype()
  assert name in ("float32", "bfloat16") and "ran" in why


def test_float16_loss_scale_is_logged_saved_and_resumed(tmp_path):
  """A float16 run stopped after step 2 and resumed to step 4 continues the loss scale's state (its good-step
  count reaches 4, as in one run of 4 steps) and gives the same params as that run, bit for bit."""
  from pgjax import finetune, loop, rundir
  cfg = config.get("tiny-gemma1-mqa").with_compute_dtype("float16")
  params = random_params(cfg, seed=5)

  def batches_from(step):
    while True:
      step += 1
      yield prefix_lm_batch(cfg, LENGTHS, SEQ_LEN, seed=step)

  def run(out, steps):
    trainable, frozen = train.split(params, frozen_dtype=jnp.float16)
    tc = finetune.TrainConfig(steps=steps, compute_dtype="float16", lr=0.05)
    return loop.fit(cfg, tc, trainable, frozen, batches_from, out_dir=out,
                    lr_schedule=train.schedule("constant", 0.05, 4))

  whole, whole_state, hist = run(tmp_path / "a", 4)
  assert int(whole_state["loss_scale"]["good_steps"]) == 4
  run(tmp_path / "b", 2)
  resumed, state, hist_b = run(tmp_path / "b", 4)
  assert hist_b.steps == [3, 4]
  assert int(state["loss_scale"]["good_steps"]) == 4 and float(state["loss_scale"]["scale"]) == 2.0 ** 15
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, resumed), jax.tree.map(np.asarray, whole))
  assert os.path.exists(os.path.join(rundir.latest(tmp_path / "b"), "opt_state.npz"))


def test_train_config_compute_dtype():
  from pgjax import finetune
  with pytest.raises(finetune.SettingError, match="compute_dtype must be one of"):
    finetune.TrainConfig(compute_dtype="int8")
  tc = finetune.TrainConfig(compute_dtype="bfloat16")
  cfg = tc.model_config(config.get("tiny-gemma1-mqa"))
  assert cfg.vision.compute_dtype == cfg.llm.compute_dtype == "bfloat16"
