"""Hugging Face interop: safetensors files without torch (bfloat16 included) and the transformers layout.

safetensors (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then the raw little-endian bytes of every
tensor, back to back. Written here leaf by leaf and atomically; read through one read-only memory map (why
not through the safetensors library: see the comment above save_safetensors).

The transformers 5.24 `PaliGemmaForConditionalGeneration` layout is per layer and (out, in) like torch.nn.Linear;
the npz layout is stacked over layers and einsum-shaped. `to_hf` / `from_hf` map one onto the other exactly
(transposes and reshapes only, no arithmetic, so a round trip is bit-exact in any dtype). Traps handled here:
Gemma 1 keeps query/key/value in one `qkv_einsum` when K == N; Gemma 1's `pre_ffw_norm` is HF's
`post_attention_layernorm`, while Gemma 2's is `pre_feedforward_layernorm` and its `post_attention_norm` takes
that name; `lm_head.weight` is the tied embedding table; HF hub tables carry rows past big_vision's vocabulary
(`<image>` and padding) that pgjax does not use; checkpoints from transformers <= 4.x use other key prefixes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping

import jax
import ml_dtypes
import numpy as np

from pgjax import checkpoint
from pgjax import config as config_lib
from pgjax import files, lora, quant, tree
from pgjax.checkpoint import CheckpointError

# ------------------------------------------------------------------------------------------ safetensors

_DTYPES = {name: np.dtype(dt) for name, dt in {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2, "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": bool}.items()}
_NAMES = {dt: name for name, dt in _DTYPES.items()}
_MAX_HEADER = 100 << 20  # the safetensors library refuses larger headers too

# Why this module writes and reads the format itself rather than through the safetensors library (0.8.0, which
# the tests use as the independent reader and writer). Measured on a synthetic 256 MiB file (16 tensors of
# 16 MiB, half bf16, half f32; peak RSS growth, a fresh process per case, 2-core CPU):
#   - writing: `serialize_file` takes every tensor at once as a contiguous host buffer (`safetensors.numpy.save_file`
#     given a transposed view writes its memory as it lies: the tensor comes back transposed, silently). From
#     to_hf's transposed views that is a second copy of the whole model (+256 MiB, 5.1 s) where the writer below
#     makes one leaf contiguous at a time (+16 MiB, 3.5-3.9 s); from device arrays it would pull the whole tree
#     to the host first. On arrays already contiguous on the host both cost nothing extra and take the same time.
#   - the header: the library's errors name neither the file nor, mostly, the tensor, and lump faults together
#     (a truncated file and trailing bytes both read "incomplete metadata, file not fully covered"; a name given
#     twice reads "invalid offset"); it accepts entries with unknown fields, and it gives no byte offsets.
#   - reading with mmap: `get_tensor` copies every tensor out of its map (+512 MiB, 0.4-1.9 s) where views of
#     one np.memmap cost nothing until touched (+1 MiB, 0.01 s).
#   - reading without mmap: its "pread" backend takes the same memory as ours (+256 MiB) and is a little faster
#     (0.41-0.60 s against 0.60-1.06 s), and reads bf16 as ml_dtypes.bfloat16 (older versions refuse it), but it
#     cannot give numpy the float8 dtypes (F8_E4M3, F8_E5M2: AttributeError, numpy has no float8_e4m3fn),
#     which this reader returns as ml_dtypes arrays.


def save_safetensors(path, params: Mapping, metadata: Mapping[str, str] | None = None) -> None:
  """Writes `params` (nested -> "/"-joined names, or flat {name: leaf}) as safetensors, one leaf at a time.

  The header is planned from the leaves' shapes and dtypes, so only one leaf is on the host at a time. Tensors
  are ordered by item size, then name, which keeps every tensor aligned to its item size (the header is padded
  to 8 bytes), as the safetensors library does.
  """
  flat = tree.flatten(params)
  metadata = dict(metadata or {})
  if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
    raise TypeError(f"safetensors metadata must map str to str, got {metadata!r}")
  plan = {}
  for name, x in flat.items():
    shape, dtype = (tuple(x.shape), np.dtype(x.dtype)) if hasattr(x, "dtype") else (np.shape(x), np.asarray(x).dtype)
    if dtype.newbyteorder("<") not in _NAMES:
      raise ValueError(f"{path}: leaf {name!r} has dtype {dtype}, which safetensors cannot hold")
    plan[name] = (shape, dtype.newbyteorder("<"))
  header, offset = {"__metadata__": metadata} if metadata else {}, 0
  order = sorted(plan, key=lambda n: (-plan[n][1].itemsize, n))
  for name in order:
    shape, dtype = plan[name]
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with files.atomic_write(path) as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for name in order:
      arr = np.asarray(jax.device_get(flat[name]))
      if arr.shape != plan[name][0] or arr.dtype.newbyteorder("<") != plan[name][1]:
        raise ValueError(f"{path}: leaf {name!r} became {arr.dtype}{arr.shape} on the host, "
                         f"not {plan[name][1]}{plan[name][0]}")
      arr = np.ascontiguousarray(arr, plan[name][1])  # little-endian, C order
      f.write(arr.reshape(-1).view(np.uint8))
      del arr


def read_safetensors_header(path) -> tuple[dict[str, tuple[tuple[int, ...], np.dtype, int, int]], dict[str, str]]:
  """({name: (shape, dtype, start, end)}, metadata) with absolute byte ranges, after checking the whole header
  against the file: known dtypes, sizes that match shapes, ranges contiguous from the data start to the end."""
  path = os.fspath(path)
  bad = lambda msg: CheckpointError(f"{path}: {msg}")
  size = os.path.getsize(files.regular_file(path, "safetensors file"))
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise bad(f"truncated or not a safetensors file ({size} bytes, no header length)")
    n = struct.unpack("<Q", head)[0]
    if n > min(size - 8, _MAX_HEADER):
      raise bad(f"header length {n} runs past the end of the file ({size} bytes) or the 100 MiB limit: "
                "truncated or not safetensors")
    raw = f.read(n)

  def no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
      raise bad(f"header names a tensor twice: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    return dict(pairs)

  try:
    header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise bad(f"corrupt header, not UTF-8 JSON ({e})") from e
  if not isinstance(header, dict):
    raise bad("corrupt header: not a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
    raise bad(f"__metadata__ must map str to str, got {metadata!r}")
  start, entries = 8 + n, {}
  for name, e in header.items():
    where = f"tensor {name!r}"
    if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
      raise bad(f"{where}: entry must hold exactly dtype, shape and data_offsets, got {e!r}")
    if e["dtype"] not in _DTYPES:
      raise bad(f"{where}: unknown dtype {e['dtype']!r} (known: {', '.join(_DTYPES)})")
    shape, offsets = e["shape"], e["data_offsets"]
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
      raise bad(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
      raise bad(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    dtype = _DTYPES[e["dtype"]]
    if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
      raise bad(f"{where}: {e['dtype']}{shape} needs {math.prod(shape) * dtype.itemsize} bytes, "
                f"data_offsets {offsets} give {offsets[1] - offsets[0]}")
    entries[name] = (tuple(shape), dtype, start + offsets[0], start + offsets[1])
  end = start
  for name, (_, _, b, e) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
    if b != end:
      raise bad(f"tensor {name!r}: data starts at byte {b - start}, not {end - start} where the previous one "
                "ends (tensors must be contiguous, without gaps or overlaps)")
    end = e
  if end != size:
    raise bad(f"truncated: the header describes {end - start} bytes of data, the file holds {size - start}"
              if end > size else f"{size - end} bytes after the last tensor")
  return entries, metadata


def load_safetensors(path, *, mmap: bool = True) -> dict[str, np.ndarray]:
  """{name: numpy array} in file order, bf16 as ml_dtypes.bfloat16. With mmap the arrays are read-only views
  of one memory map of the file (read on first touch); without, each tensor is read into its own array."""
  entries, _ = read_safetensors_header(path)
  if mmap:
    buf = np.memmap(path, np.uint8, mode="r")
    return {n: buf[b:e].view(dt).reshape(shape) for n, (shape, dt, b, e) in entries.items()}
  out = {}
  with open(path, "rb") as f:
    for n, (shape, dt, b, e) in entries.items():
      out[n] = np.empty(shape, dt)
      f.seek(b)
      if f.readinto(out[n].reshape(-1).view(np.uint8)) != e - b:
        raise CheckpointError(f"{path}: tensor {n!r}: file shrank while reading")
  return out


# ------------------------------------------------------------------------------------------- HF layout

_VT, _ENC = "model.vision_tower.", "model.vision_tower.encoder.layers.{i}."
_LM, _DEC = "model.language_model.", "model.language_model.layers.{i}."
_EMBED, _HF_EMBED, _HF_HEAD = "llm/embedder/input_embedding", _LM + "embed_tokens.weight", "lm_head.weight"
# transformers <= 4.x names (hub files and the convert scripts); 5.x renames them in from_pretrained only.
_LEGACY = (("model.vision_tower.vision_model.", _VT), ("vision_tower.vision_model.", _VT),
           ("multi_modal_projector.", "model.multi_modal_projector."),
           ("language_model.model.", _LM), ("language_model.lm_head.", "lm_head."))


def _rules(cfg: config_lib.PaliGemmaConfig):
  """[(npz key, HF names, npz leaf -> HF arrays, HF arrays -> npz leaf, layers)]; names hold "{i}" and the
  transforms act on one layer's slice when layers > 0. All but the embedding, which `to_hf`/`from_hf` handle."""
  v, t = cfg.vision, cfg.llm
  W, nh, vL, D, N, K, H, L = v.width, v.num_heads, v.depth, t.width, t.num_heads, t.num_kv_heads, t.head_dim, t.depth
  rules, same, T = [], (lambda x: x), (lambda x: x.T)

  def add(key, names, fwd=same, inv=same, layers=0):
    if isinstance(names, str):
      names, fwd = (names,), (lambda x, f=fwd: (f(x),))
    rules.append((key, names, fwd, inv, layers))

  add("img/embedding/kernel", _VT + "embeddings.patch_embedding.weight",  # HWIO -> OIHW
      lambda x: x.transpose(3, 2, 0, 1), lambda x: x.transpose(2, 3, 1, 0))
  add("img/embedding/bias", _VT + "embeddings.patch_embedding.bias")
  add("img/pos_embedding", _VT + "embeddings.position_embedding.weight",
      lambda x: x.reshape(-1, W), lambda x: x.reshape(1, -1, W))
  blk = "img/Transformer/encoderblock/"
  for ln, name in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
    add(f"{blk}{ln}/scale", f"{_ENC}{name}.weight", layers=vL)
    add(f"{blk}{ln}/bias", f"{_ENC}{name}.bias", layers=vL)
  for dense, name in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
    add(f"{blk}MlpBlock_0/{dense}/kernel", f"{_ENC}mlp.{name}.weight", T, T, vL)
    add(f"{blk}MlpBlock_0/{dense}/bias", f"{_ENC}mlp.{name}.bias", layers=vL)
  mha = blk + "MultiHeadDotProductAttention_0/"
  for bv, name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    add(f"{mha}{bv}/kernel", f"{_ENC}self_attn.{name}.weight",
        lambda x: x.reshape(W, -1).T, lambda x: x.T.reshape(W, nh, -1), vL)
    add(f"{mha}{bv}/bias", f"{_ENC}self_attn.{name}.bias", lambda x: x.reshape(-1), lambda x: x.reshape(nh, -1), vL)
  add(mha + "out/kernel", _ENC + "self_attn.out_proj.weight", lambda x: x.reshape(-1, W).T,
      lambda x: x.T.reshape(nh, -1, W), vL)
  add(mha + "out/bias", _ENC + "self_attn.out_proj.bias", layers=vL)
  add("img/Transformer/encoder_norm/scale", _VT + "post_layernorm.weight")
  add("img/Transformer/encoder_norm/bias", _VT + "post_layernorm.bias")
  add("img/head/kernel", "model.multi_modal_projector.linear.weight", T, T)
  add("img/head/bias", "model.multi_modal_projector.linear.bias")

  add("llm/final_norm/scale", _LM + "norm.weight")
  heads_out = lambda x: x.transpose(0, 2, 1).reshape(-1, D)  # [heads, D, H] -> [heads * H, D]
  heads_in = lambda x: x.reshape(-1, H, D).transpose(0, 2, 1)
  proj = lambda *ns: tuple(f"{_DEC}self_attn.{n}_proj.weight" for n in ns)
  split = lambda x: tuple(heads_out(w) for w in x)
  join = lambda *ws: np.stack([heads_in(w) for w in ws])
  if K == N:
    add("llm/layers/attn/qkv_einsum/w", proj("q", "k", "v"), split, join, L)
  else:
    add("llm/layers/attn/q_einsum/w", proj("q")[0], heads_out, heads_in, L)
    add("llm/layers/attn/kv_einsum/w", proj("k", "v"), split, join, L)
  add("llm/layers/attn/attn_vec_einsum/w", proj("o")[0], lambda x: x.reshape(N * H, D).T,
      lambda x: x.T.reshape(N, H, D), L)
  add("llm/layers/mlp/gating_einsum", (_DEC + "mlp.gate_proj.weight", _DEC + "mlp.up_proj.weight"),
      lambda x: (x[0].T, x[1].T), lambda g, u: np.stack([g.T, u.T]), L)
  add("llm/layers/mlp/linear", _DEC + "mlp.down_proj.weight", T, T, L)
  norms = {"pre_attention_norm": "input_layernorm"}
  if t.post_norms:
    norms.update(pre_ffw_norm="pre_feedforward_layernorm", post_attention_norm="post_attention_layernorm",
                 post_ffw_norm="post_feedforward_layernorm")
  else:  # the name trap: in Gemma 1 the norm before the MLP is called post_attention_layernorm
    norms.update(pre_ffw_norm="post_attention_layernorm")
  for bv, name in norms.items():
    add(f"llm/layers/{bv}/scale", f"{_DEC}{name}.weight", layers=L)
  return rules


def _apply(flat: Mapping, cfg) -> dict:
  out = {}
  for key, names, fwd, _, layers in _rules(cfg):
    for i in range(layers) if layers else [None]:
      for name, arr in zip(names, fwd(flat[key] if i is None else flat[key][i])):
        out[name.format(i=i)] = arr
  return out


def hf_shapes(cfg: config_lib.PaliGemmaConfig, *, vocab_size: int | None = None) -> dict[str, tuple[int, ...]]:
  """{HF name: shape} that `to_hf` produces, computed without allocating anything."""
  structs = {k: jax.ShapeDtypeStruct(s, np.float32) for k, s in checkpoint.manifest(cfg).items()}
  shapes = {k: tuple(s.shape) for k, s in jax.eval_shape(lambda f: _apply(f, cfg), structs).items()}
  shapes[_HF_EMBED] = shapes[_HF_HEAD] = (vocab_size or cfg.llm.vocab_size, cfg.llm.width)
  return shapes


def to_hf(params: Mapping, cfg: config_lib.PaliGemmaConfig, *, vocab_size: int | None = None,
          dtype=None) -> dict[str, np.ndarray]:
  """npz-layout params -> {transformers 5.24 name: numpy array}, dtypes kept unless `dtype` is given.

  vocab_size: pad the embedding table (and the tied lm_head.weight, the same array) to this many rows with
    zeros, e.g. 257216 as on the HF hub, where row 257152 is `<image>`; pgjax never reads those rows.
  Values may be views of one host copy of each leaf (non-contiguous); the host holds about one model's bytes.
  """
  flat = tree.flatten(params)
  checkpoint.check_shapes("params", {k: np.shape(x) for k, x in flat.items()}, checkpoint.manifest(cfg), hint=False)
  V = cfg.llm.vocab_size
  if vocab_size is not None and vocab_size < V:
    raise ValueError(f"vocab_size {vocab_size} is smaller than the config's {V}; rows would be lost")
  host = {}
  for key, x in flat.items():
    arr = np.asarray(jax.device_get(x))
    host[key] = arr if dtype is None else arr.astype(dtype)
  out = _apply(host, cfg)
  table = host.pop(_EMBED)
  if vocab_size is not None and vocab_size > V:
    table = np.concatenate([table, np.zeros((vocab_size - V, table.shape[1]), table.dtype)])
  out[_HF_EMBED] = out[_HF_HEAD] = table  # tied: strict HF loading wants both names
  return out


def _numpy(x) -> np.ndarray:
  if type(x).__module__.startswith("torch"):  # a torch.Tensor (from model.state_dict()), through its own methods
    x = x.detach().cpu()
    # numpy has no bfloat16: widen to float32 and back, both exact for bfloat16 values.
    return x.float().numpy().astype(ml_dtypes.bfloat16) if str(x.dtype) == "torch.bfloat16" else x.numpy()
  return np.asarray(x)


def from_hf(state_dict: Mapping, cfg: config_lib.PaliGemmaConfig, *, source: str = "HF state dict") -> dict:
  """{HF name: array} (numpy, jax or torch; 5.x or <= 4.x names) -> nested numpy params in the npz layout.

  Embedding rows past cfg.llm.vocab_size (HF's `<image>` and padding) are dropped; `lm_head.weight` may be
  absent (tied) but, when present, must equal the table, since pgjax has no separate output layer. Missing,
  unexpected and mis-shaped keys are reported together in one CheckpointError.
  """
  sd = {}
  for name, x in state_dict.items():
    new = next((new + name[len(old):] for old, new in _LEGACY if name.startswith(old)), name)
    if new in sd:
      raise CheckpointError(f"{source}: two keys map to {new!r} (legacy and current names mixed?)")
    sd[new] = x
  V = cfg.llm.vocab_size
  found = {k: tuple(x.shape) for k, x in sd.items()}
  for k in (_HF_EMBED, _HF_HEAD):  # extra rows are HF's own tokens, not ours
    if k in found and len(found[k]) == 2 and found[k][0] > V:
      found[k] = (V, found[k][1])
  expected = hf_shapes(cfg)
  if _HF_HEAD not in sd:
    expected.pop(_HF_HEAD)
  checkpoint.check_shapes(source, found, expected, what="the config's Hugging Face layout", hint=False)
  sd = {k: _numpy(x) for k, x in sd.items()}
  table = sd[_HF_EMBED][:V]
  if _HF_HEAD in sd and not np.array_equal(sd[_HF_HEAD][:V], table):
    raise CheckpointError(f"{source}: lm_head.weight differs from the embedding table; pgjax ties them, "
                          "so an untied output layer cannot be imported")
  flat = {_EMBED: np.array(table)}
  for key, names, _, inv, layers in _rules(cfg):
    if layers:
      flat[key] = np.stack([inv(*(sd[n.format(i=i)] for n in names)) for i in range(layers)])
    else:
      flat[key] = np.array(inv(*(sd[n] for n in names)))
  return tree.unflatten(flat)


# ------------------------------------------------------------------------------------------ files

def hf_config_dict(cfg: config_lib.PaliGemmaConfig, *, vocab_size: int | None = None,
                   dtype: str = "float32") -> dict:
  """A transformers PaliGemmaConfig as a config.json dict, built without importing transformers."""
  v, t = cfg.vision, cfg.llm
  vocab = vocab_size or t.vocab_size
  ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
  text = dict(vocab_size=vocab, hidden_size=t.width, num_hidden_layers=t.depth, num_attention_heads=t.num_heads,
              num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim, intermediate_size=t.mlp_dim,
              rms_norm_eps=1e-6, rope_theta=t.rope_max_wavelength,  # 4.x reads rope_theta, 5.x rope_parameters
              rope_parameters={"rope_type": "default", "rope_theta": t.rope_max_wavelength},
              num_image_tokens=cfg.num_image_tokens, tie_word_embeddings=True, **ids)
  if t.post_norms:
    scalar = t.head_dim if t.query_pre_attn_scalar is None else t.query_pre_attn_scalar
    if not float(scalar).is_integer():  # transformers' Gemma2Config types it int and refuses a float on load
      raise ValueError(f"transformers' Gemma 2 takes an integer query_pre_attn_scalar; this config has {scalar}")
    text.update(model_type="gemma2", hidden_activation="gelu_pytorch_tanh",
                query_pre_attn_scalar=int(scalar),
                attn_logit_softcapping=t.attn_logits_softcap or None,
                final_logit_softcapping=t.final_logits_softcap or None,
                # big_vision (and pgjax) attend over the whole sequence in every layer: no sliding window.
                sliding_window=4096, layer_types=["full_attention"] * t.depth)
  elif t.attn_logits_softcap or t.final_logits_softcap or t.query_pre_attn_scalar is not None:
    raise ValueError("transformers' Gemma 1 has no soft caps nor query_pre_attn_scalar; this config has them")
  else:
    text.update(model_type="gemma", hidden_act="gelu_pytorch_tanh")
  vision = dict(model_type="siglip_vision_model", hidden_size=v.width, intermediate_size=v.mlp_dim,
                num_hidden_layers=v.depth, num_attention_heads=v.num_heads, num_channels=3, image_size=v.image_size,
                patch_size=v.patch_size, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                vision_use_head=False, projection_dim=t.width, num_image_tokens=cfg.num_image_tokens)
  # <image> is the first id past big_vision's vocabulary (257152 on the hub; out of range, and still handled by
  # HF, when the table is not padded).
  return dict(model_type="paligemma", architectures=["PaliGemmaForConditionalGeneration"], dtype=dtype,
              vision_config=vision, text_config=text, image_token_index=t.vocab_size, vocab_size=vocab,
              projection_dim=t.width, hidden_size=t.width, tie_word_embeddings=True, **ids)


def export_hf(path, params: Mapping, cfg: config_lib.PaliGemmaConfig, vocab_size: int | None = None, *,
              dtype=None, config_json: bool = True) -> str:
  """Writes params under HF names to safetensors; returns the file written.

  path: a `*.safetensors` file, or a directory (created) that gets `model.safetensors`. With config_json, a
  `config.json` beside it makes the directory loadable by `PaliGemmaForConditionalGeneration.from_pretrained`.
  """
  path = os.fspath(path)
  if not path.endswith(".safetensors"):
    os.makedirs(path, exist_ok=True)
    path = os.path.join(path, "model.safetensors")
  sd = to_hf(params, cfg, vocab_size=vocab_size, dtype=dtype)
  save_safetensors(path, sd, metadata={"format": "pt"})  # the metadata transformers' own files carry
  if config_json:
    cfg_dict = hf_config_dict(cfg, vocab_size=vocab_size, dtype=sd[_HF_EMBED].dtype.name)
    files.atomic_write_text(os.path.join(os.path.dirname(os.path.abspath(path)), "config.json"),
                            json.dumps(cfg_dict, indent=2))
  return path


def import_hf(path, cfg: config_lib.PaliGemmaConfig, *, dtype=None) -> dict:
  """Reads an HF PaliGemma checkpoint into nested numpy params in the npz layout.

  path: a `.safetensors` file, or a model directory holding `model.safetensors` or the shards listed in
  `model.safetensors.index.json`. dtype: None keeps the file's dtypes.
  """
  path = os.fspath(path)
  files = [path]
  if os.path.isdir(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        files = [os.path.join(path, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
    else:
      files = [os.path.join(path, "model.safetensors")]
  sd = {}
  for file in files:
    for name, arr in load_safetensors(file).items():
      if name in sd:
        raise CheckpointError(f"{file}: tensor {name!r} is also in another shard of {path}")
      sd[name] = arr
  params = from_hf(sd, cfg, source=path)
  return params if dtype is None else jax.tree.map(lambda x: x.astype(dtype), params)


# ------------------------------------------------------------------------------ LoRA adapters as PEFT's

_PEFT_PREFIX = "base_model.model."  # PEFT's wrapper of the model, in its saved key names
_PEFT_CONFIG, _PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _peft_modules(cfg) -> dict[str, tuple[tuple[str, ...], int]]:
  """{npz weight key: (HF module name per fused member, with "{i}"; layers)} for the weights PEFT's LoRA can
  adapt (its Linear layers: every matmul weight but SigLIP's patch embedding, a Conv2d)."""
  return {key: (tuple(n.removesuffix(".weight") for n in names), layers)
          for key, names, _, _, layers in _rules(cfg)
          if quant.input_axes(key) is not None and key != "img/embedding/kernel"}


def export_peft(adapters: Mapping, cfg: config_lib.PaliGemmaConfig, path, *, alpha: float) -> str:
  """Writes pgjax LoRA adapters (lora.init's tree) as a PEFT LoRA adapter directory: `adapter_config.json` and
  `adapter_model.safetensors`, that `peft.PeftModel.from_pretrained` loads onto the model `export_hf` wrote.

  One PEFT adapter per HF projection, per layer: a fused weight's members (q, k, v; k, v; gate, up) are
  separate projections in transformers, and pgjax's adapters are already per member. lora_A = a as
  [r, in], lora_B = b as [out, r], with the input and output axes flattened in the order transformers'
  weights flatten them (heads, then head dim); PEFT scales by lora_alpha / r, as pgjax does.
  """
  modules = _peft_modules(cfg)
  pairs = lora.adapted_paths(adapters)
  r = lora.rank_of(adapters)
  sd, targets = {}, []
  for key, ab in sorted(pairs.items()):
    if key not in modules:
      raise ValueError(f"adapter {key!r}: PEFT has no LoRA layer for this weight")
    names, layers = modules[key]
    a, b = np.asarray(jax.device_get(ab["a"]), np.float32), np.asarray(jax.device_get(ab["b"]), np.float32)
    for i in range(layers) if layers else [None]:
      a_i, b_i = (a, b) if i is None else (a[i], b[i])
      for j, name in enumerate(names):
        a_ij, b_ij = (a_i[j], b_i[j]) if len(names) > 1 else (a_i, b_i)
        module = name.format(i=i)
        targets.append(module)
        sd[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a_ij.reshape(-1, r).T)
        sd[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b_ij.reshape(-1, r))
  os.makedirs(path, exist_ok=True)
  save_safetensors(os.path.join(path, _PEFT_WEIGHTS), sd, metadata={"format": "pt"})
  config = {"peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": float(alpha), "lora_dropout": 0.0,
            "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
            "base_model_name_or_path": None}
  files.atomic_write_text(os.path.join(path, _PEFT_CONFIG), json.dumps(config, indent=2))
  return os.fspath(path)


def import_peft(path, cfg: config_lib.PaliGemmaConfig) -> tuple[dict, float]:
  """Reads a PEFT LoRA adapter directory (written by `export_peft`, or trained in transformers) into pgjax
  adapters: (the lora tree, alpha), for `lora.apply` / `lora.merge`. A projection the adapter leaves out
  (say k_proj where PEFT targeted q_proj and v_proj only) gets a zero factor pair: no change, exactly as in
  PEFT. rsLoRA's alpha / sqrt(r) scale is returned as the equivalent alpha. Refused, naming the key: DoRA,
  per-module ranks or alphas, bias training, and any tensor the mapping does not place."""
  path = os.fspath(path)
  cfg_path, weights_path = os.path.join(path, _PEFT_CONFIG), os.path.join(path, _PEFT_WEIGHTS)
  try:
    with open(cfg_path) as f:
      pc = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{cfg_path}: cannot read a PEFT adapter config ({e})") from None
  if pc.get("peft_type") != "LORA":
    raise CheckpointError(f"{cfg_path}: peft_type {pc.get('peft_type')!r}, only LORA adapters import")
  for field, ok in (("use_dora", not pc.get("use_dora")), ("rank_pattern", not pc.get("rank_pattern")),
                    ("alpha_pattern", not pc.get("alpha_pattern")), ("bias", pc.get("bias", "none") == "none"),
                    ("modules_to_save", not pc.get("modules_to_save"))):
    if not ok:
      raise CheckpointError(f"{cfg_path}: {field} = {pc.get(field)!r} has no pgjax equivalent")
  r, alpha = int(pc["r"]), float(pc["lora_alpha"])
  if pc.get("use_rslora"):
    alpha = alpha * r ** 0.5  # PEFT's scale alpha / sqrt(r) = (alpha sqrt(r)) / r
  sd = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
        for k, v in load_safetensors(weights_path, mmap=False).items()}
  used, out = set(), {}
  for key, (names, layers) in _peft_modules(cfg).items():
    found = [f"{_PEFT_PREFIX}{n.format(i=i)}.lora_A.weight" in sd
             for i in (range(layers) if layers else [None]) for n in names]
    if not any(found):
      continue
    a_l, b_l = [], []
    for i in range(layers) if layers else [None]:
      a_j, b_j = [], []
      for name in names:
        base = f"{_PEFT_PREFIX}{name.format(i=i)}"
        A, B = sd.get(base + ".lora_A.weight"), sd.get(base + ".lora_B.weight")
        if (A is None) != (B is None):
          raise CheckpointError(f"{weights_path}: {base} has only one of lora_A and lora_B")
        a_j.append(A)
        b_j.append(B)
        used.update({base + ".lora_A.weight", base + ".lora_B.weight"})
      a_l.append(a_j)
      b_l.append(b_j)
    out.update(_peft_factors(key, names, layers, a_l, b_l, r, cfg, weights_path))
  unused = sorted(set(sd) - used)
  if unused:
    raise CheckpointError(f"{weights_path}: tensors the PaliGemma mapping does not place: {unused[:5]}"
                          f"{' ...' if len(unused) > 5 else ''}")
  if not out:
    raise CheckpointError(f"{weights_path}: no LoRA tensors for any PaliGemma projection")
  return tree.unflatten(out), alpha


def _peft_factors(key, names, layers, a_l, b_l, r, cfg, source) -> dict:
  """One weight's a and b (lora.init's layout) from PEFT's per-layer, per-member [r, in] and [out, r]."""
  shape = checkpoint.manifest(cfg)[key]
  _, ins, outs = lora.layout(key, shape)
  in_shape = tuple(shape[a] for a in ins)
  out_shape = tuple(shape[a] for a in outs)
  n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
  a_all, b_all = [], []
  for i, (a_j, b_j) in enumerate(zip(a_l, b_l)):
    a_m, b_m = [], []
    for name, A, B in zip(names, a_j, b_j):
      if A is None:  # a projection PEFT did not target: no update
        A, B = np.zeros((r, n_in), np.float32), np.zeros((n_out, r), np.float32)
      if A.shape != (r, n_in) or B.shape != (n_out, r):
        raise CheckpointError(f"{source}: {name.format(i=i if layers else None)} lora_A {A.shape}, lora_B "
                              f"{B.shape}; expected {(r, n_in)} and {(n_out, r)} for {key}")
      a_m.append(np.asarray(A, np.float32).T.reshape(*in_shape, r))
      b_m.append(np.asarray(B, np.float32).reshape(*out_shape, r))
    a_all.append(np.stack(a_m) if len(names) > 1 else a_m[0])
    b_all.append(np.stack(b_m) if len(names) > 1 else b_m[0])
  a, b = (np.stack(a_all), np.stack(b_all)) if layers else (a_all[0], b_all[0])
  return {f"{key}/a": a, f"{key}/b": b}
