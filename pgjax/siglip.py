"""SigLIP image encoder over params["img"], keyed as big_vision's `models/vit.py` with scan=True.

Axes: see pgjax/__init__.py (D is SigLIP's width here, E the LLM's). Also, in the patch embedding alone:
y, x the patch grid's rows and columns and p, q the pixel rows and columns inside a patch (Y = y p, X = x q).

  image [B, Y, X, C] in [-1, 1] -> patches (conv 14x14 stride 14 as an einsum) + pos_embedding
  -> depth x pre-LN block (MHA with biases, GELU MLP) -> encoder_norm -> head (Dense to the LLM width).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from pgjax import layers
from pgjax.config import SigLIPConfig


def init(key, cfg: SigLIPConfig, out_dim: int) -> dict:
  """Random params in the checkpoint layout (lecun-normal kernels, zero biases, zero head as in big_vision)."""
  L, D, N, H, F, p = cfg.depth, cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.patch_size
  ks = iter(jax.random.split(key, 8))

  def dense(shape, fan_in):
    return jax.random.normal(next(ks), shape, jnp.float32) * fan_in ** -0.5

  ones, zeros = (lambda *s: jnp.ones(s, jnp.float32)), (lambda *s: jnp.zeros(s, jnp.float32))
  attn = {name: {"kernel": dense((L, D, N, H), D), "bias": zeros(L, N, H)} for name in ("query", "key", "value")}
  attn["out"] = {"kernel": dense((L, N, H, D), D), "bias": zeros(L, D)}
  return {
      "embedding": {"kernel": dense((p, p, 3, D), p * p * 3), "bias": zeros(D)},
      "pos_embedding": jax.random.normal(next(ks), (1, cfg.num_patches, D), jnp.float32) * D ** -0.5,
      "Transformer": {
          "encoder_norm": {"scale": ones(D), "bias": zeros(D)},
          "encoderblock": {
              "LayerNorm_0": {"scale": ones(L, D), "bias": zeros(L, D)},
              "LayerNorm_1": {"scale": ones(L, D), "bias": zeros(L, D)},
              "MlpBlock_0": {"Dense_0": {"kernel": dense((L, D, F), D), "bias": zeros(L, F)},
                             "Dense_1": {"kernel": dense((L, F, D), F), "bias": zeros(L, D)}},
              "MultiHeadDotProductAttention_0": attn,
          },
      },
      "head": {"kernel": zeros(D, out_dim), "bias": zeros(out_dim)},
  }


def _block(x_BPD, p, *, cfg: SigLIPConfig, return_attn: bool):
  cd = cfg.compute_dtype
  mha = p["MultiHeadDotProductAttention_0"]
  h_BPD = layers.layer_norm(x_BPD, p["LayerNorm_0"]["scale"], p["LayerNorm_0"]["bias"])
  q_BPNH, k_BPNH, v_BPNH = (
      layers.dot("BPD,DNH->BPNH", h_BPD, mha[n]["kernel"], cd) + mha[n]["bias"].astype(jnp.float32)
      for n in ("query", "key", "value"))
  q_BPNH = q_BPNH * cfg.head_dim ** -0.5
  enc_BPNH, probs = layers.attention(q_BPNH, k_BPNH, v_BPNH, compute_dtype=cd)
  out = mha["out"]
  x_BPD = x_BPD + layers.dot("BPNH,NHD->BPD", enc_BPNH, out["kernel"], cd) + out["bias"].astype(jnp.float32)

  mlp = p["MlpBlock_0"]
  h_BPD = layers.layer_norm(x_BPD, p["LayerNorm_1"]["scale"], p["LayerNorm_1"]["bias"])
  h_BPF = layers.gelu(layers.dot("BPD,DF->BPF", h_BPD, mlp["Dense_0"]["kernel"], cd)
                      + mlp["Dense_0"]["bias"].astype(jnp.float32))
  x_BPD = (x_BPD + layers.dot("BPF,FD->BPD", h_BPF, mlp["Dense_1"]["kernel"], cd)
           + mlp["Dense_1"]["bias"].astype(jnp.float32))
  return x_BPD, (probs if return_attn else None)


def forward(params: dict, image_BYXC, *, cfg: SigLIPConfig, remat: str = "none", return_attn: bool = False):
  """Encodes images to LLM-width tokens. Returns (zimg_BPE, aux) with aux["pre_logits"] before the head."""
  cd = cfg.compute_dtype
  _, Y, X, C = image_BYXC.shape
  p = cfg.patch_size
  if (Y, X) != (cfg.image_size, cfg.image_size) or C != 3:
    raise ValueError(f"expected images of shape (B, {cfg.image_size}, {cfg.image_size}, 3), got {image_BYXC.shape}")
  # A VALID conv with stride == kernel size is a matmul over non-overlapping patches (row-major y, x order).
  # The residual stream is float32 whatever the compute dtype.
  patches_BypxqC = rearrange(image_BYXC.astype(jnp.float32), "B (y p) (x q) C -> B y p x q C", p=p, q=p)
  emb = params["embedding"]
  x_ByxD = layers.dot("BypxqC,pqCD->ByxD", patches_BypxqC, emb["kernel"], cd) + emb["bias"].astype(jnp.float32)
  x_BPD = rearrange(x_ByxD, "B y x D -> B (y x) D") + params["pos_embedding"].astype(jnp.float32)

  enc = params["Transformer"]
  x_BPD, probs = layers.scan_layers(
      lambda x, lp: _block(x, lp, cfg=cfg, return_attn=return_attn), x_BPD, enc["encoderblock"], remat=remat)
  pre_logits_BPD = layers.layer_norm(x_BPD, enc["encoder_norm"]["scale"], enc["encoder_norm"]["bias"])
  head = params["head"]
  zimg_BPE = layers.dot("BPD,DE->BPE", pre_logits_BPD, head["kernel"], cd) + head["bias"].astype(jnp.float32)
  aux = {"pre_logits": pre_logits_BPD}
  if return_attn:
    aux["attn"] = probs  # (L, B, N, 1, P, P): layers.attention's K axis holds all N heads, G is 1
  return zimg_BPE, aux
