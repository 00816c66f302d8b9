"""The decode view: the LLM's weights laid out for the token loop, and the forwards that run over it.

Axes: see pgjax/__init__.py. Z, a flattened product of axes, is (N + 2K) H in `qkv_DZ` (query, key, then
value heads), N H in `out_ZD` and (J F) = 2F in `gating_DZ` (gate, then up).

Why a second layout: under `lax.scan` over the checkpoint's stacked leaves, XLA:CPU slices each layer's
weights out of [L, ...] and copies them into the layout its dot wants, for every layer of every decoded
token; at one token per row that copying costs more than the matmuls (bench/README.md has the figures).
`make_decode_view`, run once outside the token loop, makes those copies up front: per-layer matrices that
each step reads in place, the projections fused into one plain matmul each, and a transposed output head.
The price is memory: the LLM's weights (layers and head) a second time, for as long as the view lives.

The math is gemma's: the blocks come from `gemma.make_block` / `gemma.make_cached_block`, given the view's
matmuls as their `gemma.LayerOps`, unrolled over the list of layers instead of scanned. `pgjax.decode` picks this
module's forwards when it is given a view; `decode.make_view` is the public way to make one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange

from pgjax import gemma, layers
from pgjax.config import GemmaConfig


def make_decode_view(params: dict, *, cfg: GemmaConfig, dtype=None) -> dict:
  """The view of the LLM's params (`params["llm"]`), in `dtype` (None: the config's compute dtype, what
  the dots read, so the loop casts nothing; in bfloat16 it is half the bytes per token of float32's, and
  the token loop is bound by those bytes); norm scales stay as they are:
    layers        a list of L dicts, one per layer:
      attn/qkv_DZ   [D, (N + 2K) H]  query heads, then key heads, then value heads (from q_einsum and
                                     kv_einsum, or qkv_einsum)
      attn/out_ZD   [N H, D]         attn_vec_einsum
      mlp/gating_DZ [D, 2F]          gate, then up
      mlp/linear    [F, D]
      and the norm scales [D] under their checkpoint names
    head_DV       [D, V]  the tied embedding table, transposed for the output head (XLA:CPU's matmul of a
                          few rows runs faster against [D, V] than against [V, D]: bench/README.md)
  """
  dtype = jnp.dtype(cfg.compute_dtype if dtype is None else dtype)
  L = cfg.depth
  lp = params["layers"]
  attn = lp["attn"]
  if "qkv_einsum" in attn:
    qkv_LDZ = rearrange(attn["qkv_einsum"]["w"], "L J N D H -> L D (J N H)")
  else:
    q_LDZ = rearrange(attn["q_einsum"]["w"], "L N D H -> L D (N H)")
    kv_LDZ = rearrange(attn["kv_einsum"]["w"], "L J K D H -> L D (J K H)")
    qkv_LDZ = jnp.concatenate([q_LDZ, kv_LDZ], axis=-1)
  out_LZD = rearrange(attn["attn_vec_einsum"]["w"], "L N H D -> L (N H) D")
  gating_LDZ = rearrange(lp["mlp"]["gating_einsum"], "L J D F -> L D (J F)")
  norms = [n for n in lp if n.endswith("_norm")]
  return {
      "layers": [{
          "attn": {"qkv_DZ": qkv_LDZ[l].astype(dtype), "out_ZD": out_LZD[l].astype(dtype)},
          "mlp": {"gating_DZ": gating_LDZ[l].astype(dtype), "linear": lp["mlp"]["linear"][l].astype(dtype)},
          **{n: {"scale": lp[n]["scale"][l]} for n in norms},
      } for l in range(L)],
      "head_DV": params["embedder"]["input_embedding"].T.astype(dtype),
  }


# ---------------------------------------------------------------------------------------- the view's matmuls


def _qkv(h_BTD, attn: dict, select=None, *, cfg: GemmaConfig):
  """One plain matmul, then split into query, key and value heads. With `select`, the queries are
  selected after it: a prefill selects once, and the fused matmul is worth more than the unselected rows."""
  N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  qkv_BTZ = layers.dot("BTD,DZ->BTZ", h_BTD, attn["qkv_DZ"], cfg.compute_dtype)
  q_BTNH = rearrange(qkv_BTZ[..., :N * H], "B T (N H) -> B T N H", H=H)
  k_BTKH = rearrange(qkv_BTZ[..., N * H:(N + K) * H], "B T (K H) -> B T K H", H=H)
  v_BTKH = rearrange(qkv_BTZ[..., (N + K) * H:], "B T (K H) -> B T K H", H=H)
  if select is not None:
    q_BTNH = select(q_BTNH)
  return q_BTNH, k_BTKH, v_BTKH


def _attn_out(enc_BTNH, attn: dict, *, cfg: GemmaConfig):
  return layers.dot("BTZ,ZD->BTD", rearrange(enc_BTNH, "B T N H -> B T (N H)"), attn["out_ZD"], cfg.compute_dtype)


def _mlp(h_BTD, mlp: dict, *, cfg: GemmaConfig):
  cd = cfg.compute_dtype
  gate_BTF, up_BTF = jnp.split(layers.dot("BTD,DZ->BTZ", h_BTD, mlp["gating_DZ"], cd), 2, axis=-1)
  return layers.dot("BTF,FD->BTD", layers.gelu(gate_BTF) * up_BTF, mlp["linear"], cd)


def _ops(cfg: GemmaConfig) -> gemma.LayerOps:
  return gemma.LayerOps(*(functools.partial(op, cfg=cfg) for op in (_qkv, _attn_out, _mlp)))


# ------------------------------------------------------------------------------------------- the forwards


def _layers(view: dict, cfg: GemmaConfig) -> list[dict]:
  if len(view["layers"]) != cfg.depth:
    raise ValueError(f"decode_view has {len(view['layers'])} layers, the config {cfg.depth}")
  return view["layers"]


def _unrolled(block_fn, x, layer_list, *, last_kwargs: dict | None = None, **xs):
  """`layers.scan_layers` over the view's list of layers, unrolled: each layer reads its own arrays, so
  nothing is sliced out of a stacked leaf. `xs` stay stacked [L, ...]. `last_kwargs`: further keyword
  arguments for the last layer's block alone."""
  ys = []
  for l, layer in enumerate(layer_list):
    extra = {k: v[l] for k, v in xs.items()}
    if last_kwargs and l == len(layer_list) - 1:
      extra.update(last_kwargs)
    x, y = block_fn(x, layer, **extra)
    ys.append(y)
  return x, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def _take(x_BT_, index_B):
  """x[b, index_B[b]] for each row b, keeping a length-1 T axis."""
  return jnp.take_along_axis(x_BT_, index_B.reshape((-1, 1) + (1,) * (x_BT_.ndim - 2)), axis=1)


def forward(params: dict, view: dict, x_BTD, positions_BT, mask_BTS, out_index_B, *, cfg: GemmaConfig,
            kv_dtype=None):
  """`gemma.forward(..., return_kv=True)` over the view, with the output wanted at one position of each
  row, `out_index_B`, as a prefill wants it: the last layer computes its keys and values everywhere but
  the rest there only. Returns (pre_logits_B1D, {"kv": (k_LBTKH, v_LBTKH)}); `params` is params["llm"]
  (for the final norm)."""
  block = gemma.make_block(positions_BT, mask_BTS, cfg=cfg, ops=_ops(cfg), kv_dtype=kv_dtype, return_kv=True)
  x_BTD, ys = _unrolled(block, x_BTD, _layers(view, cfg), last_kwargs={"select": lambda a: _take(a, out_index_B)})
  return gemma.outputs(params, x_BTD, ys, return_kv=True)


def forward_cached(params: dict, view: dict, x_BTD, positions_BT, k_LBSKH, v_LBSKH, valid_BS, *,
                   cfg: GemmaConfig):
  """`gemma.forward_cached` over the view: the same math, the same (pre_logits_BTD, (k_LBTKH, v_LBTKH))."""
  block = gemma.make_cached_block(positions_BT, valid_BS, cfg=cfg, ops=_ops(cfg))
  x_BTD, kv = _unrolled(block, x_BTD, _layers(view, cfg), k_BSKH=k_LBSKH, v_BSKH=v_LBSKH)
  return layers.rms_norm(x_BTD, params["final_norm"]["scale"]), kv


def logits(view: dict, x_BTD, *, cfg: GemmaConfig):
  """`gemma.logits` through the view's transposed copy of the table."""
  logits_BTV = layers.dot("BTD,DV->BTV", x_BTD, view["head_DV"], cfg.compute_dtype)
  return layers.softcap(logits_BTV, cfg.final_logits_softcap)
