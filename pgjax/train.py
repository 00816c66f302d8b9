"""Fine-tuning: the loss (big_vision's), and later the trainable split and the train step.

Axis legend as in layers.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pgjax import gemma, paligemma
from pgjax.config import PaliGemmaConfig


def loss_fn(params, batch, *, cfg: PaliGemmaConfig):
  """big_vision's loss: per example, the mean NLL of the supervised tokens, then the batch mean.

  The model reads text[:, :-1] and predicts text[:, 1:]; `mask_loss[:, 1:]` selects the targets
  (suffix tokens and eos), so prefix and padding carry no loss. Logits are float32 (and soft-capped
  when the config says so); target log-probs are gathered, never a one-hot over the vocabulary.
  A row with no supervised token contributes 0 (callers check for such rows before training).
  Returns (loss, loss_B).
  """
  text_BT = batch["text"]
  _, aux = paligemma.forward(params, batch["image"], text_BT[:, :-1], batch["mask_ar"][:, :-1], cfg=cfg,
                             return_logits=False)
  logits_BTV = gemma.logits(params["llm"], aux["llm/pre_logits"], cfg=cfg.llm)
  targets_BT = text_BT[:, 1:]
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  nll_BT = jax.nn.logsumexp(logits_BTV, axis=-1) - target_logit_BT
  mask_BT = batch["mask_loss"][:, 1:].astype(jnp.float32)
  loss_B = jnp.sum(nll_BT * mask_BT, axis=-1) / jnp.maximum(jnp.sum(mask_BT, axis=-1), 1.0)
  return jnp.mean(loss_B), loss_B
