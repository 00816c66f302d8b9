"""KV-cached decoding: `prefill` + `decode_step`, and greedy decoding, sampling, best-of-n and beam search,
each running both in one jitted loop; `filter_logits` and `Grammar` shape what may be chosen.

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

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pgjax import decode_view, gemma, paligemma, tree
from pgjax.grammar import Grammar
from pgjax.config import PaliGemmaConfig, is_int, is_real


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


def plain_weights(params) -> bool:
  """Whether every LLM weight is a plain array (no quant.QArray, no lora.Adapted): what the view can copy."""
  return all(isinstance(x, (jax.Array, np.ndarray)) for x in tree.flatten(params["llm"]).values())


def make_view(params, *, cfg: PaliGemmaConfig, dtype=None) -> dict:
  """A copy of the LLM's weights laid out for decoding (`decode_view.make_decode_view`, which says why).
  Make it once per set of params and pass it as `decode_view=` to `greedy`, `prefill` or `decode_step`.

  It holds the LLM's weights (layers and output head) a second time, in `dtype` (None: the config's
  compute dtype, what the dots read, so the loop casts nothing), for as long as it lives. Without it
  (`decode_view=None`, the default) nothing extra is held.
  """
  if not plain_weights(params):
    odd = [p for p, x in tree.flatten(params["llm"]).items() if not isinstance(x, (jax.Array, np.ndarray))]
    raise ValueError(f"the decode view copies plain float weights; {odd[:3]} are quantized or carry adapters "
                     "(decode without a view, or lora.merge first)")
  return _make_view(params["llm"], cfg=cfg.llm, dtype=None if dtype is None else jnp.dtype(dtype))


# ---------------------------------------------------------------------------------------------------
# Choosing tokens: filters and constraints.


def _check_filter(temperature, top_k, top_p):
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0 to filter (0 is greedy decoding), got {temperature}")
  if top_k is not None and top_k < 1:
    raise ValueError(f"top_k must be >= 1 (or None), got {top_k}")
  if top_p is not None and not top_p > 0:
    raise ValueError(f"top_p must be > 0 (or None), got {top_p}")


def filter_logits(logits_BV, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
  """Logits -> the logits a sampler draws from, over the last axis; removed entries become -inf. Pure.

  In this order: divide by `temperature` (> 0); `top_k` keeps the k largest and every entry tied with the
  k-th; `top_p` keeps the nucleus of what is left, by big_vision's rule: sorted descending, the tokens
  before the cumulative softmax reaches p, the one that reaches it, and every token tied with that one's
  logit (a rule on values, not positions). top_p >= 1 or None keeps everything; a p at or below the top
  probability keeps the argmax and its ties. top_k None (or >= V) keeps everything.
  """
  _check_filter(temperature, top_k, top_p)
  x_BV = jnp.asarray(logits_BV, jnp.float32) / temperature
  V = x_BV.shape[-1]
  if top_k is not None and top_k < V:
    kth_B1 = jax.lax.top_k(x_BV, top_k)[0][..., -1:]
    x_BV = jnp.where(x_BV >= kth_B1, x_BV, -jnp.inf)
  if top_p is not None and top_p < 1:
    cutoff = _nucleus_cutoff(x_BV.reshape(-1, V), top_p).reshape(x_BV.shape[:-1] + (1,))
    x_BV = jnp.where(x_BV >= cutoff, x_BV, -jnp.inf)
  return x_BV


def _float_key(v):
  """float32 -> uint32, order-preserving (radix-sort keys): negative floats' bits flipped, positives' sign set."""
  bits = jax.lax.bitcast_convert_type(v, jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _key_float(k):
  bits = jnp.where(k >> 31 == 1, k & jnp.uint32(0x7FFFFFFF), ~k)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _nucleus_cutoff(x_BV, top_p):
  """big_vision's nucleus cutoff without a sort: the largest logit c whose tokens at or above it hold at least
  p of the mass (sorted descending, that is the logit of the token where the cumulative softmax reaches p).
  The mass at or above a value only falls as the value rises, so 32 bisection steps over the floats' ordered
  bit patterns find c exactly, each one masked sum over V: a sort of V per row per token costs ~30x more on
  XLA:CPU (3.2 ms against 0.1 at V = 16,384). Sums are float32, so a cumulative mass within rounding of p may
  fall on either side, as in a sorted cumsum. [B, 1]; -inf (keep all) when rounding leaves the total under p."""
  probs_BV = jax.nn.softmax(x_BV, axis=-1)
  B = x_BV.shape[0]
  lo_B = jnp.full((B,), _float_key(jnp.float32(-jnp.inf)))  # mass at or above -inf: all of it
  hi_B = _float_key(jnp.max(x_BV, axis=-1)) + 1              # above the max: none

  def step(_, lo_hi):
    lo_B, hi_B = lo_hi
    mid_B = lo_B + (hi_B - lo_B) // 2
    mass_B = jnp.sum(jnp.where(x_BV >= _key_float(mid_B)[:, None], probs_BV, 0.0), axis=-1)
    ok_B = mass_B >= top_p
    return jnp.where(ok_B, mid_B, lo_B), jnp.where(ok_B, hi_B, mid_B)

  lo_B, _ = jax.lax.fori_loop(0, 32, step, (lo_B, hi_B))
  return _key_float(lo_B)[:, None]


def _first_above(cum_BN, u_B, positive_BN):
  """The first index whose cumulative sum exceeds u: an entry with mass, as the sum rises only there. Should
  rounding put u at or past the last sum, the last entry with mass."""
  N = cum_BN.shape[-1]
  last_B = N - 1 - jnp.argmax(positive_BN[:, ::-1], axis=-1)
  return jnp.minimum(jnp.sum(cum_BN <= u_B[:, None], axis=-1), last_B)


def draw(keys_B, logits_BV):
  """One token per row from softmax(logits) ([B] keys, -inf entries never drawn): int32 [B].

  An inverse-CDF draw in two levels. The vocabulary is cut into blocks of C = 2^ceil(log2 sqrt V) tokens; one
  uniform picks a block by the cumulative sum of the blocks' masses, a second picks a token within it by the
  block's own cumulative sum. Both sums run over at most ~sqrt(V) float32 terms, so a token's probability is
  resolved to float32 rounding of its block's mass, not of the whole vocabulary's as in one cumulative sum over
  V = 257k. It needs two uniforms a row where a Gumbel-max draw (jax.random.categorical) needs V: with top-p
  at V = 16,384 on XLA:CPU that was 1.9 ms against 0.35 ms for 4 rows (bench/README.md)."""
  B, V = logits_BV.shape
  C = 1 << max(0, (int(np.ceil(np.sqrt(V))) - 1).bit_length())
  R = -(-V // C)
  x_BV = logits_BV.astype(jnp.float32)
  p_BV = jnp.exp(x_BV - jnp.max(x_BV, axis=-1, keepdims=True))  # the max entry is 1, -inf ones 0
  p_BRC = jnp.pad(p_BV, ((0, 0), (0, R * C - V))).reshape(B, R, C)
  mass_BR = jnp.sum(p_BRC, axis=-1)
  cum_BR = jnp.cumsum(mass_BR, axis=-1)
  u_B2 = jax.vmap(lambda k: jax.random.uniform(k, (2,)))(keys_B)
  r_B = _first_above(cum_BR, u_B2[:, 0] * cum_BR[:, -1], mass_BR > 0)
  block_BC = jnp.take_along_axis(p_BRC, r_B[:, None, None], axis=1)[:, 0]
  cum_BC = jnp.cumsum(block_BC, axis=-1)
  c_B = _first_above(cum_BC, u_B2[:, 1] * cum_BC[:, -1], block_BC > 0)
  return (r_B * C + c_B).astype(jnp.int32)


def _forbid_mask(forbid, V: int):
  if forbid is None:
    return None
  ids = np.asarray(list(forbid), np.int64).reshape(-1)
  if ids.size and (ids.min() < 0 or ids.max() >= V):
    raise ValueError(f"forbid holds token ids outside the vocabulary [0, {V}): {sorted(set(ids[(ids < 0) | (ids >= V)].tolist()))}")
  return jnp.zeros((V,), bool).at[ids].set(True)


def _check_grammar(grammar, V: int):
  if grammar is None:
    return None
  if grammar.class_V.shape != (V,):
    raise ValueError(f"grammar.class_V has shape {tuple(grammar.class_V.shape)}, the model's vocabulary is {V}")
  return Grammar(jnp.asarray(grammar.class_V, jnp.int32), jnp.asarray(grammar.next_QC, jnp.int32))


def _constrain(x_BV, forbid_V, grammar, state_B):
  """Sets the tokens `forbid_V` lists, and those the grammar does not allow in each row's state, to -inf."""
  if forbid_V is not None:
    x_BV = jnp.where(forbid_V, -jnp.inf, x_BV)
  if grammar is not None:
    allowed_BV = grammar.next_QC[state_B][:, grammar.class_V] >= 0
    x_BV = jnp.where(allowed_BV, x_BV, -jnp.inf)
  return x_BV


def _advance(grammar, state_B, tok_B):
  return None if grammar is None else grammar.next_QC[state_B, grammar.class_V[tok_B]]


def _logp_at(logits_BV, tok_B):
  """log_softmax of the raw logits at the chosen tokens: no temperature, filter or constraint."""
  return jnp.take_along_axis(logits_BV, tok_B[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits_BV, axis=-1)


def _row_keys(key, B: int):
  """A key per row: `key` itself when it is [B] keys, else fold_in(key, row). Row b's draws depend on its key
  alone, so padding rows added after it change nothing."""
  key = jnp.asarray(key)
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)  # a raw uint32 key (jax.random.PRNGKey)
  if key.shape == ():
    return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(B))
  if key.shape != (B,):
    raise ValueError(f"key must be one key or {B} keys (one per row), got shape {key.shape}")
  return key


# ---------------------------------------------------------------------------------------------------
# One token loop for greedy decoding and sampling.


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_id", "cache_dtype", "return_logits",
                                             "return_logp", "sampling", "copies"))
def _generate(params, image_BYXC, prompt_BT, mask_input_BT, mask_ar_BT, valid_B, view, keys_B, forbid_V, grammar,
              *, cfg, max_new_tokens, eos_id, cache_dtype, return_logits, return_logp, sampling, copies=1):
  # copies > 1: each prompt is run once, then decoded `copies` times from copies of its cache (best-of-n).
  M = max_new_tokens
  T = cfg.num_image_tokens + prompt_BT.shape[1]
  logits_BV, cache = _prefill(params, image_BYXC, prompt_BT, mask_input_BT, mask_ar_BT, view, cfg=cfg,
                              cache_size=T + M - 1, cache_dtype=cache_dtype)
  if copies > 1:
    logits_BV, cache, valid_B = jnp.repeat(logits_BV, copies, axis=0), _repeat_rows(cache, copies), \
        jnp.repeat(valid_B, copies, axis=0)
  B = logits_BV.shape[0]
  V = logits_BV.shape[-1]
  is_eos = (lambda t: t == eos_id) if eos_id is not None else (lambda t: jnp.zeros_like(t, bool))

  def choose(t, logits_BV, gstate_B):
    x_BV = _constrain(logits_BV, forbid_V, grammar, gstate_B)
    if sampling is None:  # greedy: the argmax, ties to the lowest id
      return jnp.argmax(x_BV, axis=-1).astype(jnp.int32)
    f_BV = filter_logits(x_BV, *sampling)
    return draw(jax.vmap(jax.random.fold_in, (0, None))(keys_B, t), f_BV)

  def record(s, t, tok_B, logits_BV):
    s = dict(s, tok_B=tok_B, tokens_BM=s["tokens_BM"].at[:, t].set(tok_B), done_B=s["done_B"] | is_eos(tok_B))
    if return_logits:
      s["logits_BMV"] = s["logits_BMV"].at[:, t].set(logits_BV)
    if return_logp:
      s["logp_BM"] = s["logp_BM"].at[:, t].set(_logp_at(logits_BV, tok_B))
    if grammar is not None:
      s["gstate_B"] = _advance(grammar, s["gstate_B"], tok_B)
    return s

  s = {"t": jnp.asarray(1), "tokens_BM": jnp.zeros((B, M), jnp.int32), "done_B": ~valid_B, "cache": cache}
  if return_logits:
    s["logits_BMV"] = jnp.zeros((B, M, V), jnp.float32)
  if return_logp:
    s["logp_BM"] = jnp.zeros((B, M), jnp.float32)
  if grammar is not None:
    s["gstate_B"] = jnp.zeros((B,), jnp.int32)
  s = record(s, 0, choose(0, logits_BV, s.get("gstate_B")), logits_BV)

  def cond(s):
    return (s["t"] < M) & ~jnp.all(s["done_B"])

  def body(s):
    t = s["t"]
    logits_BV, cache = _decode_step(params, s["tok_B"], s["cache"], view, cfg=cfg)
    s = record(dict(s, cache=cache, t=t + 1), t, choose(t, logits_BV, s.get("gstate_B")), logits_BV)
    return s

  s = jax.lax.while_loop(cond, body, s)
  # Cut each row after its first eos; slots past the early stop stay zero.
  steps, tokens_BM = s["t"], s["tokens_BM"]
  eos_BM = is_eos(tokens_BM)
  keep_BM = ((jnp.cumsum(eos_BM, axis=1) - eos_BM) == 0) & (jnp.arange(M) < steps) & valid_B[:, None]
  out = {"tokens_BM": jnp.where(keep_BM, tokens_BM, 0),
         "info": {"num_tokens": keep_BM.sum(1), "hit_eos": (eos_BM & keep_BM).any(1), "steps": steps}}
  if return_logits:
    out["logits_BMV"] = jnp.where(keep_BM[..., None], s["logits_BMV"], 0.0)
  if return_logp:
    out["logp_BM"] = jnp.where(keep_BM, s["logp_BM"], 0.0)
  return out


def _inputs(prompt_BT, prompt_mask_input_BT, prompt_mask_ar_BT, valid_B, max_new_tokens):
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  prompt_BT = jnp.asarray(prompt_BT, jnp.int32)
  valid_B = jnp.ones(prompt_BT.shape[:1], bool) if valid_B is None else jnp.asarray(valid_B, bool)
  mask_ar_BT = None if prompt_mask_ar_BT is None else jnp.asarray(prompt_mask_ar_BT, jnp.int32)
  return prompt_BT, jnp.asarray(prompt_mask_input_BT, bool), mask_ar_BT, valid_B


def _run(params, image_BYXC, prompt_BT, prompt_mask_input_BT, *, cfg, max_new_tokens, eos_id, prompt_mask_ar_BT,
         valid_B, cache_dtype, decode_view, forbid, grammar, key=None, return_logits=False, return_logp=False,
         sampling=None, copies=1):
  prompt_BT, mask_input_BT, mask_ar_BT, valid_B = _inputs(prompt_BT, prompt_mask_input_BT, prompt_mask_ar_BT,
                                                          valid_B, max_new_tokens)
  V = cfg.llm.vocab_size
  keys_B = None if key is None else _row_keys(key, prompt_BT.shape[0] * copies)
  return _generate(params, image_BYXC, prompt_BT, mask_input_BT, mask_ar_BT, valid_B, decode_view, keys_B,
                   _forbid_mask(forbid, V), _check_grammar(grammar, V), cfg=cfg, max_new_tokens=max_new_tokens,
                   eos_id=eos_id, cache_dtype=_cache_dtype(cache_dtype, cfg), return_logits=return_logits,
                   return_logp=return_logp, sampling=sampling, copies=copies)


def _sampling(temperature, top_k, top_p):
  """The static sampling settings of `_generate`: None (the argmax) at temperature 0; argument errors now."""
  if temperature == 0:
    return None
  _check_filter(temperature, top_k, top_p)
  return float(temperature), top_k, top_p


def _repeat_rows(cache, n: int):
  """The cache with each row repeated n times, row b's copies at b·n ... b·n + n-1."""
  return dict(cache, k=jnp.repeat(cache["k"], n, axis=1), v=jnp.repeat(cache["v"], n, axis=1),
              valid=jnp.repeat(cache["valid"], n, axis=0), pos=jnp.repeat(cache["pos"], n, axis=0))


def greedy(params, image_BYXC, prompt_BT, prompt_mask_input_BT, *, cfg: PaliGemmaConfig, max_new_tokens: int,
           eos_id: int | None = 1, prompt_mask_ar_BT=None, valid_B=None, cache_dtype=None,
           return_logits: bool = True, return_info: bool = False, decode_view: dict | None = None,
           forbid=None, grammar: Grammar | None = None):
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
  `forbid`: token ids never to generate (big_vision's `mask_logits`). `grammar`: a `Grammar` the output must
  follow. Both act on the choice only; the returned logits are the model's.
  """
  out = _run(params, image_BYXC, prompt_BT, prompt_mask_input_BT, cfg=cfg, max_new_tokens=max_new_tokens,
             eos_id=eos_id, prompt_mask_ar_BT=prompt_mask_ar_BT, valid_B=valid_B, cache_dtype=cache_dtype,
             decode_view=decode_view, forbid=forbid, grammar=grammar, return_logits=return_logits)
  res = (out["tokens_BM"], out["logits_BMV"] if return_logits else None)
  return (*res, out["info"]) if return_info else res


def sample(params, image_BYXC, prompt_BT, prompt_mask_input_BT, *, cfg: PaliGemmaConfig, key, max_new_tokens: int,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, eos_id: int | None = 1,
           prompt_mask_ar_BT=None, valid_B=None, cache_dtype=None, decode_view: dict | None = None, forbid=None,
           grammar: Grammar | None = None, return_info: bool = False):
  """Samples up to `max_new_tokens` per row from `filter_logits(logits, temperature, top_k, top_p)`, in the
  same single jitted loop as `greedy` (cache, decode view, padding rows, early stop, eos cut).

  Returns tokens [B, M] and logp [B, M]: log_softmax of the raw logits at each chosen token (no temperature,
  filter or constraint; 0 after the eos). Reproducible from `key`: one key (row b draws from fold_in(key, b),
  step t from fold_in of that and t), or [B] keys, one per row. A row's tokens depend on its own key,
  prompt and image alone, so padding rows added to a batch change nothing. temperature=0 is greedy decoding
  (the argmax, whatever top_k and top_p say). `forbid`, `grammar`, return_info: as in `greedy`.
  """
  out = _run(params, image_BYXC, prompt_BT, prompt_mask_input_BT, cfg=cfg, max_new_tokens=max_new_tokens,
             eos_id=eos_id, prompt_mask_ar_BT=prompt_mask_ar_BT, valid_B=valid_B, cache_dtype=cache_dtype,
             decode_view=decode_view, forbid=forbid, grammar=grammar, key=key, return_logp=True,
             sampling=_sampling(temperature, top_k, top_p))
  res = (out["tokens_BM"], out["logp_BM"])
  return (*res, out["info"]) if return_info else res


def best_of_n(params, image_BYXC, prompt_BT, prompt_mask_input_BT, *, cfg: PaliGemmaConfig, key, n: int,
              max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
              eos_id: int | None = 1, prompt_mask_ar_BT=None, valid_B=None, cache_dtype=None,
              decode_view: dict | None = None, forbid=None, grammar: Grammar | None = None,
              return_info: bool = False):
  """big_vision's best-of-n: n samples per row, keeping the one with the highest summed log-prob up to and
  including its eos (ties: the first sample). Each prompt runs once; its n samples decode from copies of its
  cache, all n·B rows in one loop. Returns tokens [B, M] and
  that score [B]; with return_info also num_tokens, hit_eos (of the kept sample) and steps. Sample j of row b
  draws from fold_in(row b's key, j) (`sample` says what row b's key is)."""
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  B = np.shape(prompt_BT)[0]
  keys_B = _row_keys(key, B)
  keys_F = jax.vmap(lambda k: jax.vmap(jax.random.fold_in, (None, 0))(k, jnp.arange(n)))(keys_B).reshape(B * n)
  out = _run(params, image_BYXC, prompt_BT, prompt_mask_input_BT, cfg=cfg, max_new_tokens=max_new_tokens,
             eos_id=eos_id, prompt_mask_ar_BT=prompt_mask_ar_BT, valid_B=valid_B, cache_dtype=cache_dtype,
             decode_view=decode_view, forbid=forbid, grammar=grammar, key=keys_F, return_logp=True,
             sampling=_sampling(temperature, top_k, top_p), copies=n)
  tokens_FM, logp_FM, info = out["tokens_BM"], out["logp_BM"], out["info"]
  score_BN = logp_FM.sum(-1).reshape(B, n)
  best_B = jnp.argmax(score_BN, axis=-1)
  pick = lambda x: jnp.take_along_axis(x.reshape(B, n, *x.shape[1:]), best_B.reshape((B, 1) + (1,) * (x.ndim - 1)),  # noqa: E731
                                       axis=1)[:, 0]
  res = (pick(tokens_FM), jnp.max(score_BN, axis=-1))
  info = {"num_tokens": pick(info["num_tokens"]), "hit_eos": pick(info["hit_eos"]), "steps": info["steps"]}
  return (*res, info) if return_info else res


# ---------------------------------------------------------------------------------------------------
# Beam search.


@functools.partial(jax.jit, static_argnames=("cfg", "beam_size", "max_new_tokens", "eos_id", "cache_dtype"))
def _beam(params, image_BYXC, prompt_BT, mask_input_BT, mask_ar_BT, valid_B, view, forbid_V, grammar, *, cfg,
          beam_size, max_new_tokens, eos_id, cache_dtype):
  B, K, M = prompt_BT.shape[0], beam_size, max_new_tokens
  T = cfg.num_image_tokens + prompt_BT.shape[1]
  logits_BV, cache = _prefill(params, image_BYXC, prompt_BT, mask_input_BT, mask_ar_BT, view, cfg=cfg,
                              cache_size=T + M - 1, cache_dtype=cache_dtype)
  V = logits_BV.shape[-1]
  cache = _repeat_rows(cache, K)  # B·K rows, row b's beams at b·K ... b·K + K-1

  def logp_BKV(logits_FV, gstate_BK):
    lp_FV = _constrain(jax.nn.log_softmax(logits_FV, axis=-1), forbid_V, grammar,
                       None if gstate_BK is None else gstate_BK.reshape(-1))
    return lp_FV.reshape(B, K, V)

  def select(s, t, lp_BKV):
    """One step of big_vision's beam search at token t, from each live beam's next-token log-probs."""
    s = dict(s)
    if eos_id is not None:
      # Every live beam, finished here with eos, joins the best finished (old ones first: ties keep them).
      fin_BJ = jnp.concatenate([s["fin_BK"], s["live_BK"] + lp_BKV[..., eos_id]], axis=1)
      seq_BJM = jnp.concatenate([s["fin_BKM"], s["live_BKM"].at[:, :, t].set(eos_id)], axis=1)
      s["fin_BK"], i_BK = jax.lax.top_k(fin_BJ, K)
      s["fin_BKM"] = jnp.take_along_axis(seq_BJM, i_BK[..., None], axis=1)
      lp_BKV = lp_BKV.at[..., eos_id].set(-jnp.inf)  # eos never continues a live beam
    # Each live beam's top K+1 continuations, then the best K of those K·(K+1) (ties: lower beam, lower id).
    top_BKJ, tok_BKJ = jax.lax.top_k(s["live_BK"][..., None] + lp_BKV, K + 1)
    s["live_BK"], i_BK = jax.lax.top_k(top_BKJ.reshape(B, K * (K + 1)), K)
    parent_BK = i_BK // (K + 1)
    tok_BK = jnp.take_along_axis(tok_BKJ.reshape(B, K * (K + 1)), i_BK, axis=1)
    s["live_BKM"] = jnp.take_along_axis(s["live_BKM"], parent_BK[..., None], axis=1).at[:, :, t].set(tok_BK)
    if grammar is not None:
      state_BK = jnp.take_along_axis(s["gstate_BK"], parent_BK, axis=1)
      s["gstate_BK"] = _advance(grammar, state_BK.reshape(-1), tok_BK.reshape(-1)).reshape(B, K)
    s["parent_BK"], s["t"] = parent_BK, t + 1
    # Scores only fall, so a row is done once its best live beam is below its best finished one.
    best_live_B = s["live_BK"].max(-1)
    s["done_B"] = ~valid_B | (best_live_B < s["fin_BK"][:, 0]) | (best_live_B == -jnp.inf)
    return s

  s = {"live_BK": jnp.where(jnp.arange(K) == 0, 0.0, -jnp.inf) * jnp.ones((B, 1)),  # one live beam to start
       "live_BKM": jnp.zeros((B, K, M), jnp.int32), "fin_BK": jnp.full((B, K), -jnp.inf),
       "fin_BKM": jnp.zeros((B, K, M), jnp.int32), "cache": cache}
  if grammar is not None:
    s["gstate_BK"] = jnp.zeros((B, K), jnp.int32)
  s = select(s, 0, logp_BKV(jnp.repeat(logits_BV, K, axis=0), s.get("gstate_BK")))

  def cond(s):
    return (s["t"] < M) & ~jnp.all(s["done_B"])

  def body(s):
    t = s["t"]
    rows_F = (jnp.arange(B)[:, None] * K + s["parent_BK"]).reshape(-1)
    # The beams' caches follow their parents (valid and pos are the same for every beam of a row).
    cache = dict(s["cache"], k=s["cache"]["k"][:, rows_F], v=s["cache"]["v"][:, rows_F])
    logits_FV, cache = _decode_step(params, s["live_BKM"][:, :, t - 1].reshape(-1), cache, view, cfg=cfg)
    return select(dict(s, cache=cache), t, logp_BKV(logits_FV, s.get("gstate_BK")))

  s = jax.lax.while_loop(cond, body, s)
  # The best finished sequence; a row where none finished gets its best live beam (hit_eos False).
  finished_B = s["fin_BK"][:, 0] > -jnp.inf
  best_live_B = jnp.argmax(s["live_BK"], axis=-1)
  live_BM = jnp.take_along_axis(s["live_BKM"], best_live_B[:, None, None], axis=1)[:, 0]
  tokens_BM = jnp.where(valid_B[:, None], jnp.where(finished_B[:, None], s["fin_BKM"][:, 0], live_BM), 0)
  score_B = jnp.where(finished_B, s["fin_BK"][:, 0], jnp.take_along_axis(s["live_BK"], best_live_B[:, None], 1)[:, 0])
  eos_BM = (tokens_BM == eos_id) if eos_id is not None else jnp.zeros_like(tokens_BM, bool)
  num_tokens_B = jnp.where(finished_B, jnp.argmax(eos_BM, axis=1) + 1, jnp.minimum(s["t"], M))
  info = {"num_tokens": jnp.where(valid_B, num_tokens_B, 0), "hit_eos": finished_B & valid_B, "steps": s["t"]}
  return tokens_BM, score_B, s["fin_BKM"], s["fin_BK"], info


def beam_search(params, image_BYXC, prompt_BT, prompt_mask_input_BT, *, cfg: PaliGemmaConfig, beam_size: int,
                max_new_tokens: int, eos_id: int | None = 1, prompt_mask_ar_BT=None, valid_B=None, cache_dtype=None,
                decode_view: dict | None = None, forbid=None, grammar: Grammar | None = None,
                return_beams: bool = False, return_info: bool = False):
  """big_vision's beam search, in one jitted loop over a cache of B·beam_size rows (reordered by a gather).

  Scores are summed log-probs (log_softmax of the raw logits), eos included, with no length penalty. At every
  step each live beam is also scored as finished with eos; live beams expand by their top beam_size+1 tokens,
  eos excluded, and the best beam_size survive; a row stops once its best live beam scores below its best
  finished sequence (scores only fall, so nothing live can beat it). Ties go to the lower beam and token id.

  Returns tokens [B, M] (zeros after the eos) and score [B] of the best *finished* sequence: one that emitted
  eos within max_new_tokens. A row where no beam finished (eos_id None, a limit too small, or constraints
  that never allow eos) gets its best live beam at the limit and its summed log-prob instead, with hit_eos
  False in the info, so an evaluation counts it as truncated rather than returning nothing as big_vision
  does. return_beams adds the beam_size best finished sequences [B, K, M] and scores [B, K], best first
  (-inf where fewer finished before the stop). beam_size=1 is greedy decoding. The other arguments are
  `greedy`'s; `forbid` and `grammar` remove candidates, and never change a score.
  """
  if beam_size < 1:
    raise ValueError(f"beam_size must be >= 1, got {beam_size}")
  if beam_size + 1 > cfg.llm.vocab_size:
    raise ValueError(f"beam_size {beam_size} needs a vocabulary of more than {beam_size} tokens")
  prompt_BT, mask_input_BT, mask_ar_BT, valid_B = _inputs(prompt_BT, prompt_mask_input_BT, prompt_mask_ar_BT,
                                                          valid_B, max_new_tokens)
  V = cfg.llm.vocab_size
  tokens, score, beams, beam_scores, info = _beam(
      params, image_BYXC, prompt_BT, mask_input_BT, mask_ar_BT, valid_B, decode_view, _forbid_mask(forbid, V),
      _check_grammar(grammar, V), cfg=cfg, beam_size=beam_size, max_new_tokens=max_new_tokens, eos_id=eos_id,
      cache_dtype=_cache_dtype(cache_dtype, cfg))
  res = (tokens, score) + ((beams, beam_scores) if return_beams else ())
  return (*res, info) if return_info else res


# ---------------------------------------------------------------------------------------------------
# One record of how to decode, for evaluation, the CLI and run summaries.

MODES = ("greedy", "sample", "beam")
CONSTRAINTS = ("detect", "segment")
MODE_FIELDS = {"greedy": (), "sample": ("temperature", "top_k", "top_p", "num_samples", "seed"),
               "beam": ("beam_size",)}  # the Decoding fields each mode reads


@dataclasses.dataclass(frozen=True)
class Decoding:
  """How `generate` (and so `evaluate.predict`, `pgjax eval` and `pgjax predict`) chooses tokens.

  mode "greedy"; "sample" (`sample`, or `best_of_n` with num_samples > 1: temperature, top_k, top_p, seed);
  "beam" (`beam_search`: beam_size). forbid: token ids never generated. constrain: "detect" or "segment" keeps
  the output in that task's `<loc>`/`<seg>` grammar (pgjax/grammar.py). An invalid field raises a ValueError
  naming it.
  """
  mode: str = "greedy"
  temperature: float = 1.0
  top_k: int | None = None
  top_p: float | None = None
  beam_size: int = 4
  num_samples: int = 1
  seed: int = 0
  forbid: tuple[int, ...] = ()
  constrain: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "forbid", tuple(int(i) for i in self.forbid))
    checks = [
        ("mode", self.mode in MODES, f"one of {MODES}"),
        ("temperature", is_real(self.temperature) and self.temperature >= 0, "a finite number >= 0 (0: greedy)"),
        ("top_k", self.top_k is None or is_int(self.top_k, 1), "None or an integer >= 1"),
        ("top_p", self.top_p is None or (is_real(self.top_p) and 0 < self.top_p <= 1), "None or a number in (0, 1]"),
        ("beam_size", is_int(self.beam_size, 1), "an integer >= 1"),
        ("num_samples", is_int(self.num_samples, 1), "an integer >= 1"),
        ("seed", is_int(self.seed, 0), "an integer >= 0"),
        ("constrain", self.constrain is None or self.constrain in CONSTRAINTS, f"None or one of {CONSTRAINTS}"),
    ]
    for name, ok, need in checks:
      if not ok:
        raise ValueError(f"Decoding.{name} must be {need}, got {getattr(self, name)!r}")
    if self.num_samples > 1 and self.mode != "sample":
      raise ValueError(f"Decoding.num_samples={self.num_samples} needs mode 'sample' (best of n), not {self.mode!r}")

  def describe(self) -> dict:
    """The fields that matter for this mode, for logs, summaries and reports."""
    out = {"mode": self.mode, **{k: getattr(self, k) for k in MODE_FIELDS[self.mode]}}
    if self.forbid:
      out["forbid"] = list(self.forbid)
    if self.constrain:
      out["constrain"] = self.constrain
    return out


def generate(params, image_BYXC, prompt_BT, prompt_mask_input_BT, *, cfg: PaliGemmaConfig, decoding: Decoding,
             max_new_tokens: int, eos_id: int | None = 1, key=None, valid_B=None, cache_dtype=None,
             decode_view: dict | None = None, grammar: Grammar | None = None):
  """Decodes as `decoding` says. Returns (tokens [B, M], info): info as `greedy`'s, plus score [B], the summed
  log-prob of each row's tokens (eos included). key: for sampling, one key or [B] keys (None: the key of
  decoding.seed). grammar: the one decoding.constrain names, built by the caller from its tokenizer."""
  if decoding.constrain and grammar is None:
    raise ValueError(f"decoding.constrain={decoding.constrain!r} needs its grammar: "
                     f"grammar.for_task(tok, vocab_size, {decoding.constrain!r})")
  kw = dict(cfg=cfg, max_new_tokens=max_new_tokens, eos_id=eos_id, valid_B=valid_B, cache_dtype=cache_dtype,
            decode_view=decode_view, forbid=decoding.forbid or None, grammar=grammar)
  if decoding.mode == "beam":
    tokens, score, info = beam_search(params, image_BYXC, prompt_BT, prompt_mask_input_BT,
                                      beam_size=decoding.beam_size, return_info=True, **kw)
    return tokens, dict(info, score=score)
  key = jax.random.key(decoding.seed) if key is None else key
  if decoding.mode == "sample" and decoding.num_samples > 1:
    tokens, score, info = best_of_n(params, image_BYXC, prompt_BT, prompt_mask_input_BT, key=key,
                                    n=decoding.num_samples, temperature=decoding.temperature, top_k=decoding.top_k,
                                    top_p=decoding.top_p, return_info=True, **kw)
    return tokens, dict(info, score=score)
  temperature = 0.0 if decoding.mode == "greedy" else decoding.temperature
  tokens, logp, info = sample(params, image_BYXC, prompt_BT, prompt_mask_input_BT, key=key, temperature=temperature,
                              top_k=decoding.top_k, top_p=decoding.top_p, return_info=True, **kw)
  return tokens, dict(info, score=logp.sum(-1))
