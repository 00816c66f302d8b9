"""Tests for pgjax/tree.py: nested <-> "/"-joined flat dicts, and the clashes that must not pass silently."""

import pytest

from pgjax import tree


def test_flatten_unflatten():
  nested = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
  assert tree.flatten(nested) == {"a/b": 1, "a/c/d": 2, "e": 3}
  assert tree.unflatten(tree.flatten(nested)) == nested
  assert tree.flatten({"a/b": 1, "c": {"d": 2}}) == {"a/b": 1, "c/d": 2}
  with pytest.raises(ValueError):
    tree.flatten({"a/b": 1, "a": {"b": 2}})
  with pytest.raises(ValueError):
    tree.unflatten({"a": 1, "a/b": 2})
