"""The `pgjax` command: `predict` (images + prompt -> text) and `inspect` (a checkpoint's param tree)."""

from __future__ import annotations

import argparse
import sys

import numpy as np


def _add_model_args(p):
  p.add_argument("--checkpoint", required=True, help="an npz in the big_vision layout (or its .part0)")
  p.add_argument("--config", default=None, help="a preset name; default: inferred from the checkpoint's shapes")


def _config(args):
  from pgjax import checkpoint, config
  return config.get(args.config) if args.config else checkpoint.infer_config(args.checkpoint)


def cmd_inspect(args) -> int:
  from pgjax import checkpoint
  shapes = checkpoint.read_shapes(args.checkpoint)
  total = 0
  for key, (shape, dtype) in sorted(shapes.items()):
    n = int(np.prod(shape, dtype=np.int64))
    total += n
    print(f"{key:72s} {str(tuple(shape)):28s} {str(dtype):9s} {n:>14,d}")
  print(f"{len(shapes)} leaves, {total:,d} parameters")
  try:
    cfg = checkpoint.infer_config(args.checkpoint)
    print(f"config: {cfg}")
  except ValueError as e:
    print(f"config: not inferred ({e})")
  return 0


def cmd_predict(args) -> int:
  import jax.numpy as jnp
  from pgjax import checkpoint, data, decode, tokenizer
  cfg = _config(args)
  tok = tokenizer.Tokenizer(args.tokenizer)
  params = checkpoint.load(args.checkpoint, cfg, dtype=jnp.dtype(args.dtype))
  images = np.stack([data.load_image(p, cfg.vision.image_size) for p in args.image])
  prompts = [tok.encode_example(args.prompt, max_len=args.max_prompt_len) for _ in args.image]
  tokens, _ = decode.greedy(params, images, np.stack([p["text"] for p in prompts]),
                            np.stack([p["mask_input"] for p in prompts]), cfg=cfg,
                            max_new_tokens=args.max_new_tokens, eos_id=tok.eos_id, return_logits=False)
  for path, row in zip(args.image, np.asarray(tokens)):
    print(f"{path}\t{tok.decode(row)}")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="pgjax", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("inspect", help="list a checkpoint's leaves, shapes, dtypes and inferred config")
  p.add_argument("checkpoint")
  p.set_defaults(fn=cmd_inspect)
  p = sub.add_parser("predict", help="greedy-decode a prompt for each image")
  _add_model_args(p)
  p.add_argument("--tokenizer", required=True)
  p.add_argument("--image", nargs="+", required=True)
  p.add_argument("--prompt", required=True, help='the prefix, e.g. "caption en" or "answer en what is this?"')
  p.add_argument("--max-new-tokens", type=int, default=32)
  p.add_argument("--max-prompt-len", type=int, default=64)
  p.add_argument("--dtype", default="float32", help="params dtype (float32, float16, bfloat16)")
  p.set_defaults(fn=cmd_predict)
  args = parser.parse_args(argv)
  try:
    return args.fn(args)
  except (FileNotFoundError, ValueError, KeyError) as e:
    print(f"pgjax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
