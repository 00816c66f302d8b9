"""hf.py: safetensors I/O checked against the safetensors library, and the transformers layout checked against
the independent mapping in hf_reference and against transformers itself (strict loading, logits)."""

import dataclasses
import functools
import json
import os
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from helpers import assert_close_f32, prefix_lm_batch, random_params
from pgjax import config, hf, tree
from pgjax.checkpoint import CheckpointError

CONFIGS = ["tiny-gemma1-mqa", "tiny-gemma1-mha", "tiny-gemma2-gqa"]
LEGACY = {"model.vision_tower.": "vision_tower.vision_model.", "model.multi_modal_projector.": "multi_modal_projector.",
          "model.language_model.": "language_model.model.", "lm_head.": "language_model.lm_head."}


@functools.cache
def params(name, dtype=jnp.float32):
  """(cfg, random params as numpy arrays of `dtype`), made once per config."""
  if dtype != jnp.float32:
    cfg, p = params(name)
    return cfg, jax.tree.map(lambda x: x.astype(dtype), p)
  cfg = config.get(name)
  return cfg, jax.tree.map(np.asarray, random_params(cfg, seed=len(name)))


def assert_bit_equal(a, b):
  a, b = tree.flatten(a), tree.flatten(b)
  assert a.keys() == b.keys()
  for k in a:
    x, y = np.asarray(a[k]), np.asarray(b[k])
    assert (x.dtype, x.shape) == (y.dtype, y.shape), k
    assert x.tobytes() == y.tobytes(), k


def legacy(name):
  return next(old + name[len(new):] for new, old in LEGACY.items() if name.startswith(new))


# -------------------------------------------------------------------------------------------- layout

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_is_bit_exact(name, dtype, tmp_path):
  cfg, p = params(name, dtype)
  sd = hf.to_hf(p, cfg)
  assert {k: v.shape for k, v in sd.items()} == hf.hf_shapes(cfg)
  assert_bit_equal(hf.from_hf(sd, cfg), p)
  file = hf.export_hf(tmp_path / "m.safetensors", p, cfg, config_json=False)
  assert_bit_equal(hf.import_hf(file, cfg), p)


@pytest.mark.parametrize("name", CONFIGS)
def test_export_agrees_with_reference_mapping_and_transformers(name, tmp_path):
  torch = pytest.importorskip("torch")
  hf_reference = pytest.importorskip("hf_reference")
  import safetensors.torch
  import transformers
  cfg, p = params(name)
  sd, ref = hf.to_hf(p, cfg), hf_reference.state_dict(p, cfg)
  assert sd.keys() == ref.keys()
  for k in sd:
    np.testing.assert_array_equal(sd[k], ref[k].numpy(), err_msg=k)
  # The file as the safetensors library reads it, strictly loaded into a model built from the oracle's config.
  file = hf.export_hf(tmp_path, p, cfg)
  model = transformers.PaliGemmaForConditionalGeneration(hf_reference.hf_config(cfg)).eval()
  model.load_state_dict(safetensors.torch.load_file(file), strict=True)
  oracle = hf_reference.to_hf(p, cfg)
  batch = prefix_lm_batch(cfg, [(4, 6), (6, 2)], 12)
  inputs = hf_reference.inputs(batch["image"], batch["text"], batch["mask_ar"], cfg)
  with torch.no_grad():
    expected = oracle(**inputs).logits
    np.testing.assert_array_equal(model(**inputs).logits.numpy(), expected.numpy())
  # The directory with our config.json, padded as on the hub: from_pretrained gives the same model.
  V = cfg.llm.vocab_size
  hf.export_hf(tmp_path / "padded", p, cfg, vocab_size=V + 64)
  loaded = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
      tmp_path / "padded", attn_implementation="eager").eval()
  ref_cfg = hf_reference.hf_config(cfg)
  for ours, theirs in ((loaded.config.text_config, ref_cfg.text_config), (loaded.config.vision_config,
                                                                            ref_cfg.vision_config)):
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "model_type",
                  "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "attn_logit_softcapping",
                  "final_logit_softcapping", "hidden_act", "hidden_activation", "layer_norm_eps", "rms_norm_eps",
                  "rope_parameters", "image_size", "patch_size", "vision_use_head", "use_bidirectional_attention"):
      assert getattr(ours, field, None) == getattr(theirs, field, None), field
  assert (loaded.config.vocab_size, loaded.config.image_token_index) == (V + 64, V)
  with torch.no_grad():
    logits = loaded(**inputs).logits.numpy()
  # 16 eps32 * max|logits|: the same model whose output matmul has 64 more (zero) rows, which may change
  # torch's blocking of the D-term sums; a wrong mapping of a weight would move logits by O(max|logits|).
  assert_close_f32(logits[..., :V], expected.numpy(), ulps_of_max=16)
  np.testing.assert_array_equal(logits[..., V:], 0.0)  # zero rows: our padding never wins an argmax by chance


def test_vocab_padding_is_zeros_and_dropped_on_import():
  cfg, p = params("tiny-gemma2-gqa", jnp.bfloat16)
  V, D = cfg.llm.vocab_size, cfg.llm.width
  sd = hf.to_hf(p, cfg, vocab_size=V + 64)
  table = sd["model.language_model.embed_tokens.weight"]
  assert table.shape == (V + 64, D) and sd["lm_head.weight"] is table
  assert table[:V].tobytes() == p["llm"]["embedder"]["input_embedding"].tobytes()
  assert not np.any(table[V:].astype(np.float32))
  assert {k: v.shape for k, v in sd.items()} == hf.hf_shapes(cfg, vocab_size=V + 64)
  # The hub's extra rows are random, not zero: they are dropped whatever they hold.
  sd = dict(sd, **{"model.language_model.embed_tokens.weight": np.concatenate(
      [table[:V], np.ones((64, D), table.dtype)])})
  sd["lm_head.weight"] = sd["model.language_model.embed_tokens.weight"]
  assert_bit_equal(hf.from_hf(sd, cfg), p)
  with pytest.raises(ValueError, match="smaller"):
    hf.to_hf(p, cfg, vocab_size=V - 1)


@pytest.mark.parametrize("name", CONFIGS)
def test_legacy_and_torch_state_dicts_import(name):
  cfg, p = params(name)
  sd = hf.to_hf(p, cfg)
  # transformers <= 4.x names, with the tied lm_head left out as hub files do.
  old = {legacy(k): v for k, v in sd.items() if k != "lm_head.weight"}
  assert "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight" in old
  assert_bit_equal(hf.from_hf(old, cfg), p)
  nested = {k.replace("model.vision_tower.", "model.vision_tower.vision_model."): v for k, v in sd.items()}
  assert_bit_equal(hf.from_hf(nested, cfg), p)
  torch = pytest.importorskip("torch")
  hf_reference = pytest.importorskip("hf_reference")
  model_sd = hf_reference.to_hf(p, cfg).state_dict()
  assert_bit_equal(hf.from_hf(model_sd, cfg), p)
  bf16 = {k: v.to(torch.bfloat16) for k, v in model_sd.items()}
  assert_bit_equal(hf.from_hf(bf16, cfg), jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), p))


def test_bad_state_dicts_list_every_problem():
  cfg, p = params("tiny-gemma1-mqa")
  sd = hf.to_hf(p, cfg)
  bad = dict(sd)
  del bad["model.language_model.layers.1.mlp.up_proj.weight"]
  del bad["model.vision_tower.post_layernorm.bias"]
  bad["model.vision_tower.head.probe"] = np.zeros(3)
  bad["model.language_model.norm.weight"] = np.zeros(7)
  with pytest.raises(CheckpointError) as e:
    hf.from_hf(bad, cfg, source="f.safetensors")
  msg = str(e.value)
  assert "f.safetensors" in msg and "2 missing, 1 unexpected, 1 mis-shaped" in msg
  for key in ("layers.1.mlp.up_proj.weight", "post_layernorm.bias", "head.probe", "norm.weight"):
    assert key in msg
  with pytest.raises(CheckpointError, match="two keys map to"):
    hf.from_hf(dict(sd, **{legacy("model.language_model.norm.weight"): sd["model.language_model.norm.weight"]}),
               cfg)
  with pytest.raises(CheckpointError, match="lm_head.weight differs"):
    hf.from_hf(dict(sd, **{"lm_head.weight": sd["lm_head.weight"] + 1}), cfg)
  # The norm-name trap: a Gemma 2 file read with a Gemma 1 config has norms Gemma 1 lacks.
  cfg2, p2 = params("tiny-gemma2-gqa")
  as_gemma1 = dataclasses.replace(cfg2, llm=dataclasses.replace(cfg2.llm, post_norms=False))
  with pytest.raises(CheckpointError, match="0 missing, 4 unexpected") as e:
    hf.from_hf(hf.to_hf(p2, cfg2), as_gemma1)
  assert "layers.1.pre_feedforward_layernorm.weight" in str(e.value)


def test_sharded_directory_imports(tmp_path):
  cfg, p = params("tiny-gemma1-mha", jnp.bfloat16)
  sd = hf.to_hf(p, cfg)
  names = sorted(sd)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for file, keys in shards.items():
    hf.save_safetensors(tmp_path / file, {k: sd[k] for k in keys}, metadata={"format": "pt"})
  weight_map = {k: file for file, keys in shards.items() for k in keys}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  assert_bit_equal(hf.import_hf(tmp_path, cfg), p)
  assert jax.tree.leaves(hf.import_hf(tmp_path, cfg, dtype=np.float32))[0].dtype == np.float32


def test_config_dict_refuses_what_gemma1_cannot_express():
  cfg = config.get("tiny-gemma1-mqa")
  bad = config.PaliGemmaConfig(vision=cfg.vision, llm=config.GemmaConfig(
      **{**{f: getattr(cfg.llm, f) for f in ("vocab_size", "width", "depth", "num_heads", "num_kv_heads",
                                              "head_dim", "mlp_dim")}, "attn_logits_softcap": 50.0}))
  with pytest.raises(ValueError, match="soft caps"):
    hf.hf_config_dict(bad)
  d = hf.hf_config_dict(config.get("tiny-gemma2-gqa"), vocab_size=448, dtype="bfloat16")
  assert d["text_config"]["model_type"] == "gemma2" and d["text_config"]["layer_types"] == ["full_attention"] * 2
  assert (d["vocab_size"], d["image_token_index"], d["dtype"]) == (448, 384, "bfloat16")
  # transformers' Gemma2Config types query_pre_attn_scalar as int: a fractional one is refused at export,
  # not by from_pretrained later.
  g2 = config.get("tiny-gemma2-gqa")
  frac = dataclasses.replace(g2, llm=dataclasses.replace(g2.llm, query_pre_attn_scalar=12.5))
  with pytest.raises(ValueError, match="integer query_pre_attn_scalar"):
    hf.hf_config_dict(frac)
  whole = dataclasses.replace(g2, llm=dataclasses.replace(g2.llm, query_pre_attn_scalar=12.0))
  assert hf.hf_config_dict(whole)["text_config"]["query_pre_attn_scalar"] == 12


# -------------------------------------------------------------------------------------------- safetensors

def sample():
  rng = np.random.default_rng(0)
  return {"a": {"f32": rng.normal(size=(3, 5)).astype(np.float32),
                "bf16": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16)},
          "f16": rng.normal(size=(2, 3, 4)).astype(np.float16),
          "i32": np.arange(6, dtype=np.int32).reshape(2, 3), "b": np.array([True, False, True]),
          "scalar": np.float32(2.5), "empty": np.zeros((0, 4), np.float32),
          "big_endian": np.arange(4, dtype=">f4"), "strided": np.arange(12.0).reshape(3, 4).T,
          "jax": jnp.arange(5, dtype=jnp.bfloat16)}


@pytest.mark.parametrize("mmap", [True, False])
def test_safetensors_round_trip_is_bit_exact(tmp_path, mmap):
  tensors = sample()
  hf.save_safetensors(tmp_path / "x.safetensors", tensors, metadata={"step": "3"})
  got = hf.load_safetensors(tmp_path / "x.safetensors", mmap=mmap)
  want = {k: np.asarray(v) for k, v in tree.flatten(tensors).items()}
  want["big_endian"] = want["big_endian"].astype("<f4")
  assert_bit_equal(got, want)
  assert hf.read_safetensors_header(tmp_path / "x.safetensors")[1] == {"step": "3"}
  raw = (tmp_path / "x.safetensors").read_bytes()
  start = 8 + struct.unpack("<Q", raw[:8])[0]
  assert start % 8 == 0
  for shape, dtype, b, e in hf.read_safetensors_header(tmp_path / "x.safetensors")[0].values():
    assert b % dtype.itemsize == 0  # aligned, so memory-mapped views are aligned too


def test_safetensors_library_reads_ours_and_we_read_its(tmp_path):
  torch = pytest.importorskip("torch")
  import safetensors.torch
  rng = np.random.default_rng(1)
  tree = {"w": rng.normal(size=(4, 3)).astype(np.float32), "h": rng.normal(size=(5,)).astype(np.float16),
          "n": np.arange(3, dtype=np.int64), "bf": rng.normal(size=(2, 2)).astype(ml_dtypes.bfloat16)}
  hf.save_safetensors(tmp_path / "ours.safetensors", tree, metadata={"format": "pt"})
  theirs = safetensors.numpy.load_file(tmp_path / "ours.safetensors")
  for k in ("w", "h", "n"):
    assert theirs[k].dtype == tree[k].dtype and np.array_equal(theirs[k], tree[k])
  try:  # safetensors >= 0.8 reads bf16 into numpy (via ml_dtypes); older numpy backends refuse it
    np_bf = safetensors.numpy.load_file(tmp_path / "ours.safetensors")["bf"]
    assert np_bf.tobytes() == tree["bf"].tobytes()
  except (KeyError, TypeError):
    pass
  bf = safetensors.torch.load_file(tmp_path / "ours.safetensors")["bf"]
  assert bf.dtype == torch.bfloat16 and bf.view(torch.int16).numpy().tobytes() == tree["bf"].tobytes()

  safetensors.numpy.save_file({k: tree[k] for k in ("w", "h", "n")}, tmp_path / "np.safetensors",
                              metadata={"who": "numpy"})
  assert_bit_equal(hf.load_safetensors(tmp_path / "np.safetensors"), {k: tree[k] for k in ("w", "h", "n")})
  assert hf.read_safetensors_header(tmp_path / "np.safetensors")[1] == {"who": "numpy"}
  safetensors.torch.save_file({"bf": torch.from_numpy(tree["bf"].view(np.int16)).view(torch.bfloat16)},
                              tmp_path / "pt.safetensors")
  assert_bit_equal(hf.load_safetensors(tmp_path / "pt.safetensors"), {"bf": tree["bf"]})


def _file(header, data=b"", length=None):
  blob = json.dumps(header).encode()
  return struct.pack("<Q", len(blob) if length is None else length) + blob + data


@pytest.mark.parametrize("content, match", [
    (b"abc", "no header length"),
    (_file({}, length=1 << 40), "runs past the end"),
    (struct.pack("<Q", 4) + b"{no}", "not UTF-8 JSON"),
    (_file([1]), "not a JSON object"),
    (_file({"t": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unknown dtype 'Q7'"),
    (_file({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "needs 8 bytes"),
    (_file({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "non-negative"),
    (_file({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "not 0 where"),
    (_file({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "u": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "not 8 where"),
    (_file({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 5), "truncated"),
    (_file({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 6), "2 bytes after"),
    (_file({"t": {"dtype": "F32", "shape": [1]}}), "exactly dtype"),
    (_file({"__metadata__": {"a": 1}}), "__metadata__"),
])
def test_corrupt_safetensors_errors_name_the_file(tmp_path, content, match):
  path = tmp_path / "bad.safetensors"
  path.write_bytes(content)
  with pytest.raises(CheckpointError, match=match) as e:
    hf.load_safetensors(path)
  assert str(path) in str(e.value)


def test_duplicate_tensor_names_and_truncation_of_a_real_file(tmp_path):
  path = tmp_path / "dup.safetensors"
  blob = b'{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"t":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}'
  path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"ab")
  with pytest.raises(CheckpointError, match="twice"):
    hf.load_safetensors(path)
  hf.save_safetensors(tmp_path / "x.safetensors", sample())
  raw = (tmp_path / "x.safetensors").read_bytes()
  (tmp_path / "x.safetensors").write_bytes(raw[:-3])
  with pytest.raises(CheckpointError, match="truncated") as e:
    hf.load_safetensors(tmp_path / "x.safetensors")
  assert "x.safetensors" in str(e.value)


class _Exploding:
  """A leaf with a shape and dtype (so the header is planned) whose data fails to arrive mid-write."""
  shape, dtype = (4,), np.dtype(np.float32)

  def __array__(self, dtype=None, copy=None):
    raise RuntimeError("device lost")


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
  path = tmp_path / "x.safetensors"
  hf.save_safetensors(path, {"a": np.ones(3, np.float32)})
  before = path.read_bytes()
  # "a" (item size 4, name first) is written before "z" fails.
  with pytest.raises(RuntimeError, match="device lost"):
    hf.save_safetensors(path, {"a": np.zeros(1000, np.float32), "z": _Exploding()})
  with pytest.raises(ValueError, match="became"):
    hf.save_safetensors(path, {"a": np.zeros(3, np.float32), "z": type("Liar", (), {
        "shape": (5,), "dtype": np.dtype(np.float32), "__array__": lambda self, *a, **k: np.zeros(4, np.float32)})()})
  with pytest.raises(ValueError, match="cannot hold"):
    hf.save_safetensors(path, {"c": np.zeros(2, np.complex128)})
  with pytest.raises(TypeError, match="str to str"):
    hf.save_safetensors(path, {"a": np.zeros(2)}, metadata={"step": 3})
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["x.safetensors"]
