"""Weight-only quantization of frozen matmul weights: int8 per output channel, int4 in groups of 64.

`quantize(params, bits=8|4)` replaces each matmul weight of both towers (the leaves `WEIGHTS` names) with a
`QArray`: integer codes in the leaf's own shape plus float32 scales. Norm scales, biases, position
embeddings and, unless asked, the token embedding stay as they are. The embedding doubles as the output
head and is gathered by token id; quantizing it costs the most accuracy per byte saved.

- int8: symmetric absmax per output channel, the max over the leaf's input axes: codes in [-127, 127],
  w ~ codes * absmax / 127.
- int4: symmetric absmax per group of 64 consecutive entries along the last input axis (the whole input
  when that axis does not divide by 64): codes in [-7, 7], packed two per byte (uint8) along that axis, in
  memory and on disk alike. Packed by hand rather than as JAX's int4 dtype: XLA:CPU widened int4 buffers to
  a byte each, for the whole stacked leaf at once, which made a 28B step's temporaries 30 GiB larger; bytes
  unpacked per layer inside the matmul (shifts and masks) cost what int8's convert costs. A leaf whose last
  input axis has odd length (SigLIP's patch embedding, 3 colour channels) gets int8 instead.

A QArray is a pytree node (its codes and scales are the children), so `lax.scan` slices a stacked one per
layer like any other leaf, sharding places its codes and scales, and `layers.dot` dequantizes it inside the
matmul (`QArray.matmul`): one layer's weight at a time, never a full-precision copy of the model. The
backward keeps the codes, not the dequantized weight, and recomputes it.

Axes: see pgjax/__init__.py.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from pgjax import layers, tree

GROUP = 64  # int4 group size along the input axis (bitsandbytes' and most int4 kernels' default)

# path regex (full match) -> the leaf's input (contracted) axes, counted from the end so that they hold for
# the stacked leaf, one layer's slice under the scan and a fused weight's member (w[0] of a J stack).
WEIGHTS: tuple[tuple[str, tuple[int, ...]], ...] = (
    (r"img/embedding/kernel", (-4, -3, -2)),                                          # p q C D
    (r"img/.*/MlpBlock_0/Dense_[01]/kernel", (-2,)),                                  # L D F, L F D
    (r"img/.*/MultiHeadDotProductAttention_0/(query|key|value)/kernel", (-3,)),       # L D N H
    (r"img/.*/MultiHeadDotProductAttention_0/out/kernel", (-3, -2)),                  # L N H D
    (r"img/head/kernel", (-2,)),                                                      # D E
    (r"llm/layers/attn/(q_einsum|kv_einsum|qkv_einsum)/w", (-2,)),                    # L [J] N|K D H
    (r"llm/layers/attn/attn_vec_einsum/w", (-3, -2)),                                 # L N H D
    (r"llm/layers/mlp/gating_einsum", (-2,)),                                         # L J D F
    (r"llm/layers/mlp/linear", (-2,)),                                                # L F D
)
EMBEDDING = "llm/embedder/input_embedding"


def input_axes(path: str) -> tuple[int, ...] | None:
  """The input axes of a matmul weight (negative), or None for a leaf that is no matmul weight."""
  for pattern, axes in WEIGHTS:
    if re.fullmatch(pattern, path):
      return axes
  return None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized weight: `codes` (int8 in the weight's shape; int4: uint8, two codes per byte along the last
  input axis, so that axis is half as long) and float32 `scale`: per output channel, the weight's shape with
  every input axis 1; grouped (int4), the weight's shape with one entry per group along the last input axis.
  `in_axes` (negative) and `bits` are static."""
  codes: jax.Array
  scale: jax.Array
  in_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  bits: int = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self):  # the weight's
    shape = tuple(self.codes.shape)
    if self.bits == 4:
      g = self.in_axes[-1] % len(shape)
      shape = shape[:g] + (2 * shape[g],) + shape[g + 1:]
    return shape

  @property
  def ndim(self):
    return self.codes.ndim

  @property
  def dtype(self):  # what the weight means, for code that asks a leaf its dtype
    return self.scale.dtype

  @property
  def nbytes(self) -> int:
    return self.codes.size * self.codes.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize

  def __getitem__(self, index):
    """Indexes leading axes (a layer, a fused weight's member), which come before every input axis."""
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > len(self.shape) + min(self.in_axes):
      raise IndexError(f"QArray {self.shape}: index {index} reaches an input axis {self.in_axes}")
    return QArray(self.codes[index], self.scale[index], self.in_axes, self.bits)

  def astype(self, dtype):
    return dequantize(self, dtype)

  def matmul(self, spec: str, x, compute_dtype):
    """`layers.dot(spec, x, self)`: the einsum with the weight dequantized to the compute dtype inside it."""
    ws = spec.replace(" ", "").split("->")[0].split(",")[1]
    out = spec.split("->")[1]
    contracted = tuple(i - len(ws) for i, c in enumerate(ws) if c not in out)
    if contracted != self.in_axes:
      raise ValueError(f"dot {spec!r}: the quantized weight {self.shape} has input axes {self.in_axes}, the "
                       f"einsum contracts {contracted}")
    return _qdot(spec, jnp.dtype(compute_dtype), x, self)


def _group_axis(shape, in_axes, bits) -> tuple[int, int]:
  """(the axis the scale is grouped along, its group size); group size 0: no grouping (per output channel)."""
  g = in_axes[-1] % len(shape)
  if bits == 4 and shape[g] % GROUP == 0 and shape[g] > GROUP:
    return g, GROUP
  return g, 0


def scale_shape(shape, in_axes, bits) -> tuple[int, ...]:
  g, size = _group_axis(shape, in_axes, bits)
  if size:
    return tuple(shape[g] // size if a == g else n for a, n in enumerate(shape))
  axes = {a % len(shape) for a in in_axes}
  return tuple(1 if a in axes else n for a, n in enumerate(shape))


def _bits_for(shape, in_axes, bits) -> int:
  """int4 packs pairs along the last input axis: an odd one gets int8."""
  return 8 if bits == 4 and shape[in_axes[-1] % len(shape)] % 2 else bits


SLICE_BYTES = 1 << 28  # a numpy leaf larger than this (as float32) is quantized one leading-axis slice at a time


def quantize_array(w, in_axes: tuple[int, ...], bits: int) -> QArray:
  """One weight, quantized (in numpy when given numpy: no device copy of the float leaf). A large numpy leaf
  is quantized one slice of its first axis at a time (the layer axis of a stacked leaf: never an input
  axis, so each slice quantizes alone): the float32 temporaries are then a slice's, not the leaf's. A 10B's
  stacked MLP weight is 8 GiB in float16 and would need ~4x that in float32 temporaries at once."""
  if bits not in (4, 8):
    raise ValueError(f"bits must be 8 or 4, got {bits}")
  bits = _bits_for(np.shape(w), in_axes, bits)
  if (isinstance(w, np.ndarray) and w.ndim + min(in_axes) > 0 and w.shape[0] > 1
      and w.size * 4 > SLICE_BYTES):
    first = quantize_array(w[0], in_axes, bits)
    codes = np.empty((len(w),) + first.codes.shape, first.codes.dtype)
    scale = np.empty((len(w),) + first.scale.shape, first.scale.dtype)
    codes[0], scale[0] = first.codes, first.scale
    for i in range(1, len(w)):
      part = quantize_array(w[i], in_axes, bits)
      codes[i], scale[i] = part.codes, part.scale
    return QArray(codes, scale, tuple(in_axes), bits)
  xp = np if isinstance(w, np.ndarray) else jnp
  w = xp.asarray(w, np.float32)
  axes = tuple(a % w.ndim for a in in_axes)
  g, size = _group_axis(w.shape, in_axes, bits)
  qmax = 127 if bits == 8 else 7
  if size:  # [..., n, size, ...]: the max over each group of `size` entries
    grouped = w.reshape(*w.shape[:g], w.shape[g] // size, size, *w.shape[g + 1:])
    scale = xp.max(xp.abs(grouped), axis=g + 1, keepdims=True) / qmax
    codes = xp.round(grouped / xp.where(scale == 0, 1, scale)).reshape(w.shape)
    scale = xp.squeeze(scale, axis=g + 1)
  else:
    scale = xp.max(xp.abs(w), axis=axes, keepdims=True) / qmax
    codes = xp.round(w / xp.where(scale == 0, 1, scale))
  codes = xp.clip(codes, -qmax, qmax).astype(np.int8)
  if bits == 4:
    codes = pack_int4(codes, in_axes[-1])
  # numpy in, numpy out: it stays on the host (checkpoint.load places it)
  return QArray(codes, scale.astype(np.float32), tuple(in_axes), bits)


def int_codes(q: QArray):
  """The codes as int8 in the weight's shape (int4 unpacked)."""
  return unpack_int4(q.codes, q.in_axes[-1]) if q.bits == 4 else q.codes


def dequantize(q: QArray, dtype=jnp.float32):
  """codes * scale in `dtype` (the multiply in float32, then the cast)."""
  g, size = _group_axis(q.shape, q.in_axes, q.bits)
  codes = int_codes(q).astype(jnp.float32)
  if size:
    shape = q.shape
    codes = codes.reshape(*shape[:g], shape[g] // size, size, *shape[g + 1:])
    w = (codes * jnp.expand_dims(q.scale, g + 1)).reshape(shape)
  else:
    w = codes * q.scale
  return w.astype(dtype)


# The dot's own backward: it keeps the codes and scales (a layer's slice of the stacked leaves, which the
# scan's backward reads in place) and dequantizes again, instead of keeping the float weight per layer.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _qdot(spec, cd, x, q):
  return layers.dot(spec, x, dequantize(q, cd), cd)


def _qdot_fwd(spec, cd, x, q):
  return _qdot(spec, cd, x, q), (x, q)


def _qdot_bwd(spec, cd, residuals, g_y):
  x, q = residuals
  dx_spec, _ = layers._transposed_specs(spec)
  g_x = layers.dot(dx_spec, g_y, dequantize(q, cd), cd).astype(x.dtype)
  zeros = QArray(np.zeros(q.codes.shape, jax.dtypes.float0), jnp.zeros_like(q.scale), q.in_axes, q.bits)
  return g_x, zeros  # frozen: the codes and scales get no gradient


_qdot.defvjp(_qdot_fwd, _qdot_bwd)


def is_quantized(leaf) -> bool:
  return isinstance(leaf, QArray)


def quantize(params: dict, bits: int, *, embedding: bool = False, skip=()) -> dict:
  """Every matmul weight of `params` (nested or flat "a/b" keys) as a QArray; other leaves unchanged.
  `embedding`: quantize the token embedding too (it is also the output head; off by default).
  `skip`: path regexes left unquantized (e.g. the leaves that will be trained). The result's codes and scales
  are host (numpy) arrays: place them with jax.device_put (sharding.param_shardings gives their shardings)."""
  flat = tree.flatten(params)
  out = {}
  for path, leaf in flat.items():
    axes = input_axes(path) if path != EMBEDDING or not embedding else (-1,)
    if axes is None or is_quantized(leaf) or any(re.fullmatch(s, path) for s in skip):
      out[path] = leaf
    else:  # on the host, as checkpoint.load quantizes: the same float32 arithmetic, so the same codes and scales
      out[path] = quantize_array(np.asarray(jax.device_get(leaf)), axes, bits)
  return tree.unflatten(out)


def quantize_shapes(params: dict, bits: int, *, embedding: bool = False, skip=()) -> dict:
  """What `quantize` makes, as jax.ShapeDtypeStructs, from leaves with .shape and .dtype alone (for compiling
  a quantized model's step without any weights: bench/memory.py)."""
  out = {}
  for path, leaf in tree.flatten(params).items():
    axes = input_axes(path) if path != EMBEDDING or not embedding else (-1,)
    if axes is None or any(re.fullmatch(s, path) for s in skip):
      out[path] = leaf
    else:
      shape = tuple(leaf.shape)
      b = _bits_for(shape, axes, bits)
      g = axes[-1] % len(shape)
      codes = shape if b == 8 else shape[:g] + (shape[g] // 2,) + shape[g + 1:]
      out[path] = QArray(jax.ShapeDtypeStruct(codes, jnp.int8 if b == 8 else jnp.uint8),
                         jax.ShapeDtypeStruct(scale_shape(shape, axes, b), jnp.float32), tuple(axes), b)
  return tree.unflatten(out)


def dequantize_tree(params: dict, dtype=jnp.float32) -> dict:
  """`params` with every QArray dequantized to `dtype`; other leaves unchanged."""
  return tree.unflatten({p: dequantize(x, dtype) if is_quantized(x) else x for p, x in tree.flatten(params).items()})


def describe(params: dict) -> dict:
  """{"int8": n, "int4": n, "float": n} leaves, for summaries."""
  counts = {"int8": 0, "int4": 0, "float": 0}
  for leaf in tree.flatten(params).values():
    counts[f"int{leaf.bits}" if is_quantized(leaf) else "float"] += 1
  return counts


# ------------------------------------------------------------------------------------------ on disk


def pack_int4(codes, axis: int):
  """int8 codes in [-8, 7] -> uint8, two per byte along `axis` (even length): entry 2i in the low nibble, 2i + 1
  in the high one. numpy or jax arrays alike."""
  xp = np if isinstance(codes, np.ndarray) else jnp
  axis = axis % codes.ndim
  pairs = codes.reshape(*codes.shape[:axis], codes.shape[axis] // 2, 2, *codes.shape[axis + 1:])
  lo, hi = (xp.take(pairs, i, axis=axis + 1).astype(xp.uint8) & 0x0F for i in (0, 1))
  return lo | (hi << 4)


def unpack_int4(packed, axis: int):
  """The inverse of `pack_int4`: int8 codes, `axis` twice as long."""
  xp = np if isinstance(packed, np.ndarray) else jnp
  axis = axis % packed.ndim
  lo, hi = (packed & 0x0F).astype(xp.int8), (packed >> 4).astype(xp.int8)
  both = xp.stack([lo, hi], axis=axis + 1)
  both = xp.where(both > 7, both - 16, both).astype(xp.int8)  # the nibbles' two's complement
  return both.reshape(*packed.shape[:axis], 2 * packed.shape[axis], *packed.shape[axis + 1:])


def to_arrays(path: str, q: QArray) -> dict:
  """The npz entries of one quantized leaf: `path`/__q_codes (int8, or int4's packed uint8, as held in memory),
  `path`/__q_scale and `path`/__q_meta, a small int32 record (bits, ndim, the weight's shape, its input axes), so
  that `from_arrays` needs nothing else."""
  meta = np.asarray([q.bits, len(q.shape), *q.shape, *q.in_axes], np.int32)
  return {f"{path}/__q_codes": np.asarray(jax.device_get(q.codes)),
          f"{path}/__q_scale": np.asarray(jax.device_get(q.scale), np.float32), f"{path}/__q_meta": meta}


def from_arrays(path: str, codes, scale, meta) -> QArray:
  """A QArray from the entries `to_arrays` wrote (host arrays); a bad record names the leaf."""
  meta = [int(m) for m in np.asarray(meta).reshape(-1)]
  try:
    bits, ndim = meta[0], meta[1]
    shape, in_axes = tuple(meta[2:2 + ndim]), tuple(meta[2 + ndim:])
    if bits not in (4, 8) or len(shape) != ndim or not in_axes or not all(-ndim <= a < 0 for a in in_axes):
      raise ValueError
    g = in_axes[-1] % ndim
    want = (shape if bits == 8 else shape[:g] + (shape[g] // 2,) + shape[g + 1:], np.int8 if bits == 8 else np.uint8)
    codes, scale = np.asarray(codes), np.asarray(scale)
    if (codes.shape, codes.dtype) != want or scale.dtype != np.float32 or \
        scale.shape != scale_shape(shape, in_axes, bits):
      raise ValueError
  except (ValueError, IndexError):
    raise ValueError(f"{path}: not a quantized leaf record (meta {meta}, codes {np.shape(codes)} "
                     f"{getattr(codes, 'dtype', '')}, scale {np.shape(scale)})") from None
  return QArray(codes, scale, in_axes, bits)
