"""Progress bars for long host loops (loading, evaluating, training): tqdm when it is installed, else nothing.

Used by the fine-tuning job and the `pgjax` command; the library's own functions take a plain
`progress(done, total)` callback and never print.
"""

from __future__ import annotations


class Bar:
  """A tqdm bar over `total` steps when tqdm is installed; otherwise a bar that shows nothing."""

  def __init__(self, total, desc, unit="it"):
    try:
      from tqdm import tqdm
      self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
    except ImportError:
      self.bar = None

  def update(self, n=1, **postfix):
    if self.bar is not None:
      self.bar.update(n)
      if postfix:
        self.bar.set_postfix(postfix, refresh=False)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def callback(desc, scale=1, unit="it"):
  """A progress(done, total) callback for checkpoint.load and evaluate: a bar made on the first call,
  closed when done reaches total (scale divides both, e.g. bytes -> MB)."""
  state = {}

  def progress(done, total):
    if "bar" not in state:
      state["bar"] = Bar(total // scale, desc, unit)
      state["n"] = 0
    n = done // scale
    state["bar"].update(n - state["n"])
    state["n"] = n
    if done >= total:
      state["bar"].close()
  return progress
