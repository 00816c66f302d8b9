"""Tests for pgjax/files.py: an atomic write replaces the whole file or nothing, with ordinary permissions."""

import os

import pytest

from pgjax import files


def _umask():
  umask = os.umask(0)
  os.umask(umask)
  return umask


def test_atomic_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
  path = tmp_path / "f.bin"
  with files.atomic_write(path) as f:
    f.write(b"one")
  with files.atomic_write(path) as f:
    f.write(b"two")
    assert path.read_bytes() == b"one"  # the new bytes are not visible before the block ends
  assert path.read_bytes() == b"two"
  files.atomic_write_text(tmp_path / "t.json", "{\"name\": \"caf\u00e9\"}\n")
  assert (tmp_path / "t.json").read_bytes() == "{\"name\": \"caf\u00e9\"}\n".encode("utf-8")
  assert sorted(os.listdir(tmp_path)) == ["f.bin", "t.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
  path = tmp_path / "f.txt"
  path.write_text("good")
  with pytest.raises(RuntimeError, match="half way"):
    with files.atomic_write(path, "w") as f:
      f.write("partial")
      raise RuntimeError("half way")
  assert path.read_text() == "good"
  assert os.listdir(tmp_path) == ["f.txt"]


def test_permissions_are_those_open_would_give(tmp_path):
  path = tmp_path / "new.txt"
  files.atomic_write_text(path, "x")  # mkstemp alone would leave it 0o600
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()
  os.chmod(path, 0o640)
  files.atomic_write_text(path, "y")  # overwriting keeps the old file's bits, as open(path, "w") does
  assert os.stat(path).st_mode & 0o777 == 0o640
  assert files.new_file_mode(path) == 0o640 and files.new_file_mode(tmp_path / "none") == 0o666 & ~_umask()


def test_only_whole_file_modes(tmp_path):
  for mode in ("a", "r+b", "ab"):
    with pytest.raises(ValueError, match="mode must be"):
      with files.atomic_write(tmp_path / "f", mode):
        pass
  assert os.listdir(tmp_path) == []
