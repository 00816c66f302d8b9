"""Checks against the official files, opt-in: `pytest -m weights` with them in weights/.

Needs `weights/paligemma_tokenizer.model` and one PaliGemma checkpoint (`weights/paligemma*.npz`, the
first in sorted order, or PGJAX_CHECKPOINT=path). CI has none; the default run deselects these tests.
Memory: the HF comparison holds the model twice (pgjax float32 and transformers float32, about 24 GB for
3B); with less RAM it compares in bfloat16 at a bfloat16 tolerance.
"""

import glob
import os

import numpy as np
import pytest

pytestmark = pytest.mark.weights
HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "..", "weights")
TOKENIZER = os.path.join(WEIGHTS, "paligemma_tokenizer.model")


def _checkpoint():
  path = os.environ.get("PGJAX_CHECKPOINT") or next(iter(sorted(glob.glob(os.path.join(WEIGHTS, "paligemma*.npz*")))), None)
  if path is None or not os.path.exists(TOKENIZER):
    pytest.fail("pytest -m weights needs weights/paligemma_tokenizer.model and a weights/paligemma*.npz "
                "(see weights/README.md)")
  return path.split(".part")[0] if ".part" in path else path


def test_tokenizer_facts():
  from pgjax import tokenizer
  tok = tokenizer.Tokenizer(TOKENIZER)
  assert tok.vocab_size == 257152 and (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
  assert tok.sep_ids == (108,)  # "\n" on its own
  assert [tok.loc_id(n) for n in (0, 1023)] == [256000, 257023]
  assert [tok.seg_id(n) for n in (0, 127)] == [257024, 257151]
  assert tok.decode(tok.encode("<loc0123><loc0456> cat")) == "<loc0123><loc0456> cat"


def test_checkpoint_loads_with_its_inferred_config():
  from pgjax import checkpoint, config
  path = _checkpoint()
  cfg = checkpoint.infer_config(path)
  assert cfg.vision.image_size in (224, 448, 896)
  assert any(cfg == c for c in config.PRESETS.values())


def test_logits_match_transformers_on_a_real_prompt():
  import dataclasses
  import jax
  import jax.numpy as jnp
  import torch
  import hf_reference
  from pgjax import checkpoint, images, paligemma, tokenizer
  path = _checkpoint()
  cfg = checkpoint.infer_config(path)
  cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, final_logits_softcap=0.0))
  avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  f32 = avail > 3 * 4 * 3.1e9
  dtype = jnp.float32 if f32 else jnp.bfloat16
  params = checkpoint.load(path, cfg, dtype=dtype)
  tok = tokenizer.Tokenizer(TOKENIZER)
  from PIL import Image, ImageDraw
  im = Image.new("RGB", (320, 240), (240, 240, 240))
  ImageDraw.Draw(im).ellipse((100, 60, 220, 180), fill=(200, 20, 20))
  image = images.preprocess_image(np.asarray(im), cfg.vision.image_size)[None]
  ex = tok.encode_example("caption en", "a red circle", max_len=16)
  text, mask_ar = ex["text"][None], ex["mask_ar"][None]
  logits, _ = jax.jit(paligemma.forward, static_argnames="cfg")(params, image, text, mask_ar, cfg=cfg)
  model = hf_reference.to_hf(jax.tree.map(lambda x: np.asarray(x, np.float32), params), cfg)
  del params
  if not f32:
    model = model.to(torch.bfloat16)
  with torch.no_grad():
    ref = model(**hf_reference.inputs(image, text, mask_ar, cfg)).logits[:, cfg.num_image_tokens:].float().numpy()
  n = int(ex["mask_input"].sum())
  got, ref = np.asarray(logits, np.float32)[0, :n], ref[0, :n]
  scale = np.abs(ref).max()
  assert np.abs(got - ref).max() <= (1e-4 if f32 else 5e-2) * scale
  assert (got.argmax(-1) == ref.argmax(-1)).mean() >= (1.0 if f32 else 0.9)


def test_short_finetune_lowers_the_loss():
  import jax
  import jax.numpy as jnp
  from pgjax import checkpoint, images, tokenizer, train
  path = _checkpoint()
  cfg = checkpoint.infer_config(path)
  params = checkpoint.load(path, cfg, dtype=lambda k, _: jnp.float32 if train.is_trainable(k) else jnp.float16)
  trainable, frozen = train.split(params, train.is_trainable)
  del params
  tok = tokenizer.Tokenizer(TOKENIZER)
  image = images.preprocess_image(np.full((224, 224, 3), (30, 90, 200), np.uint8), cfg.vision.image_size)
  ex = tok.encode_example("caption en", "a plain blue square", max_len=24)
  batch = {k: np.stack([v] * 2) for k, v in ex.items() if k != "num_truncated"}
  batch["image"] = np.stack([image] * 2)
  losses = []
  for _ in range(4):
    trainable, m = train.train_step(trainable, frozen, batch, 0.03, cfg=cfg)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.7 * losses[0], losses
