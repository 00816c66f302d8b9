"""LoRA adapters: the adapted matmul against a merged weight built by hand in numpy, gradients, QLoRA."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgjax import config, lora, paligemma, quant, train, tree
from tests.helpers import assert_close_f32, prefix_lm_batch, random_params

def _random_adapters(params, rank, seed, targets=lora.TARGETS):
  """lora.init, with b random too (a fresh b is zero, which would hide a wrong b layout)."""
  ad = lora.init(jax.random.key(seed), params, rank=rank, targets=targets)
  flat = tree.flatten(ad)
  keys = jax.random.split(jax.random.key(seed + 1), len(flat))
  return tree.unflatten({p: (0.05 * jax.random.normal(k, x.shape) if p.endswith("/b") else x)
                         for (p, x), k in zip(flat.items(), keys)})


def _hand_delta(path, w, a, b):
  """a·b in w's layout, by reshaping to the (input, output) matrix of each layer and fused member in numpy."""
  w, a, b = (np.asarray(x, np.float64) for x in (w, a, b))
  r = a.shape[-1]
  if path.endswith(("q_einsum/w",)):          # L N D H: in D, out N H
    L, N, D, H = w.shape
    d = np.einsum("ldr,lnhr->lndh", a, b.reshape(L, N, H, r))
  elif path.endswith(("kv_einsum/w", "qkv_einsum/w")):  # L J K D H: per (l, j), in D, out K H
    L, J, K, D, H = w.shape
    m = a.reshape(L * J, D, r) @ b.reshape(L * J, K * H, r).transpose(0, 2, 1)  # [LJ, D, K H]
    d = m.reshape(L, J, D, K, H).transpose(0, 1, 3, 2, 4)
  elif path.endswith("attn_vec_einsum/w"):    # L N H D: in N H, out D
    L, N, H, D = w.shape
    d = (a.reshape(L, N * H, r) @ b.transpose(0, 2, 1)).reshape(L, N, H, D)
  elif path.endswith("mlp/linear"):           # L F D: in F, out D
    d = a @ b.transpose(0, 2, 1)
  elif path.endswith("mlp/gating_einsum"):    # L J D F: per (l, j), in D, out F
    d = a @ b.transpose(0, 1, 3, 2)
  else:
    raise AssertionError(path)
  return d


# Jitted, as every use of the model is: run op by op, the adapted forward and its gradient took 3-4x as long
# (each small op compiled on its own), most of this module's time.
@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg, params, batch):
  return paligemma.forward(params, batch["image"], batch["text"], batch["mask_ar"], cfg=cfg)[0]


# MHA (a fused qkv_einsum) and GQA with Gemma 2's norms and soft caps; MQA's q_einsum + kv_einsum run in the
# QLoRA, PEFT and sharded-step tests below and in tests/test_sharding.py.
@pytest.fixture(scope="module", params=["tiny-gemma1-mha", "tiny-gemma2-gqa"])
def model(request):
  cfg = config.get(request.param)
  return cfg, random_params(cfg, seed=3), prefix_lm_batch(cfg, [(5, 4), (3, 6)], 12, seed=1)


def test_a_fresh_adapter_changes_nothing_and_its_a_gets_no_gradient(model):
  cfg, params, batch = model
  ad = lora.init(jax.random.key(0), params, rank=4)
  assert all(np.all(np.asarray(x) == 0) for p, x in tree.flatten(ad).items() if p.endswith("/b"))
  np.testing.assert_array_equal(np.asarray(_logits(cfg, lora.apply(params, ad, alpha=8.0), batch)),
                                np.asarray(_logits(cfg, params, batch)))
  grads = jax.jit(jax.grad(lambda ad: train.loss_fn(lora.apply(params, ad, alpha=8.0), batch, cfg=cfg)[0]))(ad)
  flat = tree.flatten(grads)
  # d loss / d a is (x^T g) b^T: zero while b is zero; b's gradient is not (PEFT's starting point)
  assert all(np.all(np.asarray(g) == 0) for p, g in flat.items() if p.endswith("/a"))
  assert all(np.abs(np.asarray(g)).max() > 0 for p, g in flat.items() if p.endswith("/b"))


def test_merge_adds_the_hand_built_low_rank_update(model):
  cfg, params, _ = model
  targets = lora.TARGETS + (r"llm/layers/mlp/.*",)
  ad = _random_adapters(params, 3, seed=5, targets=targets)
  merged = tree.flatten(lora.merge(params, ad, alpha=6.0))
  flat, pairs = tree.flatten(params), lora.adapted_paths(ad)
  assert len(pairs) == (4 if "qkv_einsum" in params["llm"]["layers"]["attn"] else 5)  # + gating, linear
  for path, leaf in flat.items():
    if path in pairs:
      want = np.asarray(leaf, np.float64) + 2.0 * _hand_delta(path, leaf, pairs[path]["a"], pairs[path]["b"])
      np.testing.assert_allclose(np.asarray(merged[path]), want, rtol=0, atol=1e-6 * np.abs(want).max(),
                                 err_msg=path)
    else:
      np.testing.assert_array_equal(np.asarray(merged[path]), np.asarray(leaf), err_msg=path)


def test_adapted_forward_and_gradients_equal_the_merged_weights(model):
  cfg, params, batch = model
  targets = lora.TARGETS + (r"llm/layers/mlp/.*", r"img/.*/MultiHeadDotProductAttention_0/.*/kernel")
  ad = _random_adapters(params, 2, seed=9, targets=targets)
  on_the_fly = _logits(cfg, lora.apply(params, ad, alpha=4.0), batch)
  merged = _logits(cfg, lora.merge(params, ad, alpha=4.0), batch)
  # Same math, summed in another order (x·W + (x·a)·b vs x·(W + a·b)): a few roundings of the logits' scale;
  # 64 ulps of max|logit| covers a 2-layer, width-64 model's reassociation on any CPU's vector width.
  assert_close_f32(on_the_fly, merged, ulps_of_max=64, what="logits")

  def loss_apply(ad):
    return train.loss_fn(lora.apply(params, ad, alpha=4.0), batch, cfg=cfg)[0]

  def loss_merge(ad):
    return train.loss_fn(lora.merge(params, ad, alpha=4.0), batch, cfg=cfg)[0]

  g1, g2 = jax.jit(jax.grad(loss_apply))(ad), jax.jit(jax.grad(loss_merge))(ad)
  # A gradient is a sum over every position of products as large as the largest gradient entry of its leaf
  assert_close_f32(g1, g2, ulps_of_max=256, what="adapter grads")


def test_qlora_on_a_quantized_base_equals_the_merge_over_its_dequantized_weights(model):
  cfg, params, batch = model
  ad = _random_adapters(params, 2, seed=4)
  q = quant.quantize(params, bits=8)
  deq = jax.tree.map(lambda x: quant.dequantize(x) if quant.is_quantized(x) else x, q,
                     is_leaf=quant.is_quantized)
  assert_close_f32(_logits(cfg, lora.apply(q, ad, alpha=2.0), batch),
                   _logits(cfg, lora.merge(deq, ad, alpha=2.0), batch), ulps_of_max=64, what="qlora logits")


def test_bad_targets_and_mismatched_adapters_are_named():
  cfg = config.get("tiny-gemma1-mqa")
  params = random_params(cfg)
  with pytest.raises(ValueError, match="match none of the"):
    lora.init(jax.random.key(0), params, rank=2, targets=(r"llm/nothing",))
  with pytest.raises(ValueError, match="llm/final_norm/scale .*not a matmul weight"):
    lora.init(jax.random.key(0), params, rank=2, targets=(r"llm/final_norm/scale",))
  ad = lora.init(jax.random.key(0), params, rank=2)
  bad = tree.flatten(ad)
  bad["llm/layers/attn/q_einsum/w/b"] = bad["llm/layers/attn/q_einsum/w/b"][..., :1]
  with pytest.raises(ValueError, match=r"llm/layers/attn/q_einsum/w .*expected a"):
    lora.apply(params, tree.unflatten(bad), alpha=1.0)
  bad["llm/layers/attn/q_einsum/w/a"] = bad["llm/layers/attn/q_einsum/w/a"][..., :1]
  with pytest.raises(ValueError, match=r"adapters of mixed ranks \[1, 2\]"):
    lora.merge(params, tree.unflatten(bad), alpha=1.0)


# ------------------------------------------------------------------ the fine-tuning job with adapters


def _demo_rows():
  from pgjax import demo
  return demo.rows("vqa", "train")[:64], demo.rows("vqa", "test")[:16]


@pytest.mark.parametrize("quantize", [0, 8])
def test_finetune_trains_only_the_adapters_saves_them_alone_and_resumes(tmp_path, quantize):
  from pgjax import checkpoint, demo, finetune
  train_rows, val_rows = _demo_rows()
  tc = finetune.TrainConfig(steps=3, batch_size=8, lr=0.5, max_len=16, max_new_tokens=4, lora_rank=4,
                            quantize=quantize, compute_dtype="float32", task="vqa")
  kw = dict(train=train_rows, val=val_rows, checkpoint=demo.CHECKPOINT, tokenizer=demo.TOKENIZER,
            model=demo.load_config(), quiet=True, out=tmp_path / "run")
  run = finetune.finetune(tc, **kw)
  assert run.summary["trained"].startswith("LoRA rank 4, alpha 8, on llm/layers/attn/")
  assert run.summary["trained"].endswith(f"frozen in {'int8' if quantize else 'float16'}")
  ckpt = tmp_path / "run" / "checkpoints" / "step_000003" / "trainable.npz"
  with np.load(ckpt, allow_pickle=False) as z:
    keys = sorted(z.files)
    assert keys and all(k.endswith(("/a", "/b")) for k in keys), keys
    assert run.summary["trainable_params"] == sum(z[k].size for k in keys)
  # Everything else is the base: the merged result minus the adapters' update is the loaded base (dequantized)
  base = tree.flatten(checkpoint.load(demo.CHECKPOINT, demo.load_config(), dtype=lambda *_: np.float16))
  if quantize:
    base = tree.flatten(quant.dequantize_tree(quant.quantize(tree.unflatten(base), bits=8)))
  final = tree.flatten(run.params)
  with np.load(ckpt, allow_pickle=False) as z:
    adapters = tree.unflatten({k: np.asarray(z[k]) for k in z.files})
  pairs = lora.adapted_paths(adapters)
  assert any(np.abs(ab["b"]).max() > 0 for ab in pairs.values())  # the adapters moved
  for path, leaf in final.items():
    want = np.asarray(base[path], np.float32)
    if path in pairs:
      want = want + np.asarray(lora.delta(path, leaf.shape, pairs[path]["a"], pairs[path]["b"], 8.0 / 4))
    np.testing.assert_allclose(np.asarray(leaf, np.float32), want, rtol=0, atol=2e-3 * max(1.0, np.abs(want).max()),
                               err_msg=path)
  # A longer run resumes from step 3 with the adapters and their optimizer state
  longer = finetune.finetune(dataclasses.replace(tc, steps=5), **kw)
  assert longer.history.steps == [4, 5]
  with pytest.raises(Exception, match="lora_rank"):
    finetune.finetune(dataclasses.replace(tc, steps=7, lora_rank=8), **kw)


@pytest.mark.parametrize("field, value", [("lora_rank", -1), ("lora_alpha", 0.0), ("quantize", 2),
                                          ("lora_targets", ())])
def test_bad_lora_settings_are_refused_naming_the_field(field, value):
  from pgjax import finetune
  with pytest.raises(finetune.SettingError) as e:
    finetune.TrainConfig(**{field: value})
  assert e.value.field == field


# ------------------------------------------------------------------ PEFT interop, checked with peft itself


@pytest.mark.parametrize("name", ["tiny-gemma1-mqa", "tiny-gemma1-mha"])
def test_peft_loads_our_adapters_onto_the_exported_model_and_we_read_theirs(name, tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  from pgjax import hf
  from tests import hf_reference
  cfg = config.get(name)
  params = random_params(cfg, seed=2)
  targets = lora.TARGETS + (r"llm/layers/mlp/.*", r"img/.*/MultiHeadDotProductAttention_0/.*/kernel")
  ad = _random_adapters(params, 3, seed=8, targets=targets)
  hf.export_hf(tmp_path / "model", params, cfg)
  hf.export_peft(ad, cfg, tmp_path / "adapter", alpha=5.0)
  base = transformers.PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "model",
                                                                       attn_implementation="eager")
  model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
  batch = prefix_lm_batch(cfg, [(4, 6), (6, 2)], 12)
  inputs = hf_reference.inputs(batch["image"], batch["text"], batch["mask_ar"], cfg)
  with torch.no_grad():
    theirs = model(**inputs).logits.numpy()[:, cfg.num_image_tokens:]  # HF gives the image positions too
  ours = np.asarray(_logits(cfg, lora.merge(params, ad, alpha=5.0), batch))
  # Two implementations of the same float32 math (torch's matmuls, x·W + (x·A)·B there, merged weights here)
  assert_close_f32(theirs, ours, ulps_of_max=64, what="peft logits")
  back, alpha = hf.import_peft(tmp_path / "adapter", cfg)
  assert alpha == 5.0
  for path, leaf in tree.flatten(ad).items():
    np.testing.assert_array_equal(np.asarray(tree.flatten(back)[path]), np.asarray(leaf), err_msg=path)

  # An adapter trained in transformers: PEFT's own q_proj/v_proj LoRA with a random B, saved by PEFT
  fresh = transformers.PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "model",
                                                                        attn_implementation="eager")
  lc = peft.LoraConfig(r=2, lora_alpha=7, target_modules=r".*language_model.*\.(q_proj|v_proj)", lora_dropout=0.0)
  pm = peft.get_peft_model(fresh, lc)
  torch.manual_seed(0)
  for n, p in pm.named_parameters():
    if "lora_B" in n:
      torch.nn.init.normal_(p, std=0.05)
  pm.save_pretrained(tmp_path / "theirs")
  with torch.no_grad():
    theirs = pm.eval()(**inputs).logits.numpy()[:, cfg.num_image_tokens:]
  imported, alpha = hf.import_peft(tmp_path / "theirs", cfg)
  assert alpha == 7.0
  ours = np.asarray(_logits(cfg, lora.merge(params, imported, alpha=alpha), batch))
  assert_close_f32(theirs, ours, ulps_of_max=64, what="imported peft logits")


def test_import_peft_names_what_it_cannot_place(tmp_path):
  from pgjax import hf
  from pgjax.checkpoint import CheckpointError
  cfg = config.get("tiny-gemma1-mqa")
  ad = _random_adapters(random_params(cfg), 2, seed=1)
  hf.export_peft(ad, cfg, tmp_path, alpha=2.0)
  import safetensors.numpy
  sd = safetensors.numpy.load_file(tmp_path / "adapter_model.safetensors")
  sd["base_model.model.model.language_model.layers.0.mlp.extra.lora_A.weight"] = np.zeros((2, 4), np.float32)
  safetensors.numpy.save_file(sd, tmp_path / "adapter_model.safetensors")
  with pytest.raises(CheckpointError, match=r"does not place: \['base_model.model.model.language_model.layers.0.mlp.extra"):
    hf.import_peft(tmp_path, cfg)
