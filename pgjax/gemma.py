"""Gemma 1/2 decoder over params["llm"], keyed as big_vision's `models/ppp/gemma.py` with scan=True.

Axis legend as in layers.py: B batch, T query positions, S key positions, N query heads, K kv heads,
G = N/K, H head dim, D width, F MLP hidden, V vocab, L layers, E flattened axes (of a `make_decode_view` matrix).

Semantics (big_vision): text embeddings scaled by sqrt(D) in the table's dtype; residual stream and
norms in float32; pre-norm blocks with RMSNorm (1 + scale); Gemma 2 adds post-attention/post-FFW norms
and an attention-logit soft cap applied before masking; RoPE over halves; queries scaled after RoPE;
GeGLU MLP with tanh GELU; logits through the tied embedding table.

For inference, `make_decode_view` re-lays the weights out as per-layer matrices (and a transposed output
head) that the forwards and `logits` can use instead, the same math without per-layer slicing: see its
docstring for why.
"""

from __future__ import annotations

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
  x_BTD = table_VD[tokens_BT] * jnp.asarray(cfg.width ** 0.5, table_VD.dtype)
  return x_BTD.astype(jnp.float32)


def logits(params: dict, x_BTD, *, cfg: GemmaConfig, decode_view: dict | None = None):
  """Tied output head in float32, with Gemma 2's final soft cap when configured; with `decode_view`,
  through its transposed copy of the table."""
  if decode_view is not None:
    head_DV = decode_view["head_DV"]
    logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, head_DV.astype(x_BTD.dtype), preferred_element_type=jnp.float32)
  else:
    table_VD = params["embedder"]["input_embedding"]
    logits_BTV = jnp.einsum("BTD,VD->BTV", x_BTD, table_VD.astype(x_BTD.dtype), preferred_element_type=jnp.float32)
  return layers.softcap(logits_BTV, cfg.final_logits_softcap)


def _qkv(h_BTD, attn: dict, positions_BT, cfg: GemmaConfig, kv_dtype, select=None):
  """Queries, keys and values (after RoPE; queries scaled). With `select` (see `_residual_block`), the
  queries at the selected positions only; keys and values stay everywhere."""
  dt = h_BTD.dtype
  N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  q_positions_BT = positions_BT if select is None else select(positions_BT)
  if "qkv_DE" in attn:  # a layer of `make_decode_view`: one plain matmul, then split (q heads, k heads, v heads)
    B, T, _ = h_BTD.shape
    qkv_BTE = jnp.einsum("BTD,DE->BTE", h_BTD, attn["qkv_DE"].astype(dt))
    q_BTNH = qkv_BTE[..., :N * H].reshape(B, T, N, H)
    k_BTKH = qkv_BTE[..., N * H:(N + K) * H].reshape(B, T, K, H)
    v_BTKH = qkv_BTE[..., (N + K) * H:].reshape(B, T, K, H)
    if select is not None:  # prefill, once: the fused matmul is worth more than the unselected rows
      q_BTNH = select(q_BTNH)
  else:
    hq_BTD = h_BTD if select is None else select(h_BTD)
    if "qkv_einsum" in attn:
      w_CNDH = attn["qkv_einsum"]["w"].astype(dt)
      if select is None:
        q_BTNH, k_BTKH, v_BTKH = jnp.einsum("BTD,CNDH->CBTNH", h_BTD, w_CNDH)
      else:
        q_BTNH = jnp.einsum("BTD,NDH->BTNH", hq_BTD, w_CNDH[0])
        k_BTKH, v_BTKH = jnp.einsum("BTD,CKDH->CBTKH", h_BTD, w_CNDH[1:])
    else:
      q_BTNH = jnp.einsum("BTD,NDH->BTNH", hq_BTD, attn["q_einsum"]["w"].astype(dt))
      k_BTKH, v_BTKH = jnp.einsum("BTD,CKDH->CBTKH", h_BTD, attn["kv_einsum"]["w"].astype(dt))
  q_BTNH = layers.apply_rope(q_BTNH, q_positions_BT, cfg.rope_max_wavelength) * jnp.asarray(cfg.query_scale, dt)
  k_BTKH = layers.apply_rope(k_BTKH, positions_BT, cfg.rope_max_wavelength)
  if kv_dtype is not None:  # what a KV cache of this dtype would hold; the prompt's own attention sees the same
    k_BTKH, v_BTKH = k_BTKH.astype(kv_dtype), v_BTKH.astype(kv_dtype)
  return q_BTNH, k_BTKH, v_BTKH


def _mlp(h_BTD, mlp: dict):
  dt = h_BTD.dtype
  if "gating_DE" in mlp:  # a layer of `make_decode_view`: [gate | up] in one matmul
    gate_BTF, up_BTF = jnp.split(jnp.einsum("BTD,DE->BTE", h_BTD, mlp["gating_DE"].astype(dt)), 2, axis=-1)
  else:
    # Two plain dots, not one "BTD,CDF->CBTF": XLA:CPU ran that as a transposed [2F, B T] product and
    # transposed it back inside the GELU's fusion (bench-small's train step: 13 ms a layer).
    gating_CDF = mlp["gating_einsum"].astype(dt)
    gate_BTF = jnp.einsum("BTD,DF->BTF", h_BTD, gating_CDF[0])
    up_BTF = jnp.einsum("BTD,DF->BTF", h_BTD, gating_CDF[1])
  return jnp.einsum("BTF,FD->BTD", layers.gelu(gate_BTF) * up_BTF, mlp["linear"].astype(dt))


def _residual_block(x_BTD, p: dict, attend, cfg: GemmaConfig, select=None):
  """The pre-norm block around an attention function `attend(h_BTD) -> (out_BTD, extra)`.

  With `select` (a map [B, T, ...] -> [B, T', ...] of query positions), `attend` answers only the
  selected queries, and the block goes on for those positions alone.
  """
  a_BTD, extra = attend(layers.rms_norm(x_BTD, p["pre_attention_norm"]["scale"]))
  if select is not None:
    x_BTD = select(x_BTD)
  if cfg.post_norms:
    a_BTD = layers.rms_norm(a_BTD, p["post_attention_norm"]["scale"])
  x_BTD = x_BTD + a_BTD
  f_BTD = _mlp(layers.rms_norm(x_BTD, p["pre_ffw_norm"]["scale"]), p["mlp"])
  if cfg.post_norms:
    f_BTD = layers.rms_norm(f_BTD, p["post_ffw_norm"]["scale"])
  return x_BTD + f_BTD, extra


def _take(x_BT_, index_B):
  """x[b, index_B[b]] for each row b, keeping a length-1 T axis."""
  return jnp.take_along_axis(x_BT_, index_B.reshape((-1, 1) + (1,) * (x_BT_.ndim - 2)), axis=1)


def _out_proj(enc_BTNH, attn: dict):
  if "out_ED" in attn:  # a layer of `make_decode_view`
    B, T, N, H = enc_BTNH.shape
    return jnp.einsum("BTE,ED->BTD", enc_BTNH.reshape(B, T, N * H), attn["out_ED"].astype(enc_BTNH.dtype))
  return jnp.einsum("BTNH,NHD->BTD", enc_BTNH, attn["attn_vec_einsum"]["w"].astype(enc_BTNH.dtype))


def forward(params: dict, x_BTD, positions_BT, mask_BTS, *, cfg: GemmaConfig, remat: str = "none",
            kv_dtype=None, return_kv: bool = False, return_attn: bool = False, decode_view: dict | None = None,
            out_index_B=None, out_start: int | None = None):
  """Runs the stack on embedded inputs. Returns (pre_logits_BTD, aux).

  aux may hold "kv": (k_LBTKH, v_LBTKH) for filling a cache (return_kv) and "attn": the attention
  probabilities (L, B, K, G, T, S) (return_attn). With `decode_view` (`make_decode_view`; inference
  only: no remat), the layers come from it, unrolled, instead of a scan over params["layers"].
  `out_index_B` (with `decode_view`): the output is wanted at that position of each row alone, as a
  prefill wants it: the last layer computes its keys and values everywhere but the rest only there,
  and pre_logits come back [B, 1, D].
  `out_start` (a static int; the scan path): the output is wanted at positions out_start.. alone, as a
  loss on text positions wants it (PaliGemma: after the image tokens): likewise the last layer computes
  keys and values everywhere and the rest there only; pre_logits come back [B, T - out_start, D].
  """

  def block(x_BTD, p, index_B=None, start=None):
    select = None
    if index_B is not None:
      select = lambda a: _take(a, index_B)
    elif start is not None:
      select = lambda a: a[:, start:]

    def attend(h_BTD):
      q_BTNH, k_BTKH, v_BTKH = _qkv(h_BTD, p["attn"], positions_BT, cfg, kv_dtype, select)
      q_mask_BTS = mask_BTS if select is None else select(mask_BTS)
      enc_BTNH, probs = layers.attention(q_BTNH, k_BTKH, v_BTKH, q_mask_BTS, cap=cfg.attn_logits_softcap)
      enc_BTNH = enc_BTNH.astype(x_BTD.dtype)
      ys = ((k_BTKH, v_BTKH) if return_kv else None, probs if return_attn else None)
      return _out_proj(enc_BTNH, p["attn"]), ys
    return _residual_block(x_BTD, p, attend, cfg, select)

  if out_start is not None and return_attn:
    raise ValueError("return_attn needs every position's queries; out_start computes fewer in the last layer")
  if decode_view is None:
    if out_index_B is not None:
      raise ValueError("out_index_B needs decode_view (the scan runs every layer alike)")
    x_BTD, (kv, probs) = layers.scan_layers(block, x_BTD, params["layers"], remat=remat,
                                            last_kwargs=None if out_start is None else {"start": out_start})
  else:
    if out_start is not None:
      raise ValueError("out_start is for the scan path; with decode_view use out_index_B")
    if remat != "none":
      raise ValueError("decode_view is for inference; remat needs the stacked params")
    if out_index_B is not None and return_attn:
      raise ValueError("return_attn needs every position's queries; out_index_B computes one per row")
    x_BTD, (kv, probs) = layers.unrolled_layers(block, x_BTD, _view_layers(decode_view, cfg),
                                                last_kwargs={"index_B": out_index_B})
  aux = {}
  if return_kv:
    aux["kv"] = kv
  if return_attn:
    aux["attn"] = probs
  return layers.rms_norm(x_BTD, params["final_norm"]["scale"]), aux


def make_decode_view(params: dict, *, cfg: GemmaConfig, dtype=jnp.float32) -> dict:
  """The LLM's weights laid out for decoding, for the forwards' and `logits`' `decode_view=`.

  Why: under `lax.scan` over the stacked leaves, XLA:CPU slices each layer's weights out of [L, ...] and
  copies them into the layout its dot wants, for every layer of every decoded token; at one token per
  row that copying costs more than the matmuls. Made once (outside the token loop), these arrays are
  read in place by each step. In `dtype` (the residual stream's, so the loop casts nothing):
    layers        a list of L dicts, one per layer:
      attn/qkv_DE   [D, (N + 2K) H]  query heads, then key heads, then value heads (from q_einsum and
                                     kv_einsum, or qkv_einsum)
      attn/out_ED   [N H, D]         attn_vec_einsum
      mlp/gating_DE [D, 2F]          gate, then up
      mlp/linear    [F, D]
      and the norm scales [D] under their checkpoint names
    head_DV       [D, V]  the tied embedding table, transposed for the output head: XLA:CPU's
                          matmul of a few rows against [V, D] runs ~1.4x slower than against [D, V]
  The view is a copy: it holds the LLM's weights a second time, for as long as it lives.
  """
  L, D, N, K, H = cfg.depth, cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  lp = params["layers"]
  attn = lp["attn"]
  if "qkv_einsum" in attn:
    qkv_LDE = jnp.transpose(attn["qkv_einsum"]["w"], (0, 3, 1, 2, 4)).reshape(L, D, 3 * N * H)
  else:
    q_LDE = jnp.transpose(attn["q_einsum"]["w"], (0, 2, 1, 3)).reshape(L, D, N * H)
    kv_LDE = jnp.transpose(attn["kv_einsum"]["w"], (0, 3, 1, 2, 4)).reshape(L, D, 2 * K * H)
    qkv_LDE = jnp.concatenate([q_LDE, kv_LDE], axis=-1)
  out_LED = attn["attn_vec_einsum"]["w"].reshape(L, N * H, D)
  gating_LDE = jnp.transpose(lp["mlp"]["gating_einsum"], (0, 2, 1, 3)).reshape(L, D, -1)
  norms = [n for n in lp if n.endswith("_norm")]
  return {
      "layers": [{
          "attn": {"qkv_DE": qkv_LDE[l].astype(dtype), "out_ED": out_LED[l].astype(dtype)},
          "mlp": {"gating_DE": gating_LDE[l].astype(dtype), "linear": lp["mlp"]["linear"][l].astype(dtype)},
          **{n: {"scale": lp[n]["scale"][l]} for n in norms},
      } for l in range(L)],
      "head_DV": params["embedder"]["input_embedding"].T.astype(dtype),
  }


def _view_layers(decode_view: dict, cfg: GemmaConfig) -> list[dict]:
  if len(decode_view["layers"]) != cfg.depth:
    raise ValueError(f"decode_view has {len(decode_view['layers'])} layers, the config {cfg.depth}")
  return decode_view["layers"]


def forward_cached(params: dict, x_BTD, positions_BT, k_LBSKH, v_LBSKH, valid_BS, *, cfg: GemmaConfig,
                   decode_view: dict | None = None):
  """Runs new tokens against a KV cache. Returns (pre_logits_BTD, (k_LBTKH, v_LBTKH)) for the new tokens.

  Each new token sees the valid cache slots, and itself and the new tokens before it (causal). The
  caller writes the returned k/v into the cache, so the cache is only read here (no per-layer copy).
  With `decode_view` (`make_decode_view`), the layers come from it, unrolled, instead of a scan over
  params["layers"]; the same math.
  """
  T = x_BTD.shape[1]
  causal_TT = jnp.tri(T, dtype=bool)

  def block(x_BTD, p, k_BSKH, v_BSKH):
    def attend(h_BTD):
      q_BTNH, k_BTKH, v_BTKH = _qkv(h_BTD, p["attn"], positions_BT, cfg, k_BSKH.dtype)
      cap = cfg.attn_logits_softcap
      old_BKTGS = layers.attention_logits(q_BTNH, k_BSKH, cap=cap)
      old_BKTGS = jnp.where(valid_BS[:, None, None, None, :], old_BKTGS, layers.MASK_VALUE)
      new_BKTGT = jnp.where(causal_TT[:, None, :], layers.attention_logits(q_BTNH, k_BTKH, cap=cap),
                            layers.MASK_VALUE)
      probs = jax.nn.softmax(jnp.concatenate([old_BKTGS, new_BKTGT], axis=-1), axis=-1)
      S = k_BSKH.shape[1]
      enc_BTNH = (layers.attention_combine(probs[..., :S], v_BSKH).astype(x_BTD.dtype)
                  + layers.attention_combine(probs[..., S:], v_BTKH).astype(x_BTD.dtype))
      return _out_proj(enc_BTNH, p["attn"]), (k_BTKH, v_BTKH)
    return _residual_block(x_BTD, p, attend, cfg)

  if decode_view is None:
    x_BTD, kv = layers.scan_layers(block, x_BTD, params["layers"], k_BSKH=k_LBSKH, v_BSKH=v_LBSKH)
  else:
    x_BTD, kv = layers.unrolled_layers(block, x_BTD, _view_layers(decode_view, cfg), k_BSKH=k_LBSKH,
                                       v_BSKH=v_LBSKH)
  return layers.rms_norm(x_BTD, params["final_norm"]["scale"]), kv
