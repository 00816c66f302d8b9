"""Low-rank adapters (LoRA) over the checkpoint-keyed param tree, as pure functions.

An adapter of a weight W is two factors over W's (input, output) matrix view, per layer and per member of a
fused stack (q, k, v of qkv_einsum; k, v of kv_einsum; gate, up of gating_einsum, each its own adapter, as
PEFT has one per projection):
  a  [stack..., input axes..., r]   random (PEFT's default: uniform in +-1/sqrt(fan-in))
  b  [stack..., output axes..., r]  zero, so a fresh adapter changes nothing
and the adapted matmul is x·W + (x·a)·b · alpha/r.

`init` makes the adapters (a pytree of arrays only: {path: {"a", "b"}}, keyed by the adapted leaf's path);
`apply` puts them on the params as `Adapted` leaves, which `layers.dot` runs as that sum, so no merged weight
is made per step and gradients reach the adapters alone; `merge` folds them into a plain tree (a checkpoint
big_vision loads). The base may be float or quantized (`quant.QArray`): QLoRA is `apply(quant.quantize(...))`.

Axes: see pgjax/__init__.py; r is the adapter's rank.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from pgjax import layers, quant, tree

# The LLM attention's projections (the seed recipe's trainable set). The MLP and SigLIP are opt-in by regex,
# e.g. r"llm/layers/mlp/.*" or r"img/.*/MultiHeadDotProductAttention_0/.*/kernel".
TARGETS = (r"llm/layers/attn/(q_einsum|kv_einsum|qkv_einsum|attn_vec_einsum)/w",)
_STACKED = ("llm/layers/", "img/Transformer/encoderblock/")  # leaves with a leading layer axis L
_FUSED = re.compile(r"llm/layers/(attn/(kv_einsum|qkv_einsum)/w|mlp/gating_einsum)")  # and a J axis after it


def stack_axes(path: str) -> int:
  """How many leading axes of a weight are stacks (L, J) rather than input or output axes of its matmul."""
  return int(path.startswith(_STACKED)) + int(bool(_FUSED.fullmatch(path)))


def layout(path: str, shape) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
  """(stack axes, input axes, output axes) of a weight, as non-negative axis numbers."""
  in_axes = quant.input_axes(path)
  if in_axes is None:
    raise ValueError(f"{path} {tuple(shape)}: not a matmul weight, so it takes no adapter")
  n_stack = stack_axes(path)
  ins = tuple(a % len(shape) for a in in_axes)
  outs = tuple(a for a in range(n_stack, len(shape)) if a not in ins)
  return n_stack, ins, outs


def init(key, params: dict, *, rank: int, targets=TARGETS) -> dict:
  """Adapters of rank `rank` for every matmul weight whose path full-matches a regex of `targets`, in float32."""
  if rank < 1:
    raise ValueError(f"rank must be at least 1, got {rank}")
  flat = tree.flatten(params)
  paths = [p for p in flat if any(re.fullmatch(t, p) for t in targets)]
  if not paths:
    raise ValueError(f"the LoRA targets {list(targets)} match none of the {len(flat)} params (e.g. {next(iter(flat))})")
  out = {}
  for path, k in zip(paths, jax.random.split(key, len(paths))):
    shape = flat[path].shape
    n_stack, ins, outs = layout(path, shape)
    fan_in = math.prod(shape[a] for a in ins)
    stack = tuple(shape[:n_stack])
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)), PEFT's and torch.nn.Linear's init
    out[f"{path}/a"] = jax.random.uniform(k, stack + tuple(shape[a] for a in ins) + (rank,), jnp.float32,
                                          -bound, bound)
    out[f"{path}/b"] = jnp.zeros(stack + tuple(shape[a] for a in outs) + (rank,), jnp.float32)
  return tree.unflatten(out)


def adapted_paths(adapters: dict) -> dict:
  """{weight path: {"a": ..., "b": ...}} of an adapter tree."""
  flat = tree.flatten(adapters)
  out = {}
  for key, leaf in flat.items():
    path, _, part = key.rpartition("/")
    if part not in ("a", "b"):
      raise ValueError(f"adapter leaf {key!r}: expected .../a or .../b")
    out.setdefault(path, {})[part] = leaf
  for path, ab in out.items():
    if set(ab) != {"a", "b"}:
      raise ValueError(f"adapter {path!r} has {sorted(ab)}, needs both a and b")
  return out


def rank_of(adapters: dict) -> int:
  ranks = {ab["a"].shape[-1] for ab in adapted_paths(adapters).values()}
  if len(ranks) != 1:
    raise ValueError(f"adapters of mixed ranks {sorted(ranks)}")
  return ranks.pop()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapted:
  """A weight with its adapter: `base` (an array or quant.QArray), `a`, `b`; `scale` = alpha / r, static."""
  base: object
  a: jax.Array
  b: jax.Array
  scale: float = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self):
    return self.base.shape

  @property
  def ndim(self):
    return len(self.base.shape)

  @property
  def dtype(self):
    return self.base.dtype

  def __getitem__(self, index):
    """Indexes leading stack axes (a layer, a fused weight's member) of the weight and both factors alike."""
    return Adapted(self.base[index], self.a[index], self.b[index], self.scale)

  def matmul(self, spec: str, x, compute_dtype):
    """x·W + (x·a)·b · scale, each dot through `layers.dot` in the compute dtype, float32 out."""
    ins, out = spec.replace(" ", "").split("->")
    xs, ws = ins.split(",")
    contracted = "".join(c for c in ws if c not in out)
    n_stack = self.a.ndim - 1 - len(contracted)
    stack = ws[:n_stack]
    if n_stack < 0 or any(c in contracted for c in stack) or self.b.ndim != len(ws) - len(contracted) + 1:
      raise ValueError(f"dot {spec!r}: the adapter's factors {self.a.shape}, {self.b.shape} do not fit the "
                       f"weight {self.shape}")
    a_spec = stack + contracted + "r"
    b_spec = stack + "".join(c for c in ws[n_stack:] if c in out) + "r"
    u_spec = stack + "".join(c for c in xs if c not in contracted) + "r"
    y = layers.dot(spec, x, self.base, compute_dtype)
    u = layers.dot(f"{xs},{a_spec}->{u_spec}", x, self.a, compute_dtype)
    return y + self.scale * layers.dot(f"{u_spec},{b_spec}->{out}", u, self.b, compute_dtype)


def apply(params: dict, adapters: dict, *, alpha: float) -> dict:
  """`params` with every adapted weight replaced by an `Adapted` leaf (nested tree in, nested tree out)."""
  ab = adapted_paths(adapters)
  flat = tree.flatten(params)
  missing = sorted(set(ab) - set(flat))
  if missing:
    raise ValueError(f"adapters for {missing} have no weight in the params")
  scale = alpha / rank_of(adapters)
  for path, f in ab.items():
    _check_fits(path, flat[path].shape, f["a"].shape, f["b"].shape)
    flat[path] = Adapted(flat[path], f["a"], f["b"], scale)
  return tree.unflatten(flat)


def _check_fits(path, shape, a_shape, b_shape):
  n_stack, ins, outs = layout(path, shape)
  r = a_shape[-1]
  want_a = tuple(shape[:n_stack]) + tuple(shape[i] for i in ins) + (r,)
  want_b = tuple(shape[:n_stack]) + tuple(shape[i] for i in outs) + (r,)
  if tuple(a_shape) != want_a or tuple(b_shape) != want_b:
    raise ValueError(f"{path} {tuple(shape)}: adapter a {tuple(a_shape)}, b {tuple(b_shape)}; expected a {want_a}, "
                     f"b {want_b}")


def delta(path: str, shape, a, b, scale: float):
  """The adapter's update of the weight, scale · a·b in the weight's own layout (float32)."""
  n_stack, ins, outs = layout(path, shape)
  letters = "ABCDEFGHIJKLMNOPQ"[:len(shape)]
  a_spec = letters[:n_stack] + "".join(letters[i] for i in ins) + "r"
  b_spec = letters[:n_stack] + "".join(letters[i] for i in outs) + "r"
  return scale * jnp.einsum(f"{a_spec},{b_spec}->{letters}", a, b, precision="highest")


def merge(params: dict, adapters: dict, *, alpha: float) -> dict:
  """A plain tree: each adapted weight W + a·b·alpha/r, in W's dtype (a quantized W is dequantized to float32
  first); every other leaf as given."""
  ab = adapted_paths(adapters)
  flat = tree.flatten(params)
  scale = alpha / rank_of(adapters)
  for path, f in ab.items():
    w = flat[path]
    _check_fits(path, w.shape, f["a"].shape, f["b"].shape)
    base = quant.dequantize(w) if quant.is_quantized(w) else w
    dtype = jnp.float32 if quant.is_quantized(w) else w.dtype
    merged = base.astype(jnp.float32) + delta(path, w.shape, f["a"], f["b"], scale)
    flat[path] = np.asarray(merged, dtype) if isinstance(w, np.ndarray) else merged.astype(dtype)
  return tree.unflatten(flat)


def num_params(adapters: dict) -> int:
  return sum(int(np.prod(x.shape)) for x in tree.flatten(adapters).values())
