"""Sharding on 8 fake CPU devices: the rules table covers every leaf, and the sharded step equals one device."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import EPS32, assert_close_f32, prefix_lm_batch, random_params
from pgjax import checkpoint, config, paligemma, sharding, train, tree

assert jax.device_count() == 8, "tests/conftest.py should give 8 CPU devices"


@pytest.mark.parametrize("name", sorted(n for n in config.PRESETS))
@pytest.mark.parametrize("model", [1, 2])
def test_rules_cover_every_preset(name, model):
  cfg = config.get(name)
  shapes = jax.eval_shape(lambda: paligemma.init(jax.random.key(0), cfg))
  mesh = sharding.make_mesh(model=model)
  specs = sharding.param_shardings(shapes, mesh)
  flat = tree.flatten(specs)
  assert len(flat) == len(tree.flatten(shapes))
  # The big matrices really are split: no leaf over 1 MiB is left whole.
  for k, v in tree.flatten(shapes).items():
    if np.prod(v.shape) * 4 > 2**20:
      assert flat[k].spec != P(*([None] * len(v.shape))), k


def test_unmatched_leaf_and_indivisible_axis_raise():
  mesh = sharding.make_mesh()
  with pytest.raises(sharding.ShardingError, match="llm/new_thing/w"):
    sharding.spec_for("llm/new_thing/w", (8, 8), mesh)
  with pytest.raises(sharding.ShardingError, match="does not divide"):
    sharding.spec_for("llm/final_norm/scale", (12,), mesh)
  cfg = config.get("tiny-gemma1-mqa")
  shapes = jax.eval_shape(lambda: paligemma.init(jax.random.key(0), cfg))
  partial_rules = tuple(r for r in sharding.RULES if "q_einsum" not in r[0])
  with pytest.raises(sharding.ShardingError, match="q_einsum"):
    sharding.param_shardings(shapes, mesh, partial_rules)
  with pytest.raises(sharding.ShardingError, match="match no leaf"):
    sharding.check_rules(shapes, sharding.RULES + ((r"llm/typo/.*", (None,)),))


def test_mqa_kv_einsum_splits_width_not_heads():
  mesh = sharding.make_mesh(model=2)
  spec = sharding.spec_for("llm/layers/attn/kv_einsum/w", (18, 2, 1, 2048, 256), mesh)
  assert spec == P(None, None, None, "data", "model")


@pytest.mark.parametrize("model", [1, 2])
def test_sharded_step_equals_single_device_step(model):
  cfg = config.get("tiny-gemma1-mqa")
  params = random_params(cfg, seed=3)
  batch = prefix_lm_batch(cfg, [(4, 6), (6, 2), (3, 5), (5, 5)] * 2, 12)
  trainable, frozen = train.split(params, train.is_trainable, frozen_dtype=jnp.float32)
  ref, ref_metrics = train.train_step(jax.tree.map(jnp.copy, trainable), frozen, batch, 0.1, cfg=cfg)
  step_max = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())  # the largest change one step makes
                 for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(trainable)))

  mesh = sharding.make_mesh(model=model)
  tr_sh, fr_sh = sharding.param_shardings(trainable, mesh), sharding.param_shardings(frozen, mesh)
  step = train.make_train_step(cfg, mesh=mesh, trainable_shardings=tr_sh, frozen_shardings=fr_sh)
  t = jax.device_put(trainable, tr_sh)
  f = jax.device_put(frozen, fr_sh)
  out, _, metrics = step(t, f, batch, 0.1, None)
  # Per leaf: the roundings of p - lr*g (2 eps32 * max|p|) plus lr times the gradients' difference (sharded
  # matmuls and the all-reduce sum the same products in other orders: 64 eps32 * max|g|, and lr * max|g| is
  # step_max).
  assert_close_f32(out, ref, ulps_of_max=2, floor=64 * EPS32 * step_max)
  # The loss, reordered likewise: 64 eps32 of it (the tiny model's logits are smaller than the loss, ~log V).
  assert_close_f32(metrics["loss"], ref_metrics["loss"], ulps_of_max=64)
  for k, v in tree.flatten(out).items():
    expected = sharding.spec_for(k, v.shape, mesh)
    assert isinstance(v.sharding, NamedSharding) and v.sharding.spec == expected, k
    assert len(v.sharding.device_set) == 8


def test_checkpoint_load_places_each_leaf_in_its_sharding(tmp_path):
  cfg = config.get("tiny-gemma2-gqa")
  params = random_params(cfg, seed=1)
  checkpoint.save(tmp_path / "p.npz", params)
  mesh = sharding.make_mesh()
  loaded = checkpoint.load(tmp_path / "p.npz", cfg, sharding=sharding.leaf_sharding(mesh))
  for k, v in tree.flatten(loaded).items():
    assert v.sharding.spec == sharding.spec_for(k, v.shape, mesh), k
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, loaded), jax.tree.map(np.asarray, params))
  rows = sharding.describe(loaded)
  big = [r for r in rows if r[0] == "llm/embedder/input_embedding"][0]
  assert big[4] == 384 * 64 * 4 // 8  # per-device bytes: split 8 ways


def test_describe_from_shapes_alone_names_each_leaf_it_cannot_place():
  """`pgjax inspect` describes a checkpoint from its headers: the rules table applied leaf by leaf, and a leaf
  it cannot place is reported (spec "-", no bytes, why) beside the others instead of stopping the table."""
  mesh = sharding.make_mesh()  # 8 devices on "data"; the "model" entries of the table mean "not split"
  leaves = {"llm/embedder/input_embedding": jax.ShapeDtypeStruct((384, 64), jnp.bfloat16),
            "llm/final_norm/scale": jax.ShapeDtypeStruct((12,), jnp.float32),
            "llm/new_thing/w": jax.ShapeDtypeStruct((8, 8), jnp.float32)}
  rows = sharding.describe(leaves, mesh)
  assert [r[0] for r in rows] == sorted(leaves)
  # 384 rows x 64 / 8 columns x 2 bytes on each device.
  assert rows[0] == ("llm/embedder/input_embedding", (384, 64), "bfloat16", str(P(None, "data")), 384 * 8 * 2, "")
  (_, _, _, spec, nbytes, problem), (_, _, _, spec2, nbytes2, problem2) = rows[1:]
  assert (spec, nbytes, spec2, nbytes2) == ("-", None, "-", None)
  assert "llm/final_norm/scale (12,): axis of size 12 does not divide" in problem
  assert "llm/new_thing/w (8, 8): matches 0 sharding rules" in problem2


@pytest.mark.parametrize("model", [1, 2])
def test_sharded_qlora_step_equals_single_device_step(model):
  from pgjax import lora, quant
  cfg = config.get("tiny-gemma1-mqa")
  params = random_params(cfg, seed=5)
  batch = prefix_lm_batch(cfg, [(4, 6), (6, 2), (3, 5), (5, 5)] * 2, 12)
  frozen = quant.quantize(params, bits=8)
  adapters = lora.init(jax.random.key(1), params, rank=2)
  adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # b nonzero, so a gets a gradient too
  plain = train.make_train_step(cfg, lora_alpha=4.0)
  opt = train.init_opt_state(train.Optimizer(), adapters, cfg)
  ref, _, ref_metrics = plain(jax.tree.map(jnp.copy, adapters), frozen, batch, 0.1, opt)
  step_max = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                 for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(adapters)))
  mesh = sharding.make_mesh(model=model)
  tr_sh, fr_sh = sharding.param_shardings(adapters, mesh), sharding.param_shardings(frozen, mesh)
  # the codes split as their weight's rule says; the per-channel scales keep their single entry along D whole
  q_sh = tree.flatten(fr_sh)["llm/layers/attn/q_einsum/w"]
  assert q_sh.codes.spec == sharding.spec_for("llm/layers/attn/q_einsum/w", (2, 4, 64, 16), mesh)
  assert q_sh.scale.spec[2] is None
  assert tree.flatten(tr_sh)["llm/layers/attn/q_einsum/w/a"].spec == P(None, "data", None)  # L D r: D as W's
  step = train.make_train_step(cfg, mesh=mesh, trainable_shardings=tr_sh, frozen_shardings=fr_sh, lora_alpha=4.0)
  out, _, metrics = step(jax.device_put(adapters, tr_sh), jax.device_put(frozen, fr_sh), batch, 0.1, opt)
  # As the plain sharded step above: the update's roundings plus lr times reordered gradient sums
  assert_close_f32(out, ref, ulps_of_max=2, floor=64 * EPS32 * step_max)
  assert_close_f32(metrics["loss"], ref_metrics["loss"], ulps_of_max=64)
