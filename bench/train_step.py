"""Times the seed recipe's training step: SGD on the LLM's attention params only, everything else frozen.

  python bench/train_step.py                      # bench-small, batch 4, text 64 (prefix 16 + suffix 48)
  python bench/train_step.py --vs hf              # also the same step in transformers, alternating, with the ratio
  python bench/train_step.py --config tiny-gemma1-mqa --reps 2    # a smoke run

Prints one JSON line: the step's median and spread over --reps timed steps (after warm-up), the time to the
first step (trace + compile + run), examples/s and tokens/s, the step's matmul FLOPs counted by hand and
checked against XLA's cost analysis, achieved FLOP/s and MFU against the device's peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from pgjax import config, host, paligemma, train  # noqa: E402


def matmul_flops(cfg: config.PaliGemmaConfig, batch: int, text_len: int) -> dict:
  """Matmul FLOPs (2 per multiply-add) of one attention-only training step, by hand.

  The model reads text[:, :-1], so the LLM sees S = image tokens + text_len - 1 positions; logits are
  computed for the text positions only. Forward: the image tower, the LLM, the tied output head. Backward:
  nothing through the image tower (frozen, and nothing trainable below it); in every LLM layer the
  gradient w.r.t. each matmul's activation input (to reach the attention params of lower layers; under
  `scan` even the bottom layer computes it), both operands of the two attention-core matmuls, and weight
  gradients for the trainable q/kv/out projections only; the output head's gradient w.r.t. pre-logits
  only (the table is frozen).

  "step", the model's FLOPs (what MFU counts), is the least the step needs: the last LLM layer's queries,
  output projection and MLP at the text positions only (its keys and values everywhere), whatever the
  remat. "straightforward" is the same step with every layer at every position (the design's ~117 GFLOP
  for bench-small). "executed" is what the compiled step computes (what HFU counts): without remat the cut
  (`paligemma.forward`'s out_start); with remat every layer at every position, plus the recomputed forward:
  "full" recomputes each LLM layer's forward but its MLP output projection (the backward needs that dot's
  input, never its output, so JAX drops it; Gemma 2's post-norm does read it), "dots" only the two
  attention-core matmuls (the dots with batch dimensions, which its policy does not save).

  Also returns the count XLA's cost analysis sees, which counts the scan's body once (and the split-off last
  layer once).
  """
  v, t = cfg.vision, cfg.llm
  B, T, P = batch, text_len - 1, cfg.num_image_tokens
  S = P + T
  mm = lambda *dims: 2 * math.prod(dims)
  vis_outer = mm(B, P, v.patch_size ** 2 * 3, v.width) + mm(B, P, v.width, t.width)  # patch embedding, head
  vis_layer = (mm(B, P, v.width, 4 * v.width)  # q, k, v, out
               + 2 * mm(B, v.num_heads, P, P, v.head_dim)  # logits, weighted sum
               + mm(B, P, v.width, 2 * v.mlp_dim))
  N, K, H, D, F = t.num_heads, t.num_kv_heads, t.head_dim, t.width, t.mlp_dim

  def llm_layer(Q):  # forward and backward of one layer whose queries (and all after them) sit at Q positions
    attn_proj = mm(B, Q, D, N * H) + mm(B, S, D, 2 * K * H) + mm(B, Q, N * H, D)
    attn_core = 2 * mm(B, N, Q, S, H)
    fwd = attn_proj + attn_core + mm(B, Q, D, 3 * F)  # gating (2F) and linear (F)
    return fwd, fwd + attn_core + attn_proj

  fwd, bwd = llm_layer(S)
  text_fwd, text_bwd = llm_layer(T)  # the last layer, cut to the text positions
  # "full" skips recomputing the MLP's output projection unless a post-norm (Gemma 2) reads its output.
  full = fwd if t.post_norms else fwd - mm(B, S, F, D)
  recompute = {"none": 0, "full": full, "dots": 2 * mm(B, N, S, S, H)}[cfg.remat]
  split = paligemma.last_layer_at_text_only(cfg)  # the step runs the cut last layer outside the scan
  head = mm(B, T, D, t.vocab_size)
  outer = vis_outer + 2 * head
  vision = v.depth * vis_layer
  step = outer + vision + (t.depth - 1) * (fwd + bwd) + text_fwd + text_bwd
  straightforward = outer + vision + t.depth * (fwd + bwd)
  # transformers' step (HFStep): every layer at every position, the output head at the image positions too
  # (and its input gradient there, zeros included), and no input gradient for the bottom layer's q/k/v
  # projections (autograd skips what nothing trainable needs).
  hf = straightforward + 2 * mm(B, P, D, t.vocab_size) - mm(B, S, D, N * H) - mm(B, S, D, 2 * K * H)
  return {
      "step": step,  # the model's FLOPs, what MFU counts
      "straightforward": straightforward,
      "executed": step if split else straightforward + t.depth * recompute,  # what HFU counts
      "scan_once": outer + vis_layer + fwd + bwd + recompute + (text_fwd + text_bwd if split else 0),
      "hf": hf,
      "forward": vis_outer + vision + (t.depth - 1) * fwd + (text_fwd if split else fwd) + head,
      "llm_layer_fwd": fwd, "llm_layer_bwd": bwd, "vision_layer": vis_layer, "head": head,
  }


def make_batch(cfg, batch, text_len, prefix_len, seed=0):
  """A full batch laid out as big_vision builds it: [bos] prefix "\\n" (mask_ar 0), suffix eos (mask_ar 1,
  supervised). No padding, so every row has the same amount of work."""
  if not 2 <= prefix_len < text_len:
    raise SystemExit(f"--prefix-len {prefix_len} must be in [2, text_len={text_len})")
  rng = np.random.default_rng(seed)
  V = cfg.llm.vocab_size
  text = rng.integers(3, V, (batch, text_len)).astype(np.int32)
  text[:, 0], text[:, -1] = 2, 1  # bos, eos
  mask_ar = (np.arange(text_len) >= prefix_len).astype(np.int32)[None].repeat(batch, 0)
  s = cfg.vision.image_size
  return {"image": rng.uniform(-1, 1, (batch, s, s, 3)).astype(np.float32), "text": text, "mask_ar": mask_ar,
          "mask_loss": mask_ar.copy(), "mask_input": np.ones_like(text)}


def cost_flops(stage) -> float:
  """XLA's flop count of a Lowered (the HLO as traced) or Compiled (as optimized for the backend) step; NaN
  where the backend gives none (jax 0.11's GPU backend returns None for a Lowered)."""
  try:
    ca = stage.cost_analysis()
  except Exception:  # an unsupported analysis must not lose the timings measured before it
    return float("nan")
  ca = ca[0] if isinstance(ca, (list, tuple)) and ca else ca  # older jax returns one dict per device
  return float(ca.get("flops", float("nan"))) if isinstance(ca, dict) else float("nan")


class HFStep:
  """The same step in transformers: float32, eager attention, only q/k/v/o of the LLM require grad, the
  per-example (big_vision) loss from HF's text logits, and p -= lr * g under no_grad. HF computes logits
  for every position, image slots included, as users run it."""

  def __init__(self, params, cfg, batch, lr, autocast: str | None = None):
    torch = self.torch = common.torch_setup()
    # autocast: "bfloat16" or "float16" runs the forward under torch.autocast, as transformers users do.
    self.autocast = autocast
    # The tested npz -> transformers mapping lives with the parity tests; reuse it rather than keep a copy
    # that could drift from what the tests check.
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import hf_reference
    self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    self.model = hf_reference.to_hf(jax.device_get(params), cfg).to(self.dev).train()
    self.trainable = []
    for name, p in self.model.named_parameters():
      p.requires_grad_(".language_model.layers." in name and ".self_attn." in name)
      if p.requires_grad:
        self.trainable.append(p)
    text, mask_ar = batch["text"], batch["mask_ar"]
    self.inputs = {k: v.to(self.dev) for k, v in
                   hf_reference.inputs(batch["image"], text[:, :-1], mask_ar[:, :-1], cfg).items()}
    self.targets = torch.as_tensor(text[:, 1:], dtype=torch.long, device=self.dev)
    self.mask = torch.as_tensor(batch["mask_loss"][:, 1:], dtype=torch.float32, device=self.dev)
    self.P, self.lr = cfg.num_image_tokens, lr

  def __call__(self) -> float:
    torch = self.torch
    if self.autocast:
      with torch.autocast(self.dev.type, dtype=getattr(torch, self.autocast)):
        logits = self.model(**self.inputs).logits[:, self.P:].float()
    else:
      logits = self.model(**self.inputs).logits[:, self.P:].float()
    nll = torch.logsumexp(logits, -1) - logits.gather(-1, self.targets[..., None])[..., 0]
    loss = ((nll * self.mask).sum(-1) / self.mask.sum(-1).clamp(min=1)).mean()
    loss.backward()
    with torch.no_grad():
      for p in self.trainable:
        p.sub_(self.lr * p.grad)
        p.grad = None
    return loss.item()  # .item() waits for the device


def breakdown(trainable, frozen, batch, cfg, reps) -> dict:
  """Median seconds of the step's pieces, each jitted alone: the image tower, the whole forward + loss, and
  forward + backward (no update). Differences give the LLM forward, the backward and the update."""
  params = train.merge(trainable, frozen)
  loss = functools.partial(train.loss_fn, cfg=cfg)
  pieces = {
      "image_tower": jax.jit(lambda p, b: paligemma.embed_image(p, b["image"], cfg=cfg)[0]),
      "forward_loss": jax.jit(lambda p, b: loss(p, b)[0]),
      "forward_backward": jax.jit(lambda tr, fr, b: jax.grad(lambda t: loss(train.merge(t, fr), b)[0])(tr)),
  }
  args = {"image_tower": (params, batch), "forward_loss": (params, batch),
          "forward_backward": (trainable, frozen, batch)}
  out = {}
  for name, fn in pieces.items():
    jax.block_until_ready(fn(*args[name]))
    out[name + "_s"] = common.stats([common.timed(lambda: jax.block_until_ready(fn(*args[name])))[0]
                                     for _ in range(reps)])["median_s"]
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="bench-small")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--text-len", type=int, default=64, help="prefix + suffix tokens (bos, '\\n' and eos included)")
  ap.add_argument("--prefix-len", type=int, default=16, help="[bos] prefix '\\n', the bidirectional part")
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--frozen-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                  help="bench-small is float32; the fine-tuning recipe uses float16")
  ap.add_argument("--remat", choices=["none", "full", "dots"], default=None, help="override cfg.remat")
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--precision", choices=["default", "highest"], default="default",
                  help="jax_default_matmul_precision; on GPUs 'default' lets float32 matmuls use TF32")
  ap.add_argument("--compute-dtype", choices=["float32", "bfloat16", "float16", "auto"], default="float32",
                  help="pgjax's matmul dtype (layers.dot); with --vs hf, transformers runs under torch.autocast "
                       "in it (float32: plain)")
  ap.add_argument("--vs", choices=["hf", "f32"], default=None,
                  help="also time transformers (hf) or pgjax's own float32 step (f32), alternating with pgjax")
  ap.add_argument("--compile-cache", metavar="DIR", default=None,
                  help="JAX's persistent compilation cache, as the pgjax command keeps one: a second run with the "
                       "same DIR reports the first step of a run that loads its compiled step (default: none)")
  ap.add_argument("--breakdown", action="store_true",
                  help="also time the step's pieces (image tower, forward + loss, forward + backward)")
  args = ap.parse_args(argv)
  if args.reps < 1:
    raise SystemExit("--reps must be >= 1")
  jax.config.update("jax_default_matmul_precision", None if args.precision == "default" else args.precision)
  host.enable_compilation_cache(args.compile_cache)

  cfg = config.get(args.config)
  if args.remat:
    cfg = dataclasses.replace(cfg, remat=args.remat)
  compute_dtype, compute_why = host.resolve_compute_dtype(args.compute_dtype)
  cfg32, cfg = cfg, cfg.with_compute_dtype(compute_dtype)
  params = jax.jit(paligemma.init, static_argnums=1)(jax.random.key(0), cfg)
  batch_np = make_batch(cfg, args.batch, args.text_len, args.prefix_len)
  batch = jax.device_put(batch_np)
  trainable, frozen = train.split(params, frozen_dtype=jnp.dtype(args.frozen_dtype))
  lr = jnp.asarray(args.lr, jnp.float32)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (trainable, frozen, batch, lr))
  hf = None
  if args.vs == "hf":
    common.note("building the transformers model")
    # From the weights pgjax trains with: with --frozen-dtype float16 the frozen ones rounded to it, then
    # float32 in transformers as in pgjax's matmuls, so both compute the same function.
    hf = HFStep(jax.tree.map(lambda x: x.astype(jnp.float32), train.merge(trainable, frozen)), cfg, batch_np, args.lr,
                autocast=None if compute_dtype == "float32" else compute_dtype)
  elif args.vs == "f32":  # pgjax's own float32 step on the same weights, as its own donated copy
    f32_trainable = jax.tree.map(jnp.copy, trainable)
    f32_step = train.make_train_step(cfg32).lower(*shapes, None).compile()

    def hf():  # the alternating partner, timed as transformers would be
      nonlocal f32_trainable
      f32_trainable, _, m = f32_step(f32_trainable, frozen, batch, lr, None)
      return float(m["loss"])
  del params

  # Time to the first step = trace and lower + compile + the first run. The timed steps call the same
  # compiled executable (jit's own cache would hand back this one too).
  common.note(f"compiling ({args.config})")
  opt_state = train.init_opt_state(train.Optimizer(), trainable, cfg)  # float16: the loss scale
  opt_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), opt_state)
  lower_s, lowered = common.timed(lambda: train.make_train_step(cfg).lower(*shapes, opt_shapes))
  compile_s, step = common.timed(lowered.compile)

  def run():
    nonlocal trainable, opt_state
    trainable, opt_state, metrics = step(trainable, frozen, batch, lr, opt_state)  # both donated
    jax.block_until_ready((trainable, metrics))
    return metrics

  first_run_s, metrics = common.timed(run)
  loss_first = float(metrics["loss"])
  for _ in range(args.warmup):
    run()
  hf_first_s = hf_loss_first = None
  if hf is not None:
    hf_first_s, hf_loss_first = common.timed(hf)
    for _ in range(args.warmup):
      hf()

  partner = {"hf": "transformers", "f32": "pgjax's float32 step"}.get(args.vs)
  common.note(f"timing {args.reps} steps" + (f" alternating with {partner}" if hf else ""))
  times, hf_times = [], []
  for _ in range(args.reps):
    times.append(common.timed(run)[0])
    if hf is not None:
      hf_times.append(common.timed(hf)[0])

  flops = matmul_flops(cfg, args.batch, args.text_len)
  # Both count a scanned body once. The traced HLO has every matmul as a plain dot on any backend; the
  # compiled count depends on the backend's cost model (on GPUs it misses much of the matmul work).
  xla_flops, xla_compiled_flops = cost_flops(lowered), cost_flops(step)
  # The peak of the dtype the matmuls run in (both operands cast to the compute dtype, whatever the frozen dtype):
  # on a CPU the measured float32 rate (a bf16 peak is not measured: MFU against float32's says what bf16 gains).
  if compute_dtype != "float32" and jax.devices()[0].platform != "cpu":
    precision = {"bfloat16": "bf16", "float16": "f16"}[compute_dtype]
  else:
    precision = "f32" if jax.devices()[0].platform == "cpu" or args.precision == "highest" else "tf32"
  peak, peak_source = common.device_peak(precision)
  st = common.stats(times)
  med = st["median_s"]
  figures = {
      "step": st, "first_step_s": lower_s + compile_s + first_run_s, "lower_s": lower_s,
      "compile_s": compile_s, "first_run_s": first_run_s,
      "examples_per_s": args.batch / med, "text_tokens_per_s": args.batch * args.text_len / med,
      "seq_tokens_per_s": args.batch * (args.text_len - 1 + cfg.num_image_tokens) / med,
      "flops_hand_step": flops["step"], "flops_hand_forward": flops["forward"],
      "flops_hand_scan_once": flops["scan_once"], "flops_xla_hlo": xla_flops,
      "flops_xla_compiled": xla_compiled_flops, "xla_hlo_vs_hand_scan_once_ratio": xla_flops / flops["scan_once"],
      "xla_compiled_vs_hand_scan_once_ratio": xla_compiled_flops / flops["scan_once"],
      # XLA's count with every scanned layer counted, assuming its per-layer excess over the hand count (the
      # elementwise ops it also counts) is the same as over the whole scan-once count.
      "flops_xla_scaled": xla_flops * flops["executed"] / flops["scan_once"],
      "flops_hand_executed": flops["executed"],
      # The design's count: every layer at every position. Divided by the median, the rate a step computing all
      # of it would need to match this one; comparable with runs before the last layer was cut to text.
      "flops_hand_straightforward": flops["straightforward"],
      "straightforward_flops_per_s": flops["straightforward"] / med,
      "achieved_flops_per_s": flops["step"] / med,
      "peak_flops_per_s": peak, "peak_source": peak_source,
      "mfu": flops["step"] / med / peak if peak else None,
      "hfu": flops["executed"] / med / peak if peak else None,  # hardware FLOPs: remat's recompute counted
      "loss_first_step": loss_first,
  }
  if args.breakdown:
    common.note("timing the step's pieces")
    figures["breakdown"] = parts = breakdown(trainable, frozen, batch, cfg, args.reps)
    parts["llm_forward_loss_s"] = parts["forward_loss_s"] - parts["image_tower_s"]
    parts["backward_s"] = parts["forward_backward_s"] - parts["forward_loss_s"]
    parts["update_and_rest_s"] = med - parts["forward_backward_s"]
  versions = ()
  if args.vs == "f32":
    fst = common.stats(hf_times)
    figures.update({"f32": fst, "f32_loss_first_step": hf_loss_first,
                    "f32_to_pgjax_step_ratio": fst["median_s"] / med})
  elif hf is not None:
    hst = common.stats(hf_times)
    versions = ("torch", "transformers")
    figures.update({
        "hf": hst, "hf_first_step_s": hf_first_s, "hf_loss_first_step": hf_loss_first,
        "hf_device": str(hf.dev), "hf_torch_threads": hf.torch.get_num_threads(),
        "hf_tf32": bool(hf.torch.backends.cuda.matmul.allow_tf32) if hf.dev.type == "cuda" else None,
        "flops_hand_hf": flops["hf"], "hf_achieved_flops_per_s": flops["hf"] / hst["median_s"],
        "hf_to_pgjax_step_ratio": hst["median_s"] / med,
    })
  common.emit("train_step", {
      "name": args.config, "batch": args.batch, "text_len": args.text_len, "prefix_len": args.prefix_len,
      "suffix_len": args.text_len - args.prefix_len, "image_size": cfg.vision.image_size,
      "image_tokens": cfg.num_image_tokens, "frozen_dtype": args.frozen_dtype, "trainable_dtype": "float32",
      "compute_dtype": compute_dtype, "compute_dtype_asked": args.compute_dtype, "compute_dtype_why": compute_why,
      "hf_autocast": (None if compute_dtype == "float32" else compute_dtype) if args.vs == "hf" else None,
      "remat": cfg.remat, "lr": args.lr, "matmul_precision": args.precision, "warmup": args.warmup,
      "vs": args.vs, "hf_loss": "big_vision per-example mean" if hf else None, "compile_cache": args.compile_cache}, extra_versions=versions, **figures)


if __name__ == "__main__":
  host.tune_allocator()  # as the `pgjax` command runs: see pgjax/host.py (PGJAX_TUNE_MALLOC=0 to compare)
  main()
