"""Tests for pgjax/checkpoint.py: the npz layout, bf16-as-void, streaming, pieces, atomic saves, bad files."""

import dataclasses
import os
import re
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgjax import checkpoint, config, tree

TINY = ["tiny-gemma1-mqa", "tiny-gemma1-mha", "tiny-gemma2-gqa"]
MANIFESTS = os.path.join(os.path.dirname(__file__), os.pardir, "weights", "manifests")


def _params(name, dtype=np.float32, seed=0):
  """Random values in every leaf of the preset's tree (init leaves norms and the head at zero), so that
  bit-exactness means something. numpy, not jax.random: no compilation per shape, so the tests stay fast."""
  rng = np.random.default_rng(seed)
  flat = {k: rng.standard_normal(shape, np.float32).astype(dtype)
          for k, shape in checkpoint.manifest(config.get(name)).items()}
  return tree.unflatten(flat)


def _bits(x):
  x = np.asarray(x)
  return x.view(f"u{x.dtype.itemsize}")


def _assert_identical(a, b):
  fa, fb = tree.flatten(a), tree.flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
    np.testing.assert_array_equal(_bits(fa[k]), _bits(fb[k]), err_msg=k)


def _read_manifest(name):
  shapes = {}
  with open(os.path.join(MANIFESTS, f"{name}.txt")) as f:
    for line in f:
      if line.strip() and not line.startswith("#"):
        key, shape = line.rstrip("\n").split("\t")
        shapes[key] = tuple(int(d) for d in shape.split(",") if d)
  return shapes


# ------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16], ids=["f32", "f16", "bf16"])
def test_round_trip_bit_exact(tmp_path, name, dtype):
  params = _params(name, dtype)
  path = tmp_path / "ckpt.npz"
  checkpoint.save(path, params)
  loaded = checkpoint.load(path, config.get(name))
  _assert_identical(params, loaded)
  assert isinstance(loaded["llm"]["layers"]["mlp"]["linear"], jax.Array)
  # What numpy itself sees: one member per "/"-joined key, no pickle, bf16 as raw 2-byte void.
  with np.load(path, allow_pickle=False) as npz:
    assert sorted(npz.files) == sorted(tree.flatten(params))
    expected = np.dtype("V2") if dtype == jnp.bfloat16 else np.dtype(dtype)
    assert {npz[k].dtype for k in npz.files} == {expected}


def test_layout_matches_big_vision_np_savez(tmp_path):
  """A file written by np.savez of the flattened tree (big_vision's writer) loads, and ours matches it byte for byte."""
  flat = {k: np.asarray(v) for k, v in tree.flatten(_params("tiny-gemma1-mqa", jnp.bfloat16)).items()}
  np.savez(tmp_path / "bv.npz", **flat)
  checkpoint.save(tmp_path / "ours.npz", flat)  # a flat dict is accepted too
  _assert_identical(checkpoint.load(tmp_path / "bv.npz"), checkpoint.load(tmp_path / "ours.npz"))
  with zipfile.ZipFile(tmp_path / "bv.npz") as a, zipfile.ZipFile(tmp_path / "ours.npz") as b:
    for name in sorted(a.namelist()):
      assert a.read(name) == b.read(name), name  # identical .npy members, header included
  np.savez_compressed(tmp_path / "deflated.npz", **flat)  # deflated members read the same way
  _assert_identical(flat, checkpoint.load(tmp_path / "deflated.npz"))
  assert checkpoint.read_shapes(tmp_path / "deflated.npz")["llm/final_norm/scale"] == ((64,), jnp.bfloat16)


def test_params_prefix_accepted(tmp_path):
  params = _params("tiny-gemma2-gqa")
  np.savez(tmp_path / "p.npz", **{f"params/{k}": np.asarray(v) for k, v in tree.flatten(params).items()})
  _assert_identical(params, checkpoint.load(tmp_path / "p.npz", config.get("tiny-gemma2-gqa")))
  assert "params/img/pos_embedding" not in checkpoint.read_shapes(tmp_path / "p.npz")


def test_a_whole_training_state_loads_its_params_tree(tmp_path):
  """As big_vision's load_params: a file holding params beside optimizer state and a step count (even a
  pickled member, which is never read) loads its "params" tree; an older file's "opt/target" tree likewise."""
  params = _params("tiny-gemma1-mqa")
  flat = {k: np.asarray(v) for k, v in tree.flatten(params).items()}
  np.savez(tmp_path / "state.npz", **{f"params/{k}": v for k, v in flat.items()}, step=np.int64(7),
           **{"opt/0/count": np.int32(3), "opt/1/mu/llm/final_norm/scale": flat["llm/final_norm/scale"],
              "extra": np.array([{"a": 1}], dtype=object)})
  _assert_identical(params, checkpoint.load(tmp_path / "state.npz", config.get("tiny-gemma1-mqa")))
  np.savez(tmp_path / "old.npz", **{f"opt/target/{k}": v for k, v in flat.items()}, **{"opt/state/count": np.int32(3)})
  _assert_identical(params, checkpoint.load(tmp_path / "old.npz", config.get("tiny-gemma1-mqa")))


def test_dtype_fixed_and_callable(tmp_path):
  params = _params("tiny-gemma1-mqa", jnp.bfloat16)
  checkpoint.save(tmp_path / "c.npz", params)
  seen = {}

  def split_precision(path, file_dtype):
    seen[path] = file_dtype
    return jnp.float32 if path.startswith("llm/layers/attn/") else jnp.float16

  loaded = tree.flatten(checkpoint.load(tmp_path / "c.npz", dtype=split_precision))
  assert set(seen.values()) == {np.dtype(jnp.bfloat16)}
  for k, v in tree.flatten(params).items():
    want = jnp.float32 if k.startswith("llm/layers/attn/") else jnp.float16
    assert loaded[k].dtype == want, k
    np.testing.assert_array_equal(np.asarray(loaded[k]), np.asarray(v).astype(want), err_msg=k)
  as_f32 = tree.flatten(checkpoint.load(tmp_path / "c.npz", dtype=np.float32))
  assert {v.dtype for v in as_f32.values()} == {np.dtype(np.float32)}


def test_progress_reports_file_bytes_to_the_total(tmp_path):
  params = _params("tiny-gemma1-mqa")
  checkpoint.save(tmp_path / "c.npz", params)
  calls = []
  checkpoint.load(tmp_path / "c.npz", progress=lambda done, total: calls.append((done, total)))
  with zipfile.ZipFile(tmp_path / "c.npz") as zf:
    sizes = [i.file_size for i in zf.infolist()]
  assert len(calls) == len(sizes) == len(tree.flatten(params))  # once per leaf
  assert {t for _, t in calls} == {sum(sizes)}
  done = [d for d, _ in calls]
  assert done == sorted(done) and len(set(done)) == len(done) and done[-1] == sum(sizes)


def test_sharding_callable(tmp_path):
  params = _params("tiny-gemma1-mqa")
  checkpoint.save(tmp_path / "s.npz", params)
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.array(devices), ("x",))
  calls = []

  def shard(path, shape, dtype):
    calls.append((path, shape, dtype))
    spec = jax.sharding.PartitionSpec("x") if shape and shape[0] % len(devices) == 0 else jax.sharding.PartitionSpec()
    return jax.sharding.NamedSharding(mesh, spec)

  loaded = tree.flatten(checkpoint.load(tmp_path / "s.npz", config.get("tiny-gemma1-mqa"), sharding=shard))
  assert len(calls) == len(loaded)
  for path, shape, dtype in calls:
    leaf = loaded[path]
    assert isinstance(leaf.sharding, jax.sharding.NamedSharding) and leaf.shape == shape and leaf.dtype == dtype
  table = loaded["llm/embedder/input_embedding"]  # 384 rows divide any small device count
  if len(devices) > 1:
    assert table.sharding.spec == jax.sharding.PartitionSpec("x")
    assert {s.data.shape[0] for s in table.addressable_shards} == {384 // len(devices)}
  _assert_identical(params, tree.unflatten(loaded))


# ---------------------------------------------------------------------------------------- bad files

UNPICKLED = []


def _mark():
  UNPICKLED.append("unpickled")


class _Boom:
  """Unpickling this would call _mark: proves the loader never unpickles anything."""

  def __reduce__(self):
    return (_mark, ())


def test_pickled_member_refused(tmp_path):
  path = tmp_path / "evil.npz"
  np.savez(path, **{"img/pos_embedding": np.zeros((1, 16, 32), np.float32),
                    "llm/evil": np.array([_Boom()], dtype=object)})
  for fn in (checkpoint.load, checkpoint.read_shapes, checkpoint.infer_config):
    with pytest.raises(checkpoint.CheckpointError, match=r"(?s)evil\.npz.*'llm/evil'.*pickled"):
      fn(path)
  with pytest.raises(checkpoint.CheckpointError, match="llm/evil"):
    list(checkpoint.iter_arrays(path))
  assert UNPICKLED == []
  with pytest.raises(ValueError):  # and save never writes one
    checkpoint.save(tmp_path / "out.npz", {"a": np.array([{}], dtype=object)})
  assert not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("bad", [np.array([[1, 2]], np.int32), np.array([True, False]),
                                 np.array([1 + 2j], np.complex64), np.array([b"abcd"], "S4"), np.array(["ab"], "U2"),
                                 np.array([1.5], ">f4"), np.zeros(1, [("a", "i1"), ("b", "i1")])],
                         ids=["int32", "bool", "complex64", "bytes", "str", "big-endian", "structured-2-byte"])
def test_non_float_leaf_refused_naming_file_key_and_dtype(tmp_path, bad):
  """A weight must be float16/32/64 or bfloat16: anything else used to load and compute nonsense, or fail later
  naming no key. Refused from the header, before any data is read, whatever the entry point."""
  flat = {k: np.asarray(v) for k, v in tree.flatten(_params("tiny-gemma1-mqa")).items()}
  flat["llm/layers/attn/q_einsum/w"] = bad
  np.savez(tmp_path / "odd.npz", **flat)
  msg = rf"odd\.npz, key 'llm/layers/attn/q_einsum/w': dtype {re.escape(str(bad.dtype))} is not a checkpoint leaf type"
  for fn in (checkpoint.load, checkpoint.read_shapes, checkpoint.infer_config,
             lambda p: checkpoint.load(p, config.get("tiny-gemma1-mqa"), dtype=jnp.float32),
             lambda p: list(checkpoint.iter_arrays(p))):
    with pytest.raises(checkpoint.CheckpointError, match=msg):
      fn(tmp_path / "odd.npz")


def test_float_dtypes_and_optimizer_step_counts_load(tmp_path):
  """float16/32/64 and bf16 ('V2' on disk) weights load; integers load only outside img/ and llm/: the optimizer
  state loop.py saves holds optax's int32 step count (under keys "0000", ...)."""
  import ml_dtypes
  np.savez(tmp_path / "f.npz", **{"llm/a": np.array([0.5], np.float16), "llm/b": np.array([0.25], np.float32),
                                  "llm/c": np.array([2.0], np.float64),
                                  "img/d": np.array([1.5], ml_dtypes.bfloat16).view("V2")})
  loaded = tree.flatten(checkpoint.load(tmp_path / "f.npz"))
  f64 = "float64" if jax.config.x64_enabled else "float32"  # jax's own narrowing, not the loader's
  assert {k: (str(v.dtype), float(v[0])) for k, v in loaded.items()} == {
      "llm/a": ("float16", 0.5), "llm/b": ("float32", 0.25), "llm/c": (f64, 2.0), "img/d": ("bfloat16", 1.5)}
  checkpoint.save(tmp_path / "opt.npz", {"0000": np.array(7, np.int32), "0001": np.array([0.5], np.float32)})
  opt = checkpoint.load(tmp_path / "opt.npz")
  assert opt["0000"].dtype == np.int32 and int(opt["0000"]) == 7 and float(opt["0001"][0]) == 0.5
  np.savez(tmp_path / "flag.npz", **{"0000": np.array(True)})  # not even optimizer state holds a bool
  with pytest.raises(checkpoint.CheckpointError, match=r"flag\.npz, key '0000': dtype bool .*or an integer"):
    checkpoint.load(tmp_path / "flag.npz")


def test_mismatch_lists_every_problem_in_one_error(tmp_path):
  cfg = config.get("tiny-gemma1-mqa")
  flat = {k: np.asarray(v) for k, v in tree.flatten(_params("tiny-gemma1-mqa")).items()}
  del flat["llm/final_norm/scale"], flat["img/head/bias"]
  flat["llm/layers/extra/scale"] = np.zeros((2, 64), np.float32)
  flat["img/pos_embedding"] = np.zeros((1, 64, 32), np.float32)
  flat["llm/layers/mlp/linear"] = np.zeros((2, 96, 64), np.float32)
  np.savez(tmp_path / "bad.npz", **flat)
  with pytest.raises(checkpoint.CheckpointError) as info:
    checkpoint.load(tmp_path / "bad.npz", cfg)
  msg = str(info.value)
  assert "bad.npz" in msg and "2 missing, 1 unexpected, 2 mis-shaped" in msg
  for expected in ("missing key llm/final_norm/scale: expected shape (64,)", "missing key img/head/bias",
                   "unexpected key llm/layers/extra/scale: shape (2, 64)",
                   "shape mismatch img/pos_embedding: expected (1, 16, 32), found (1, 64, 32)",
                   "shape mismatch llm/layers/mlp/linear: expected (2, 128, 64), found (2, 96, 64)"):
    assert expected in msg
  assert len(tree.flatten(checkpoint.load(tmp_path / "bad.npz", cfg, check=False))) == len(flat)


def test_mismatch_names_the_preset_the_file_holds(tmp_path):
  checkpoint.save(tmp_path / "g2.npz", _params("tiny-gemma2-gqa"))
  with pytest.raises(checkpoint.CheckpointError, match="describe preset 'tiny-gemma2-gqa'"):
    checkpoint.load(tmp_path / "g2.npz", config.get("tiny-gemma1-mqa"))


def test_truncated_and_corrupt_files(tmp_path):
  path = tmp_path / "t.npz"
  checkpoint.save(path, _params("tiny-gemma1-mqa"))
  data = path.read_bytes()
  cut = tmp_path / "cut.npz"
  for n in (len(data) // 2, len(data) - 10, 100):
    cut.write_bytes(data[:n])
    for fn in (checkpoint.load, checkpoint.infer_config):
      with pytest.raises(checkpoint.CheckpointError, match=r"cut\.npz.*(truncated|corrupt)"):
        fn(cut)
  # A flipped byte in the last data byte of a member: caught by the zip CRC, reported with its key.
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo("llm/layers/mlp/linear.npy")
  local = data[info.header_offset:info.header_offset + 30]
  start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
  bad = bytearray(data)
  bad[start + info.file_size - 1] ^= 0xFF
  (tmp_path / "crc.npz").write_bytes(bytes(bad))
  with pytest.raises(checkpoint.CheckpointError, match=r"crc\.npz, key 'llm/layers/mlp/linear'.*CRC"):
    checkpoint.load(tmp_path / "crc.npz")
  (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
  with pytest.raises(checkpoint.CheckpointError, match="junk.npz"):
    checkpoint.load(tmp_path / "junk.npz")
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    checkpoint.load(tmp_path / "nope.npz")


# ------------------------------------------------------------------------------------------ pieces

@pytest.mark.parametrize("numbering", ["part{}", "part0{}"])
def test_part_pieces_load_in_place(tmp_path, numbering):
  params = _params("tiny-gemma2-gqa", jnp.bfloat16)
  whole = tmp_path / "whole.npz"
  checkpoint.save(whole, params)
  data = whole.read_bytes()
  d = tmp_path / "split"
  d.mkdir()
  bounds = [0, len(data) // 3, 2 * len(data) // 3 + 7, len(data)]
  for i in range(3):
    (d / f"big.npz.{numbering.format(i)}").write_bytes(data[bounds[i]:bounds[i + 1]])
  before = sorted(os.listdir(d))
  cfg = config.get("tiny-gemma2-gqa")
  _assert_identical(params, checkpoint.load(d / "big.npz", cfg))  # the name without the suffix
  _assert_identical(params, checkpoint.load(d / f"big.npz.{numbering.format(0)}", cfg))  # or the first piece
  assert checkpoint.infer_config(d / "big.npz") == cfg
  assert sorted(os.listdir(d)) == before  # nothing concatenated on disk


def test_pieces_reader_is_a_seekable_view(tmp_path):
  data = bytes(range(256)) * 10
  paths = []
  for i, (a, b) in enumerate([(0, 100), (100, 100), (100, 1000), (1000, 2560)]):  # includes an empty piece
    paths.append(str(tmp_path / f"f.part{i}"))
    with open(paths[-1], "wb") as f:
      f.write(data[a:b])
  with checkpoint._Pieces(paths) as f:
    assert f.seek(0, os.SEEK_END) == len(data)
    f.seek(95)
    assert f.read(10) == data[95:105]
    f.seek(-5, os.SEEK_END)
    assert f.read(100) == data[-5:] and f.read(1) == b""
    f.seek(0)
    assert f.read() == data


def test_missing_piece_is_reported(tmp_path):
  for i in (0, 1, 3):
    (tmp_path / f"x.npz.part{i}").write_bytes(b"xx")
  with pytest.raises(checkpoint.CheckpointError, match="consecutively"):
    checkpoint.load(tmp_path / "x.npz")


# ------------------------------------------------------------------------------------------- saving

def test_atomic_save_keeps_previous_file(tmp_path):
  path = tmp_path / "ckpt.npz"
  old = _params("tiny-gemma1-mqa", seed=1)
  checkpoint.save(path, old)
  before = path.read_bytes()

  class Exploding:
    def __array__(self, *args, **kwargs):
      raise RuntimeError("disk full, say")

  new = tree.flatten(_params("tiny-gemma1-mqa", seed=2))
  new["zzz/last"] = Exploding()  # sorted last: every other leaf is already written when it fails
  with pytest.raises(RuntimeError, match="disk full"):
    checkpoint.save(path, new)
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["ckpt.npz"]  # no temp file left behind
  _assert_identical(old, checkpoint.load(path))


def test_save_sets_ordinary_permissions(tmp_path):
  path = tmp_path / "p.npz"
  checkpoint.save(path, {"a": np.zeros(3, np.float32)})
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
  os.chmod(path, 0o640)
  checkpoint.save(path, {"a": np.ones(3, np.float32)})
  assert os.stat(path).st_mode & 0o777 == 0o640


# ------------------------------------------------------------------------------------- infer_config

@pytest.mark.parametrize("name", TINY + ["tiny-gemma2-qscale"])
def test_infer_config_from_file(tmp_path, name):
  checkpoint.save(tmp_path / "c.npz", _params(name, jnp.float16))
  assert checkpoint.infer_config(tmp_path / "c.npz") == config.get(name)


@pytest.mark.parametrize("name", sorted(n[:-4] for n in os.listdir(MANIFESTS) if n.endswith(".txt")))
def test_infer_config_full_size_from_official_manifest(name):
  """Full-size shapes come from the independent manifests, so no weights are needed."""
  assert checkpoint.infer_config_from_shapes(_read_manifest(name)) == config.get(name)
  stray = {**_read_manifest(name), "img/stray": (3,)}
  with pytest.raises(checkpoint.CheckpointError, match="unexpected key img/stray"):
    checkpoint.infer_config_from_shapes(stray)


def test_infer_config_unknown_shapes():
  base = config.get("tiny-gemma2-gqa")
  odd = dataclasses.replace(base, llm=dataclasses.replace(base.llm, mlp_dim=96))
  with pytest.raises(checkpoint.CheckpointError) as info:
    checkpoint.infer_config_from_shapes(checkpoint.manifest(odd))
  for field in ("llm.attn_logits_softcap", "llm.final_logits_softcap", "llm.query_pre_attn_scalar", "overrides"):
    assert field in str(info.value)
  caps = {"llm.attn_logits_softcap": 50.0, "llm.final_logits_softcap": 30.0, "llm.query_pre_attn_scalar": None}
  assert checkpoint.infer_config_from_shapes(checkpoint.manifest(odd), caps) == odd
  # Gemma-1-shaped and unknown: defaults (no caps); other overrides apply on top of a preset.
  g1 = dataclasses.replace(base, llm=config.GemmaConfig(vocab_size=384, width=64, depth=3, num_heads=4,
                                                          num_kv_heads=1, head_dim=16, mlp_dim=128))
  assert checkpoint.infer_config_from_shapes(checkpoint.manifest(g1)) == g1
  got = checkpoint.infer_config_from_shapes(checkpoint.manifest(base), {"llm.final_logits_softcap": 0.0,
                                                                        "vision.compute_dtype": "bfloat16"})
  assert got.llm.final_logits_softcap == 0.0 and got.llm.attn_logits_softcap == 50.0
  assert got.vision.compute_dtype == "bfloat16"
  with pytest.raises(ValueError, match="read from the checkpoint's shapes"):
    checkpoint.infer_config_from_shapes(checkpoint.manifest(base), {"llm.width": 128})
  with pytest.raises(ValueError, match="bad override"):
    checkpoint.infer_config_from_shapes(checkpoint.manifest(base), {"llm.no_such_field": 1})


# ------------------------------------------------------------------------------------------- memory

def _memory_checkpoint(tmp_path):
  rng = np.random.default_rng(0)
  flat = {"big/leaf": rng.standard_normal(50 * 2**20 // 4, np.float32)}  # the largest leaf: 50 MiB
  flat.update({f"small/leaf{i:02d}": rng.standard_normal(5 * 2**20 // 4, np.float32) for i in range(30)})
  path = tmp_path / "mem.npz"
  checkpoint.save(path, flat)
  return path, 50 * 2**20, sum(v.nbytes for v in flat.values())  # 200 MiB in all


def test_load_peak_memory(tmp_path):
  """Peak RSS while loading stays near (loaded data + one leaf), not (whole file on host + loaded data)."""
  path, largest, total = _memory_checkpoint(tmp_path)
  script = textwrap.dedent(f"""
      import resource, jax, jax.numpy as jnp
      from pgjax import checkpoint
      jnp.zeros(8).block_until_ready()
      def rss(): return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
      before = rss()
      params = checkpoint.load({str(path)!r})
      jax.block_until_ready(params)
      # VmHWM belongs to this address space; ru_maxrss would carry the forking parent's RSS over exec.
      hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
      print(int(hwm.split()[1]) * 1024 - before)
  """)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
  peak = int(out.stdout.split()[-1])
  # On CPU the loaded arrays themselves live in host RAM (total); streaming adds about one leaf on top.
  # Reading everything first and then copying to the device would need about 2 * total = 400 MiB.
  assert peak < total + 2 * largest + 48 * 2**20, (peak / 2**20, total / 2**20)


def test_iter_arrays_streams(tmp_path):
  path, largest, total = _memory_checkpoint(tmp_path)
  tracemalloc.start()
  try:
    n = sum(1 for _ in checkpoint.iter_arrays(path))  # each array dropped before the next is read
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert n == 31 and largest <= peak < largest + 8 * 2**20, peak / 2**20


def test_a_header_asking_for_more_than_the_member_holds_is_refused_before_allocating(tmp_path):
  import zipfile
  with zipfile.ZipFile(tmp_path / "big.npz", "w") as zf:
    with zf.open("llm/x.npy", "w") as f:
      np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (2**20, 2**20)})
      f.write(b"\0" * 16)
  with pytest.raises(checkpoint.CheckpointError, match=r"llm/x'.*needs 4,398,046,511,104 bytes, but the member holds"):
    checkpoint.load(tmp_path / "big.npz")
