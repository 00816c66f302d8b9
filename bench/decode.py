"""Times KV-cached greedy decoding: prefill latency, per-token latency and tokens/s, for batch 1 and 4.

  python bench/decode.py                    # bench-small: 256 image tokens, a 16-token prompt, 32 new tokens
  python bench/decode.py --vs hf            # also transformers `generate` (with its cache), alternating
  python bench/decode.py --config tiny-gemma1-mqa --reps 2 --new-tokens 4     # a smoke run
  python bench/decode.py --decode-view off  # over the stacked params (no second copy of the LLM's weights)
  python bench/decode.py --decode beam --vs hf     # beam 4 against generate(num_beams=4, length_penalty=0)
  python bench/decode.py --decode sample --vs hf   # top-p 0.9 against generate(do_sample=True, top_p=0.9)

With --decode beam or sample, that mode is timed too ("<mode>" in the record, with <mode>_to_greedy_ratio from
the same run), and with --vs hf transformers generates the same way (hf_to_pgjax_<mode>_ratio).

eos is disabled, so every run decodes exactly --new-tokens tokens. Prefill is timed on its own through
`decode.prefill`; greedy is the whole of `decode.greedy` (prefill + the decode loop, one jitted while_loop);
per-token latency = (greedy - prefill) / (new_tokens - 1). Both run over `decode.make_view` (made once,
before the timings; `decode_view_s`) unless --decode-view off. One JSON line per batch size.
"""

from __future__ import annotations

import argparse
import os
import sys

import contextlib

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from pgjax import config, decode, host, paligemma  # noqa: E402


class HFGenerate:
  """transformers `generate` with its KV cache: greedy, exactly `new_tokens` tokens (min = max, no eos),
  token_type_ids zeros over the prompt (one bidirectional block with the image), attention_mask ones."""

  def __init__(self, model, dev, image, prompt, cfg, new_tokens, autocast=None, **generate_kwargs):
    import torch
    self.torch, self.model, self.M = torch, model, new_tokens
    self.kwargs = {"do_sample": False, **generate_kwargs}  # beam or sampling settings; greedy by default
    # autocast "bfloat16"/"float16": generate under torch.autocast, as transformers users run it.
    self.autocast = (lambda: torch.autocast(dev.type, dtype=getattr(torch, autocast))) if autocast else None
    B = prompt.shape[0]
    ids = np.concatenate([np.full((B, cfg.num_image_tokens), cfg.llm.vocab_size), prompt], axis=1)
    self.inputs = {
        "input_ids": torch.as_tensor(ids, dtype=torch.long, device=dev),
        "pixel_values": torch.as_tensor(image.transpose(0, 3, 1, 2).copy(), device=dev),
        "token_type_ids": torch.zeros(ids.shape, dtype=torch.long, device=dev),
        "attention_mask": torch.ones(ids.shape, dtype=torch.long, device=dev),
    }
    self.sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

  def generate(self):
    if self.autocast:
      with self.autocast():
        return self._generate()
    return self._generate()

  def _generate(self):
    out = self.model.generate(**self.inputs, **self.kwargs, max_new_tokens=self.M, min_new_tokens=self.M,
                              eos_token_id=None, pad_token_id=0, use_cache=True)
    return out[:, self.inputs["input_ids"].shape[1]:].cpu().numpy()

  def prefill(self):
    with self.torch.no_grad(), (self.autocast() if self.autocast else contextlib.nullcontext()):
      out = self.model(**self.inputs, use_cache=True, logits_to_keep=1)
    self.sync()
    return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="bench-small")
  ap.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
  ap.add_argument("--prompt-len", type=int, default=16, help="[bos] prefix '\\n'")
  ap.add_argument("--new-tokens", type=int, default=32)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--precision", choices=["default", "highest"], default="default",
                  help="jax_default_matmul_precision; on GPUs 'default' lets float32 matmuls use TF32")
  ap.add_argument("--vs", choices=["hf"], default=None)
  ap.add_argument("--compute-dtype", choices=["float32", "bfloat16", "float16", "auto"], default="float32",
                  help="pgjax's matmul, view and cache dtype; with --vs hf, transformers generates under "
                       "torch.autocast in it (float32: plain)")
  ap.add_argument("--decode", choices=["greedy", "sample", "beam"], default="greedy",
                  help="also time this mode against greedy (and transformers' same mode with --vs hf)")
  ap.add_argument("--beam-size", type=int, default=4)
  ap.add_argument("--top-p", type=float, default=0.9, help="--decode sample: nucleus mass (temperature 1)")
  ap.add_argument("--decode-view", choices=["on", "off"], default="on",
                  help="decode over decode.make_view (a copy of the LLM's weights laid out for it), or the params")
  args = ap.parse_args(argv)
  if args.new_tokens < 2 or args.reps < 1:
    raise SystemExit("--new-tokens must be >= 2 and --reps >= 1")
  jax.config.update("jax_default_matmul_precision", None if args.precision == "default" else args.precision)
  compute_dtype, compute_why = host.resolve_compute_dtype(args.compute_dtype)
  cfg = config.get(args.config).with_compute_dtype(compute_dtype)
  autocast = None if compute_dtype == "float32" else compute_dtype
  M = args.new_tokens
  params = jax.jit(paligemma.init, static_argnums=1)(jax.random.key(0), cfg)
  view, decode_view_s = None, None
  if args.decode_view == "on":
    common.timed(lambda: jax.block_until_ready(decode.make_view(params, cfg=cfg)))  # compiles
    decode_view_s, view = common.timed(lambda: jax.block_until_ready(decode.make_view(params, cfg=cfg)))
  hf_model = hf_dev = None
  if args.vs == "hf":
    torch = common.torch_setup()
    # The tested npz -> transformers mapping lives with the parity tests; reuse it.
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import hf_reference
    hf_dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hf_model = hf_reference.to_hf(jax.device_get(params), cfg).to(hf_dev).eval()

  for B in (int(b) for b in args.batches.split(",")):
    rng = np.random.default_rng(B)
    s = cfg.vision.image_size
    image_np = rng.uniform(-1, 1, (B, s, s, 3)).astype(np.float32)
    prompt_np = rng.integers(3, cfg.llm.vocab_size, (B, args.prompt_len)).astype(np.int32)
    prompt_np[:, 0] = 2  # bos
    image, prompt, mask = jax.device_put((image_np, prompt_np, np.ones_like(prompt_np, bool)))
    cache_size = cfg.num_image_tokens + args.prompt_len + M - 1

    def prefill():
      return jax.block_until_ready(decode.prefill(params, image, prompt, mask, decode_view=view, cfg=cfg,
                                                  cache_size=cache_size))

    def greedy():
      tokens, _ = decode.greedy(params, image, prompt, mask, cfg=cfg, max_new_tokens=M, eos_id=None,
                                return_logits=False, decode_view=view)
      return np.asarray(tokens)

    def other():  # the --decode mode: eos disabled, so it too runs exactly M tokens
      if args.decode == "sample":
        tokens, _ = decode.sample(params, image, prompt, mask, cfg=cfg, key=jax.random.key(0), max_new_tokens=M,
                                  top_p=args.top_p, eos_id=None, decode_view=view)
      else:
        tokens, _ = decode.beam_search(params, image, prompt, mask, cfg=cfg, beam_size=args.beam_size,
                                       max_new_tokens=M, eos_id=None, decode_view=view)
      return np.asarray(tokens)

    hf_kwargs = {"greedy": {}, "sample": {"do_sample": True, "top_p": args.top_p, "top_k": 0, "temperature": 1.0},
                 "beam": {"num_beams": args.beam_size, "length_penalty": 0.0}}[args.decode]
    common.note(f"batch {B}: compiling")
    prefill_first_s, _ = common.timed(prefill)
    greedy_first_s, tokens = common.timed(greedy)
    other_first_s = common.timed(other)[0] if args.decode != "greedy" else None
    hf = HFGenerate(hf_model, hf_dev, image_np, prompt_np, cfg, M, autocast, **hf_kwargs) if hf_model is not None else None
    for _ in range(args.warmup):
      prefill(), greedy()
      if args.decode != "greedy":
        other()
      if hf:
        hf.prefill(), hf.generate()
    common.note(f"batch {B}: timing {args.reps} reps" + (" alternating with transformers" if hf else ""))
    t_pre, t_gen, t_other, h_pre, h_gen = [], [], [], [], []
    for _ in range(args.reps):
      t_pre.append(common.timed(prefill)[0])
      t_gen.append(common.timed(greedy)[0])
      if args.decode != "greedy":
        t_other.append(common.timed(other)[0])
      if hf:
        h_pre.append(common.timed(hf.prefill)[0])
        dt, hf_tokens = common.timed(hf.generate)
        h_gen.append(dt)
    pre, gen = common.stats(t_pre), common.stats(t_gen)
    per_token = (gen["median_s"] - pre["median_s"]) / (M - 1)
    figures = {"prefill": pre, "greedy": gen, "per_token_s": per_token, "tokens_per_s": B * M / gen["median_s"],
               "decode_tokens_per_s": B / per_token if per_token > 0 else None,
               "prefill_first_s": prefill_first_s, "greedy_first_s": greedy_first_s, "decode_view_s": decode_view_s}
    mine = gen
    if args.decode != "greedy":
      mine = common.stats(t_other)
      figures.update({args.decode: mine, f"{args.decode}_first_s": other_first_s,
                      f"{args.decode}_to_greedy_ratio": mine["median_s"] / gen["median_s"]})
    versions = ()
    if hf:
      versions = ("torch", "transformers")
      hpre, hgen = common.stats(h_pre), common.stats(h_gen)
      h_per_token = (hgen["median_s"] - hpre["median_s"]) / (M - 1)
      if hf_tokens.shape != (B, M):
        raise SystemExit(f"transformers generated {hf_tokens.shape[1]} tokens, expected {M}")
      if args.decode == "greedy":
        # Same weights: the greedy tokens should agree (HF's 1-based positions move logits by ~1e-6).
        figures["tokens_match_fraction"] = float(np.mean(hf_tokens == tokens))
      figures.update({
          "hf_prefill": hpre, "hf_generate": hgen, "hf_per_token_s": h_per_token,
          "hf_tokens_per_s": B * M / hgen["median_s"], "hf_device": str(hf_dev),
          "hf_torch_threads": hf.torch.get_num_threads(),
          "hf_generate_kwargs": hf_kwargs,
          f"hf_to_pgjax_{args.decode}_ratio": hgen["median_s"] / mine["median_s"],
          "hf_to_pgjax_prefill_ratio": hpre["median_s"] / pre["median_s"],
          "hf_to_pgjax_per_token_ratio": h_per_token / per_token if per_token > 0 else None,
      })
    common.emit("decode", {"name": args.config, "batch": B, "image_tokens": cfg.num_image_tokens,
                           "prompt_len": args.prompt_len, "new_tokens": M, "eos": None, "dtype": "float32",
                           "compute_dtype": compute_dtype, "compute_dtype_why": compute_why, "hf_autocast": autocast,
                           "cache_dtype": compute_dtype, "return_logits": False, "matmul_precision": args.precision,
                           "warmup": args.warmup, "vs": args.vs, "decode_view": args.decode_view == "on",
                           "decode": args.decode, "beam_size": args.beam_size if args.decode == "beam" else None,
                           "top_p": args.top_p if args.decode == "sample" else None},
                extra_versions=versions, **figures)


if __name__ == "__main__":
  host.tune_allocator()  # as the `pgjax` command runs: see pgjax/host.py (PGJAX_TUNE_MALLOC=0 to compare)
  main()
