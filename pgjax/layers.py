"""Pure ops shared by both towers, and the scan over stacked layers.

Axes: see pgjax/__init__.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# big_vision fills masked attention logits with this finite value rather than -inf, so a fully masked
# row (a padding query) gives a uniform distribution instead of NaN.
MASK_VALUE = -2.3819763e38


def layer_norm(x, scale, bias, eps: float = 1e-6):
  """flax.linen.LayerNorm defaults, statistics in float32, result in x's dtype."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rms_norm(x, scale, eps: float = 1e-6):
  """Gemma's RMSNorm: the checkpoint stores `scale`, the op multiplies by (1 + scale)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
  return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def gelu(x):
  """Both towers use the tanh approximation."""
  return jax.nn.gelu(x, approximate=True)


def softcap(x, cap: float):
  return cap * jnp.tanh(x / cap) if cap else x


def apply_rope(x_BTNH, positions_BT, max_wavelength: float = 10_000.0):
  """Rotary embedding over halves of the head vector (not interleaved pairs), as Gemma does."""
  H = x_BTNH.shape[-1]
  inv_timescale = max_wavelength ** (-2.0 * jnp.arange(H // 2, dtype=jnp.float32) / H)
  angle_BTH = positions_BT[..., None].astype(jnp.float32) * inv_timescale
  sin, cos = jnp.sin(angle_BTH)[:, :, None, :], jnp.cos(angle_BTH)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTNH.dtype)


def attention_logits(q_BTNH, k_BSKH, *, cap: float = 0.0):
  """Grouped-query attention logits in float32, soft-capped (before masking, as the reference does).

  Query head n reads kv head n // G: big_vision groups query heads as (K G) with K outer. The result is
  laid out [B, K, T, G, S] rather than [B, K, G, T, S]: with one kv head (Gemma 1's MQA) the (T, G) rows
  are q's own layout, so neither this dot nor `attention_combine`'s (nor their gradients) needs a
  transposed copy of q, the probabilities or the output; with several kv heads both layouts need one.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  logits_BKTGS = jnp.einsum("BTKGH,BSKH->BKTGS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
  return softcap(logits_BKTGS, cap)


def attention_combine(probs_BKTGS, v_BSKH):
  """Weighted sum of values for grouped heads; returns (B, T, N, H) in v's dtype."""
  B, K, T, G, _ = probs_BKTGS.shape
  enc_BTKGH = jnp.einsum("BKTGS,BSKH->BTKGH", probs_BKTGS.astype(v_BSKH.dtype), v_BSKH)
  return enc_BTKGH.reshape(B, T, K * G, v_BSKH.shape[-1])


def attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS=None, *, cap: float = 0.0):
  """Scaled-elsewhere dot-product attention. Returns (out_BTNH, probs_BKGTS); the probabilities are
  transposed to [B, K, G, T, S] for callers that inspect them (unused, the transpose is never computed)."""
  logits_BKTGS = attention_logits(q_BTNH, k_BSKH, cap=cap)
  if mask_BTS is not None:
    logits_BKTGS = jnp.where(mask_BTS[:, None, :, None, :], logits_BKTGS, MASK_VALUE)
  probs_BKTGS = jax.nn.softmax(logits_BKTGS, axis=-1)
  return attention_combine(probs_BKTGS, v_BSKH), jnp.swapaxes(probs_BKTGS, 2, 3)


# Ops whose outputs the backward recomputes rather than keeps even without remat: in a block they make a
# layer's weights ready for its matmuls (its slice of the stacked leaves, the float32 cast of float16
# weights, a gate/up split, a reshape), and kept they would be per-layer copies of every weight, stacked
# by the scan for the backward: a large share of a 3B step's memory (bench/README.md, "Why the code is laid
# out as it is"). Recomputed, the backward reads the stacked leaves it has anyway. On activations the same
# ops are cheap copies (and usually free views).
_RECOMPUTED_VIEWS = frozenset({jax.lax.convert_element_type_p, jax.lax.dynamic_slice_p, jax.lax.slice_p,
                               jax.lax.squeeze_p, jax.lax.reshape_p, jax.lax.transpose_p,
                               jax.lax.broadcast_in_dim_p})


def _save_all_but_views(prim, *_, **__) -> bool:
  return prim not in _RECOMPUTED_VIEWS


def remat_policy(name: str):
  """Maps PaliGemmaConfig.remat to a jax.checkpoint policy: "none" recomputes no matmul or activation, only
  the weights' views above; "full" recomputes the block's forward; "dots" keeps the dots without batch
  dimensions (the projections and the MLP) and recomputes the rest."""
  return {"none": _save_all_but_views,
          "full": jax.checkpoint_policies.nothing_saveable,
          "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[name]


def scan_layers(block_fn, x, layers, *, remat: str = "none", last_kwargs: dict | None = None, **xs):
  """Runs `block_fn(x, layer_params, **per_layer) -> (x, ys)` over params stacked on a leading axis.

  One traced block regardless of depth (constant compile time); `xs` are further per-layer inputs
  (e.g. a layer's KV cache), stacked on the same leading axis. `last_kwargs`: further keyword arguments
  for the last layer's block alone (e.g. to compute less there); the scan then runs the other layers and
  the last one is called on its own, so the block is traced twice.
  """
  policy = remat_policy(remat)
  if not last_kwargs:
    block_fn = jax.checkpoint(block_fn, policy=policy, prevent_cse=False)

    def body(carry, inputs):
      layer, extra = inputs
      return block_fn(carry, layer, **extra)

    return jax.lax.scan(body, x, (layers, xs))

  # The first L - 1 layers index the stacked leaves by the loop counter instead of scanning over a
  # slice [:-1] of them: a static slice of a stacked leaf is a copy of it (for a 3B, of nearly every
  # weight), an index is read in place. The index sits inside the checkpointed block (every policy
  # recomputes it), so what the backward keeps is the (loop-invariant) stacked leaves, not each layer's slice.
  def indexed_block(carry, stacked, i, **kw):
    take = lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False)
    return block_fn(carry, jax.tree.map(take, stacked[0]), **jax.tree.map(take, stacked[1]), **kw)

  def make(kw):  # keyword arguments bound before jax.checkpoint, which would trace them
    fn = functools.partial(indexed_block, **kw)
    return jax.checkpoint(fn, policy=policy, prevent_cse=False)

  scan_block, last_block = make({}), make(last_kwargs)
  L = jax.tree.leaves(layers)[0].shape[0]
  x, ys = jax.lax.scan(lambda carry, i: scan_block(carry, (layers, xs), i), x, jnp.arange(L - 1))
  x, y = last_block(x, (layers, xs), jnp.asarray(L - 1))
  return x, jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), ys, y)

