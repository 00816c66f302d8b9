"""Checkpoint I/O in big_vision's npz layout: one `.npy` member per leaf, "/"-joined keys, layers stacked.

Every checkpoint quirk lives here (reference: big_vision `utils.py` load_params / npz save, `paligemma.load`):
  - numpy stores bfloat16 as raw 2-byte void ('V2'): re-viewed as ml_dtypes.bfloat16 on load, written the
    same way on save, so files go both ways between pgjax and big_vision unchanged;
  - keys may carry a leading "params/" (big_vision's load_params accepts one): stripped on load;
  - large PaliGemma 2 files ship as byte-level pieces `name.npz.part0`, `.part1`, ...: read in place through
    one seekable file object that spans them, never concatenated;
  - checkpoints are data, never code: object (pickled) members are refused, reads use allow_pickle=False.

Loading streams: the .npy headers (shape, dtype) are read first and checked against the config's manifest
before any data; then one member at a time is read, converted, placed on device and dropped, so peak host
memory stays near the largest leaf. Saving streams the same way into a temp file renamed into place.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import glob
import hashlib
import io
import math
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Mapping

import jax
import ml_dtypes
import numpy as np

from pgjax import config as config_lib
from pgjax import files, paligemma, tree

# Where a file holds more than the params, the tree they sit under (big_vision's load_params), first match.
_ROOTS = ("params/", "opt/target/")
_BF16_AS_VOID, _BF16 = np.dtype("V2"), np.dtype(ml_dtypes.bfloat16)
# Leaf dtypes a checkpoint may hold. Weights are floating point; anything else (int, bool, complex, bytes,
# big-endian) would load and compute nonsense or fail later naming no key. Integers are allowed only outside the
# two towers, for the optimizer step counts loop.py saves in opt_state.npz (keys "0000", ...).
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), _BF16_AS_VOID)
_PARAM_TOWERS = ("img/", "llm/")
_READ_HEADER = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
_PART_RE = re.compile(r"^(.*)\.part[-_]?(\d+)$")
# Shape-determined fields; everything else in a config cannot be read off a checkpoint.
_VISION_SHAPE_FIELDS = ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim")
_LLM_SHAPE_FIELDS = ("vocab_size", "width", "depth", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "post_norms")
_LLM_UNSHAPED = ("attn_logits_softcap", "final_logits_softcap", "query_pre_attn_scalar")


class CheckpointError(ValueError):
  """A checkpoint that cannot be used as asked: corrupt, pickled, or not matching the config."""


# checkpoint.flatten / unflatten predate pgjax/tree.py; the names stay for the code that calls them here.
flatten, unflatten = tree.flatten, tree.unflatten


# ----------------------------------------------------------------------------------------------- shapes

def manifest(cfg: config_lib.PaliGemmaConfig) -> dict[str, tuple[int, ...]]:
  """{path: shape} of the param tree `cfg` describes, computed without allocating it."""
  shapes = jax.eval_shape(lambda key: paligemma.init(key, cfg), jax.random.key(0))
  return {k: tuple(v.shape) for k, v in tree.flatten(shapes).items()}


# ------------------------------------------------------------------------------------ opening files

def _pieces(path: str) -> list[str]:
  """[path], or the ordered `path.partN` pieces when `path` is missing or is itself one of the pieces."""
  m = _PART_RE.match(path)
  if os.path.exists(path) and not m:
    return [path]
  base = m.group(1) if m else path
  found = {}
  for p in glob.glob(glob.escape(base) + ".part*"):
    mp = _PART_RE.match(p)
    if mp and mp.group(1) == base:
      if int(mp.group(2)) in found:
        raise CheckpointError(f"{path}: two pieces share number {int(mp.group(2))}: {found[int(mp.group(2))]}, {p}")
      found[int(mp.group(2))] = p
  if not found:
    raise FileNotFoundError(errno.ENOENT, "no such checkpoint, nor .part* pieces of it", path)
  nums = sorted(found)
  if nums[0] not in (0, 1) or nums != list(range(nums[0], nums[0] + len(nums))):
    raise CheckpointError(f"{path}: pieces are not numbered consecutively from 0 or 1: {[found[n] for n in nums]}")
  return [found[n] for n in nums]


class _Pieces(io.RawIOBase):
  """A read-only, seekable file spanning byte-level pieces in order; reads go straight to the pieces."""

  def __init__(self, paths: list[str]):
    self._files = [open(p, "rb") for p in paths]
    self._starts = [0]
    for f in self._files:
      self._starts.append(self._starts[-1] + os.fstat(f.fileno()).st_size)
    self._pos = 0

  def readable(self):
    return True

  def seekable(self):
    return True

  def tell(self):
    return self._pos

  def seek(self, offset, whence=io.SEEK_SET):
    pos = offset + {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._starts[-1]}[whence]
    if pos < 0:
      raise OSError(errno.EINVAL, "negative seek position")
    self._pos = pos
    return pos

  def readinto(self, buf):
    view, n = memoryview(buf).cast("B"), 0
    while n < len(view) and self._pos < self._starts[-1]:
      i = bisect.bisect_right(self._starts, self._pos) - 1
      f = self._files[i]
      f.seek(self._pos - self._starts[i])
      got = f.readinto(view[n:n + min(len(view) - n, self._starts[i + 1] - self._pos)])
      if not got:
        raise OSError(errno.EIO, "piece shrank while reading", f.name)
      n, self._pos = n + got, self._pos + got
    return n

  def close(self):
    for f in self._files:
      f.close()
    super().close()


@contextlib.contextmanager
def _errors(path, key=None):
  """Turns the many ways a broken zip/npy can fail into one CheckpointError naming the file (and key)."""
  try:
    yield
  except CheckpointError:
    raise
  except (zipfile.BadZipFile, zlib.error, struct.error, EOFError, OSError, ValueError, NotImplementedError) as e:
    where = f"{path}" + (f", key {key!r}" if key else "")
    raise CheckpointError(f"{where}: truncated or corrupt npz ({type(e).__name__}: {e})") from e


@contextlib.contextmanager
def _open_zip(path):
  pieces = _pieces(os.fspath(path))
  for piece in pieces:
    files.regular_file(piece, "checkpoint")
  fobj = open(pieces[0], "rb") if len(pieces) == 1 else _Pieces(pieces)
  try:
    with _errors(path):
      zf = zipfile.ZipFile(fobj)
    with zf:
      yield zf
  finally:
    fobj.close()


def _members(zf: zipfile.ZipFile, path) -> dict[str, tuple[zipfile.ZipInfo, tuple[int, ...], np.dtype]]:
  """key -> (member, shape, dtype) from the .npy headers only; refuses pickled members before any data is read.

  As big_vision's `load_params`: where the file has a top-level "params" tree (a training state saved whole:
  params beside optimizer state and step), that tree alone is the checkpoint, "opt/target" likewise in older
  files; the other members are not read.
  """
  out = {}
  infos = [info for info in zf.infolist() if not info.is_dir()]
  names = [info.filename.removesuffix(".npy") for info in infos]
  root = next((r for r in _ROOTS if any(n.startswith(r) for n in names)), "")
  for info, key in zip(infos, names):
    if not key.startswith(root):
      continue
    with _errors(path, key), zf.open(info) as fp:
      version = np.lib.format.read_magic(fp)
      if version not in _READ_HEADER:
        raise CheckpointError(f"{path}, key {key!r}: .npy format version {version} is not supported")
      shape, _, dtype = _READ_HEADER[version](fp)
    if dtype.hasobject:
      raise CheckpointError(f"{path}, key {key!r}: holds a pickled object array (dtype {dtype}); "
                            "checkpoints are data, never code, so it is not unpickled")
    key = key.removeprefix(root)
    _check_dtype(path, key, dtype)
    out[key] = (info, tuple(shape), _BF16 if dtype == _BF16_AS_VOID else dtype)
  return out


_Q_PARTS = ("__q_codes", "__q_scale", "__q_meta")  # a quantized leaf's record (quant.to_arrays)
_Q_DTYPES = {"__q_codes": (np.dtype(np.int8), np.dtype(np.uint8)), "__q_meta": (np.dtype(np.int32),)}


def _check_dtype(path, key: str, dtype: np.dtype) -> None:
  """Refuses a member whose header dtype cannot be a leaf, before its data is read.

  Values are not scanned for NaN/Inf here: that is a full pass over every byte. Training stops on a
  non-finite loss or params (loop.py); `train.all_finite(params)` checks a loaded tree on demand.
  """
  if dtype in _FLOAT_DTYPES:
    return
  if dtype.kind in "iu" and dtype.isnative and not key.startswith(_PARAM_TOWERS):
    return
  if dtype in _Q_DTYPES.get(key.rpartition("/")[2], ()):  # a quantized leaf's codes and record (quant.to_arrays)
    return
  allowed = "float16, float32, float64 or bfloat16 (stored as 'V2')"
  if not key.startswith(_PARAM_TOWERS):
    allowed += ", or an integer for optimizer state"
  raise CheckpointError(f"{path}, key {key!r}: dtype {dtype} is not a checkpoint leaf type; "
                        f"expected {allowed}")


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path, key: str) -> np.ndarray:
  """One member as an array, read in 1 MiB chunks into a 64-byte-aligned buffer.

  Reading chunk-wise avoids a second full-size temporary; the alignment lets jax on CPU adopt the
  buffer instead of copying it, so loading peaks near the params plus one chunk. zip CRCs are verified
  when the member is read to its end. Headers were checked for pickles in _members.
  """
  with _errors(path, key), zf.open(info) as fp:
    version = np.lib.format.read_magic(fp)
    shape, fortran, dtype = _READ_HEADER[version](fp)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > info.file_size:  # checked before the allocation: a damaged header must not ask for terabytes
      raise CheckpointError(f"{path}, key {key!r}: its header's shape {shape} needs {nbytes:,d} bytes, but the "
                            f"member holds {info.file_size:,d}")
    raw = np.empty(nbytes + 64, np.uint8)
    offset = (-raw.ctypes.data) % 64
    buf = memoryview(raw[offset:offset + nbytes])
    done = 0
    while done < nbytes:
      got = fp.readinto(buf[done:done + (1 << 20)])  # zipfile copies each chunk a few times: keep it small
      if not got:
        raise EOFError(f"member ends after {done} of {nbytes} bytes")
      done += got
    if fp.read(1):
      raise CheckpointError(f"{path}, key {key!r}: more data than its header's shape {shape} holds")
    arr = raw[offset:offset + nbytes].view(dtype).reshape(shape, order="F" if fortran else "C")
  return arr.view(_BF16) if arr.dtype == _BF16_AS_VOID else arr


def read_shapes(path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{key: (shape, dtype)} from the .npy headers alone (bf16 reported as bfloat16, "params/" stripped). A
  quantized leaf's record is reported as one leaf of the weight's shape in int8 or int4 (its small record
  read for that)."""
  with _open_zip(path) as zf:
    members = _members(zf, path)
    out = {k: (shape, dt) for k, (_, shape, dt) in members.items() if k.rpartition("/")[2] not in _Q_PARTS}
    for name, (info, _, _) in members.items():
      key, _, part = name.rpartition("/")
      if part == "__q_meta":
        meta = [int(m) for m in _read(zf, info, path, name)]
        out[key] = (tuple(meta[2:2 + meta[1]]), np.dtype(np.int8) if meta[0] == 8 else np.dtype(ml_dtypes.int4))
        # (int4 is the weight's meaning; the file holds its codes packed two per byte)
    return out


def fingerprint(path) -> dict:
  """What a checkpoint holds, by content rather than by path: its size in bytes and a SHA-256 over every
  member's name, size and CRC-32 as the zip's directory records them (the writer's checksum of each array's
  bytes). Only the directory is read, not the data. An identical copy elsewhere has the same fingerprint; a
  file replaced at the same path does not. A resume compares it with the checkpoint's."""
  h = hashlib.sha256()
  with _open_zip(path) as zf:
    for info in zf.infolist():
      h.update(f"{info.filename}\0{info.file_size}\0{info.CRC:08x}\n".encode())
  return {"bytes": sum(os.path.getsize(p) for p in _pieces(os.fspath(path))), "sha256": h.hexdigest()}


def iter_arrays(path):
  """Yields (key, numpy array) one leaf at a time, bf16 recovered; drop each array to keep host memory low."""
  with _open_zip(path) as zf:
    for key, (info, _, _) in _members(zf, path).items():
      yield key, _read(zf, info, path, key)


# ----------------------------------------------------------------------------------------- load/save

def check_shapes(source, found: Mapping, expected: Mapping, what: str = "the config", hint: bool = True) -> None:
  """Raises one CheckpointError naming every missing, unexpected and mis-shaped key of `found` ({key: shape})
  against `expected` ({key: shape}), so a bad file is fixed in one go rather than one key per run.

  source names the file (or tree) in the message, `what` what it was checked against. With hint, a file whose
  shapes describe a preset (or another valid config) says so: the usual cause is the wrong --config.
  """
  missing = sorted(expected.keys() - found.keys())
  unexpected = sorted(found.keys() - expected.keys())
  mismatched = sorted(k for k in expected.keys() & found.keys() if tuple(found[k]) != tuple(expected[k]))
  if not (missing or unexpected or mismatched):
    return
  lines = [f"{source}: does not match {what} ({len(missing)} missing, {len(unexpected)} unexpected, "
           f"{len(mismatched)} mis-shaped keys)"]
  lines += [f"  missing key {k}: expected shape {tuple(expected[k])}" for k in missing]
  lines += [f"  unexpected key {k}: shape {tuple(found[k])}" for k in unexpected]
  lines += [f"  shape mismatch {k}: expected {tuple(expected[k])}, found {tuple(found[k])}" for k in mismatched]
  if hint:
    with contextlib.suppress(CheckpointError):
      inferred = infer_config_from_shapes(found, source=source)
      names = [n for n, p in config_lib.PRESETS.items() if p == inferred]
      lines.append(f"  (the file's shapes describe preset {names[0]!r})" if names else
                   "  (checkpoint.infer_config(path) gives the config the file's shapes describe)")
  raise CheckpointError("\n".join(lines))


def _is_dtype_function(dtype) -> bool:
  if dtype is None:
    return False
  try:  # np.float32 and jnp.float16 are callable too, but they are dtypes
    np.dtype(dtype)
    return False
  except TypeError:
    return callable(dtype)




def _scale_sharding(codes_sharding, scale_shape):
  """A quantized leaf's scales placed like its codes, unsplit where they have too few entries to divide."""
  from jax.sharding import NamedSharding, PartitionSpec
  if not isinstance(codes_sharding, NamedSharding):
    return codes_sharding
  mesh = codes_sharding.mesh
  spec = tuple(codes_sharding.spec) + (None,) * (len(scale_shape) - len(codes_sharding.spec))
  return NamedSharding(mesh, PartitionSpec(*(a if a is not None and n > 1 and n % mesh.shape[a] == 0 else None
                                             for a, n in zip(spec, scale_shape))))


def _place(arr, sharding, key):
  if sharding is None:
    leaf = jax.device_put(arr)
  else:
    leaf = jax.make_array_from_callback(arr.shape, sharding, lambda i: arr[i])
  return leaf.block_until_ready()  # transfers are asynchronous: wait, so the host copy goes before the next read


def load(path, cfg: config_lib.PaliGemmaConfig | None = None, *, dtype=None, sharding=None, check: bool = True,
         progress=None, quantize: int | None = None, quantize_skip=None) -> dict:
  """Loads an npz checkpoint into a nested dict of jax arrays, leaf by leaf.

  path: `file.npz`, or a file shipped as `file.npz.part0`, `.part1`, ... (pass either name).
  cfg: with check=True, the file's keys and shapes must equal `manifest(cfg)`; one CheckpointError lists every
    missing, unexpected and mis-shaped key before any data is read.
  dtype: None keeps the file's dtype (float64 becomes float32 unless JAX runs with jax_enable_x64, as every
    JAX array does); a dtype converts every leaf; a callable (path, file_dtype) -> dtype or None
    chooses per leaf (e.g. trainable float32, frozen float16 straight from the file).
  sharding: None puts leaves on the default device; a callable (path, shape, dtype) -> jax.sharding.Sharding
    places each leaf with make_array_from_callback (each process reads the leaf and keeps its own shards).
  progress: None, or called as progress(bytes_done, bytes_total) after each leaf (file bytes, for a progress bar).
  quantize: 8 or 4: each matmul weight (quant.WEIGHTS) is quantized on the host as it is read (quant.quantize's
    rules), so the host holds one float leaf at a time beside the quantized tree; `quantize_skip(path)` -> True
    keeps a leaf float (e.g. the trainable ones). Leaves the file holds quantized (saved from a quantized tree)
    load as quant.QArray whatever `quantize` says.
  """
  from pgjax import quant
  pick_dtype = dtype if _is_dtype_function(dtype) else (lambda key, file_dtype: dtype)
  with _open_zip(path) as zf:
    members = _members(zf, path)
    records = {}  # weight key -> its quantized record's meta
    for name in members:
      key, _, part = name.rpartition("/")
      if part == "__q_meta":
        records[key] = _read(zf, members[name][0], path, name)
    shapes = {k: shape for k, (_, shape, _) in members.items() if k.rpartition("/")[2] not in _Q_PARTS}
    for key, meta in records.items():
      shapes[key] = tuple(int(m) for m in meta[2:2 + int(meta[1])])
    if cfg is not None and check:
      check_shapes(path, shapes, manifest(cfg))
    flat, done, total = {}, 0, sum(info.file_size for info, _, _ in members.values())
    for key in shapes:
      if key in records:
        codes = _read(zf, members[f"{key}/__q_codes"][0], path, f"{key}/__q_codes")
        scale = _read(zf, members[f"{key}/__q_scale"][0], path, f"{key}/__q_scale")
        q = quant.from_arrays(f"{path}: {key}", codes, scale, records[key])
        nbytes = sum(members[f"{key}/{p}"][0].file_size for p in _Q_PARTS)
      else:
        info, _, file_dtype = members[key]
        arr = _read(zf, info, path, key)
        nbytes = info.file_size
        axes = quant.input_axes(key)
        q = None
        if quantize and axes is not None and not (quantize_skip and quantize_skip(key)):
          q = quant.quantize_array(arr, axes, quantize)
        else:
          target = pick_dtype(key, file_dtype)
          if target is not None and arr.dtype != np.dtype(target):
            arr = arr.astype(target)
          flat[key] = _place(arr, None if sharding is None else sharding(key, arr.shape, arr.dtype), key)
        del arr
      if q is not None:
        codes_sh = None if sharding is None else sharding(key, q.codes.shape, q.codes.dtype)
        flat[key] = quant.QArray(_place(q.codes, codes_sh, key),
                                 _place(q.scale, None if codes_sh is None else _scale_sharding(codes_sh, q.scale.shape),
                                        key), q.in_axes, q.bits)
      done += nbytes
      if progress is not None:
        progress(done, total)
  return tree.unflatten(flat)


def save(path, params: Mapping) -> None:
  """Writes `params` (nested, or flat {"a/b": leaf}) as a big_vision npz, one leaf at a time, atomically.

  Members are "/"-joined keys + ".npy" (no "params/"), bfloat16 as 'V2' exactly as np.savez writes it. A
  quantized leaf (quant.QArray) is written as its codes, scales and a small record (big_vision cannot read those). The data
  goes to a temp file in the same directory, fsynced, then renamed over `path`; on any error the temp file is
  removed and a previous file at `path` is untouched. Leaves must be fully addressable by this process.
  """
  from pgjax import quant
  flat = {}
  for key, leaf in tree.flatten(params).items():  # a quantized leaf saves as its record (quant.to_arrays)
    flat.update(quant.to_arrays(key, leaf) if quant.is_quantized(leaf) else {key: leaf})
  with files.atomic_write(path) as f:
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
      for key in sorted(flat):
        arr = np.asarray(jax.device_get(flat[key]))
        if arr.dtype.hasobject:
          raise ValueError(f"leaf {key!r} has dtype {arr.dtype}; checkpoints hold numeric arrays only")
        big = arr.nbytes + (1 << 16) > zipfile.ZIP64_LIMIT  # zip64 sizes must be chosen before writing
        with zf.open(key + ".npy", "w", force_zip64=big) as member:
          np.lib.format.write_array(member, arr, allow_pickle=False)
        del arr


# ------------------------------------------------------------------------------------- infer_config

def _apply_overrides(cfg: config_lib.PaliGemmaConfig, overrides: Mapping) -> config_lib.PaliGemmaConfig:
  groups = {"vision": {}, "llm": {}, "": {}}
  for name, value in overrides.items():
    tower, _, field = name.rpartition(".")
    if tower not in groups:
      raise ValueError(f"override {name!r}: use 'vision.<field>', 'llm.<field>' or a top-level field")
    if field in {"vision": _VISION_SHAPE_FIELDS, "llm": _LLM_SHAPE_FIELDS, "": ()}[tower]:
      raise ValueError(f"override {name!r}: this field is read from the checkpoint's shapes")
    groups[tower][field] = value
  try:
    return dataclasses.replace(cfg, **groups[""], vision=dataclasses.replace(cfg.vision, **groups["vision"]),
                               llm=dataclasses.replace(cfg.llm, **groups["llm"]))
  except TypeError as e:
    raise ValueError(f"bad override in {dict(overrides)}: {e}") from None


def infer_config_from_shapes(shapes: Mapping, overrides: Mapping | None = None, *,
                             source: str = "checkpoint") -> config_lib.PaliGemmaConfig:
  """The PaliGemmaConfig whose param tree has exactly these {key: shape} (keys without "params/").

  Soft caps and query scaling cannot be seen in shapes: they come from the preset whose LLM has these shapes;
  a Gemma-1-shaped LLM (no post norms) that matches no preset gets the Gemma 1 defaults (no caps); a
  Gemma-2-shaped one that matches no preset needs them in `overrides`, dotted names applied with
  dataclasses.replace, e.g. {"llm.attn_logits_softcap": 50.0, "llm.final_logits_softcap": 30.0,
  "llm.query_pre_attn_scalar": None}. Overrides of other non-shape fields ("vision.compute_dtype", "remat",
  "llm.final_logits_softcap") are applied in every case.
  """
  shapes = {k: tuple(v) for k, v in shapes.items()}

  def get(key):
    if key not in shapes:
      raise CheckpointError(f"{source}: cannot infer the config, key {key!r} is missing")
    return shapes[key]

  try:
    p, _, _, vD = get("img/embedding/kernel")
    n_pos = get("img/pos_embedding")[1]
    if math.isqrt(n_pos) ** 2 != n_pos:
      raise CheckpointError(f"{source}: img/pos_embedding has {n_pos} positions, not a square grid")
    vL, _, vF = get("img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel")
    vN = get("img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel")[2]
    vision = config_lib.SigLIPConfig(image_size=math.isqrt(n_pos) * p, patch_size=p, width=vD, depth=vL,
                                     num_heads=vN, mlp_dim=vF)
    V, D = get("llm/embedder/input_embedding")
    if "llm/layers/attn/qkv_einsum/w" in shapes:
      L, _, N, _, H = get("llm/layers/attn/qkv_einsum/w")
      K = N
    else:
      L, N, _, H = get("llm/layers/attn/q_einsum/w")
      K = get("llm/layers/attn/kv_einsum/w")[2]
    F = get("llm/layers/mlp/gating_einsum")[3]
    llm = config_lib.GemmaConfig(vocab_size=V, width=D, depth=L, num_heads=N, num_kv_heads=K, head_dim=H,
                                 mlp_dim=F, post_norms="llm/layers/post_attention_norm/scale" in shapes)
  except CheckpointError:
    raise
  except (ValueError, TypeError, IndexError) as e:  # a shape of the wrong rank, or a config's own check
    raise CheckpointError(f"{source}: shapes describe no valid config ({type(e).__name__}: {e})") from e

  overrides = dict(overrides or {})
  known = {pr.llm for pr in config_lib.PRESETS.values()
           if all(getattr(pr.llm, f) == getattr(llm, f) for f in _LLM_SHAPE_FIELDS)}
  if len(known) == 1:
    llm = known.pop()
  elif llm.post_norms:
    needed = [f"llm.{f}" for f in _LLM_UNSHAPED if f"llm.{f}" not in overrides]
    if needed:
      raise CheckpointError(
          f"{source}: the LLM is Gemma-2-shaped (post norms; width {D}, depth {L}, heads {N}/{K}, head_dim {H}, "
          f"mlp {F}, vocab {V}) but matches no single preset, so {', '.join(needed)} cannot be inferred from "
          "shapes; pass them, e.g. infer_config(path, overrides={'llm.attn_logits_softcap': 50.0, "
          "'llm.final_logits_softcap': 30.0, 'llm.query_pre_attn_scalar': None}) (None means head_dim)")
  cfg = _apply_overrides(config_lib.PaliGemmaConfig(vision=vision, llm=llm), overrides)
  check_shapes(source, shapes, manifest(cfg), what="the config inferred from its shapes", hint=False)  # stray keys
  return cfg


def infer_config(path, overrides: Mapping | None = None) -> config_lib.PaliGemmaConfig:
  """The config a checkpoint's shapes describe (reads headers only; never looks at the file name)."""
  shapes = {k: shape for k, (shape, _) in read_shapes(path).items()}
  return infer_config_from_shapes(shapes, overrides, source=os.fspath(path))
