"""Sharding: a device mesh, one rules table (path regex -> PartitionSpec), per-leaf NamedShardings.

FSDP-style by default: a 1-D mesh with axis "data" over every device; each large param is split along
its model-width axis (D, which divides by every realistic device count: 1152, 2048, 2304, 3584, 4608),
so each device holds 1/n of the weights, and batches are split along the batch axis. A 2-D mesh
("data", "model") additionally splits heads, MLP hidden units and the vocabulary over "model". On a
1-D mesh the "model" entries of the table mean "not split".

Every leaf must match exactly one rule and every split axis must divide, else `ShardingError` names the
leaf: nothing is silently replicated. PaliGemma 1's kv_einsum has a single kv head (1, 2048, 256),
so its rule splits D and H, never K.

Axes (the leaves' shapes in the table's comments): see pgjax/__init__.py; D is each tower's own width (E the
LLM's, where SigLIP's head projects into it), p, q a patch's pixel rows and columns.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pgjax import lora, quant, tree

# path regex (full match)                                  spec per axis of the leaf (its shape in comments)
RULES: tuple[tuple[str, tuple], ...] = (
    (r"img/embedding/kernel", (None, None, None, "data")),                      # p q C D
    (r"img/embedding/bias", ("data",)),                                         # D
    (r"img/pos_embedding", (None, None, "data")),                               # 1 P D
    (r"img/Transformer/encoder_norm/(scale|bias)", ("data",)),                  # D
    (r"img/Transformer/encoderblock/LayerNorm_[01]/(scale|bias)", (None, "data")),           # L D
    (r"img/.*/MlpBlock_0/Dense_0/kernel", (None, "data", "model")),            # L D F
    (r"img/.*/MlpBlock_0/Dense_0/bias", (None, "model")),                      # L F
    (r"img/.*/MlpBlock_0/Dense_1/kernel", (None, "model", "data")),            # L F D
    (r"img/.*/MlpBlock_0/Dense_1/bias", (None, "data")),                       # L D
    (r"img/.*/MultiHeadDotProductAttention_0/(query|key|value)/kernel", (None, "data", "model", None)),  # L D N H
    (r"img/.*/MultiHeadDotProductAttention_0/(query|key|value)/bias", (None, "model", None)),  # L N H (small)
    (r"img/.*/MultiHeadDotProductAttention_0/out/kernel", (None, "model", None, "data")),    # L N H D
    (r"img/.*/MultiHeadDotProductAttention_0/out/bias", (None, "data")),       # L D
    (r"img/head/kernel", ("data", "model")),                                    # D E
    (r"img/head/bias", ("data",)),                                              # E
    (r"llm/embedder/input_embedding", ("model", "data")),                      # V D
    (r"llm/final_norm/scale", ("data",)),                                      # D
    (r"llm/layers/(pre|post)_(attention|ffw)_norm/scale", (None, "data")),     # L D
    (r"llm/layers/attn/q_einsum/w", (None, "model", "data", None)),            # L N D H
    (r"llm/layers/attn/kv_einsum/w", (None, None, None, "data", "model")),     # L J K D H (J = 2; K may be 1)
    (r"llm/layers/attn/qkv_einsum/w", (None, None, "model", "data", None)),    # L J N D H (J = 3)
    (r"llm/layers/attn/attn_vec_einsum/w", (None, "model", None, "data")),     # L N H D
    (r"llm/layers/mlp/gating_einsum", (None, None, "data", "model")),          # L J D F (J = 2)
    (r"llm/layers/mlp/linear", (None, "model", "data")),                       # L F D
)


class ShardingError(ValueError):
  pass


def make_mesh(devices=None, *, model: int = 1) -> Mesh:
  """All devices (of all hosts) as ("data",), or ("data", "model") with `model` devices per model group."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  if model == 1:
    return Mesh(devices.reshape(-1), ("data",))
  if devices.size % model:
    raise ShardingError(f"{devices.size} devices do not split into model groups of {model}")
  return Mesh(devices.reshape(-1, model), ("data", "model"))


def spec_for(path: str, shape, mesh: Mesh, rules=RULES) -> P:
  """The PartitionSpec of one leaf; raises ShardingError naming the leaf if no rule fits."""
  matches = [spec for pattern, spec in rules if re.fullmatch(pattern, path)]
  if len(matches) != 1:
    raise ShardingError(f"{path} {tuple(shape)}: matches {len(matches)} sharding rules, needs exactly one")
  spec = matches[0]
  if len(spec) != len(shape):
    raise ShardingError(f"{path} {tuple(shape)}: rule {spec} has {len(spec)} axes, the leaf {len(shape)}")
  spec = tuple(a if a in mesh.axis_names else None for a in spec)
  for dim, axis in zip(shape, spec):
    if axis is not None and dim % mesh.shape[axis]:
      raise ShardingError(f"{path} {tuple(shape)}: axis of size {dim} does not divide over mesh axis "
                          f"{axis!r} of size {mesh.shape[axis]} (spec {spec})")
  return P(*spec)


def param_shardings(params, mesh: Mesh, rules=RULES):
  """A tree of NamedShardings matching `params` (arrays or ShapeDtypeStructs, nested or partial trees).

  A quantized weight (quant.QArray) gets its codes placed by the weight's rule and its scales by the same
  rule, unsplit along the axes where they have a single entry (or too few to divide). A LoRA adapter's
  factors ("<weight path>/a", "/b", from lora.init) follow the weight's rule on the axes they share with it
  (the layer and fused-member stacks, a's input axes, b's output axes) and are not split along the rank."""
  out = {}
  for k, v in tree.flatten(params).items():
    if quant.is_quantized(v):
      spec = spec_for(k, v.codes.shape, mesh, rules)  # int4's codes: the packed axis must divide too
      scale = P(*(a if a is not None and n % mesh.shape[a] == 0 and n > 1 else None
                  for a, n in zip(spec, v.scale.shape)))
      out[k] = quant.QArray(NamedSharding(mesh, spec), NamedSharding(mesh, scale), v.in_axes, v.bits)
    else:
      spec = _adapter_spec(k, v.shape, mesh, rules) if k.endswith(("/a", "/b")) else None
      out[k] = NamedSharding(mesh, spec if spec is not None else spec_for(k, v.shape, mesh, rules))
  return tree.unflatten(out)


def _adapter_spec(path: str, shape, mesh: Mesh, rules=RULES) -> P | None:
  """The spec of a LoRA factor, from its weight's rule; None when `path` is no adapter of a known weight."""
  weight, _, part = path.rpartition("/")
  specs = [spec for pattern, spec in rules if re.fullmatch(pattern, weight)]
  in_axes = quant.input_axes(weight)
  if len(specs) != 1 or in_axes is None:
    return None
  spec = tuple(a if a in mesh.axis_names else None for a in specs[0])
  n_stack, ndim = lora.stack_axes(weight), len(spec)
  ins = [a % ndim for a in in_axes]
  keep = list(range(n_stack)) + (ins if part == "a" else [a for a in range(n_stack, ndim) if a not in ins])
  if len(keep) + 1 != len(shape):
    raise ShardingError(f"{path} {tuple(shape)}: not a LoRA factor of {weight} (its rule has {ndim} axes)")
  factor = [spec[a] for a in keep] + [None]
  for dim, axis in zip(shape, factor):
    if axis is not None and dim % mesh.shape[axis]:
      raise ShardingError(f"{path} {tuple(shape)}: axis of size {dim} does not divide over mesh axis "
                          f"{axis!r} of size {mesh.shape[axis]} (spec {tuple(factor)})")
  return P(*factor)


def leaf_sharding(mesh: Mesh, rules=RULES):
  """The `sharding` callable for `checkpoint.load`: each leaf goes straight to its NamedSharding."""
  return lambda path, shape, dtype: NamedSharding(mesh, spec_for(path, shape, mesh, rules))


def check_rules(params, rules=RULES) -> None:
  """Raises if any rule matches no leaf of `params` (a rule that matches nothing is a silent typo)."""
  keys = list(tree.flatten(params))
  unused = [pattern for pattern, _ in rules if not any(re.fullmatch(pattern, k) for k in keys)]
  if unused:
    raise ShardingError(f"sharding rules that match no leaf: {unused}")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches split along their leading (batch) axis over "data"."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def describe(params, mesh: Mesh | None = None, rules=RULES) -> list[tuple[str, tuple, str, str, int | None, str]]:
  """(path, shape, dtype, spec, bytes per device, problem) for each leaf, sorted by path, for `pgjax inspect`.

  Without a mesh each leaf is described as it is placed (its own sharding; spec "-" when that is not a
  NamedSharding). With a mesh, leaves need only .shape and .dtype (ShapeDtypeStructs, a checkpoint's headers)
  and are described as `param_shardings` would place them there, the rules table applied leaf by leaf. A leaf
  the table cannot place gets spec "-", no bytes and the ShardingError's message as its problem ("" otherwise),
  so one bad leaf does not hide the others.
  """
  rows = []
  for k, v in sorted(tree.flatten(params).items()):
    shape, dtype, problem = tuple(v.shape), np.dtype(v.dtype), ""
    placed = getattr(v, "sharding", None)
    if mesh is not None:
      try:
        placed = NamedSharding(mesh, spec_for(k, shape, mesh, rules))
      except ShardingError as e:
        placed, problem = None, str(e)
    spec = str(placed.spec) if isinstance(placed, NamedSharding) else "-"
    shard = shape if placed is None else placed.shard_shape(shape)
    bits = 4 if dtype.name == "int4" else 8 * dtype.itemsize  # int4 codes: two per byte
    nbytes = None if problem else math.prod(shard) * bits // 8  # Python ints: no int64 overflow
    rows.append((k, shape, str(dtype), spec, nbytes, problem))
  return rows


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """This process's share of a batch -> global arrays split over "data" (one host or several)."""
  sh = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}
