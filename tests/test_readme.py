"""The README's first Python snippet runs as written, in a fresh folder."""

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_snippet_runs_end_to_end(tmp_path):
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  snippet = blocks[0]
  assert "decode.greedy" in snippet and "checkpoint.load" in snippet
  out = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().startswith("'")  # printed the decoded text


def test_readme_decoding_snippet_runs_after_the_first(tmp_path):
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  (decoding,) = [b for b in blocks if "decode.beam_search(" in b]
  code = blocks[0] + decoding + "print(tokens.shape, score.shape, logp.shape)\n"
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == "(1, 8) (1,) (1, 8)"
