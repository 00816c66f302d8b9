"""The fine-tuning core: trainable split, split precision, the SGD step, accumulation, schedules."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import EPS32, assert_close_f32, jaxpr_eqns, prefix_lm_batch, random_params
from pgjax import config, paligemma, train, tree

LENGTHS = [(4, 6), (6, 2), (3, 9), (5, 5)]


@pytest.fixture(scope="module", params=["tiny-gemma1-mqa", "tiny-gemma2-gqa"])
def setup(request):
  cfg = config.get(request.param)
  return cfg, random_params(cfg, seed=2), prefix_lm_batch(cfg, LENGTHS, 12)


def test_split_selects_attention_in_float32_and_freezes_the_rest(setup):
  cfg, params, _ = setup
  trainable, frozen = train.split(params, train.is_trainable)
  t, f = tree.flatten(trainable), tree.flatten(frozen)
  assert set(t) == {k for k in tree.flatten(params) if k.startswith("llm/layers/attn/")}
  assert not set(t) & set(f) and len(t) + len(f) == len(tree.flatten(params))
  assert {v.dtype for v in t.values()} == {jnp.dtype(jnp.float32)}
  assert {v.dtype for v in f.values()} == {jnp.dtype(jnp.float16)}
  _, fb = train.split(params, train.is_trainable, frozen_dtype=jnp.bfloat16)
  assert {v.dtype for v in tree.flatten(fb).values()} == {jnp.dtype(jnp.bfloat16)}
  merged = tree.flatten(train.merge(trainable, frozen))
  assert set(merged) == set(tree.flatten(params))


def test_predicates(setup):
  cfg, params, _ = setup
  n_all = len(tree.flatten(params))
  t, _ = train.split(params, [r"llm/layers/attn/.*", r"img/head/.*"])
  assert set(tree.flatten(t)) >= {"img/head/kernel", "img/head/bias"}
  t, f = train.split(params, [".*"])
  assert len(tree.flatten(t)) == n_all and not f
  with pytest.raises(ValueError, match="matches none"):
    train.split(params, [r"llm/layers/atn/.*"])  # a typo trains nothing: an error, not a no-op


@pytest.mark.parametrize("clip", [None, 0.5])
def test_one_step_is_p_minus_lr_g_of_the_float32_loss(setup, clip):
  cfg, params, batch = setup
  lr = 0.03
  trainable, frozen = train.split(params, train.is_trainable, frozen_dtype=jnp.float32)
  # The expected update from jax.grad of the loss on the merged float32 tree, computed independently.
  grads = jax.jit(jax.grad(lambda p: train.loss_fn(p, batch, cfg=cfg)[0]))(params)
  g = grads["llm"]["layers"]["attn"]
  norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(x))) for x in jax.tree.leaves(g))))
  scale = min(1.0, clip / norm) if clip else 1.0
  expected = jax.tree.map(lambda p, g: np.asarray(p) - lr * scale * np.asarray(g), trainable["llm"]["layers"]["attn"], g)
  new, metrics = train.train_step(trainable, frozen, batch, lr, cfg=cfg, clip_norm=clip)
  # Per leaf: the roundings of p - lr*g on each side (2 eps32 * max|p|) plus lr times the two gradients'
  # difference (the step's backward and this one sum the same products in other orders: 64 eps32 * max|g|).
  g_max = max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(g))
  assert_close_f32(new["llm"]["layers"]["attn"], expected, ulps_of_max=2, floor=lr * scale * 64 * EPS32 * g_max)
  # A norm of gradients that differ by <= 64 eps32 * max|g| each, summed in another order: 64 eps32 relative.
  assert_close_f32(metrics["grad_norm"], norm, ulps_of_max=64)
  loss = jax.jit(train.loss_fn, static_argnames="cfg")(params, batch, cfg=cfg)[0]
  # The loss of the same logits computed in another program: its error is that of the logits (64 eps32 of
  # their size), and the loss (~log V) is larger than the tiny model's logits.
  assert_close_f32(metrics["loss"], loss, ulps_of_max=64)
  assert float(metrics["lr"]) == pytest.approx(lr)


def test_frozen_leaves_stay_bit_identical_and_buffers_are_donated(setup):
  cfg, params, batch = setup
  trainable, frozen = train.split(params, train.is_trainable)
  before = jax.tree.map(np.asarray, frozen)
  for step in range(3):
    old_leaf = trainable["llm"]["layers"]["attn"]["attn_vec_einsum"]["w"]
    trainable, metrics = train.train_step(trainable, frozen, batch, 0.01, cfg=cfg)
    assert old_leaf.is_deleted()  # donated
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen), before)
  assert all(x.dtype == jnp.float16 for x in jax.tree.leaves(frozen))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainable))
  assert np.isfinite(float(metrics["loss"]))


def test_low_precision_trainable_is_refused(setup):
  cfg, params, batch = setup
  trainable, frozen = train.split(params, train.is_trainable)
  half = jax.tree.map(lambda x: x.astype(jnp.float16), trainable)
  with pytest.raises(ValueError, match="float32"):
    train.train_step(half, frozen, batch, 0.01, cfg=cfg)


def test_gradient_accumulation_equals_the_full_batch(setup):
  cfg, params, batch = setup
  trainable, frozen = train.split(params, train.is_trainable, frozen_dtype=jnp.float32)
  copy = jax.tree.map(jnp.array, trainable)
  p0 = jax.tree.map(np.asarray, trainable)
  full, m_full = train.train_step(trainable, frozen, batch, 0.1, cfg=cfg)
  acc, m_acc = train.train_step(copy, frozen, batch, 0.1, cfg=cfg, accum_steps=2)
  # Per leaf: the roundings of p - lr*g (2 eps32 * max|p|) plus lr times the gradients' difference (two halves'
  # means averaged vs one mean: the same products summed in other orders, 64 eps32 * max|g|; lr * max|g| is
  # the largest step, max|full - p0|).
  step = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(p0)))
  assert_close_f32(acc, full, ulps_of_max=2, floor=64 * EPS32 * step)
  # The mean of two half-batch losses vs one mean: 64 eps32 of the loss, as the logits' reordering bounds it.
  assert_close_f32(m_acc["loss"], m_full["loss"], ulps_of_max=64)


def test_loss_with_final_softcap_is_cross_entropy_of_capped_logits():
  base = config.get("tiny-gemma2-gqa")
  cfg = dataclasses.replace(base, llm=dataclasses.replace(base.llm, final_logits_softcap=2.0))
  params = random_params(cfg, seed=4)
  batch = prefix_lm_batch(cfg, LENGTHS, 12)
  from pgjax import paligemma
  # Jitted: op by op, the two towers take most of this test's time.
  logits, _ = jax.jit(paligemma.forward, static_argnames="cfg")(params, batch["image"], batch["text"][:, :-1],
                                                                batch["mask_ar"][:, :-1], cfg=cfg)
  assert np.abs(np.asarray(logits)).max() <= 2.0  # capped
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)
  tgt, m = batch["text"][:, 1:], batch["mask_loss"][:, 1:]
  nll = -np.take_along_axis(np.asarray(logp), tgt[..., None], -1)[..., 0]
  expected = ((nll * m).sum(1) / m.sum(1)).mean()
  loss_fn = jax.jit(train.loss_fn, static_argnames="cfg")
  # The loss from logits computed at the loss's positions only (other shapes: the logits' reordering, 64 eps32
  # of their size <= 2, bounds the loss's error) against float64 on these logits; the loss is ~log V.
  assert_close_f32(loss_fn(params, batch, cfg=cfg)[0], expected, ulps_of_max=64)
  uncapped = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, final_logits_softcap=0.0))
  assert abs(float(loss_fn(params, batch, cfg=uncapped)[0]) - expected) > 1e-2


def test_check_batch_names_rows_without_loss_tokens():
  batch = {"mask_loss": np.array([[0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]])}
  with pytest.raises(ValueError, match="ex-b"):
    train.check_batch(batch, names=["ex-a", "ex-b", "ex-c"])
  train.check_batch({"mask_loss": batch["mask_loss"][[0, 2]]})


def test_notebook_schedule_values():
  # big_vision's create_learning_rate_schedule(total_steps=65, base=0.03, decay_type="cosine",
  # warmup_percent=0.10) at steps 1..64: warmup round(6.5) = 6 (half to even); values from the notebook.
  lr = train.schedule("cosine", 0.03, 65, 0.10)
  assert lr(1) == pytest.approx(0.005)
  assert lr(3) == pytest.approx(0.015)
  assert lr(6) == pytest.approx(0.03)
  assert lr(20) == pytest.approx(0.02602, abs=1e-5)
  assert lr(32) == pytest.approx(0.01778, abs=1e-5)
  assert lr(64) == pytest.approx(2.1e-5, abs=1e-6)
  lin = train.schedule("linear", 1.0, 10, 0.2)  # warmup 2 steps, then to 0 at step 10
  assert [lin(s) for s in (1, 2, 6, 10)] == pytest.approx([0.5, 1.0, 0.5, 0.0])
  assert train.schedule("constant", 0.1, 10)(7) == 0.1


@pytest.mark.parametrize("opt", [train.Optimizer(name="momentum", momentum=0.9),
                                 train.Optimizer(name="adamw", weight_decay=0.1)])
def test_optax_optimizers_match_their_update_rules(setup, opt):
  cfg, params, batch = setup
  trainable, frozen = train.split(params, train.is_trainable, frozen_dtype=jnp.float32)
  p0 = jax.tree.map(np.asarray, trainable)
  step = train.make_train_step(cfg, optimizer=opt)
  state = opt.init(trainable)
  lr = 0.01
  grads = []
  grad_fn = jax.jit(jax.grad(lambda t: train.loss_fn(train.merge(t, frozen), batch, cfg=cfg)[0]))
  for _ in range(2):
    g = grad_fn(trainable)
    grads.append(jax.tree.map(np.asarray, g))
    trainable, state, _ = step(trainable, frozen, batch, lr, state)
  # Hand-written update rules for two steps.
  if opt.name == "momentum":
    v1 = grads[0]
    p1 = jax.tree.map(lambda p, v: p - lr * v, p0, v1)
    v2 = jax.tree.map(lambda v, g: opt.momentum * v + g, v1, grads[1])
    expected = jax.tree.map(lambda p, v: p - lr * v, p1, v2)
  else:
    def adam(p, g1, g2):
      m1, s1 = (1 - opt.b1) * g1, (1 - opt.b2) * g1 ** 2
      p1 = p - lr * (m1 / (1 - opt.b1) / (np.sqrt(s1 / (1 - opt.b2)) + opt.eps) + opt.weight_decay * p)
      m2, s2 = opt.b1 * m1 + (1 - opt.b1) * g2, opt.b2 * s1 + (1 - opt.b2) * g2 ** 2
      return p1 - lr * (m2 / (1 - opt.b1 ** 2) / (np.sqrt(s2 / (1 - opt.b2 ** 2)) + opt.eps) + opt.weight_decay * p1)
    expected = jax.tree.map(adam, p0, grads[0], grads[1])
  # Per leaf 840 eps32 * max|p| (1e-4 of the largest weight): momentum's update is linear in the gradients,
  # whose two programs' reorderings (a few eps32 * max|g|) stay that size; Adam divides each gradient by its
  # own RMS, so an element c times smaller than the leaf's largest carries c times its gradient's relative
  # error into an update of size lr. A wrong moment, bias correction or decay term moves p by ~lr = 0.01.
  assert_close_f32(trainable, expected, ulps_of_max=840)


def test_small_model_overfits_a_handful_of_examples():
  cfg = config.get("tiny-gemma1-mqa")
  params = random_params(cfg, seed=9)
  batch = prefix_lm_batch(cfg, LENGTHS, 12, seed=9)
  trainable, frozen = train.split(params, [".*"])  # everything trains: a tiny model needs the capacity
  first = None
  for step in range(60):
    trainable, metrics = train.train_step(trainable, frozen, batch, 0.5, cfg=cfg, clip_norm=1.0)
    first = float(metrics["loss"]) if first is None else first
  last = float(train.loss_fn(train.merge(trainable, frozen), batch, cfg=cfg)[0])
  assert last < 0.1 * first, (first, last)


def _scan_outputs(jaxpr):
  """(length, output avals) of every scan in a jaxpr and the jaxprs inside it."""
  return [(eqn.params["length"], [v.aval for v in eqn.outvars])
          for eqn, _ in jaxpr_eqns(jaxpr) if eqn.primitive.name == "scan"]


@pytest.mark.parametrize("remat,compute_dtype", [("none", "float32"), ("full", "float32"), ("dots", "float32"),
                                                  ("none", "bfloat16"), ("full", "bfloat16")])
def test_backward_keeps_no_per_layer_copy_of_the_weights(remat, compute_dtype):
  """What the layer scan hands its backward (its stacked outputs) holds activations, never a layer's weights:
  the backward reads them from the stacked params, which it has anyway, instead of a stacked copy of each
  layer's slice (or of its float32 cast). Checked on the traced step: no scan output of the LLM's layer
  count has the per-layer shape of a frozen weight (the MLP's; the trainable attention weights' per-layer
  shapes are those of their gradients, which the backward scan does output), in either dtype."""
  cfg = dataclasses.replace(config.get("tiny-gemma1-mqa"), remat=remat).with_compute_dtype(compute_dtype)
  sds = jax.ShapeDtypeStruct
  params = jax.eval_shape(lambda k: paligemma.init(k, cfg), jax.random.key(0))
  trainable, frozen = jax.eval_shape(lambda p: train.split(p, frozen_dtype=jnp.float16), params)
  B, T = 2, 12
  batch = {"image": sds((B, cfg.vision.image_size, cfg.vision.image_size, 3), jnp.float32),
           **{k: sds((B, T), jnp.int32) for k in ("text", "mask_ar", "mask_loss", "mask_input")}}
  jaxpr = train.make_train_step(cfg).trace(trainable, frozen, batch, sds((), jnp.float32), None).jaxpr.jaxpr
  weights = {k: v.shape[1:] for k, v in tree.flatten(params).items()
             if k.startswith("llm/layers/mlp/")}
  L = cfg.llm.depth
  llm_scans = [avals for length, avals in _scan_outputs(jaxpr) if length in (L, L - 1)]
  assert llm_scans
  for avals in llm_scans:
    for aval in avals:
      assert all(aval.shape[1:] != shape for shape in weights.values()), (aval, weights)


def test_the_head_in_chunks_under_remat_gives_the_whole_heads_loss_and_gradients(monkeypatch):
  cfg = dataclasses.replace(config.get("tiny-gemma2-gqa"), remat="full")  # Gemma 2: the final soft cap too
  batch = prefix_lm_batch(cfg, LENGTHS, 12)
  trainable, frozen = train.split(random_params(cfg, seed=2), train.is_trainable, frozen_dtype=jnp.float32)

  def run(chunk_bytes):  # a new function each time, so jit traces it again under the chunk size set now
    monkeypatch.setattr(train, "HEAD_CHUNK_BYTES", chunk_bytes)
    grad = jax.value_and_grad(lambda tr: train.loss_fn(train.combine(tr, frozen), batch, cfg=cfg)[0])
    scans = sum(e.primitive.name == "scan" for e, _ in jaxpr_eqns(jax.make_jaxpr(grad)(trainable).jaxpr))
    return jax.jit(grad)(trainable), scans

  row_bytes = 4 * (batch["text"].shape[1] - 1) * cfg.llm.vocab_size
  (whole, g_whole), scans_whole = run(1 << 40)  # one chunk: the head made whole
  for rows in (1, 3):  # 4 chunks of one row; 2 chunks of 3, the last padded by 2
    (chunked, g_chunked), scans_chunked = run(rows * row_bytes)
    assert scans_chunked == scans_whole + 2, rows  # the chunks' forward scan and its backward
    # Each row's logits are the same products in both, blocked differently by the dot: 64 eps32 of the loss
    # (a few times log V here) and of each gradient leaf's largest entry, as the other reorderings here.
    assert_close_f32(chunked, whole, ulps_of_max=64, what=f"loss, {rows} rows a chunk")
    assert_close_f32(g_chunked, g_whole, ulps_of_max=64, what=f"grads, {rows} rows a chunk")
