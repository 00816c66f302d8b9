"""Fine-tuning: the trainable subtree, split precision, big_vision's loss, one jitted train step, schedules.

The seed recipe (big_vision's PaliGemma notebook): only the LLM's attention layers train, in float32,
with plain SGD; everything else stays frozen in float16 (bfloat16 by option). Gradients are taken with
respect to the trainable subtree only; frozen leaves never get one. Axes: see pgjax/__init__.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from pgjax import gemma, paligemma, tree
from pgjax.config import PaliGemmaConfig

# ------------------------------------------------------------------------------------------ what trains


def is_trainable(path: str) -> bool:
  """The seed recipe: the LLM's attention layers."""
  return path.startswith("llm/layers/attn/")


def make_predicate(spec=None) -> Callable[[str], bool]:
  """A path predicate from: None (the seed recipe), a callable, a regex, or a list of regexes (any
  full-matching one makes the leaf trainable), e.g. [r"llm/layers/attn/.*", r"img/head/.*"] or [".*"]."""
  if spec is None:
    return is_trainable
  if callable(spec):
    return spec
  patterns = [spec] if isinstance(spec, str) else list(spec)
  compiled = [re.compile(p) for p in patterns]
  return lambda path: any(c.fullmatch(path) for c in compiled)


def split(params, is_trainable=is_trainable, *, frozen_dtype=jnp.float16):
  """Splits params into (trainable float32, frozen `frozen_dtype`) subtrees with disjoint leaves.

  A predicate that selects no leaf is an error (a typo would otherwise train nothing). Trainable
  leaves are fresh copies: the train step donates them, which must not delete the caller's params.
  """
  predicate = make_predicate(is_trainable)
  flat = tree.flatten(params)
  trainable = {k: jnp.copy(v.astype(jnp.float32)) for k, v in flat.items() if predicate(k)}
  if not trainable:
    raise ValueError(f"the trainable predicate matches none of the {len(flat)} params (e.g. {next(iter(flat))})")
  frozen = {k: v if hasattr(v, "matmul") else v.astype(frozen_dtype) for k, v in flat.items() if not predicate(k)}
  return tree.unflatten(trainable), tree.unflatten(frozen)  # (a quantized leaf stays as it is)


def merge(trainable, frozen):
  """One param tree from the two subtrees."""
  return tree.unflatten({**tree.flatten(frozen), **tree.flatten(trainable)})


# ------------------------------------------------------------------------------------------------ loss


def loss_fn(params, batch, *, cfg: PaliGemmaConfig):
  """big_vision's loss: per example, the mean NLL of the supervised tokens, then the batch mean.

  The model reads text[:, :-1] and predicts text[:, 1:]; `mask_loss[:, 1:]` selects the targets
  (suffix tokens and eos), so prefix and padding carry no loss. Logits are float32 (and soft-capped
  when the config says so); target log-probs are gathered, never a one-hot over the vocabulary.
  A row with no supervised token would contribute 0: `check_batch` rejects such rows first.
  Returns (loss, loss_B).
  """
  nll_BT, mask_BT = _target_nll(params, batch, cfg=cfg)
  loss_B = jnp.sum(nll_BT * mask_BT, axis=-1) / jnp.maximum(jnp.sum(mask_BT, axis=-1), 1.0)
  return jnp.mean(loss_B), loss_B


HEAD_CHUNK_BYTES = 1 << 28  # under remat, the head's float32 logits are made this many bytes at a time


def _target_nll(params, batch, *, cfg: PaliGemmaConfig):
  """The NLL of each next text token [B, T-1] from one teacher-forced forward, and the loss mask [B, T-1].

  Under remat the output head runs in chunks of positions, each recomputed in the backward: the float32
  logits over a 257k vocabulary are ~1 MB per position (8.4 GB for batch 8 at text 128 with their
  gradient and softmax), the largest temporaries of a remat step. Remat is chosen for memory, and the
  recompute adds one head matmul (~2% of a 3B step). Without remat the logits are made whole (no recompute)."""
  text_BT = batch["text"]
  _, aux = paligemma.forward(params, batch["image"], text_BT[:, :-1], batch["mask_ar"][:, :-1], cfg=cfg,
                             return_logits=False)
  x_BTD, targets_BT = aux["llm/pre_logits"], text_BT[:, 1:]

  def nll(x_NTD, targets_NT):
    logits_NTV = gemma.logits(params["llm"], x_NTD, cfg=cfg.llm)
    target_logit_NT = jnp.take_along_axis(logits_NTV, targets_NT[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits_NTV, axis=-1) - target_logit_NT

  B, T, _ = x_BTD.shape
  rows = max(1, HEAD_CHUNK_BYTES // (4 * T * cfg.llm.vocab_size))  # whole rows of positions per chunk
  if cfg.remat == "none" or rows >= B:
    nll_BT = nll(x_BTD, targets_BT)
  else:
    n = -(-B // rows)
    pad = lambda a: jnp.pad(a, [(0, n * rows - B)] + [(0, 0)] * (a.ndim - 1)).reshape(n, rows, *a.shape[1:])
    nll_BT = jax.lax.map(lambda a: jax.checkpoint(nll)(*a), (pad(x_BTD), pad(targets_BT)))
    nll_BT = nll_BT.reshape(n * rows, T)[:B]
  return nll_BT, batch["mask_loss"][:, 1:].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames="cfg")
def suffix_logp(params, batch, *, cfg: PaliGemmaConfig):
  """Scoring without generating: the log-likelihood of each row's suffix given its image and prefix, from one
  teacher-forced forward with the loss's masking (the supervised tokens, eos included; prefix and padding
  excluded). batch as for `loss_fn`. Returns (logp_B summed over the suffix, logp_BT per token: [B, T-1], the
  log-prob of text[:, 1:], 0 outside the suffix). Ranking candidate answers or multiple choice is comparing
  logp_B (`evaluate.score_candidates`)."""
  nll_BT, mask_BT = _target_nll(params, batch, cfg=cfg)
  logp_BT = jnp.where(mask_BT > 0, -nll_BT, 0.0)
  return jnp.sum(logp_BT, axis=-1), logp_BT


def check_batch(batch, names=None) -> None:
  """Host-side check before a step: every row has at least one supervised token. Raises naming the row."""
  counts = np.asarray(batch["mask_loss"])[:, 1:].sum(1)
  bad = np.flatnonzero(counts == 0)
  if len(bad):
    which = [names[i] for i in bad] if names is not None else [f"row {i}" for i in bad]
    raise ValueError(f"{len(bad)} example(s) have no supervised (suffix) token, so no loss: {which[:5]}")


# ------------------------------------------------------------------------------------------ optimizers


@dataclasses.dataclass(frozen=True, kw_only=True)
class Optimizer:
  """"sgd" is the seed's update p - lr * g and needs nothing else; "momentum" and "adamw" use optax."""

  name: str = "sgd"
  momentum: float = 0.9
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0  # decoupled (AdamW), multiplied by lr

  def _tx(self):
    if self.name == "sgd":
      return None
    import optax  # optional dependency: only the non-default optimizers need it
    if self.name == "momentum":
      return optax.trace(decay=self.momentum)
    if self.name == "adamw":
      return optax.chain(optax.scale_by_adam(b1=self.b1, b2=self.b2, eps=self.eps),
                         optax.add_decayed_weights(self.weight_decay))
    raise ValueError(f"unknown optimizer {self.name!r}; use sgd, momentum or adamw")

  def init(self, trainable):
    tx = self._tx()
    return None if tx is None else tx.init(trainable)

  def update(self, grads, state, trainable, lr):
    tx = self._tx()
    updates, state = (grads, state) if tx is None else tx.update(grads, state, trainable)
    return jax.tree.map(lambda p, u: p - lr * u, trainable, updates), state


# ------------------------------------------------------------------------------------------ train step


def combine(trainable, frozen, lora_alpha: float | None = None) -> dict:
  """The params the model runs on: `merge(trainable, frozen)`, or, with `lora_alpha`, the frozen params with
  the trainable LoRA adapters put on them (`lora.apply`: the adapted matmuls run on the fly)."""
  if lora_alpha is None:
    return merge(trainable, frozen)
  from pgjax import lora
  return lora.apply(frozen, trainable, alpha=lora_alpha)


def _loss_and_grads(trainable, frozen, batch, *, cfg, accum_steps, scale=None, lora_alpha=None):
  """(loss, grads) of the batch; with `scale`, the gradients are those of loss * scale (loss scaling)."""
  def loss_of(tr, micro):
    loss = loss_fn(combine(tr, frozen, lora_alpha), micro, cfg=cfg)[0]
    return loss if scale is None else loss * scale, loss

  if accum_steps == 1:
    (_, loss), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable, batch)
    return loss, grads
  B = batch["text"].shape[0]
  if B % accum_steps:
    raise ValueError(f"batch size {B} is not a multiple of accum_steps {accum_steps}")
  # Micro-batch a takes rows a, a + A, a + 2A, ...: with the batch split over devices in blocks,
  # every micro-batch keeps rows on every device.
  micro = jax.tree.map(lambda x: x.reshape(B // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

  def body(acc, mb):
    (_, loss), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable, mb)
    return jax.tree.map(jnp.add, acc, (loss, grads)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trainable))
  (loss, grads), _ = jax.lax.scan(body, zeros, micro)
  # Equal-sized micro-batches: the mean of their means is the batch mean, as in one big step.
  return loss / accum_steps, jax.tree.map(lambda g: g / accum_steps, grads)


# -------------------------------------------------------------------------------- float16 loss scaling


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossScale:
  """Dynamic loss scaling for float16 compute (a GPU without bfloat16: T4, V100). The backward's
  cotangents are cast to float16 at every dot, where gradients below 2^-24 would flush to zero; the loss is
  multiplied by `scale` first and the float32 gradients divided by it after. A step whose gradients are
  not finite is skipped (the params and the optimizer state stay as they were) and halves the scale; after
  `growth_interval` good steps in a row it doubles. Its state rides in the optimizer state, so checkpoints
  save it and a resume restores it."""

  init_scale: float = 2.0 ** 15
  growth_interval: int = 2000
  factor: float = 2.0
  min_scale: float = 1.0

  def init(self) -> dict:
    return {"scale": jnp.asarray(self.init_scale, jnp.float32), "good_steps": jnp.asarray(0, jnp.int32)}

  def update(self, state: dict, finite) -> dict:
    good = jnp.where(finite, state["good_steps"] + 1, 0)
    grow = good >= self.growth_interval
    scale = jnp.where(finite, jnp.where(grow, state["scale"] * self.factor, state["scale"]),
                      jnp.maximum(state["scale"] / self.factor, self.min_scale))
    return {"scale": scale, "good_steps": jnp.where(grow, 0, good).astype(jnp.int32)}


def uses_loss_scale(cfg: PaliGemmaConfig) -> bool:
  """float16 compute in either tower needs loss scaling; bfloat16 has float32's range and does not."""
  return "float16" in (cfg.llm.compute_dtype, cfg.vision.compute_dtype)


def init_opt_state(optimizer: "Optimizer", trainable, cfg: PaliGemmaConfig, loss_scale: "LossScale | None" = None):
  """The state `make_train_step`'s step carries: the optimizer's, and with float16 compute the loss
  scale's beside it ({"opt": ..., "loss_scale": ...})."""
  state = optimizer.init(trainable)
  if not uses_loss_scale(cfg):
    return state
  return {"opt": state, "loss_scale": (loss_scale or LossScale()).init()}


def _step(trainable, frozen, batch, lr, opt_state, *, cfg, optimizer, clip_norm, accum_steps, loss_scale=None,
          lora_alpha=None):
  scaling = uses_loss_scale(cfg)
  ls_state = opt_state["loss_scale"] if scaling else None
  inner = opt_state["opt"] if scaling else opt_state
  loss, grads = _loss_and_grads(trainable, frozen, batch, cfg=cfg, accum_steps=accum_steps,
                                scale=ls_state["scale"] if scaling else None, lora_alpha=lora_alpha)
  if scaling:
    grads = jax.tree.map(lambda g: g / ls_state["scale"], grads)
  grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
  if clip_norm:
    grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, clip_norm / (grad_norm + 1e-12)), grads)
  new_trainable, new_inner = optimizer.update(grads, inner, trainable, lr)
  metrics = {"loss": loss, "grad_norm": grad_norm, "lr": jnp.asarray(lr, jnp.float32)}
  if not scaling:
    return new_trainable, new_inner, metrics
  finite = jnp.isfinite(grad_norm)  # one Inf or NaN anywhere makes the norm non-finite
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  metrics.update(loss_scale=ls_state["scale"], skipped=(~finite).astype(jnp.int32))
  state = {"opt": keep(new_inner, inner), "loss_scale": (loss_scale or LossScale()).update(ls_state, finite)}
  return keep(new_trainable, trainable), state, metrics


def make_train_step(cfg: PaliGemmaConfig, *, optimizer: Optimizer = Optimizer(), clip_norm: float | None = None,
                    accum_steps: int = 1, mesh=None, trainable_shardings=None, frozen_shardings=None,
                    opt_state_shardings=None, loss_scale: LossScale | None = None,
                    lora_alpha: float | None = None):
  """The jitted step `(trainable, frozen, batch, lr, opt_state) -> (trainable, opt_state, metrics)`.

  Compiled once; trainable params and optimizer state are donated; `init_opt_state` makes the first state.
  The matmuls run in the config's compute dtype; with float16 the step scales the loss (`LossScale`, its
  state in opt_state) and adds "loss_scale" and "skipped" to the metrics. With a mesh, in/out shardings are
  explicit: params as given (see sharding.param_shardings), the batch split over "data", scalars
  replicated. Remat of the blocks is `cfg.remat`. With `lora_alpha`, `trainable` is a tree of LoRA adapters
  (lora.init) over the frozen params, float or quantized (`combine`).
  """
  from pgjax import host
  step = functools.partial(_step, cfg=cfg, optimizer=optimizer, clip_norm=clip_norm, accum_steps=accum_steps,
                           loss_scale=loss_scale, lora_alpha=lora_alpha)
  options = host.compiler_options()  # on CPU: the emitters that compile the step faster (bench/README.md)
  if mesh is None:
    return jax.jit(step, donate_argnums=(0, 4), compiler_options=options)
  from pgjax import sharding
  rep = sharding.replicated(mesh)
  opt_sh = rep if opt_state_shardings is None else opt_state_shardings
  return jax.jit(step, donate_argnums=(0, 4), compiler_options=options,
                 in_shardings=(trainable_shardings, frozen_shardings, sharding.batch_sharding(mesh), rep, opt_sh),
                 out_shardings=(trainable_shardings, opt_sh, rep))


@functools.partial(jax.jit, static_argnames=("cfg", "clip_norm", "accum_steps"), donate_argnames=("trainable",))
def _sgd_step(trainable, frozen, batch, lr, *, cfg, clip_norm, accum_steps):
  if uses_loss_scale(cfg):  # a loss scale is state across steps: make_train_step carries it
    raise ValueError("float16 compute needs loss scaling, whose state `train_step` does not carry; use "
                     "make_train_step with init_opt_state")
  trainable, _, metrics = _step(trainable, frozen, batch, lr, None, cfg=cfg, optimizer=Optimizer(),
                                clip_norm=clip_norm, accum_steps=accum_steps)
  return trainable, metrics


def train_step(trainable, frozen, batch, lr, *, cfg: PaliGemmaConfig, clip_norm: float | None = None,
               accum_steps: int = 1, allow_low_precision: bool = False):
  """One SGD step, the seed's update: p <- p - lr * grad (float32). Returns (trainable, metrics).

  Trainable leaves must be float32 (low-precision updates lose small steps; pass allow_low_precision
  to override). Metrics are device arrays: read them one step late to keep the host from syncing.
  """
  if not allow_low_precision:
    bad = [k for k, v in tree.flatten(trainable).items() if v.dtype != jnp.float32]
    if bad:
      raise ValueError(f"trainable params must be float32, these are not: {bad[:5]}")
  return _sgd_step(trainable, frozen, batch, lr, cfg=cfg, clip_norm=clip_norm, accum_steps=accum_steps)


# ------------------------------------------------------------------------------------------- schedules


def warmup_cosine(base: float, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
  """The notebook's schedule: linear warmup to `base` over `warmup_steps`, then cosine to 0 at `total_steps`.

  lr(s) = base * min(1, s / warmup) * 0.5 * (1 + cos(pi * clip((s - warmup) / (total - warmup), 0, 1))),
  for steps s counted from 1 (big_vision's create_learning_rate_schedule).
  """
  def lr(step):
    warm = min(1.0, step / warmup_steps) if warmup_steps else 1.0
    progress = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
    return base * warm * 0.5 * (1.0 + math.cos(math.pi * progress))
  return lr


def linear_decay(base: float, total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
  """Linear warmup, then linear decay to 0 at `total_steps`."""
  def lr(step):
    warm = min(1.0, step / warmup_steps) if warmup_steps else 1.0
    progress = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
    return base * warm * (1.0 - progress)
  return lr


def constant(base: float) -> Callable[[int], float]:
  return lambda step: base


def schedule(name: str, base: float, total_steps: int, warmup_fraction: float = 0.1) -> Callable[[int], float]:
  """By name: "constant", "cosine" (warmup + cosine, the notebook's) or "linear". Warmup steps are
  round(warmup_fraction * total_steps), Python's round, as big_vision computes them."""
  warmup = round(warmup_fraction * total_steps)
  if name == "constant":
    return constant(base)
  if name == "cosine":
    return warmup_cosine(base, total_steps, warmup)
  if name == "linear":
    return linear_decay(base, total_steps, warmup)
  raise ValueError(f"unknown schedule {name!r}; use constant, cosine or linear")


def all_finite(tree: Iterable) -> bool:
  return all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(tree))
