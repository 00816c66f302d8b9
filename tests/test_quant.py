"""Weight-only quantization: literal codes and scales, the half-step bound, the dot under scan and autodiff,
int4 packing, the on-disk record, and the logit error of quantized models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgjax import config, layers, paligemma, quant, tree
from tests.helpers import assert_close_f32, prefix_lm_batch, random_params


def test_int8_is_absmax_per_output_channel_by_hand():
  w = np.array([[1.0, -2.0], [4.0, 0.5]], np.float32)  # D F: input axis 0, one scale per column
  q = quant.quantize_array(w, (-2,), 8)
  np.testing.assert_array_equal(np.asarray(q.scale), np.float32([[4 / 127, 2 / 127]]))  # float32 scales
  # 1 / (4/127) = 31.75 -> 32; 0.5 / (2/127) = 31.75 -> 32; the absmax entries map to +-127
  np.testing.assert_array_equal(np.asarray(q.codes), [[32, -127], [127, 32]])
  assert q.codes.dtype == np.int8 and q.nbytes == 4 + 2 * 4


def test_int4_groups_64_along_the_input_axis_by_hand():
  w = np.zeros((128, 2), np.float32)  # D F with D = 2 groups of 64
  w[3, 0], w[70, 0], w[100, 1], w[10, 1] = 7.0, -3.5, 1.4, -0.7
  q = quant.quantize_array(w, (-2,), 4)
  assert (q.codes.dtype, q.codes.shape, q.shape, q.scale.shape) == (np.uint8, (64, 2), (128, 2), (2, 2))
  np.testing.assert_allclose(np.asarray(q.scale), [[1.0, 0.1], [0.5, 0.2]], rtol=1e-7)
  codes = np.asarray(quant.int_codes(q))
  assert (codes[3, 0], codes[70, 0], codes[100, 1], codes[10, 1]) == (7, -7, 7, -7)
  assert np.count_nonzero(codes) == 4
  # an input axis that does not divide by 64 falls back to one scale per output channel
  assert quant.quantize_array(np.ones((96, 3), np.float32), (-2,), 4).scale.shape == (1, 3)
  # and an odd input axis, which cannot pack in pairs, gets int8
  assert quant.quantize_array(np.ones((8, 8, 3, 4), np.float32), (-4, -3, -2), 4).bits == 8


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantized_weights_are_within_half_a_step(bits):
  rng = np.random.default_rng(0)
  w = rng.standard_t(3, size=(2, 4, 128, 16)).astype(np.float32)  # L N D H, heavy-tailed like real weights
  q = quant.quantize_array(w, (-2,), bits)
  err = np.abs(np.asarray(quant.dequantize(q)) - w)
  step = np.asarray(q.scale)
  if bits == 4:
    step = np.repeat(step, 64, axis=-2)
  assert (err <= 0.5 * step * (1 + 1e-6)).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_a_large_leaf_quantized_slice_by_slice_is_the_whole_leaf_quantized(bits, monkeypatch):
  # Per output channel (int8) and per group along the input axis (int4), a slice of the first axis (the
  # layer, an output axis) quantizes alone: quantizing slice by slice must give the same codes and scales.
  w = np.random.default_rng(3).standard_t(3, size=(3, 2, 128, 6)).astype(np.float16)  # L J D F, as stored
  whole = quant.quantize_array(w, (-2,), bits)
  monkeypatch.setattr(quant, "SLICE_BYTES", 0)
  sliced = quant.quantize_array(w, (-2,), bits)
  for a, b in ((whole.codes, sliced.codes), (whole.scale, sliced.scale)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  assert quant.quantize_array(w[0, 0], (-2,), bits).codes.shape == whole.codes.shape[2:]  # 2-D: whole
  # a leaf whose first axis is an input axis is never sliced (SigLIP's patch embedding: p q C D)
  emb = np.random.default_rng(4).normal(size=(4, 4, 3, 8)).astype(np.float32)
  np.testing.assert_array_equal(quant.quantize_array(emb, (-4, -3, -2), bits).scale.shape, (1, 1, 1, 8))


def test_quantized_dot_under_scan_jit_and_grad_equals_the_dequantized_weight():
  rng = np.random.default_rng(1)
  w = rng.normal(size=(3, 2, 4, 128, 16)).astype(np.float32)  # L J K D H
  x = rng.normal(size=(2, 5, 128)).astype(np.float32)
  for bits in (8, 4):
    q = quant.quantize_array(w, (-2,), bits)
    deq = quant.dequantize(q)

    def run(ws, x):
      def body(c, wl):
        k, v = layers.dot("BTD,JKDH->JBTKH", x, wl[0:2], "float32")
        return c + jnp.sum(jnp.tanh(k) * v), None
      return jax.lax.scan(body, 0.0, ws)[0]

    assert_close_f32(jax.jit(run)(q, x), run(deq, x), ulps_of_max=16, what=f"int{bits} scan")
    assert_close_f32(jax.grad(run, argnums=1)(q, x), jax.grad(run, argnums=1)(deq, x), ulps_of_max=16,
                     what=f"int{bits} grad")
  with pytest.raises(ValueError, match="has input axes"):
    layers.dot("BTH,JKDH->JBTKD", x[..., :16], q[0], "float32")


def test_int4_packing_two_per_byte_by_hand():
  codes = np.array([[1, -1, 7, -7], [0, 3, -8, 2]], np.int8).T  # [4, 2]: packed along axis 0
  packed = quant.pack_int4(codes, 0)
  # low nibble first; -1 = 0xF, -7 = 0x9, -8 = 0x8
  np.testing.assert_array_equal(packed, np.array([[0xF1, 0x97], [0x30, 0x28]], np.uint8).T)
  np.testing.assert_array_equal(quant.unpack_int4(packed, 0), codes)
  np.testing.assert_array_equal(np.asarray(quant.unpack_int4(jnp.asarray(packed), -2)), codes)  # jax alike


def test_record_round_trips_and_a_bad_one_is_named():
  q = quant.quantize_array(np.random.default_rng(2).normal(size=(4, 128, 8)).astype(np.float32), (-2,), 4)
  arrays = quant.to_arrays("llm/layers/mlp/linear", q)
  assert arrays["llm/layers/mlp/linear/__q_codes"].nbytes == 4 * 128 * 8 // 2
  back = quant.from_arrays("llm/layers/mlp/linear", *arrays.values())
  np.testing.assert_array_equal(np.asarray(quant.int_codes(back)), np.asarray(quant.int_codes(q)))
  assert (back.in_axes, back.bits) == (q.in_axes, 4)
  with pytest.raises(ValueError, match="llm/layers/mlp/linear: not a quantized leaf record"):
    quant.from_arrays("llm/layers/mlp/linear", arrays["llm/layers/mlp/linear/__q_codes"],
                      np.ones((4, 1, 8), np.float32), arrays["llm/layers/mlp/linear/__q_meta"])


def test_only_matmul_weights_are_quantized():
  cfg = config.get("tiny-gemma2-gqa")
  q = tree.flatten(quant.quantize(random_params(cfg), bits=8))
  quantized = sorted(p for p, x in q.items() if quant.is_quantized(x))
  assert "llm/embedder/input_embedding" not in quantized and not any(p.endswith(("bias", "scale")) for p in quantized)
  assert [p for p in quantized if p.startswith("llm/")] == [
      "llm/layers/attn/attn_vec_einsum/w", "llm/layers/attn/kv_einsum/w", "llm/layers/attn/q_einsum/w",
      "llm/layers/mlp/gating_einsum", "llm/layers/mlp/linear"]
  assert len(quantized) == 5 + 8  # img: query, key, value, out, Dense_0, Dense_1, the patch embedding, the head
  assert quant.describe(q)["int8"] == len(quantized)


@pytest.mark.parametrize("name", ["tiny-gemma1-mqa", "tiny-gemma1-mha", "tiny-gemma2-gqa"])
def test_logits_of_quantized_models_stay_within_a_stated_multiple_of_the_step(name):
  """The bound, set before measuring: each weight is off by at most half its step, a relative 1/254 (int8) or 1/14
  (int4) of its channel's or group's absmax, so each layer's output by about that fraction of its magnitude;
  over a few layers these add up, and the bound allows 4 steps (1/127, 1/7) of max|logit|. Measured on an AMD
  EPYC: int8 1.1 to 2.3 steps, int4 1.0 to 2.7, with or without the embedding table quantized."""
  cfg = config.get(name)
  params = random_params(cfg, seed=11)
  batch = prefix_lm_batch(cfg, [(5, 4), (3, 6)], 12, seed=2)
  fwd = lambda p: np.asarray(paligemma.forward(p, batch["image"], batch["text"], batch["mask_ar"], cfg=cfg)[0])
  ref = fwd(params)
  for bits, step in ((8, 1 / 127), (4, 1 / 7)):
    for embedding in (False, True) if name == "tiny-gemma2-gqa" else (False,):  # the table too: the same bound
      err = np.abs(fwd(quant.quantize(params, bits=bits, embedding=embedding)) - ref).max() / np.abs(ref).max()
      print(f"{name} int{bits} embedding {embedding}: max|dlogit| / max|logit| = {err:.4f} = {err / step:.2f} steps")
      assert err <= 4 * step, (bits, embedding, err)


def test_checkpoint_quantizes_while_loading_and_a_quantized_tree_saves_and_loads(tmp_path):
  from pgjax import checkpoint
  cfg = config.get("tiny-gemma1-mqa")
  params = random_params(cfg, seed=4)
  checkpoint.save(tmp_path / "f.npz", params)
  for bits in (8, 4):
    skip = lambda p: p.startswith("llm/layers/attn/")
    loaded = tree.flatten(checkpoint.load(tmp_path / "f.npz", cfg, quantize=bits, quantize_skip=skip))
    want = tree.flatten(quant.quantize(params, bits=bits, skip=(r"llm/layers/attn/.*",)))
    assert loaded.keys() == want.keys()
    for k, v in want.items():
      assert quant.is_quantized(loaded[k]) == quant.is_quantized(v), k
      if quant.is_quantized(v):
        np.testing.assert_array_equal(np.asarray(loaded[k].codes), np.asarray(v.codes))
        np.testing.assert_array_equal(np.asarray(loaded[k].scale), np.asarray(v.scale))
      else:
        np.testing.assert_array_equal(np.asarray(loaded[k]), np.asarray(v), err_msg=k)
    checkpoint.save(tmp_path / f"q{bits}.npz", tree.unflatten(loaded))
    again = tree.flatten(checkpoint.load(tmp_path / f"q{bits}.npz", cfg))  # no re-quantizing: the record loads
    assert sum(quant.is_quantized(x) for x in again.values()) == sum(quant.is_quantized(x) for x in want.values())
    for k, v in loaded.items():
      a, b = (quant.dequantize(x) if quant.is_quantized(x) else x for x in (again[k], v))
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=k)
  # `pgjax inspect` and config inference read a quantized file as the weights' shapes, in int8 / int4
  shapes = checkpoint.read_shapes(tmp_path / "q4.npz")
  assert shapes["llm/layers/mlp/linear"] == ((2, 128, 64), np.dtype("int4"))
  assert shapes["llm/layers/attn/q_einsum/w"][1] == np.float32  # skipped when quantizing
  assert checkpoint.infer_config(tmp_path / "q4.npz") == cfg
  # int4 on disk is half a byte per weight (+ scales): the saved file is smaller than the int8 one
  assert (tmp_path / "q4.npz").stat().st_size < (tmp_path / "q8.npz").stat().st_size
