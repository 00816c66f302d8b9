"""The demo's pretraining data: captions inferred from easy-vqa's questions, and the matching rows."""

import collections
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


def test_matches_half_true_and_a_false_phrase_changes_one_attribute():
  rows = demo.matches("train", seed=0)
  assert rows == demo.matches("train", seed=0) and rows != demo.matches("train", seed=1)  # seeded
  caption = _truth(rows)
  match = [r for r in rows if r["prefix"].startswith("match en ")]
  assert len(match) == 3 * len(caption) and len(rows) == 4 * len(caption)
  forms, answers, templates = collections.Counter(), collections.Counter(), collections.Counter()
  for r in match:
    colour, shape = caption[r["image"]]
    statement = r["prefix"][len("match en "):]
    # The phrase is read back from the text itself, not from the row's "match" field.
    attr = "|".join(demo.COLORS + demo.SHAPES)
    found = re.search(rf"\ba ({attr})(?: ({'|'.join(demo.SHAPES)}|shape))?\b", statement)
    words = [w for w in found.groups() if w]
    templates[statement[:found.start()] + "{}" + statement[found.end():]] += 1
    if len(words) == 1:  # "a circle"
      form, holds = "shape", words[0] == shape
      assert words[0] in demo.SHAPES
    elif words[1] == "shape":  # "a red shape"
      form, holds = "colour", words[0] == colour
      assert words[0] in demo.COLORS
    else:  # "a red circle": a false one differs in exactly one of the two
      form, holds = "both", (words[0], words[1]) == (colour, shape)
      assert words[0] in demo.COLORS and words[1] in demo.SHAPES
      assert (words[0] == colour) + (words[1] == shape) >= 1
    assert (r["suffix"] == "yes") == holds, r
    assert r["match"] == {"form": form, "phrase": "a " + " ".join(words)}
    forms[form] += 1
    answers[r["suffix"]] += 1
  assert set(templates) == set(demo.MATCH_TEMPLATES), templates
  assert all(abs(n / len(match) - 1 / 3) < 0.03 for n in forms.values()), forms
  assert abs(answers["yes"] / len(match) - 0.5) < 0.03, answers
