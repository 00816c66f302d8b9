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


def dot(spec: str, x, w, compute_dtype="float32"):
  """The einsum `spec` of two operands, both cast to `compute_dtype`, accumulated and returned in float32.

  This is where a weight meets an activation (and where attention's two activation dots run): every
  matmul of both towers goes through it. In float32 it is a plain einsum, big_vision's numerics. In
  bfloat16 or float16 its gradient is its own: JAX's autodiff of a low-precision dot with a float32
  result runs the backward's two dots in float32, against a float32 cotangent, and the backward is two
  thirds of a step's FLOPs; here the cotangent is cast to the compute dtype too, so both gradient dots run
  at the low-precision rate, still accumulating in float32. Gradients come back in the operands' dtypes
  (a float32 master weight gets a float32 gradient).

  `w` may also be a quantized weight (`quant.QArray`) or a weight with a low-rank adapter (`lora.Adapted`),
  each with a matmul of its own: this is the one place where either plugs in.
  """
  if hasattr(w, "matmul"):  # a quantized weight (quant.QArray) or one with a LoRA adapter (lora.Adapted)
    return w.matmul(spec, x, compute_dtype)
  cd = jnp.dtype(compute_dtype)
  if cd == jnp.float32:
    return jnp.einsum(spec, x.astype(cd), w.astype(cd), preferred_element_type=jnp.float32)
  return _low_precision_dot(spec, cd, x, w)


def _einsum_f32(spec, a, b, cd):
  return jnp.einsum(spec, a.astype(cd), b.astype(cd), preferred_element_type=jnp.float32)


@functools.lru_cache(maxsize=None)
def _transposed_specs(spec: str) -> tuple[str, str]:
  """The einsums of the two operands' gradients: for "xs,ws->ys", "ys,ws->xs" and "ys,xs->ws". Every letter
  of an operand must appear in the other operand or the output (a letter summed over one operand alone has
  no such transpose; no matmul here has one)."""
  inputs, out = spec.replace(" ", "").split("->")
  xs, ws = inputs.split(",")
  for name, own, other in (("first", xs, ws), ("second", ws, xs)):
    lone = set(own) - set(other) - set(out)
    if lone:
      raise ValueError(f"dot {spec!r}: {''.join(sorted(lone))} of the {name} operand is summed over it alone")
  return f"{out},{ws}->{xs}", f"{out},{xs}->{ws}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _low_precision_dot(spec, cd, x, w):
  return _einsum_f32(spec, x, w, cd)


def _low_precision_dot_fwd(spec, cd, x, w):
  # The residuals are the operands as given (not their casts): under remat the cast is recomputed like
  # every other view of a weight (`_RECOMPUTED_VIEWS`), and an activation costs what it costs in float32.
  return _einsum_f32(spec, x, w, cd), (x, w)


def _low_precision_dot_bwd(spec, cd, residuals, g_y):
  x, w = residuals
  dx_spec, dw_spec = _transposed_specs(spec)
  g_x = _einsum_f32(dx_spec, g_y, w, cd).astype(x.dtype)
  g_w = _einsum_f32(dw_spec, g_y, x, cd).astype(w.dtype)
  return g_x, g_w


_low_precision_dot.defvjp(_low_precision_dot_fwd, _low_precision_dot_bwd)


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


def attention_logits(q_BTNH, k_BSKH, *, cap: float = 0.0, compute_dtype="float32"):
  """Grouped-query attention logits in float32, soft-capped (before masking, as the reference does).

  Query head n reads kv head n // G: big_vision groups query heads as (K G) with K outer. The result is
  laid out [B, K, T, G, S] rather than [B, K, G, T, S]: with one kv head (Gemma 1's MQA) the (T, G) rows
  are q's own layout, so neither this dot nor `attention_combine`'s (nor their gradients) needs a
  transposed copy of q, the probabilities or the output; with several kv heads both layouts need one.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  logits_BKTGS = dot("BTKGH,BSKH->BKTGS", q_BTKGH, k_BSKH, compute_dtype)
  return softcap(logits_BKTGS, cap)


def attention_combine(probs_BKTGS, v_BSKH, compute_dtype="float32"):
  """Weighted sum of values for grouped heads; returns (B, T, N, H) in float32."""
  B, K, T, G, _ = probs_BKTGS.shape
  enc_BTKGH = dot("BKTGS,BSKH->BTKGH", probs_BKTGS, v_BSKH, compute_dtype)
  return enc_BTKGH.reshape(B, T, K * G, v_BSKH.shape[-1])


def attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS=None, *, cap: float = 0.0, compute_dtype="float32"):
  """Scaled-elsewhere dot-product attention. Returns (out_BTNH, probs_BKGTS); the probabilities are
  transposed to [B, K, G, T, S] for callers that inspect them (unused, the transpose is never computed)."""
  logits_BKTGS = attention_logits(q_BTNH, k_BSKH, cap=cap, compute_dtype=compute_dtype)
  if mask_BTS is not None:
    logits_BKTGS = jnp.where(mask_BTS[:, None, :, None, :], logits_BKTGS, MASK_VALUE)
  probs_BKTGS = jax.nn.softmax(logits_BKTGS, axis=-1)
  return attention_combine(probs_BKTGS, v_BSKH, compute_dtype), jnp.swapaxes(probs_BKTGS, 2, 3)


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

