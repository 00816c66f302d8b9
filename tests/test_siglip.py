"""siglip.py: the patch embedding, the position embedding, aux, and a one-layer forward against numpy."""

import functools
import math

import jax
import numpy as np
import pytest

from helpers import assert_close_f32
from pgjax import siglip
from pgjax.config import SigLIPConfig

# Jitted: one compilation per call site instead of one per op (the suite runs on 2 cores).
forward = jax.jit(siglip.forward, static_argnames=("cfg", "return_attn"))
init = jax.jit(siglip.init, static_argnums=(1, 2))

# 12 px in 4 px patches: P = 9 patches of 4 * 4 * 3 = 48 pixels; width 8, two heads of 4.
CFG = SigLIPConfig(image_size=12, patch_size=4, width=8, depth=1, num_heads=2, mlp_dim=16)
E = 6  # the LLM width the head projects to

# float32 against float64 through a block (dots of <= 48 terms, two layer norms, a softmax over 9): a few
# roundings of each partial sum, which stay within a few times the outputs' largest magnitude: 64 eps32 *
# max|out|. A missing bias, a wrong scale or a transposed weight moves outputs by O(max|out|).
NUMPY_ULPS = 64


def _params(seed=0):
  """siglip.init with every leaf random (the zero biases and head, the unit scales), so none hides a bug."""
  return jax.tree.map(np.copy, _random_params(seed))  # a copy: tests edit it


@functools.cache
def _random_params(seed):
  params = init(jax.random.key(seed), CFG, E)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    leaf = np.asarray(leaf, np.float64)
    if path[-1].key in ("scale", "bias") or path[0].key == "head":
      leaf = leaf + 0.3 * rng.normal(size=leaf.shape)
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


def _image(B=2, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (B, 12, 12, 3)).astype(np.float32)


def _layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _patches(image):
  """[B, P, 48]: patch (i, j) is image[4i:4i+4, 4j:4j+4, :] flattened row-major, patches in row-major order."""
  B, p = image.shape[0], CFG.patch_size
  n = CFG.image_size // p
  return np.stack([image[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :].reshape(B, -1)
                   for i in range(n) for j in range(n)], axis=1).astype(np.float64)


def _embed(params, image):
  emb = params["embedding"]
  x = _patches(image) @ emb["kernel"].reshape(-1, CFG.width) + emb["bias"]  # a stride-4 4x4 conv, by hand
  return x + params["pos_embedding"]


def _forward_np(params, image):
  """The documented math in float64: patches + pos_embedding, one pre-LN block (MHA with biases, queries scaled
  by head_dim**-0.5; GELU MLP), encoder_norm, head."""
  x = _embed(params, image)
  blk = jax.tree.map(lambda a: a[0], params["Transformer"]["encoderblock"])
  mha = blk["MultiHeadDotProductAttention_0"]
  h = _layer_norm(x, blk["LayerNorm_0"]["scale"], blk["LayerNorm_0"]["bias"])
  q, k, v = (np.einsum("BPD,DNH->BPNH", h, mha[n]["kernel"]) + mha[n]["bias"] for n in ("query", "key", "value"))
  logits = np.einsum("BPNH,BQNH->BNPQ", q * CFG.head_dim ** -0.5, k)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  enc = np.einsum("BNPQ,BQNH->BPNH", probs, v)
  x = x + np.einsum("BPNH,NHD->BPD", enc, mha["out"]["kernel"]) + mha["out"]["bias"]
  mlp = blk["MlpBlock_0"]
  h = _layer_norm(x, blk["LayerNorm_1"]["scale"], blk["LayerNorm_1"]["bias"])
  h = _gelu(h @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
  x = x + h @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]
  enc_norm = params["Transformer"]["encoder_norm"]
  pre_logits = _layer_norm(x, enc_norm["scale"], enc_norm["bias"])
  return pre_logits @ params["head"]["kernel"] + params["head"]["bias"], pre_logits


def _f32(params):
  return jax.tree.map(lambda a: np.asarray(a, np.float32), params)


def test_one_layer_forward_matches_numpy():
  params, image = _params(), _image()
  zimg, aux = forward(_f32(params), image, cfg=CFG)
  ref_zimg, ref_pre_logits = _forward_np(params, image)
  assert_close_f32(zimg, ref_zimg, ulps_of_max=NUMPY_ULPS)
  assert_close_f32(aux["pre_logits"], ref_pre_logits, ulps_of_max=NUMPY_ULPS)


def test_patch_embedding_is_a_reshape_and_a_matmul():
  # With the block's output projections zeroed, the block is the identity, so pre_logits is encoder_norm of
  # the embedded patches alone: the hand reshape + matmul above, plus pos_embedding.
  params = _params(seed=3)
  blk = params["Transformer"]["encoderblock"]
  for leaf in (blk["MultiHeadDotProductAttention_0"]["out"], blk["MlpBlock_0"]["Dense_1"]):
    leaf["kernel"], leaf["bias"] = np.zeros_like(leaf["kernel"]), np.zeros_like(leaf["bias"])
  image = _image(seed=3)
  _, aux = forward(_f32(params), image, cfg=CFG)
  enc_norm = params["Transformer"]["encoder_norm"]
  assert_close_f32(aux["pre_logits"], _layer_norm(_embed(params, image), enc_norm["scale"], enc_norm["bias"]),
                   ulps_of_max=NUMPY_ULPS)
  # The position embedding is added per patch: changing patch 4's row changes that token alone.
  moved = {**params, "pos_embedding": params["pos_embedding"].copy()}
  moved["pos_embedding"][0, 4] += np.linspace(-1, 1, 8)  # not a constant, which the norm would remove
  _, aux2 = forward(_f32(moved), image, cfg=CFG)
  changed = np.abs(np.asarray(aux2["pre_logits"]) - np.asarray(aux["pre_logits"])).max(-1) > 0.1
  np.testing.assert_array_equal(changed, np.broadcast_to(np.arange(9) == 4, (2, 9)))


def test_aux_shapes_and_attention():
  params, image = _f32(_params()), _image()
  zimg, aux = forward(params, image, cfg=CFG, return_attn=True)
  assert zimg.shape == (2, 9, E) and aux["pre_logits"].shape == (2, 9, 8)
  attn = np.asarray(aux["attn"])
  assert attn.shape == (1, 2, 2, 1, 9, 9)  # (L, B, N, 1, P, P): every head its own kv head
  # Sums of 9 probabilities normalised by a float32 sum of the same 9: at most ~18 roundings of 1.
  assert_close_f32(attn.sum(-1), np.ones(attn.shape[:-1]), ulps_of_max=18)
  assert "attn" not in forward(params, image, cfg=CFG)[1]


def test_wrong_image_shape_is_refused():
  with pytest.raises(ValueError, match=r"\(B, 12, 12, 3\)"):
    forward(_f32(_params()), np.zeros((1, 16, 16, 3), np.float32), cfg=CFG)
