"""The demo's pretraining data: captions inferred from easy-vqa's questions."""

import re

from pgjax import demo


def _truth(rows):
  """image -> (colour, shape), from the caption rows."""
  return {r["image"]: tuple(r["suffix"].split()[1:]) for r in rows if r["prefix"] == "caption en"}


def test_captions_agree_with_every_question_about_their_image():
  caption = _truth(demo.captions("train"))
  assert len(caption) > 3000
  checked = 0
  for q in demo.questions("train"):
    if q["image"] not in caption:
      continue
    colour, shape = caption[q["image"]]
    if q["suffix"] in demo.COLORS:
      assert q["suffix"] == colour, q
    elif q["suffix"] in demo.SHAPES:
      assert q["suffix"] == shape, q
    else:  # yes/no about one named colour or shape, possibly negated
      words = re.findall(r"[a-z]+", q["prefix"])
      named = [w for w in words if w in demo.COLORS + demo.SHAPES]
      assert len(named) == 1, q
      holds = named[0] in (colour, shape)
      negated = "not" in words or "no" in words
      assert (q["suffix"] == "yes") == (holds != negated), q
    checked += 1
  assert checked > 30000
