"""Numerical parity with the independent reference, Hugging Face transformers (float32, eager).

Tiny random configs cover the three attention layouts of the PaliGemma families: Gemma 1 MQA
(q_einsum + kv_einsum), Gemma 1 MHA (qkv_einsum), Gemma 2 GQA with post-norms and both soft caps, and
Gemma 2 with 28B-style query scaling. Where the HF port differs from big_vision, hf_reference translates
explicitly (text positions only, 0-based positions, per-example loss). Tolerances are float32 ones.
"""

import dataclasses
import functools

import chex
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
hf_reference = pytest.importorskip("hf_reference")

from helpers import assert_close_f32, prefix_lm_batch, random_params  # noqa: E402
from pgjax import config, decode, paligemma, train  # noqa: E402

CONFIGS = ["tiny-gemma1-mqa", "tiny-gemma1-mha", "tiny-gemma2-gqa", "tiny-gemma2-qscale", "tight-caps"]
# (prefix incl. bos and "\n", suffix incl. eos) per row; ragged so per-example vs token means differ.
LENGTHS = [(4, 6), (6, 2), (3, 9)]
SEQ_LEN = 13
# Per leaf PARITY_ULPS eps32 * max|reference|: two float32 implementations of the same math (XLA and torch
# sum the same products in their own orders, through a few layers of both towers); a wrong term, sign or
# mask moves values by O(max|reference|).
PARITY_ULPS = 64


def close(actual, expected, scale=None):
  assert_close_f32(np.asarray(actual), np.asarray(expected), ulps_of_max=PARITY_ULPS, scale=scale)


def get_config(name):
  if name == "tight-caps":
    # Caps of 50/30 barely bend the small logits of a tiny random model; these make both caps matter.
    base = config.get("tiny-gemma2-gqa")
    return dataclasses.replace(base, llm=dataclasses.replace(base.llm, attn_logits_softcap=0.5,
                                                             final_logits_softcap=2.0))
  return config.get(name)


@functools.cache
def setup(name):
  cfg = get_config(name)
  params = random_params(cfg, seed=len(name))
  model = hf_reference.to_hf(params, cfg)
  return cfg, params, model


@pytest.mark.parametrize("name", CONFIGS)
def test_text_logits_match_hf(name):
  cfg, params, model = setup(name)
  batch = prefix_lm_batch(cfg, LENGTHS, SEQ_LEN)
  logits, aux = paligemma.forward(params, batch["image"], batch["text"], batch["mask_ar"], cfg=cfg)
  with torch.no_grad():
    ref = model(**hf_reference.inputs(batch["image"], batch["text"], batch["mask_ar"], cfg)).logits
  P = cfg.num_image_tokens
  assert float(ref[:, P:].abs().max()) > 1.0  # the comparison is not between near-zero numbers
  close(logits, ref[:, P:].numpy())
  # The image embeddings too: HF's projector output is big_vision's zimg.
  with torch.no_grad():
    zimg = model.model.get_image_features(
        hf_reference.inputs(batch["image"], batch["text"], batch["mask_ar"], cfg)["pixel_values"]).pooler_output
  close(aux["img/zimg"], zimg.numpy())


@pytest.mark.parametrize("name", CONFIGS)
def test_loss_and_attention_grads_match_hf(name):
  cfg, params, model = setup(name)
  batch = prefix_lm_batch(cfg, LENGTHS, SEQ_LEN)
  trainable = params["llm"]["layers"]["attn"]

  def loss_of_attn(attn):
    p = {**params, "llm": {**params["llm"], "layers": {**params["llm"]["layers"], "attn": attn}}}
    return train.loss_fn(p, batch, cfg=cfg)

  (loss, loss_B), grads = jax.value_and_grad(loss_of_attn, has_aux=True)(trainable)

  model.zero_grad()
  # big_vision's train forward reads text[:, :-1]; the HF forward over the full text gives the same
  # logits at those positions because the dropped last position is causal (mask_ar 1).
  out = model(**hf_reference.inputs(batch["image"], batch["text"], batch["mask_ar"], cfg))
  ref_B = hf_reference.per_example_loss(out.logits[:, cfg.num_image_tokens:], batch["text"], batch["mask_loss"])
  ref_B.mean().backward()
  close(loss_B, ref_B.detach().numpy())
  close(loss, ref_B.mean().item())
  # The per-example mean really differs from HF's token mean here (ragged suffixes).
  m = batch["mask_loss"][:, 1:]
  token_mean = float((np.asarray(loss_B) * m.sum(1)).sum() / m.sum())
  assert abs(token_mean - float(loss)) > 1e-3
  ref_grads = hf_reference.attn_grads_to_bv(model, cfg)
  chex.assert_trees_all_equal_structs(jax.tree.map(np.asarray, grads), ref_grads)
  # Scaled by the whole gradient's largest element: the three leaves sum products of the same backward, and
  # a kv leaf is small where the query heads sharing it cancel (27 eps32 of its own max here, 5 of this).
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
  jax.tree.map(functools.partial(close, scale=scale), grads, ref_grads)


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_matches_hf_generate(name):
  cfg, params, model = setup(name)
  # Prompts of different lengths, right-padded for pgjax; HF decodes each row alone, unpadded.
  batch = prefix_lm_batch(cfg, [(5, 0), (3, 0), (7, 0)], 8, seed=3)
  prompt, mask_input = batch["text"], batch["mask_input"]
  max_new = 6
  tokens, step_logits = decode.greedy(params, batch["image"], prompt, mask_input, cfg=cfg,
                                      max_new_tokens=max_new, eos_id=None)
  for b in range(prompt.shape[0]):
    n = int(mask_input[b].sum())
    row = {k: v[b:b + 1, :n] for k, v in (("text", prompt), ("mask_ar", batch["mask_ar"]))}
    inp = hf_reference.inputs(batch["image"][b:b + 1], row["text"], row["mask_ar"], cfg)
    inp.pop("position_ids")  # generate numbers positions itself (from 1; RoPE is relative)
    with torch.no_grad():
      out = model.generate(**inp, max_new_tokens=max_new, do_sample=False, use_cache=True, eos_token_id=None,
                           pad_token_id=0, output_logits=True, return_dict_in_generate=True, min_new_tokens=max_new)
    ref_tokens = out.sequences[0, -max_new:].numpy()
    ref_logits = torch.stack(out.logits, 1)[0].numpy()
    np.testing.assert_array_equal(np.asarray(tokens[b]), ref_tokens)
    close(step_logits[b], ref_logits)


@pytest.mark.parametrize("name", ["tiny-gemma1-mqa", "tiny-gemma2-gqa"])
def test_beam_search_matches_hf_beam_search_without_eos(name):
  """Where the two definitions coincide. Without an eos both keep, at every step, the K best of the live beams'
  K·V continuations by summed log-prob, and return the best at the length limit; with length_penalty=0.0
  transformers' score is that plain sum. With an eos they differ: transformers finishes a beam only when eos
  ranks among the top 2K candidates of the step and stops (early_stopping=True) once K beams finished, while
  big_vision's search scores every live beam as finished at every step and stops when no live beam can beat
  the best finished one."""
  cfg, params, model = setup(name)
  batch = prefix_lm_batch(cfg, [(5, 0), (3, 0), (7, 0)], 8, seed=3)
  K, max_new = 3, 5
  tokens, score = decode.beam_search(params, batch["image"], batch["text"], batch["mask_input"], cfg=cfg,
                                     beam_size=K, max_new_tokens=max_new, eos_id=None)
  for b in range(3):
    n = int(batch["mask_input"][b].sum())
    inp = hf_reference.inputs(batch["image"][b:b + 1], batch["text"][b:b + 1, :n], batch["mask_ar"][b:b + 1, :n], cfg)
    inp.pop("position_ids")
    with torch.no_grad():
      out = model.generate(**inp, num_beams=K, length_penalty=0.0, do_sample=False, max_new_tokens=max_new,
                           min_new_tokens=max_new, eos_token_id=None, pad_token_id=0, use_cache=True,
                           output_scores=True, return_dict_in_generate=True)
    np.testing.assert_array_equal(np.asarray(tokens[b]), out.sequences[0, -max_new:].numpy())
    close(score[b:b + 1], out.sequences_scores.numpy())
