"""Shared by test_images, test_sources and test_data: a tiny tokenizer, a folder of images with its
train.jsonl, JSONL writing and batch comparison."""

import json
import random

import numpy as np
import pytest
from PIL import Image

from pgjax.tokenizer import Tokenizer, make_sentencepiece

SIZE, MAX_LEN = 8, 24
WORDS = "the a cat dog sits on mat runs in park red blue big small bird caption en answer detect left".split()


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
  rng = random.Random(0)
  texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) for _ in range(200)]
  return Tokenizer(make_sentencepiece(texts, tmp_path_factory.mktemp("tok") / "tiny.model", 300))


def _image(path, seed, shape=(12, 10, 3)):
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, np.uint8)).save(path)
  return path


def _write(path, lines):
  """Each line a dict (dumped as JSON) or a str/bytes written as is."""
  with open(path, "wb") as f:
    for line in lines:
      line = json.dumps(line) if isinstance(line, dict) else line
      f.write((line.encode() if isinstance(line, str) else line) + b"\n")
  return path


def _rows(n):
  return [dict(image=f"images/{i}.{'jpg' if i % 3 == 0 else 'png'}", prefix="caption en",
               suffix=" ".join(WORDS[(i + k) % len(WORDS)] for k in range(i % 4 + 1))) for i in range(n)]


@pytest.fixture
def folder(tmp_path):
  (tmp_path / "images").mkdir()
  for i, row in enumerate(_rows(7)):
    _image(tmp_path / row["image"], i)
  _write(tmp_path / "train.jsonl", _rows(7))
  return tmp_path


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _take(batches, n=None):
  with batches:
    return [b for _, b in zip(range(n) if n else iter(int, 1), batches)]


GOOD = dict(image="images/1.png", prefix="caption en", suffix="a cat")
