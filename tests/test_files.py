"""Tests for pgjax/files.py: an atomic write replaces the whole file or nothing, with ordinary permissions."""

import os
import re

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


def test_regular_file_names_what_a_special_file_is(tmp_path):
  fifo = tmp_path / "pipe"
  os.mkfifo(fifo)
  (tmp_path / "zero.npz").symlink_to("/dev/zero")
  (tmp_path / "real.npz").write_bytes(b"x")
  (tmp_path / "link.npz").symlink_to(tmp_path / "real.npz")
  assert files.regular_file(tmp_path / "link.npz") == str(tmp_path / "link.npz")  # a link to a file is a file
  for path, kind in ((fifo, "a FIFO (named pipe)"), (tmp_path / "zero.npz", "a character device"),
                     (tmp_path, "a directory")):
    with pytest.raises(files.NotARegularFile, match=f"checkpoint {path}: is {re.escape(kind)}, not a regular file"):
      files.regular_file(path, "checkpoint")
  with pytest.raises(FileNotFoundError, match="checkpoint not found"):
    files.regular_file(tmp_path / "missing.npz", "checkpoint")


def test_check_writable_refuses_folders_and_missing_parents(tmp_path):
  assert files.check_writable(tmp_path / "p.jsonl", "--predictions") == str(tmp_path / "p.jsonl")
  with pytest.raises(files.NotARegularFile, match=f"--predictions {tmp_path}: exists and is not a regular file"):
    files.check_writable(tmp_path, "--predictions")
  with pytest.raises(ValueError, match="does not exist"):
    files.check_writable(tmp_path / "no" / "p.jsonl", "--predictions")


def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch):
  """A write to an open file that fails (ENOSPC) names no path; atomic_write names the one it was writing,
  and the old file stays."""
  import errno
  (tmp_path / "f").write_bytes(b"old")

  with pytest.raises(OSError) as e:
    with files.atomic_write(tmp_path / "f") as f:
      f.write(b"new")
      raise OSError(errno.ENOSPC, "No space left on device")
  assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "f")
  assert (tmp_path / "f").read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["f"]
