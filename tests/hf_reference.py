"""The independent reference: Hugging Face transformers' PaliGemma (PyTorch, float32, eager attention).

`to_hf(params, cfg)` builds a `PaliGemmaForConditionalGeneration` from a pgjax config and a param tree in
the big_vision npz layout, through the published npz -> HF mapping (transformers 5.24 key names), loaded
with strict=True so every key is accounted for. `from_hf_grads` maps HF gradients back to the npz layout.

Differences between big_vision (which pgjax follows) and the HF port that the tests translate explicitly:
- HF returns logits for every position, image slots included; big_vision for text positions only.
- HF numbers positions from 1 by default; we pass 0-based `position_ids` to `forward`. (`generate` keeps
  its 1-based positions; RoPE is relative, so this moves float32 logits by ~1e-6 only.)
- HF's loss is a token mean over the batch; big_vision's is a per-example mean, then the batch mean. The
  tests compute big_vision's loss from HF logits by hand.
- The prefix-LM mask must be given as `token_type_ids` (0 = image + prefix, 1 = suffix) plus
  `attention_mask`; without them HF silently changes the mask.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

from pgjax.config import PaliGemmaConfig


def hf_config(cfg: PaliGemmaConfig) -> transformers.PaliGemmaConfig:
  v, t = cfg.vision, cfg.llm
  vision = transformers.SiglipVisionConfig(
      image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.width, num_hidden_layers=v.depth,
      num_attention_heads=v.num_heads, intermediate_size=v.mlp_dim, hidden_act="gelu_pytorch_tanh",
      layer_norm_eps=1e-6, vision_use_head=False)
  common = dict(vocab_size=t.vocab_size, hidden_size=t.width, num_hidden_layers=t.depth,
                num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim,
                intermediate_size=t.mlp_dim, rms_norm_eps=1e-6, rope_theta=t.rope_max_wavelength,
                pad_token_id=0, bos_token_id=2, eos_token_id=1)
  if t.post_norms:
    text = transformers.Gemma2Config(
        **common, hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=t.head_dim if t.query_pre_attn_scalar is None else t.query_pre_attn_scalar,
        attn_logit_softcapping=t.attn_logits_softcap or None,
        final_logit_softcapping=t.final_logits_softcap or None, sliding_window=4096)
  else:
    assert not t.attn_logits_softcap and not t.final_logits_softcap, "HF Gemma 1 has no soft caps"
    text = transformers.GemmaConfig(**common, hidden_act="gelu_pytorch_tanh")
  hf = transformers.PaliGemmaConfig(
      vision_config=vision, text_config=text, projection_dim=t.width, hidden_size=t.width,
      image_token_index=t.vocab_size, vocab_size=t.vocab_size, pad_token_id=0, bos_token_id=2, eos_token_id=1)
  for c in (hf, hf.text_config, hf.vision_config):
    c._attn_implementation = "eager"
  return hf


def state_dict(params, cfg: PaliGemmaConfig) -> dict[str, torch.Tensor]:
  """The published npz -> HF mapping, written out key by key."""
  f = lambda x: np.asarray(x, np.float32)
  img, llm = params["img"], params["llm"]
  v, t = cfg.vision, cfg.llm
  W, D = v.width, t.width
  sd = {}
  vt = "model.vision_tower."
  sd[vt + "embeddings.patch_embedding.weight"] = f(img["embedding"]["kernel"]).transpose(3, 2, 0, 1)
  sd[vt + "embeddings.patch_embedding.bias"] = f(img["embedding"]["bias"])
  sd[vt + "embeddings.position_embedding.weight"] = f(img["pos_embedding"]).reshape(-1, W)
  blk = img["Transformer"]["encoderblock"]
  mha = blk["MultiHeadDotProductAttention_0"]
  for i in range(v.depth):
    p = f"{vt}encoder.layers.{i}."
    for ln, name in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
      sd[p + name + ".weight"] = f(blk[ln]["scale"][i])
      sd[p + name + ".bias"] = f(blk[ln]["bias"][i])
    for d, name in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
      sd[p + f"mlp.{name}.weight"] = f(blk["MlpBlock_0"][d]["kernel"][i]).T
      sd[p + f"mlp.{name}.bias"] = f(blk["MlpBlock_0"][d]["bias"][i])
    for bv, hfn in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      sd[p + f"self_attn.{hfn}.weight"] = f(mha[bv]["kernel"][i]).reshape(W, -1).T
      sd[p + f"self_attn.{hfn}.bias"] = f(mha[bv]["bias"][i]).reshape(-1)
    sd[p + "self_attn.out_proj.weight"] = f(mha["out"]["kernel"][i]).reshape(-1, W).T
    sd[p + "self_attn.out_proj.bias"] = f(mha["out"]["bias"][i])
  sd[vt + "post_layernorm.weight"] = f(img["Transformer"]["encoder_norm"]["scale"])
  sd[vt + "post_layernorm.bias"] = f(img["Transformer"]["encoder_norm"]["bias"])
  sd["model.multi_modal_projector.linear.weight"] = f(img["head"]["kernel"]).T
  sd["model.multi_modal_projector.linear.bias"] = f(img["head"]["bias"])

  lm = "model.language_model."
  sd[lm + "embed_tokens.weight"] = f(llm["embedder"]["input_embedding"])
  sd["lm_head.weight"] = sd[lm + "embed_tokens.weight"]
  sd[lm + "norm.weight"] = f(llm["final_norm"]["scale"])
  L = llm["layers"]
  attn = L["attn"]
  N, K, H = t.num_heads, t.num_kv_heads, t.head_dim
  proj = lambda w: w.transpose(0, 2, 1).reshape(-1, D)  # [heads, D, H] -> [heads*H, D]
  for i in range(t.depth):
    p = f"{lm}layers.{i}."
    if "qkv_einsum" in attn:
      qkv = f(attn["qkv_einsum"]["w"][i])
      q, k, v_ = qkv[0], qkv[1], qkv[2]
    else:
      q = f(attn["q_einsum"]["w"][i])
      k, v_ = f(attn["kv_einsum"]["w"][i])
    sd[p + "self_attn.q_proj.weight"] = proj(q)
    sd[p + "self_attn.k_proj.weight"] = proj(k)
    sd[p + "self_attn.v_proj.weight"] = proj(v_)
    sd[p + "self_attn.o_proj.weight"] = f(attn["attn_vec_einsum"]["w"][i]).reshape(N * H, D).T
    gate, up = f(L["mlp"]["gating_einsum"][i])
    sd[p + "mlp.gate_proj.weight"] = gate.T
    sd[p + "mlp.up_proj.weight"] = up.T
    sd[p + "mlp.down_proj.weight"] = f(L["mlp"]["linear"][i]).T
    sd[p + "input_layernorm.weight"] = f(L["pre_attention_norm"]["scale"][i])
    if t.post_norms:  # the name trap: Gemma 2's pre_ffw_norm is "pre_feedforward_layernorm"
      sd[p + "pre_feedforward_layernorm.weight"] = f(L["pre_ffw_norm"]["scale"][i])
      sd[p + "post_attention_layernorm.weight"] = f(L["post_attention_norm"]["scale"][i])
      sd[p + "post_feedforward_layernorm.weight"] = f(L["post_ffw_norm"]["scale"][i])
    else:
      sd[p + "post_attention_layernorm.weight"] = f(L["pre_ffw_norm"]["scale"][i])
  del K
  return {k: torch.from_numpy(np.array(v, np.float32, copy=True)) for k, v in sd.items()}


def to_hf(params, cfg: PaliGemmaConfig) -> transformers.PaliGemmaForConditionalGeneration:
  torch.manual_seed(0)
  model = transformers.PaliGemmaForConditionalGeneration(hf_config(cfg)).float().eval()
  model.load_state_dict(state_dict(params, cfg), strict=True)
  return model


def attn_grads_to_bv(model, cfg: PaliGemmaConfig) -> dict:
  """HF gradients of the LLM attention projections, in the npz layout (stacked over layers)."""
  t = cfg.llm
  N, K, H, D = t.num_heads, t.num_kv_heads, t.head_dim, t.width
  unproj = lambda g, heads: g.reshape(heads, H, D).transpose(0, 2, 1)  # [heads*H, D] -> [heads, D, H]
  qs, ks, vs, os_ = [], [], [], []
  for layer in model.model.language_model.layers:
    a = layer.self_attn
    g = lambda m: m.weight.grad.detach().numpy().astype(np.float32)
    qs.append(unproj(g(a.q_proj), N))
    ks.append(unproj(g(a.k_proj), K))
    vs.append(unproj(g(a.v_proj), K))
    os_.append(g(a.o_proj).T.reshape(N, H, D))
  out = {"attn_vec_einsum": {"w": np.stack(os_)}}
  if K == N:
    out["qkv_einsum"] = {"w": np.stack([np.stack([q, k, v]) for q, k, v in zip(qs, ks, vs)])}
  else:
    out["q_einsum"] = {"w": np.stack(qs)}
    out["kv_einsum"] = {"w": np.stack([np.stack([k, v]) for k, v in zip(ks, vs)])}
  return out


def inputs(image_BHWC, text_BT, mask_ar_BT, cfg: PaliGemmaConfig):
  """HF forward inputs for a prefix-LM batch: image token ids in front, 0-based positions.

  HF can express one bidirectional block per row only: the tests use big_vision's prefix-LM layout
  (mask_ar 0 on the prefix, then 1), which maps to token_type_ids = mask_ar over the text.
  """
  text = np.asarray(text_BT)
  mask_ar = np.asarray(mask_ar_BT)
  B, T = text.shape
  P = cfg.num_image_tokens
  # Check the layout is a prefix-LM one: zeros then ones.
  assert all(np.all(np.diff(row) >= 0) for row in mask_ar), "HF can only express prefix-LM masks"
  ids = np.concatenate([np.full((B, P), cfg.llm.vocab_size), text], axis=1)
  tt = np.concatenate([np.zeros((B, P), np.int64), mask_ar], axis=1)
  return dict(
      input_ids=torch.from_numpy(ids.astype(np.int64)),
      pixel_values=torch.from_numpy(np.asarray(image_BHWC, np.float32).transpose(0, 3, 1, 2).copy()),
      token_type_ids=torch.from_numpy(tt.astype(np.int64)),
      attention_mask=torch.ones(B, P + T, dtype=torch.long),
      position_ids=torch.arange(P + T).expand(B, -1).clone(),
  )


def per_example_loss(text_logits, text_BT, mask_loss_BT):
  """big_vision's loss from full-sequence text logits [B, T, V]: predict t+1 from t, per-example mean."""
  logp = torch.log_softmax(text_logits[:, :-1].double(), dim=-1)
  tgt = torch.as_tensor(np.asarray(text_BT)[:, 1:], dtype=torch.long)
  m = torch.as_tensor(np.asarray(mask_loss_BT)[:, 1:], dtype=torch.float64)
  nll = -logp.gather(-1, tgt[..., None])[..., 0]
  return (nll * m).sum(-1) / m.sum(-1).clamp(min=1)
