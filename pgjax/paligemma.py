"""PaliGemma: SigLIP image tokens followed by Gemma text tokens under a prefix-LM mask.

Follows big_vision's `models/proj/paligemma/paligemma.py`. Axes: see pgjax/__init__.py. The LLM's T (and
S) is the whole [image; text] sequence, P image tokens then the text; arrays of the text alone (`text_BT`,
`mask_ar_BT`, `mask_input_BT`) have T - P positions, and their extension over the image is `full_*`.

  image -> siglip -> zimg_BPD (not scaled)   text -> gemma.embed (x sqrt(D))
  x = [zimg; ztxt] -> gemma stack under make_attn_mask(mask_input, [0]*P + mask_ar) -> text logits
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pgjax import gemma, siglip
from pgjax.config import PaliGemmaConfig


def init(key, cfg: PaliGemmaConfig) -> dict:
  """Random params in the checkpoint's exact layout (`jax.eval_shape` gives full-size trees for free)."""
  k_img, k_llm = jax.random.split(key)
  return {"img": siglip.init(k_img, cfg.vision, out_dim=cfg.llm.width), "llm": gemma.init(k_llm, cfg.llm)}


def make_attn_mask(mask_input_BT, mask_ar_BT):
  """The prefix-LM attention mask, exactly big_vision's `make_attn_mask`.

  `mask_ar[i] = 1` starts a new causal block at i; 0 puts i in the same block as i - 1. Query i may
  attend key j iff cumsum(mask_ar)[j] <= cumsum(mask_ar)[i] and both are valid inputs. So:

    mask_ar [1 1 1 1 1 1]: plain causal attention.
    mask_ar [0 0 0 1 1 1]: prefix-LM; the first three attend each other, the rest are causal.
    mask_ar [1 0 1 0 1 0]: block-causal; pairs attend each other and every earlier pair.

  Returns bool [B, T, S] (query, key; S = T, the same sequence). The three terms are ANDed, so their order
  cannot matter.
  """
  mask_input_BT = jnp.asarray(mask_input_BT, bool)
  block_BT = jnp.cumsum(jnp.asarray(mask_ar_BT, jnp.int32), axis=1)
  structure_BTS = block_BT[:, None, :] <= block_BT[:, :, None]
  return structure_BTS & mask_input_BT[:, :, None] & mask_input_BT[:, None, :]


def embed_image(params: dict, image_BYXC, *, cfg: PaliGemmaConfig, return_attn: bool = False):
  """Image tokens at the LLM width, float32 (they enter the LLM unscaled). Returns (zimg_BPD, aux)."""
  zimg_BPD, aux = siglip.forward(params["img"], image_BYXC, cfg=cfg.vision, remat=cfg.remat, return_attn=return_attn)
  return zimg_BPD.astype(jnp.float32), aux


def embed_image_and_text(params: dict, image_BYXC, text_BT, *, cfg: PaliGemmaConfig, return_attn: bool = False):
  """Returns (x_BTD, aux): image tokens then text tokens, float32 (T = P + the text's length)."""
  zimg_BPD, img_aux = embed_image(params, image_BYXC, cfg=cfg, return_attn=return_attn)
  ztxt_BTD = gemma.embed(params["llm"], text_BT, cfg=cfg.llm)  # the text's T
  aux = {"img/zimg": zimg_BPD, "img/pre_logits": img_aux["pre_logits"]}
  if return_attn:
    aux["img/attn"] = img_aux["attn"]
  return jnp.concatenate([zimg_BPD, ztxt_BTD], axis=1), aux


def full_masks(mask_ar_BT, mask_input_BT, num_image_tokens: int):
  """Extends text masks over the image tokens, which are valid and form one block with the prefix.
  Returns (full_mask_ar_BT, full_mask_input_BT) over [image; text]."""
  B = mask_ar_BT.shape[0]
  full_mask_ar_BT = jnp.concatenate([jnp.zeros((B, num_image_tokens), jnp.int32), jnp.asarray(mask_ar_BT, jnp.int32)],
                                    1)
  full_mask_input_BT = jnp.concatenate([jnp.ones((B, num_image_tokens), bool), jnp.asarray(mask_input_BT, bool)], 1)
  return full_mask_ar_BT, full_mask_input_BT


def last_layer_at_text_only(cfg: PaliGemmaConfig) -> bool:
  """Whether the teacher-forced forward runs the last LLM layer's queries, output projection and MLP at
  text positions only (its keys and values everywhere; `gemma.forward`'s `out_start`): without remat. Only
  text positions are wanted, so the cut saves FLOPs; but under remat the split-off last layer makes the
  backward keep a second, full-size gradient of the trainable layers, and remat is chosen for memory
  (both measured: bench/README.md, "Why the code is laid out as it is")."""
  return cfg.remat == "none"


def forward(params: dict, image_BYXC, text_BT, mask_ar_BT, *, cfg: PaliGemmaConfig, mask_input_BT=None,
            return_attn: bool = False, return_logits: bool = True):
  """Teacher-forced forward (big_vision's `Model.__call__`). Returns (text logits [B, T, V], aux).

  As in the reference's training forward, there is no input mask unless `mask_input_BT` is given:
  right padding is harmless because padded positions carry no loss and no earlier position sees them.
  Positions are 0..T-1 over [image; text]. Logits are computed for text positions only.

  aux: "img/zimg", "img/pre_logits", "llm/pre_logits" (text positions), "attn_mask" (B, T, S) and, with
  return_attn, "img/attn" (L, B, N, 1, P, P) and "llm/attn" (L, B, K, G, T, S).
  With return_logits=False the logits are None (callers that only need pre_logits, e.g. a loss that
  computes logits at supervised positions only).
  """
  x_BTD, aux = embed_image_and_text(params, image_BYXC, text_BT, cfg=cfg, return_attn=return_attn)
  B, T, _ = x_BTD.shape
  P = T - text_BT.shape[1]
  if mask_input_BT is None:
    mask_input_BT = jnp.ones(text_BT.shape, bool)
  full_mask_ar_BT, full_mask_input_BT = full_masks(mask_ar_BT, mask_input_BT, P)
  mask_BTS = make_attn_mask(full_mask_input_BT, full_mask_ar_BT)
  positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
  # The last layer at text positions alone (`last_layer_at_text_only`); not with return_attn (every query wanted).
  out_start = P if last_layer_at_text_only(cfg) and not return_attn else None
  pre_logits_BTD, llm_aux = gemma.forward(params["llm"], x_BTD, positions_BT, mask_BTS, cfg=cfg.llm,
                                          remat=cfg.remat, return_attn=return_attn, out_start=out_start)
  text_pre_logits_BTD = pre_logits_BTD if out_start is not None else pre_logits_BTD[:, P:]
  aux.update({"llm/pre_logits": text_pre_logits_BTD, "attn_mask": mask_BTS})
  if return_attn:
    aux["llm/attn"] = llm_aux["attn"]
  logits_BTV = gemma.logits(params["llm"], text_pre_logits_BTD, cfg=cfg.llm) if return_logits else None
  return logits_BTV, aux
