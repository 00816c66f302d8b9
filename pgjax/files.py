"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of either.

Checkpoints (npz, safetensors), their config.json and the training loop's state.json and LATEST all go
through `atomic_write`: the data goes to a temp file in the target's folder (a rename is atomic only within
one filesystem), is fsynced, gets the permission bits a plain open() would have given it, and is renamed
over the target; on any error the temp file is removed and the old file is untouched. The folder is fsynced
after the rename so that the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile


class NotARegularFile(ValueError):
  """A path to read names a FIFO, a device, a socket or a directory instead of a file."""


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def regular_file(path, what: str = "file") -> str:
  """`path`, checked to be a regular file (or a symlink to one) before anything opens it: opening a FIFO blocks
  forever, a device such as /dev/zero reads without end (a checkpoint reader would grow until the kernel kills
  it), and a folder fails deep inside with a bare IsADirectoryError. Raises NotARegularFile naming `what`, the
  path and what it is; FileNotFoundError (with the path) when there is nothing there."""
  path = os.fspath(path)
  try:
    mode = os.stat(path).st_mode  # follows symlinks: a link to a file is fine, a link to /dev/zero is not
  except FileNotFoundError:
    raise FileNotFoundError(errno.ENOENT, f"{what} not found", path) from None
  if not stat.S_ISREG(mode):
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise NotARegularFile(f"{what} {path}: is {kind}, not a regular file")
  return path


def check_writable(path, what: str = "output") -> str:
  """`path`, checked before the work that produces it: its folder exists and is writable, and it is not a
  folder or a special file itself. Raises ValueError naming `what` and the path."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.exists(path) and not os.path.isfile(path):
    raise NotARegularFile(f"{what} {path}: exists and is not a regular file")
  if not os.path.isdir(folder):
    raise ValueError(f"{what} {path}: folder {folder} does not exist")
  if not os.access(folder, os.W_OK):
    raise ValueError(f"{what} {path}: folder {folder} is not writable")
  return path


def new_file_mode(path) -> int:
  """The permission bits open(path, "w") would leave `path` with: an existing file's own, else 0o666 less
  the umask. mkstemp creates its file owner-only (0o600), which a checkpoint meant to be shared must not keep."""
  with contextlib.suppress(FileNotFoundError):
    return os.stat(path).st_mode & 0o7777  # overwriting keeps the old file's permissions
  umask = os.umask(0)  # the only way to read the umask is to set it
  os.umask(umask)
  return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
  """Yields a file open for writing ("wb", or "w" for UTF-8 text) that replaces `path` when the block
  ends without an error; on any error `path` is left as it was and the temp file is removed."""
  if mode not in ("wb", "w"):
    raise ValueError(f"atomic_write writes a whole new file: mode must be 'wb' or 'w', got {mode!r}")
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, new_file_mode(path))
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    if e.filename is None:  # a write to the open file (ENOSPC) names no path: name the one being written
      raise OSError(e.errno, e.strerror, path) from e
    raise
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  with contextlib.suppress(OSError):  # not every platform can open a directory
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)


def atomic_write_text(path, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically, as `atomic_write` does."""
  with atomic_write(path, "w") as f:
    f.write(text)
