"""Full-size param trees without weights: `jax.eval_shape(paligemma.init)` of every released preset equals the
official manifest in weights/manifests/ (written from published facts by make_manifests.py, not from pgjax),
and the parameter counts equal the published totals."""

import functools
import math
import os

import jax
import pytest

from pgjax import config, paligemma

MANIFESTS = os.path.join(os.path.dirname(__file__), os.pardir, "weights", "manifests")
RELEASED = [f"paligemma-3b-{r}" for r in (224, 448, 896)] + [
    f"paligemma2-{s}-{r}" for s in ("3b", "10b", "28b") for r in (224, 448, 896)]

# Published totals (big_vision eval_shape / the released checkpoints). PaliGemma 2 at 448 / 896 px differs from
# 224 px only in img/pos_embedding: (1024 - 256) or (4096 - 256) more rows of width 1152.
TOTALS = {"paligemma-3b-224": 2_923_335_408, "paligemma-3b-448": 2_924_220_144,
          "paligemma-3b-896": 2_927_759_088}
for _size, _total in (("3b", 3_032_094_960), ("10b", 9_662_409_456), ("28b", 27_650_192_112)):
  for _res in (224, 448, 896):
    TOTALS[f"paligemma2-{_size}-{_res}"] = _total + ((_res // 14) ** 2 - 256) * 1152


def _read(name):
  shapes = {}
  with open(os.path.join(MANIFESTS, f"{name}.txt")) as f:
    for line in f:
      if line.strip() and not line.startswith("#"):
        key, shape = line.rstrip("\n").split("\t")
        assert key not in shapes, key
        shapes[key] = tuple(int(d) for d in shape.split(",") if d)
  return shapes


@functools.cache
def _eval_shapes(name):
  tree = jax.eval_shape(functools.partial(paligemma.init, cfg=config.get(name)), jax.random.key(0))
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_every_released_preset_has_a_manifest():
  on_disk = sorted(n[:-4] for n in os.listdir(MANIFESTS) if n.endswith(".txt"))
  assert on_disk == sorted(RELEASED)
  released_presets = [n for n in config.PRESETS if not n.startswith("tiny-") and n != "bench-small"]
  assert sorted(released_presets) == sorted(RELEASED)


@pytest.mark.parametrize("name", RELEASED)
def test_manifest_is_sorted_and_counts_match(name):
  with open(os.path.join(MANIFESTS, f"{name}.txt")) as f:
    lines = f.read().splitlines()
  keys = [line.split("\t")[0] for line in lines if not line.startswith("#")]
  assert keys == sorted(keys)
  total = sum(math.prod(s) for s in _read(name).values())
  assert total == TOTALS[name]
  assert f"# total parameters: {TOTALS[name]}" in lines


@pytest.mark.parametrize("name", RELEASED)
def test_eval_shape_equals_manifest(name):
  expected, got = _read(name), _eval_shapes(name)
  assert sorted(got) == sorted(expected), (sorted(set(got) ^ set(expected)))
  mismatched = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
  assert not mismatched
  assert sum(math.prod(s) for s in got.values()) == TOTALS[name]


def test_paligemma_3b_attention_params():
  """The notebook's trainable set (llm/layers/attn/*): 18 x (8*2048*256 + 2*2048*256 + 8*256*2048)."""
  shapes = _eval_shapes("paligemma-3b-224")
  attn = sum(math.prod(s) for k, s in shapes.items() if k.startswith("llm/layers/attn/"))
  assert attn == 169_869_312
  assert sum(math.prod(s) for k, s in shapes.items() if k.startswith("img/")) == 414_803_696
  assert sum(math.prod(s) for k, s in shapes.items() if k.startswith("llm/")) == 2_508_531_712
