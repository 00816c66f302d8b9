"""KV-cached greedy decoding: `prefill` + `decode_step`, and `greedy` running both in one jitted loop.

Axes: see pgjax/__init__.py.

Follows big_vision's `gemma_bv.prefill_cache` / `extend_cache` semantics without its roll to right
alignment: prompts are right-padded ([bos] prefix "\\n" then padding, `mask_input` 0 on padding) and
each row keeps its own positions, `cumsum(mask_input) - 1` over [image; prompt], so valid tokens are
numbered contiguously from 0 and generated token t of a row sits at position len(row) + t.

Cache (a plain dict, donated by `decode_step`):
  k, v   [L, B, S, K, H]  keys (after RoPE) and values; the first slots hold [image; prompt], later slots
                          the generated tokens, written at the same slot for the whole batch
  valid  [B, S] bool      which slots a new token may attend (padding and unwritten slots are False)
  pos    [B] int32        position of the next token of each row
  idx    [] int32         the next slot to write

Every entry point takes an optional `decode_view` (`make_view(params, cfg=cfg)`, made once per set of
params): a copy of the LLM's weights laid out for the token loop (why: pgjax/decode_view.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pgjax import decode_view, gemma, paligemma
from pgjax.config import PaliGemmaConfig


def _prefill(params, image_BYXC, prompt_BT, mask_input_BT, mask_ar_BT, view=None, *, cfg: PaliGemmaConfig,
             cache_size: int, cache_dtype):
  # T is [image; prompt]; the prompt's own arrays (prompt_BT, mask_*_BT) cover its last T - P positions.
  x_BTD, _ = paligemma.embed_image_and_text(params, image_BYXC, prompt_BT, cfg=cfg)
  B, T, _ = x_BTD.shape
  if mask_ar_BT is None:
    mask_ar_BT = jnp.zeros(prompt_BT.shape, jnp.int32)
  full_mask_ar_BT, full_mask_input_BT = paligemma.full_masks(mask_ar_BT, mask_input_BT, T - prompt_BT.shape[1])
  mask_BTS = paligemma.make_attn_mask(full_mask_input_BT, full_mask_ar_BT)
  positions_BT = jnp.cumsum(full_mask_input_BT, axis=1) - 1
  # The next token is predicted at the last valid prompt position: logits there alone, and with the
  # view, the last layer's attention output and MLP too.
  last_B = T - 1 - jnp.argmax(full_mask_input_BT[:, ::-1], axis=1)
  if view is None:
    pre_logits_BTD, aux = gemma.forward(params["llm"], x_BTD, positions_BT, mask_BTS, cfg=cfg.llm,
                                        kv_dtype=cache_dtype, return_kv=True)
    pre_logits_B1D = pre_logits_BTD[jnp.arange(B), last_B][:, None]
    logits_BV = gemma.logits(params["llm"], pre_logits_B1D, cfg=cfg.llm)[:, 0]
  else:
    pre_logits_B1D, aux = decode_view.forward(params["llm"], view, x_BTD, positions_BT, mask_BTS, last_B,
                                              cfg=cfg.llm, kv_dtype=cache_dtype)
    logits_BV = decode_view.logits(view, pre_logits_B1D, cfg=cfg.llm)[:, 0]
  pad = ((0, 0), (0, 0), (0, cache_size - T), (0, 0), (0, 0))
  k_LBSKH, v_LBSKH = aux["kv"]  # the prompt's keys and values: the cache's first T slots
  cache = {
      "k": jnp.pad(k_LBSKH, pad), "v": jnp.pad(v_LBSKH, pad),
      "valid": jnp.pad(full_mask_input_BT, ((0, 0), (0, cache_size - T))),
      "pos": jnp.sum(full_mask_input_BT, axis=1, dtype=jnp.int32),
      "idx": jnp.asarray(T, jnp.int32),
  }
  return logits_BV, cache


def _decode_step(params, tokens_B, cache, view=None, *, cfg: PaliGemmaConfig):
  x_B1D = gemma.embed(params["llm"], tokens_B[:, None], cfg=cfg.llm)
  args = (x_B1D, cache["pos"][:, None], cache["k"], cache["v"], cache["valid"])
  if view is None:
    pre_logits_B1D, (k_LB1KH, v_LB1KH) = gemma.forward_cached(params["llm"], *args, cfg=cfg.llm)
  else:
    pre_logits_B1D, (k_LB1KH, v_LB1KH) = decode_view.forward_cached(params["llm"], view, *args, cfg=cfg.llm)
  idx = cache["idx"]
  B = tokens_B.shape[0]
  cache = {
      "k": jax.lax.dynamic_update_slice(cache["k"], k_LB1KH, (0, 0, idx, 0, 0)),
      "v": jax.lax.dynamic_update_slice(cache["v"], v_LB1KH, (0, 0, idx, 0, 0)),
      "valid": jax.lax.dynamic_update_slice(cache["valid"], jnp.ones((B, 1), bool), (0, idx)),
      "pos": cache["pos"] + 1,
      "idx": idx + 1,
  }
  if view is None:
    logits_B1V = gemma.logits(params["llm"], pre_logits_B1D, cfg=cfg.llm)
  else:
    logits_B1V = decode_view.logits(view, pre_logits_B1D, cfg=cfg.llm)
  return logits_B1V[:, 0], cache


def _cache_dtype(cache_dtype, cfg: PaliGemmaConfig):
  # The default is the compute dtype: keys and values are cast to it at every attention dot anyway, so a
  # cache in it changes no number and, in a 16-bit dtype, is half the size.
  return jnp.dtype(cfg.llm.compute_dtype if cache_dtype is None else cache_dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "cache_size", "cache_dtype"))
def prefill(params, image_BYXC, prompt_BT, mask_input_BT, mask_ar_BT=None, decode_view=None, *,
            cfg: PaliGemmaConfig, cache_size: int, cache_dtype=None):
  """Runs [image; prompt] once and fills the cache. Returns (logits_BV of the next token, cache).

  cache_size counts slots for the image, the prompt and every token to be fed by `decode_step`.
  `mask_ar_BT` defaults to zeros: the whole prompt is one bidirectional block with the image.
  `decode_view`: see `make_view`. `cache_dtype`: see `greedy`.
  """
  T = cfg.num_image_tokens + prompt_BT.shape[1]
  if cache_size < T:
    raise ValueError(f"cache_size {cache_size} is smaller than the {T} image and prompt tokens")
  return _prefill(params, image_BYXC, prompt_BT, mask_input_BT, mask_ar_BT, decode_view, cfg=cfg,
                  cache_size=cache_size, cache_dtype=_cache_dtype(cache_dtype, cfg))


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def decode_step(params, tokens_B, cache, decode_view=None, *, cfg: PaliGemmaConfig):
  """Feeds one token per row. Returns (logits_BV of the next token, cache). The cache is donated.

  The caller must not feed more tokens than the cache has free slots (XLA would clamp the write).
  `decode_view`: see `make_view`.
  """
  return _decode_step(params, tokens_B, cache, decode_view, cfg=cfg)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _make_view(llm_params, *, cfg, dtype):
  return decode_view.make_decode_view(llm_params, cfg=cfg, dtype=dtype)


def make_view(params, *, cfg: PaliGemmaConfig, dtype=None) -> dict:
  """A copy of the LLM's weights laid out for decoding (`decode_view.make_decode_view`, which says why).
  Make it once per set of params and pass it as `decode_view=` to `greedy`, `prefill` or `decode_step`.

  It holds the LLM's weights (layers and output head) a second time, in `dtype` (None: the config's
  compute dtype, what the dots read, so the loop casts nothing), for as long as it lives. Without it
  (`decode_view=None`, the default) nothing extra is held.
  """
  return _make_view(params["llm"], cfg=cfg.llm, dtype=None if dtype is None else jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_id", "cache_dtype", "return_logits"))
def _greedy(params, image_BYXC, prompt_BT, mask_input_BT, mask_ar_BT, valid_B, view, *, cfg, max_new_tokens,
            eos_id, cache_dtype, return_logits):
  B, M = prompt_BT.shape[0], max_new_tokens
  T = cfg.num_image_tokens + prompt_BT.shape[1]
  logits_BV, cache = _prefill(params, image_BYXC, prompt_BT, mask_input_BT, mask_ar_BT, view, cfg=cfg,
                              cache_size=T + M - 1, cache_dtype=cache_dtype)
  V = logits_BV.shape[-1]
  is_eos = (lambda t: t == eos_id) if eos_id is not None else (lambda t: jnp.zeros_like(t, bool))

  def record(t, tok_B, logits_BV, tokens_BM, logits_BMV, done_B):
    tokens_BM = tokens_BM.at[:, t].set(tok_B)
    if return_logits:
      logits_BMV = logits_BMV.at[:, t].set(logits_BV)
    return tokens_BM, logits_BMV, done_B | is_eos(tok_B)

  tok_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BMV = jnp.zeros((B, M, V) if return_logits else (B, 0, V), jnp.float32)
  state = (1, tok_B, *record(0, tok_B, logits_BV, jnp.zeros((B, M), jnp.int32), logits_BMV, ~valid_B), cache)

  def cond(state):
    t, _, _, _, done_B, _ = state
    return (t < M) & ~jnp.all(done_B)

  def body(state):
    t, tok_B, tokens_BM, logits_BMV, done_B, cache = state
    logits_BV, cache = _decode_step(params, tok_B, cache, view, cfg=cfg)
    tok_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return (t + 1, tok_B, *record(t, tok_B, logits_BV, tokens_BM, logits_BMV, done_B), cache)

  steps, _, tokens_BM, logits_BMV, _, _ = jax.lax.while_loop(cond, body, state)
  # Cut each row after its first eos; slots past the early stop stay zero.
  eos_BM = is_eos(tokens_BM)
  keep_BM = ((jnp.cumsum(eos_BM, axis=1) - eos_BM) == 0) & (jnp.arange(M) < steps) & valid_B[:, None]
  tokens_BM = jnp.where(keep_BM, tokens_BM, 0)
  if return_logits:
    logits_BMV = jnp.where(keep_BM[..., None], logits_BMV, 0.0)
  info = {"num_tokens": keep_BM.sum(1), "hit_eos": (eos_BM & keep_BM).any(1), "steps": steps}
  return tokens_BM, logits_BMV, info


def greedy(params, image_BYXC, prompt_BT, prompt_mask_input_BT, *, cfg: PaliGemmaConfig, max_new_tokens: int,
           eos_id: int | None = 1, prompt_mask_ar_BT=None, valid_B=None, cache_dtype=None,
           return_logits: bool = True, return_info: bool = False, decode_view: dict | None = None):
  """Greedy decoding of up to `max_new_tokens` per row, in one jitted `while_loop`.

  Stops early once every valid row has produced `eos_id` (None: never). Returns tokens [B, M] (zero
  after each row's first eos, which is kept) and the logits each token was chosen from [B, M, V]
  (zero where the token is). With return_info, also a dict: num_tokens [B] (eos included), hit_eos [B]
  (False: the row ran out of tokens), steps (decode steps run). `valid_B` marks batch rows that are
  padding (False); they never delay the early stop and come back as zeros. cache_dtype (None: the
  config's compute dtype): in float32 compute, float32 matches a teacher-forced forward to float32
  precision and bfloat16 halves the cache.
  `decode_view` (`make_view(params, cfg=cfg)`, made once): prefill and the token loop read the LLM's
  weights from it instead of the stacked params (see `make_view`).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  prompt_BT = jnp.asarray(prompt_BT, jnp.int32)
  if valid_B is None:
    valid_B = jnp.ones(prompt_BT.shape[:1], bool)
  tokens, logits, info = _greedy(params, image_BYXC, prompt_BT, jnp.asarray(prompt_mask_input_BT, bool),
                                 None if prompt_mask_ar_BT is None else jnp.asarray(prompt_mask_ar_BT, jnp.int32),
                                 jnp.asarray(valid_B, bool), decode_view, cfg=cfg, max_new_tokens=max_new_tokens, eos_id=eos_id,
                                 cache_dtype=_cache_dtype(cache_dtype, cfg), return_logits=return_logits)
  out = (tokens, logits if return_logits else None)
  return (*out, info) if return_info else out
