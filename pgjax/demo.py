"""The embedded demo: a small PaliGemma-architecture model on the `easy-vqa` dataset, no download needed.

`easy-vqa` ships its images (64x64 PNGs, one coloured circle, rectangle or triangle each) and questions in
its wheel. The demo checkpoint in `weights/demo/` was made by `pretrain` below, reproducibly:

  python -m pgjax.demo pretrain --out weights/demo

The model has the PaliGemma architecture and param tree, just small: SigLIP 64 px / patch 8, width 64,
2 layers; Gemma width 128, 3 layers, 4 heads with 4 kv heads (the `qkv_einsum` layout). Pretraining
trains every param with AdamW on easy-vqa's TRAIN images, in two stages, as a stand-in for PaliGemma's
multitask pretraining:
  1. captioning: "caption en" -> "a blue rectangle";
  2. captioning mixed with image-text matching, as in vision-language pretraining (SigLIP itself is
     trained to match images with texts): "match en <statement>" -> "yes" or "no", half of them true,
     the statement one of MATCH_TEMPLATES around "a red circle", "a red shape" or "a circle".
So the model sees colours and shapes and can tell whether a statement fits the image, but has never seen
a question. `pgjax finetune` with no data flags then fine-tunes it with the seed recipe (attention layers
only, float32, plain SGD with warmup + cosine; here with the gradient norm clipped to 1) on the train
questions -> answers and evaluates VQA accuracy on the whole test split before and after.

Why stage 2: after captioning alone, the fine-tuned model answered every "what colour / what shape"
question from the image but every yes/no question (three quarters of easy-vqa) from the question's form
alone (0.865 overall): comparing a word of the question with the image is a circuit this tiny model did
not find within the demo's budget, not even with every param training. Matching needs that circuit; the
model finds it in pretraining (the matching loss leaves chance after ~1,000 steps of a plateau), as real
PaliGemma checkpoints bring such skills from their pretraining mixture. The statements around the phrase
matter: with the bare phrase only, the fine-tune reached 0.870; with them, 0.918 (both measured with the
kernels of the time; the shipped checkpoint's fine-tune reaches 0.930 with today's, README).

Why 4 kv heads: the seed recipe trains attention only, and with a single shared kv head per layer (MQA)
this tiny model's trainable attention learned markedly slower in our trials.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import time

import numpy as np

from pgjax import checkpoint, finetune
from pgjax import config as config_lib
from pgjax import train as train_lib

COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "demo")


def demo_config(vocab_size: int) -> config_lib.PaliGemmaConfig:
  return config_lib.PaliGemmaConfig(
      vision=config_lib.SigLIPConfig(image_size=64, patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=128),
      llm=config_lib.GemmaConfig(vocab_size=vocab_size, width=128, depth=3, num_heads=4, num_kv_heads=4,
                                 head_dim=32, mlp_dim=256))


def _easy_vqa():
  try:
    import easy_vqa
  except ImportError:
    raise ImportError("the demo needs the easy-vqa package: pip install easy-vqa (or pip install -e '.[demo]')") from None
  return easy_vqa


def questions(split: str) -> list[dict]:
  """easy-vqa's questions as pgjax rows: image path, prefix "answer en <question>", suffix, answers."""
  ev = _easy_vqa()
  q, a, ids = (ev.get_train_questions if split == "train" else ev.get_test_questions)()
  paths = (ev.get_train_image_paths if split == "train" else ev.get_test_image_paths)()
  return [{"image": paths[i], "prefix": f"answer en {qq}", "suffix": aa, "answers": [aa]}
          for qq, aa, i in zip(q, a, ids)]


def captions(split: str) -> list[dict]:
  """Captions "a <colour> <shape>" for the images whose colour and shape the questions determine."""
  ev = _easy_vqa()
  q, a, ids = (ev.get_train_questions if split == "train" else ev.get_test_questions)()
  paths = (ev.get_train_image_paths if split == "train" else ev.get_test_image_paths)()
  known = collections.defaultdict(dict)
  for qq, aa, i in zip(q, a, ids):
    words = re.findall(r"[a-z]+", qq)
    cs, ss = [w for w in words if w in COLORS], [w for w in words if w in SHAPES]
    if aa in COLORS:
      known[i]["color"] = aa
      known[i].update({"shape": ss[0]} if ss else {})
    elif aa in SHAPES:
      known[i]["shape"] = aa
      known[i].update({"color": cs[0]} if cs else {})
    elif (aa == "yes") != ("not" in words or "no" in words):  # a true statement about the image
      known[i].update({"color": cs[0]} if cs else {})
      known[i].update({"shape": ss[0]} if ss else {})
  return [{"image": paths[i], "prefix": "caption en", "suffix": f"a {k['color']} {k['shape']}"}
          for i, k in sorted(known.items()) if len(k) == 2]


# Statements around the matched phrase, so that matching does not depend on where the phrase sits.
MATCH_TEMPLATES = ("{}", "there is {}", "{} is in the image", "the image has {}", "{} is present")


def matches(split: str, seed: int = 0, per_image: int = 3) -> list[dict]:
  """Captioning mixed with image-text matching: each caption row, then `per_image` rows
  "match en <statement>" -> "yes"/"no" for the same image. The statement puts a phrase naming colour
  and shape ("a red circle"), the colour ("a red shape") or the shape ("a circle") in one of
  MATCH_TEMPLATES; half are true, a false one changes one attribute."""
  import random
  rng, rows = random.Random(seed), []
  for r in captions(split):
    _, c, s = r["suffix"].split()
    rows.append(r)
    for _ in range(per_image):
      form = rng.choice(["both", "colour", "shape"])
      yes = rng.random() < 0.5
      cc, ss = c, s
      if not yes:
        if form == "colour" or (form == "both" and rng.random() < 0.5):
          cc = rng.choice([o for o in COLORS if o != c])
        else:
          ss = rng.choice([o for o in SHAPES if o != s])
      phrase = {"both": f"a {cc} {ss}", "colour": f"a {cc} shape", "shape": f"a {ss}"}[form]
      statement = rng.choice(MATCH_TEMPLATES).format(phrase)
      rows.append({"image": r["image"], "prefix": f"match en {statement}", "suffix": "yes" if yes else "no",
                   "match": {"form": form, "phrase": phrase}})
  return rows


def write_jsonl(path: str, rows: list[dict]) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return path


def make_tokenizer(path: str):
  """A small SentencePiece model over the demo's texts, with PaliGemma's special ids and loc/seg pieces."""
  from pgjax import tokenizer
  texts = [r["prefix"] for r in questions("train")] + [r["suffix"] for r in captions("train")]
  texts += ["caption en"] + list(COLORS) + list(SHAPES) + ["yes", "no"]
  return tokenizer.make_sentencepiece(texts, path, vocab_size=500)


# The demo's runs are TrainConfig presets that go through the one fine-tuning path (finetune.finetune). The
# pretraining stages follow the same schedule rule as every run (decay laid out over steps + 1), which the
# shipped checkpoint predates (its stages decayed over exactly `steps`).
FINETUNE = finetune.TrainConfig(steps=2400, batch_size=32, lr=0.7, clip=1.0, max_len=16, max_new_tokens=4,
                                eval_every=400, eval_examples=512, task="vqa", schedule="cosine", warmup=0.05)
"""`pgjax finetune` with no data flags: the seed recipe (attention only, float32 masters, SGD with warmup +
cosine), with settings measured to meet the demo's target (README); the compute dtype is "auto", as every run's."""

# The detection and segmentation demos train every param with AdamW: the demo checkpoint never saw a <loc> or
# <seg> token in pretraining (a real PaliGemma checkpoint has), so their embeddings, which are also the output
# head, are as initialised. SGD on attention and embeddings left the detection loss flat (2.8 after 300 steps,
# lr 0.3); AdamW on every param learns (2.0 after 800 steps).
_LOCATE = dict(batch_size=32, lr=1e-3, clip=1.0, schedule="cosine", warmup=0.05, trainable=(".*",),
               optimizer=train_lib.Optimizer(name="adamw", weight_decay=1e-4), eval_every=1000, eval_examples=256)
FINETUNE_DETECT = finetune.TrainConfig(steps=4000, max_len=16, max_new_tokens=8, task="detect", **_LOCATE)
"""`pgjax finetune --demo detect`: "detect <shape>" -> the shape's box; COCO mAP on the test images."""
FINETUNE_SEGMENT = finetune.TrainConfig(steps=4000, max_len=32, max_new_tokens=24, task="segment", **_LOCATE)
"""`pgjax finetune --demo segment`: "segment <shape>" -> its box and 16 <seg> codes of the demo VAE; mIoU."""
PRESETS = {"vqa": FINETUNE, "detect": FINETUNE_DETECT, "segment": FINETUNE_SEGMENT}

# The shipped checkpoint is made in float32 on every machine, so that it is the same everywhere.
_PRETRAIN = dict(batch_size=32, schedule="cosine", warmup=0.05, clip=1.0, trainable=(".*",), frozen_dtype="float32",
                 compute_dtype="float32",
                 optimizer=train_lib.Optimizer(name="adamw", weight_decay=1e-4))
PRETRAIN_CAPTION = finetune.TrainConfig(steps=2000, lr=3e-3, max_len=10, seed=0, **_PRETRAIN)
"""Pretraining stage 1: captioning, every param training with AdamW."""
PRETRAIN_MATCH = finetune.TrainConfig(steps=2000, lr=1e-3, max_len=18, seed=1, **_PRETRAIN)
"""Pretraining stage 2: captioning mixed with image-text matching (its own data order: seed 1)."""

CHECKPOINT = os.path.join(DEMO_DIR, "demo.npz")
TOKENIZER = os.path.join(DEMO_DIR, "tokenizer.model")


def pretrain(out_dir: str = DEMO_DIR, *, caption: finetune.TrainConfig = PRETRAIN_CAPTION,
             match: finetune.TrainConfig | None = PRETRAIN_MATCH, seed: int = 0, log_every: int = 100) -> dict:
  """Makes weights/demo/{tokenizer.model, demo.npz, config.json}: captioning on easy-vqa's train images
  (`caption`), then captioning mixed with image-text matching (`match`; None: skip it); see the module
  docstring. `seed` draws the initial params and the matching rows."""
  import jax
  from pgjax import evaluate, paligemma, tokenizer

  os.makedirs(out_dir, exist_ok=True)
  tok_path = make_tokenizer(os.path.join(out_dir, "tokenizer.model"))
  tok = tokenizer.Tokenizer(tok_path)
  cfg = demo_config(tok.vocab_size)
  t0 = time.time()

  def stage(name, params, rows, tc):
    log = lambda s, m: print(f"{name} step {s}: loss {m['loss']:.4f}", flush=True) if s % log_every == 0 else None
    run = finetune.finetune(tc, train=rows, params=params, model=cfg, tokenizer=tok, on_step=log, quiet=True)
    # Rounded to float16 as the checkpoint stores it, so stage 2 starts from what stage 1 would ship.
    params = jax.tree.map(lambda x: np.asarray(np.asarray(x, np.float16), np.float32), run.params)
    return params, run.history.loss[-1]

  params = jax.tree.map(np.asarray, paligemma.init(jax.random.key(seed), cfg))
  caption_rows, match_rows = captions("train"), matches("train", seed)
  params, caption_loss = stage("caption", params, caption_rows, caption)
  if match is not None:
    params, match_loss = stage("caption+match", params, match_rows, match)
  test_caption = evaluate.evaluate(params, cfg, tok, captions("test"), task="exact", batch_size=64, max_new_tokens=6)
  test_match = [r for r in matches("test", seed + 1) if r["prefix"].startswith("match")]
  test_match = evaluate.evaluate(params, cfg, tok, test_match, task="exact", batch_size=64, max_new_tokens=3)
  checkpoint.save(os.path.join(out_dir, "demo.npz"), jax.tree.map(lambda x: x.astype(np.float16), params))
  stages = [("caption en -> 'a <colour> <shape>'", caption_rows, caption, caption_loss)]
  if match is not None:
    stages.append(("caption, and match en <statement> -> yes/no (half true)", match_rows, match, match_loss))
  info = {"config": dataclasses.asdict(cfg), "pretrain": {
      "stages": [{"task": task, "examples": len(rows), "train_config": dataclasses.asdict(tc), "final_loss": loss}
                 for task, rows, tc, loss in stages],
      "images": "easy-vqa train", "seed": seed, "seconds": round(time.time() - t0, 1),
      "test_caption_exact_match": test_caption["metrics"]["exact_match"],
      "test_match_accuracy": test_match["metrics"]["exact_match"]}}
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(info, f, indent=1)
  return info


# ---------------------------------------------------------------------------------------------------
# Segmentation: the shapes' masks and a small VQ-VAE of vae-oid.npz's architecture.

VAE = os.path.join(DEMO_DIR, "vae.npz")
VAE_WIDTHS = dict(encoder=(8, 16, 32, 32), enc_hidden=16, num_codes=128, code_dim=16, decoder=32, dec_hidden=16,
                  upsample=(32, 16, 16, 8))
"""The demo VAE's widths (the released file's are 16-32-64-128 / 128 / 128 x 512 / 128 / 128-64-32-16): ~79k
params, 0.3 MB, because its masks are simple (one filled circle, rectangle or triangle, cropped to its box)."""


def shape_mask(path: str) -> np.ndarray:
  """The shape's pixels in an easy-vqa image (one shape on a plain background): uint8 0/255 [H, W].

  The background is the corners' colour, the shape's the commonest colour far from it; the images'
  antialiased edge pixels lie between the two and go to the nearer one (half way along the line between)."""
  import PIL.Image
  rgb = np.asarray(PIL.Image.open(path).convert("RGB"))
  im = rgb.astype(np.float32)
  bg = np.median(im[[0, 0, -1, -1], [0, -1, 0, -1]], axis=0)
  # The colours as one integer each (r, g, b in base 256: sorted as the (r, g, b) rows are): np.unique over
  # rows sorts them as records, 100x slower, most of the time the detection and segmentation demos took to set up.
  packed = (rgb[..., 0].astype(np.int32) << 16 | rgb[..., 1].astype(np.int32) << 8 | rgb[..., 2]).ravel()
  codes, counts = np.unique(packed, return_counts=True)
  colours = np.stack([codes >> 16, codes >> 8 & 255, codes & 255], axis=1).astype(np.float32)
  far = np.linalg.norm(colours - bg, axis=1) > 40
  if not far.any():
    raise ValueError(f"{path}: no shape: every colour is within 40 of the background {bg}")
  d = colours[far][np.argmax(counts[far])] - bg
  return np.where((im - bg) @ d / (d @ d) > 0.5, 255, 0).astype(np.uint8)


def _image_paths(split: str) -> list[str]:
  ev = _easy_vqa()
  paths = (ev.get_train_image_paths if split == "train" else ev.get_test_image_paths)()
  return [paths[i] for i in sorted(paths)]


def _shape_rows(split: str):
  """(image path, shape name, mask) of every image whose shape the questions determine (as `captions`)."""
  for r in captions(split):
    yield r["image"], r["suffix"].split()[-1], shape_mask(r["image"])


def detect_rows(split: str) -> list[dict]:
  """"detect <shape>" rows, each with its shape's tight pixel box (annotations.py builds the <loc> text)."""
  rows = []
  for image, shape, m in _shape_rows(split):
    ys, xs = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    rows.append({"image": image, "prefix": f"detect {shape}", "labels": [shape],
                 "boxes": [[int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]]})
  return rows


def segment_rows(split: str, mask_dir: str) -> list[dict]:
  """"segment <shape>" rows with their shape's mask, written as PNGs into `mask_dir` (named by image)."""
  import PIL.Image
  os.makedirs(mask_dir, exist_ok=True)
  rows = []
  for image, shape, m in _shape_rows(split):
    path = os.path.join(mask_dir, f"{split}-{os.path.splitext(os.path.basename(image))[0]}.png")
    if not os.path.isfile(path):
      PIL.Image.fromarray(m).save(path)
    rows.append({"image": image, "prefix": f"segment {shape}", "mask": [path]})
  return rows


MASK_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                        "pgjax", "demo-masks")


def rows(task: str, split: str) -> list[dict]:
  """The demo's rows for `task`: "vqa" (questions), "detect" (detect_rows) or "segment" (segment_rows, the
  masks written once under MASK_DIR)."""
  if task == "vqa":
    return questions(split)
  if task == "detect":
    return detect_rows(split)
  if task == "segment":
    return segment_rows(split, MASK_DIR)
  raise ValueError(f"unknown demo task {task!r}: vqa, detect or segment")


def train_vae(out_path: str = VAE, *, steps: int = 1000, lr: float = 1e-3, batch_size: int = 64, seed: int = 0,
              log_every: int = 100) -> dict:
  """Trains the demo VAE on easy-vqa's train masks, each cropped to its box as refcoco_mask2str crops it, and
  writes it (npz, the released file's layout) with `<out>.json`: the held-out reconstruction IoU on the test
  masks, at 64x64 and through the text at full resolution.

  The loss is a VQ-VAE's (arXiv 1711.00937): sigmoid cross-entropy of the decoded logits against the soft
  64x64 crop, the codebook term and a 0.25 commitment term, with a straight-through gradient past the
  quantizer. The codebook starts as encoder outputs of training crops, so that no code starts dead."""
  import jax
  import jax.numpy as jnp
  import optax
  from pgjax import segmentation as seg

  t0 = time.time()
  train = np.stack([seg.crop_to_64(shape_mask(p)) for p in _image_paths("train")])
  k_init, k_book, k_data = jax.random.split(jax.random.key(seed), 3)
  vae = seg.init_vae(k_init, **VAE_WIDTHS)
  z = seg.encoder_output(vae, jnp.asarray(train[:256])).reshape(-1, VAE_WIDTHS["code_dim"])
  vae[seg.CODEBOOK] = z[jax.random.choice(k_book, len(z), (VAE_WIDTHS["num_codes"],), replace=False)]
  tx = optax.adam(lr)
  opt = tx.init(vae)

  def loss_fn(vae, m_BHW):
    z = seg.encoder_output(vae, m_BHW)
    e = vae[seg.CODEBOOK][seg.nearest_code(vae, jax.lax.stop_gradient(z))]
    logits = seg.decoder_output(vae, z + jax.lax.stop_gradient(e - z))
    rec = optax.sigmoid_binary_cross_entropy(logits, m_BHW).mean()
    sg = jax.lax.stop_gradient
    return rec + jnp.mean((sg(z) - e) ** 2) + 0.25 * jnp.mean((z - sg(e)) ** 2), rec

  @jax.jit
  def step(vae, opt, m_BHW):
    (_, rec), g = jax.value_and_grad(loss_fn, has_aux=True)(vae, m_BHW)
    updates, opt = tx.update(g, opt, vae)
    return optax.apply_updates(vae, updates), opt, rec

  order = np.asarray(jax.random.randint(k_data, (steps, batch_size), 0, len(train)))
  for s in range(steps):
    vae, opt, rec = step(vae, opt, jnp.asarray(train[order[s]]))
    if log_every and (s % log_every == 0 or s == steps - 1):
      print(f"vae step {s}: reconstruction loss {float(rec):.4f}", flush=True)
  seg.save_vae(out_path, vae)
  info = {"widths": VAE_WIDTHS, "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
          "train_masks": len(train), "seconds": round(time.time() - t0, 1),
          **vae_iou(seg.load_vae(out_path), _image_paths("test"))}
  with open(os.path.splitext(out_path)[0] + ".json", "w") as f:
    json.dump(info, f, indent=1)
  return info


def vae_iou(vae, paths: list[str]) -> dict:
  """Mean IoU of the codec's reconstruction of each image's shape mask: at 64x64 (decode(encode(crop)) > 0
  against crop > 0.5), and whole (mask_to_text, then text_to_masks at the image's size, against the mask)."""
  from pgjax import segmentation as seg
  masks = [shape_mask(p) for p in paths]
  crops = np.stack([seg.crop_to_64(m) for m in masks])
  recon = np.asarray(seg.decode(vae, seg.encode(vae, crops))) > 0
  iou64 = [seg.mask_iou(r, c > 0.5) for r, c in zip(recon, crops)]
  whole = []
  for m in masks:
    (obj,) = seg.text_to_masks(vae, seg.mask_to_text(vae, m), *m.shape)
    whole.append(seg.mask_iou(obj["mask"], m > 0) if obj["mask"] is not None else 0.0)
  return {"held_out_masks": len(masks), "held_out_iou_64": float(np.mean(iou64)),
          "held_out_iou_text": float(np.mean(whole))}


def load_config(demo_dir: str = DEMO_DIR) -> config_lib.PaliGemmaConfig:
  with open(os.path.join(demo_dir, "config.json")) as f:
    c = json.load(f)["config"]
  return config_lib.PaliGemmaConfig(vision=config_lib.SigLIPConfig(**c["vision"]),
                                    llm=config_lib.GemmaConfig(**c["llm"]), remat=c["remat"])


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m pgjax.demo")
  sub = p.add_subparsers(dest="cmd", required=True)
  pre = sub.add_parser("pretrain", help="make the demo checkpoint and tokenizer")
  pre.add_argument("--out", default=DEMO_DIR)
  pre.add_argument("--steps", type=int, default=2000, help="captioning steps")
  pre.add_argument("--match-steps", type=int, default=2000, help="captioning + matching steps (0: none)")
  vae = sub.add_parser("vae", help="train the demo's segmentation VAE (weights/demo/vae.npz)")
  vae.add_argument("--out", default=VAE)
  vae.add_argument("--steps", type=int, default=1000)
  args = p.parse_args(argv)
  if args.cmd == "vae":
    print(json.dumps(train_vae(args.out, steps=args.steps), indent=1))
    return
  match = dataclasses.replace(PRETRAIN_MATCH, steps=args.match_steps) if args.match_steps else None
  print(json.dumps(pretrain(args.out, caption=dataclasses.replace(PRETRAIN_CAPTION, steps=args.steps), match=match),
                   indent=1))


if __name__ == "__main__":
  from pgjax import host
  host.tune_allocator()
  main()
