"""Param trees as nested dicts and as flat {"a/b/c": leaf} dicts, the checkpoint's own "/"-joined keys.

The modules that walk a param tree by path (checkpoint, hf, train, sharding, loop) share these two
functions, so they all agree on what a path is. Nothing here imports jax: leaves are never looked at.
"""

from __future__ import annotations

from collections.abc import Mapping


def flatten(tree: Mapping, prefix: str = "") -> dict:
  """{"a": {"b": x}} -> {"a/b": x}. Keys already holding "/" pass through, so flat dicts are accepted."""
  flat = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    for key, leaf in (flatten(v, name + "/").items() if isinstance(v, Mapping) else [(name, v)]):
      if key in flat:
        raise ValueError(f"key {key!r} occurs twice in the tree")
      flat[key] = leaf
  return flat


def unflatten(flat: Mapping) -> dict:
  """{"a/b": x} -> {"a": {"b": x}}."""
  tree = {}
  for path, leaf in flat.items():
    *parents, last = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ValueError(f"key {path!r} nests under a leaf")
    if last in node:
      raise ValueError(f"key {path!r} clashes with another key")
    node[last] = leaf
  return tree
