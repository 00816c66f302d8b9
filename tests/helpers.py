"""Shared test fixtures: random params with every leaf non-trivial, and small prefix-LM batches."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from pgjax import paligemma


_RANDOM_PARAMS = {}  # (cfg, seed) -> the host copy: init compiles for ~10 s, and test modules ask again and again


def random_params(cfg, seed=0):
  """paligemma.init, with norm scales, biases and the (zero-initialised) image head made random too,
  so that a wrong norm offset or a dropped bias cannot hide behind a zero. Made once per (cfg, seed) in a
  test session; each call gets its own device arrays (a train step may donate them)."""
  if (cfg, seed) not in _RANDOM_PARAMS:
    _RANDOM_PARAMS[cfg, seed] = jax.tree.map(np.asarray, _random_params(cfg, seed))
  # a fresh host copy first: on CPU a device array may alias the numpy buffer it was made from
  return jax.tree.map(lambda x: jnp.asarray(np.array(x)), _RANDOM_PARAMS[cfg, seed])


def _random_params(cfg, seed):
  params = jax.jit(paligemma.init, static_argnums=1)(jax.random.key(seed), cfg)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  out = []
  for (path, leaf), k in zip(leaves, keys):
    name = "/".join(p.key for p in path)
    if name == "img/head/kernel":
      leaf = jax.random.normal(k, leaf.shape) * leaf.shape[0] ** -0.5
    elif name.endswith(("scale", "bias")):
      leaf = leaf + 0.2 * jax.random.normal(k, leaf.shape)
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


def prefix_lm_batch(cfg, lengths, seq_len, seed=0):
  """A right-padded training batch laid out as big_vision builds it.

  lengths: (prefix_len, suffix_len) per row, prefix_len counting bos and "\\n", suffix_len the eos.
  Padding: text 0, mask_ar 1, mask_loss 0, mask_input 0.
  """
  rng = np.random.default_rng(seed)
  B = len(lengths)
  text = np.zeros((B, seq_len), np.int32)
  mask_ar = np.ones((B, seq_len), np.int32)
  mask_loss = np.zeros((B, seq_len), np.int32)
  mask_input = np.zeros((B, seq_len), np.int32)
  for b, (np_, ns) in enumerate(lengths):
    assert np_ + ns <= seq_len
    text[b, :np_ + ns] = rng.integers(3, cfg.llm.vocab_size, np_ + ns)
    text[b, 0] = 2  # bos
    text[b, np_ + ns - 1] = 1  # eos
    mask_ar[b, :np_] = 0
    mask_loss[b, np_:np_ + ns] = 1
    mask_input[b, :np_ + ns] = 1
  s = cfg.vision.image_size
  image = rng.uniform(-1, 1, (B, s, s, 3)).astype(np.float32)
  return dict(image=image, text=text, mask_ar=mask_ar, mask_loss=mask_loss, mask_input=mask_input)


def screenshot(html_path, png_path, size=(1200, 1600)):
  """Renders a local HTML file in headless Chromium; returns the screenshot as an RGB uint8 array."""
  import os
  import subprocess
  from PIL import Image
  png_path = str(png_path)
  cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={png_path}.profile", f"--screenshot={png_path}", f"--window-size={size[0]},{size[1]}",
         "file://" + os.path.abspath(html_path)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
  assert os.path.exists(png_path), proc.stderr[-2000:]
  return np.asarray(Image.open(png_path).convert("RGB"))


def jaxpr_eqns(jaxpr, *, scan_lengths: bool = True):
  """(equation, times it runs) for every equation of a jaxpr and of the jaxprs inside it: a scan body's
  equations `length` times (or once, as XLA's cost analysis counts them, with scan_lengths=False)."""
  for eqn in jaxpr.eqns:
    yield eqn, 1
    assert eqn.primitive.name != "while", "a while loop's trip count is unknown here"
    times = eqn.params["length"] if eqn.primitive.name == "scan" and scan_lengths else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from ((e, times * t) for e, t in jaxpr_eqns(inner, scan_lengths=scan_lengths))



# float32's machine epsilon, 2**-23: the spacing of float32 numbers in [1, 2).
EPS32 = float(np.finfo(np.float32).eps)


def _leaves_by_path(tree):
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def assert_close_f32(actual, expected, *, ulps_of_max: float, what: str = "", floor: float = 0.0,
                     scale: float | None = None):
  """Per leaf of two trees of the same structure: |actual - expected| <= ulps_of_max * EPS32 * max|expected|
  + floor, elementwise; with `scale`, that magnitude instead of each leaf's max|expected|.

  Why the leaf's largest magnitude and not each element's: two float32 computations of the same math that
  sum in different orders (another CPU's vector width, another fusion, another batch blocking) differ by a
  few roundings of the partial sums, and those are as large as the terms summed, which the leaf's largest
  values bound, whatever the size of the element that comes out (a small gradient element is a sum of
  large terms that cancel). A bound per element (rtol) is then too tight on small elements, and a fixed
  atol too tight or too loose depending on the leaf's scale. `ulps_of_max` is stated by each caller with
  its reason; `floor` is for leaves whose expected values may all be zero, `scale` for trees whose small
  leaves come from cancellation among terms as large as the other leaves' values. Leaves that are not floating
  point compare exactly. The message names the leaf, the worst element's index, both values, the bound
  and the error in units of EPS32 * max|expected|.
  """
  a_leaves, e_leaves = _leaves_by_path(actual), _leaves_by_path(expected)
  assert a_leaves.keys() == e_leaves.keys(), (what, sorted(a_leaves), sorted(e_leaves))
  for path, e in e_leaves.items():
    a, e = np.asarray(a_leaves[path]), np.asarray(e)
    name = f"{what}{path}" or "the value"
    assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
    if not (np.issubdtype(e.dtype, np.floating) or np.issubdtype(a.dtype, np.floating)):
      np.testing.assert_array_equal(a, e, err_msg=name)
      continue
    a64, e64 = a.astype(np.float64), e.astype(np.float64)
    assert np.isfinite(a64).all() and np.isfinite(e64).all(), f"{name}: non-finite values"
    leaf_scale = (float(np.abs(e64).max()) if e64.size else 0.0) if scale is None else scale
    bound = ulps_of_max * EPS32 * leaf_scale + floor
    err = np.abs(a64 - e64)
    if os.environ.get("PGJAX_TEST_PRINT_ULPS"):  # to see how much of each bound a machine uses
      used = float(err.max()) / (EPS32 * leaf_scale) if leaf_scale and err.size else 0.0
      print(f"ulps {name}: {used:.2f} of {ulps_of_max} (scale {leaf_scale:.3g}); "
            f"{float(err.max()) / bound if bound and err.size else 0.0:.1%} of the bound")
    if err.size and not (err <= bound).all():
      i = np.unravel_index(int(np.argmax(err - bound)), err.shape)
      raise AssertionError(
          f"{name}: |actual - expected| = {err[i]:.3g} at index {tuple(int(j) for j in i)} (actual {a64[i]!r}, "
          f"expected {e64[i]!r}) exceeds the bound {bound:.3g} = {ulps_of_max} * eps32 * scale ({leaf_scale:.3g}, "
          f"{'max|expected|' if scale is None else 'given'}) + {floor:g}; the largest error is "
          f"{err.max() / (EPS32 * leaf_scale) if leaf_scale else np.inf:.1f} eps32 * scale")


def sharpen(params, logits_scale: float = 1.0):
  """Larger attention and MLP outputs than at init (x30), and logits x`logits_scale`: as initialised, a tiny
  model repeats one token; these give peaked, varied next-token distributions, so eos can stop a row early and
  decoders that differ in how they choose give different texts. In place; returns params."""
  lp = params["llm"]["layers"]
  lp["mlp"]["linear"] = lp["mlp"]["linear"] * 30
  lp["attn"]["attn_vec_einsum"]["w"] = lp["attn"]["attn_vec_einsum"]["w"] * 30
  for n in ("post_attention_norm", "post_ffw_norm"):  # Gemma 2 normalises the outputs: scale the norms
    if n in lp:
      lp[n]["scale"] = (1 + lp[n]["scale"]) * 30 - 1
  if logits_scale != 1.0:
    fn = params["llm"]["final_norm"]
    fn["scale"] = (1 + fn["scale"]) * logits_scale - 1
  return params
