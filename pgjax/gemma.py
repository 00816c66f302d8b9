"""Gemma 1/2 decoder over params["llm"], keyed as big_vision's `models/ppp/gemma.py` with scan=True.

Axes: see pgjax/__init__.py.

Semantics (big_vision): text embeddings scaled by sqrt(D) in the table's dtype; residual stream and
norms in float32; pre-norm blocks with RMSNorm (1 + scale); Gemma 2 adds post-attention/post-FFW norms
and an attention-logit soft cap applied before masking; RoPE over halves; queries scaled after RoPE;
GeGLU MLP with tanh GELU; logits through the tied embedding table.

This is the reference model: one block, scanned over the checkpoint's stacked layers, for the
teacher-forced forward (`forward`) and for new tokens against a KV cache (`forward_cached`). The block is
built by `make_block` / `make_cached_block` from `LayerOps`, the three places where a layer's weights
meet activations; `checkpoint_ops` reads the checkpoint's einsum weights. `pgjax/decode_view.py` runs
the same blocks over a copy of the weights laid out for decoding, with ops of its own.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from pgjax import layers
from pgjax.config import GemmaConfig


def init(key, cfg: GemmaConfig) -> dict:
  """Random params in the checkpoint layout (fan-in scaled normals, zero norm scales as in big_vision)."""
  L, D, N, K, H, F = cfg.depth, cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  ks = iter(jax.random.split(key, 8))

  def dense(shape, fan_in):
    return jax.random.normal(next(ks), shape, jnp.float32) * fan_in ** -0.5

  if K == N:  # MHA checkpoints fuse q, k and v
    attn = {"qkv_einsum": {"w": dense((L, 3, N, D, H), D)}}
  else:
    attn = {"q_einsum": {"w": dense((L, N, D, H), D)}, "kv_einsum": {"w": dense((L, 2, K, D, H), D)}}
  attn["attn_vec_einsum"] = {"w": dense((L, N, H, D), N * H)}
  norms = ["pre_attention_norm", "pre_ffw_norm"] + (["post_attention_norm", "post_ffw_norm"] if cfg.post_norms else [])
  return {
      "embedder": {"input_embedding": dense((cfg.vocab_size, D), D)},
      "final_norm": {"scale": jnp.zeros((D,), jnp.float32)},
      "layers": {
          "attn": attn,
          "mlp": {"gating_einsum": dense((L, 2, D, F), D), "linear": dense((L, F, D), F)},
          **{n: {"scale": jnp.zeros((L, D), jnp.float32)} for n in norms},
      },
  }


def embed(params: dict, tokens_BT, *, cfg: GemmaConfig):
  """Token embeddings times sqrt(D); the multiplier is cast to the table's dtype first, as in the reference."""
  table_VD = params["embedder"]["input_embedding"]
  rows_BTD = table_VD[tokens_BT]
  if hasattr(rows_BTD, "matmul"):  # a quantized table (quant.quantize(..., embedding=True)): the rows dequantized
    rows_BTD = rows_BTD.astype(jnp.float32)
  x_BTD = rows_BTD * jnp.asarray(cfg.width ** 0.5, table_VD.dtype)
  return x_BTD.astype(jnp.float32)


def logits(params: dict, x_BTD, *, cfg: GemmaConfig):
  """Tied output head, float32 out, with Gemma 2's final soft cap when configured."""
  logits_BTV = layers.dot("BTD,VD->BTV", x_BTD, params["embedder"]["input_embedding"], cfg.compute_dtype)
  return layers.softcap(logits_BTV, cfg.final_logits_softcap)


# ------------------------------------------------------------------------------- the checkpoint's matmuls


def _qkv(h_BTD, attn: dict, select=None, *, cd):
  """Queries (at the positions `select` keeps; all without it), keys and values everywhere, before RoPE."""
  hq_BTD = h_BTD if select is None else select(h_BTD)
  if "qkv_einsum" in attn:
    w_JNDH = attn["qkv_einsum"]["w"]
    if select is None:
      q_BTNH, k_BTKH, v_BTKH = layers.dot("BTD,JNDH->JBTNH", h_BTD, w_JNDH, cd)
    else:
      q_BTNH = layers.dot("BTD,NDH->BTNH", hq_BTD, w_JNDH[0], cd)
      k_BTKH, v_BTKH = layers.dot("BTD,JKDH->JBTKH", h_BTD, w_JNDH[1:], cd)
  else:
    q_BTNH = layers.dot("BTD,NDH->BTNH", hq_BTD, attn["q_einsum"]["w"], cd)
    k_BTKH, v_BTKH = layers.dot("BTD,JKDH->JBTKH", h_BTD, attn["kv_einsum"]["w"], cd)
  return q_BTNH, k_BTKH, v_BTKH


def _attn_out(enc_BTNH, attn: dict, *, cd):
  return layers.dot("BTNH,NHD->BTD", enc_BTNH, attn["attn_vec_einsum"]["w"], cd)


def _mlp(h_BTD, mlp: dict, *, cd):
  # Two plain dots, not one "BTD,JDF->JBTF": XLA:CPU ran that as a transposed [2F, B T] product and
  # transposed it back inside the GELU's fusion (bench/README.md, "Why the code is laid out as it is").
  gating_JDF = mlp["gating_einsum"]
  gate_BTF = layers.dot("BTD,DF->BTF", h_BTD, gating_JDF[0], cd)
  up_BTF = layers.dot("BTD,DF->BTF", h_BTD, gating_JDF[1], cd)
  return layers.dot("BTF,FD->BTD", layers.gelu(gate_BTF) * up_BTF, mlp["linear"], cd)


class LayerOps(NamedTuple):
  """Where a layer's weights meet activations (the rest of a block is the same for every layout), each
  through `layers.dot` in the config's compute dtype, float32 out.

  qkv(h_BTD, attn, select) -> (q_BTNH, k_BTKH, v_BTKH) before RoPE; q at the positions `select` keeps
  (a map [B, T, ...] -> [B, T', ...]; None: all), k and v everywhere.
  attn_out(enc_BTNH, attn) -> BTD, the attention output projection.
  mlp(h_BTD, mlp) -> BTD.
  """
  qkv: Callable
  attn_out: Callable
  mlp: Callable


def checkpoint_ops(cfg: GemmaConfig) -> LayerOps:
  """The matmuls over the checkpoint's einsum weights."""
  cd = cfg.compute_dtype
  return LayerOps(functools.partial(_qkv, cd=cd), functools.partial(_attn_out, cd=cd),
                  functools.partial(_mlp, cd=cd))


# ------------------------------------------------------------------------------------------ the block


def _rope_qkv(q_BTNH, k_BTKH, v_BTKH, q_positions_BT, positions_BT, *, cfg: GemmaConfig, kv_dtype=None):
  """RoPE on queries and keys, the query scale, and the keys and values cast to `kv_dtype` (None: kept):
  what a KV cache of that dtype would hold; the prompt's own attention sees the same."""
  dt = q_BTNH.dtype
  q_BTNH = layers.apply_rope(q_BTNH, q_positions_BT, cfg.rope_max_wavelength) * jnp.asarray(cfg.query_scale, dt)
  k_BTKH = layers.apply_rope(k_BTKH, positions_BT, cfg.rope_max_wavelength)
  if kv_dtype is not None:
    k_BTKH, v_BTKH = k_BTKH.astype(kv_dtype), v_BTKH.astype(kv_dtype)
  return q_BTNH, k_BTKH, v_BTKH


def _residual_block(x_BTD, p: dict, attend, mlp, *, cfg: GemmaConfig, select=None):
  """The pre-norm block around `attend(h_BTD) -> (out_BTD, extra)` and `mlp(h_BTD, p["mlp"]) -> BTD`.

  With `select` (a map [B, T, ...] -> [B, T', ...] of query positions), `attend` answers only the
  selected queries, and the block goes on for those positions alone.
  """
  a_BTD, extra = attend(layers.rms_norm(x_BTD, p["pre_attention_norm"]["scale"]))
  if select is not None:
    x_BTD = select(x_BTD)
  if cfg.post_norms:
    a_BTD = layers.rms_norm(a_BTD, p["post_attention_norm"]["scale"])
  x_BTD = x_BTD + a_BTD
  f_BTD = mlp(layers.rms_norm(x_BTD, p["pre_ffw_norm"]["scale"]), p["mlp"])
  if cfg.post_norms:
    f_BTD = layers.rms_norm(f_BTD, p["post_ffw_norm"]["scale"])
  return x_BTD + f_BTD, extra


def make_block(positions_BT, mask_BTS, *, cfg: GemmaConfig, ops: LayerOps | None = None, kv_dtype=None,
               return_kv: bool = False, return_attn: bool = False):
  """The teacher-forced block `block(x_BTD, p, select=None) -> (x_BTD, (kv, probs))` over every position:
  kv = (k_BTKH, v_BTKH) with return_kv, probs (B, K, G, T, S) with return_attn, else None. With `select`,
  the block runs its queries, output projection and MLP at the selected positions only. `ops`: the
  layer's matmuls (`checkpoint_ops(cfg)` when None)."""
  ops = checkpoint_ops(cfg) if ops is None else ops
  cd = cfg.compute_dtype

  def block(x_BTD, p, select=None):
    def attend(h_BTD):
      q_positions_BT = positions_BT if select is None else select(positions_BT)
      q_BTNH, k_BTKH, v_BTKH = ops.qkv(h_BTD, p["attn"], select)
      q_BTNH, k_BTKH, v_BTKH = _rope_qkv(q_BTNH, k_BTKH, v_BTKH, q_positions_BT, positions_BT, cfg=cfg,
                                         kv_dtype=kv_dtype)
      q_mask_BTS = mask_BTS if select is None else select(mask_BTS)
      enc_BTNH, probs = layers.attention(q_BTNH, k_BTKH, v_BTKH, q_mask_BTS, cap=cfg.attn_logits_softcap,
                                         compute_dtype=cd)
      ys = ((k_BTKH, v_BTKH) if return_kv else None, probs if return_attn else None)
      return ops.attn_out(enc_BTNH, p["attn"]), ys
    return _residual_block(x_BTD, p, attend, ops.mlp, cfg=cfg, select=select)
  return block


def make_cached_block(positions_BT, valid_BS, *, cfg: GemmaConfig, ops: LayerOps | None = None):
  """The block for T new tokens against a layer's KV cache, `block(x_BTD, p, k_BSKH, v_BSKH) -> (x_BTD,
  (k_BTKH, v_BTKH))`: each new token sees the valid cache slots, and itself and the new tokens before it
  (causal); its keys and values come back in the cache's dtype for the caller to write."""
  causal_TT = jnp.tri(positions_BT.shape[1], dtype=bool)
  ops = checkpoint_ops(cfg) if ops is None else ops
  cd = cfg.compute_dtype

  def block(x_BTD, p, k_BSKH, v_BSKH):
    def attend(h_BTD):
      q_BTNH, k_BTKH, v_BTKH = ops.qkv(h_BTD, p["attn"], None)
      q_BTNH, k_BTKH, v_BTKH = _rope_qkv(q_BTNH, k_BTKH, v_BTKH, positions_BT, positions_BT, cfg=cfg,
                                         kv_dtype=k_BSKH.dtype)
      cap = cfg.attn_logits_softcap
      old_BKTGS = layers.attention_logits(q_BTNH, k_BSKH, cap=cap, compute_dtype=cd)
      old_BKTGS = jnp.where(valid_BS[:, None, None, None, :], old_BKTGS, layers.MASK_VALUE)
      new_BKTGT = jnp.where(causal_TT[:, None, :], layers.attention_logits(q_BTNH, k_BTKH, cap=cap, compute_dtype=cd),
                            layers.MASK_VALUE)
      probs = jax.nn.softmax(jnp.concatenate([old_BKTGS, new_BKTGT], axis=-1), axis=-1)
      S = k_BSKH.shape[1]
      enc_BTNH = (layers.attention_combine(probs[..., :S], v_BSKH, cd)
                  + layers.attention_combine(probs[..., S:], v_BTKH, cd))
      return ops.attn_out(enc_BTNH, p["attn"]), (k_BTKH, v_BTKH)
    return _residual_block(x_BTD, p, attend, ops.mlp, cfg=cfg)
  return block


def outputs(params: dict, x_BTD, ys, *, return_kv: bool = False, return_attn: bool = False):
  """(pre_logits_BTD, aux) from the last block's output and the layers' stacked `ys` (see `make_block`)."""
  kv, probs = ys
  aux = {}
  if return_kv:
    aux["kv"] = kv
  if return_attn:
    aux["attn"] = probs
  return layers.rms_norm(x_BTD, params["final_norm"]["scale"]), aux


# ---------------------------------------------------------------------------------------- the forwards


def forward(params: dict, x_BTD, positions_BT, mask_BTS, *, cfg: GemmaConfig, remat: str = "none",
            kv_dtype=None, return_kv: bool = False, return_attn: bool = False, out_start: int | None = None):
  """Runs the stack on embedded inputs, scanned over params["layers"]. Returns (pre_logits_BTD, aux).

  aux may hold "kv": (k_LBTKH, v_LBTKH) for filling a cache (return_kv) and "attn": the attention
  probabilities (L, B, K, G, T, S) (return_attn).
  `out_start` (a static int): the output is wanted at positions out_start.. alone, as a loss on text
  positions wants it (PaliGemma after its image tokens: `paligemma.last_layer_at_text_only` decides). The
  last layer then computes its keys and values everywhere but its queries, output projection and MLP at
  those positions only; pre_logits come back [B, T - out_start, D].
  """
  block = make_block(positions_BT, mask_BTS, cfg=cfg, kv_dtype=kv_dtype, return_kv=return_kv,
                     return_attn=return_attn)
  if out_start is not None and return_attn:
    raise ValueError("return_attn needs every position's queries; out_start computes fewer in the last layer")
  last = None if out_start is None else {"select": lambda a: a[:, out_start:]}
  x_BTD, ys = layers.scan_layers(block, x_BTD, params["layers"], remat=remat, last_kwargs=last)
  return outputs(params, x_BTD, ys, return_kv=return_kv, return_attn=return_attn)


def forward_cached(params: dict, x_BTD, positions_BT, k_LBSKH, v_LBSKH, valid_BS, *, cfg: GemmaConfig):
  """Runs new tokens against a KV cache. Returns (pre_logits_BTD, (k_LBTKH, v_LBTKH)) for the new tokens.

  Each new token sees the valid cache slots, and itself and the new tokens before it (causal). The
  caller writes the returned k/v into the cache, so the cache is only read here (no per-layer copy).
  """
  block = make_cached_block(positions_BT, valid_BS, cfg=cfg)
  x_BTD, kv = layers.scan_layers(block, x_BTD, params["layers"], k_BSKH=k_LBSKH, v_BSKH=v_LBSKH)
  return layers.rms_norm(x_BTD, params["final_norm"]["scale"]), kv
