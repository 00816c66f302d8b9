"""Evaluation: padded batches predict each example once and as if alone; metric dispatch on hand-checkable
predictions; malformed target boxes refused before decoding. (<loc> text itself: test_detection.py; which task
a row is: test_metrics.py.)"""

import dataclasses
import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers import random_params
from pgjax import config, decode, evaluate
from pgjax.tokenizer import Tokenizer, make_sentencepiece

PREFIXES = ["caption en", "answer en what is on the mat", "detect cat ; dog", "ocr",
            "answer en is the big red bird over the house"]  # 5 examples: not a multiple of the batch size
MAX_NEW = 6
KW = dict(batch_size=2, max_new_tokens=MAX_NEW)  # one shape for every test here: one compilation


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  rng = random.Random(0)
  words = "the a cat dog sits on mat red bird over house caption en answer detect what is ocr big".split()
  texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(200)]
  tok = Tokenizer(make_sentencepiece(texts, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=300))
  cfg = config.get("tiny-gemma1-mqa")
  # The PaliGemma layout (loc and seg pieces at the end) needs a model vocabulary as big as the tokenizer's.
  cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=tok.vocab_size))
  params = random_params(cfg, seed=3)
  # As initialised, the tied embedding makes every row repeat its last prompt token ("\n"), which would
  # hide a mix-up of rows. Larger attention and MLP outputs give varied text; an eos embedding just
  # above one loc token's makes some rows stop early and others run to the limit.
  llm = params["llm"]
  llm["layers"]["mlp"]["linear"] = llm["layers"]["mlp"]["linear"] * 10
  llm["layers"]["attn"]["attn_vec_einsum"]["w"] = llm["layers"]["attn"]["attn_vec_einsum"]["w"] * 10
  e = llm["embedder"]["input_embedding"]
  llm["embedder"]["input_embedding"] = e.at[tok.eos_id].set(1.01 * e[tok.loc_id(770)])
  return cfg, params, tok


def _images(cfg, n, seed=0):
  s = cfg.vision.image_size
  return np.random.default_rng(seed).uniform(-1, 1, (n, s, s, 3)).astype(np.float32)


def _alone(cfg, params, tok, image, prefix, max_len):
  """One example decoded on its own (batch 1). The prompt keeps predict's length so that this compiles
  once; test_decode checks that right-padding a prompt changes nothing."""
  ex = tok.encode_example(prefix, None, max_len=max_len)
  tokens, logits, info = decode.greedy(params, image[None], ex["text"][None], ex["mask_input"][None], cfg=cfg,
                                       max_new_tokens=MAX_NEW, eos_id=tok.eos_id, return_info=True)
  k = int(info["num_tokens"][0])
  lp = np.asarray(jax.nn.log_softmax(np.asarray(logits[0, :k], np.float64), axis=-1))
  score = float(lp[np.arange(k), np.asarray(tokens[0, :k])].sum())  # the summed log-prob of the tokens
  return dict(prediction=tok.decode(np.asarray(tokens[0, :k])), num_tokens=k, hit_eos=bool(info["hit_eos"][0]),
              score=score)


def same_prediction(got, want):
  """Equal but for the score, which is float32 sums (batch and alone compile to other shapes): 64 eps32 of it."""
  assert {k: v for k, v in got.items() if k != "score"} == {k: v for k, v in want.items() if k != "score"}
  assert abs(got["score"] - want["score"]) <= 64 * 2 ** -23 * abs(want["score"]), (got, want)


class _FakeDevice:
  def __init__(self, stats):
    self.stats = stats

  def memory_stats(self):
    return self.stats


def test_view_fits_on_cpu_always_elsewhere_by_free_memory(monkeypatch):
  params = {"llm": {"a": np.zeros((1000,), np.float16), "b": {"c": np.zeros((10, 50), np.float32)}}}
  view_bytes = 4 * 1500  # float32 whatever the params' dtype
  assert evaluate.view_fits(params)  # the tests run on CPU
  monkeypatch.setattr(evaluate.jax, "default_backend", lambda: "gpu")
  for devices, want in [
      ([_FakeDevice({"bytes_limit": 2 * view_bytes, "bytes_in_use": 0})], True),  # exactly the headroom
      ([_FakeDevice({"bytes_limit": 2 * view_bytes, "bytes_in_use": 1})], False),
      ([_FakeDevice({"bytes_limit": 10 * view_bytes})], True),  # no bytes_in_use: nothing in use
      ([_FakeDevice({"bytes_limit": 10 * view_bytes}), _FakeDevice({"bytes_limit": view_bytes})], False),
      ([_FakeDevice(None)], False),  # no statistics: no view
      ([_FakeDevice({"bytes_in_use": 0})], False)]:
    monkeypatch.setattr(evaluate.jax, "local_devices", lambda devices=devices: devices)
    assert evaluate.view_fits(params) is want, [d.stats for d in devices]
  monkeypatch.setattr(evaluate.jax, "local_devices", lambda: [_FakeDevice({"bytes_limit": 3 * view_bytes})])
  assert evaluate.view_fits(params) and not evaluate.view_fits(params, headroom=4.0)


def test_padded_batches_predict_each_example_once_as_if_alone(model):
  cfg, params, tok = model
  images = _images(cfg, len(PREFIXES))
  before = decode._generate._cache_size()
  preds = evaluate.predict(params, cfg, tok, images, PREFIXES, **KW)
  # Three batches (2, 2, 1 + padding) of one shape: at most one compilation (none if cached already),
  # and none for another dataset size.
  assert decode._generate._cache_size() - before <= 1
  again = evaluate.predict(params, cfg, tok, images[:3], PREFIXES[:3], max_len=evaluate.prompt_len(tok, PREFIXES), **KW)
  assert decode._generate._cache_size() - before <= 1
  assert again == preds[:3]
  assert len(preds) == len(PREFIXES)
  # The model is varied enough for this to mean something: distinct texts, some rows cut at the limit.
  assert len({p["prediction"] for p in preds}) >= 3 and {p["hit_eos"] for p in preds} == {True, False}
  max_len = evaluate.prompt_len(tok, PREFIXES)
  for i, (image, prefix) in enumerate(zip(images, PREFIXES)):
    same_prediction(preds[i], _alone(cfg, params, tok, image, prefix, max_len))


def test_predict_accepts_paths_uint8_and_a_loader(model, tmp_path):
  cfg, params, tok = model
  rng = np.random.default_rng(1)
  raw = [rng.integers(0, 256, (40 + 10 * i, 70, 3), np.uint8) for i in range(3)]
  paths = []
  for i, a in enumerate(raw):
    paths.append(tmp_path / f"{i}.png")
    Image.fromarray(a).save(paths[-1])
  prefixes = PREFIXES[:3]
  kw = dict(KW, max_len=evaluate.prompt_len(tok, PREFIXES))
  from_paths = evaluate.predict(params, cfg, tok, [str(p) for p in paths], prefixes, **kw)
  assert evaluate.predict(params, cfg, tok, raw, prefixes, **kw) == from_paths
  loaded = []
  assert evaluate.predict(params, cfg, tok, lambda i: loaded.append(i) or paths[i], prefixes, **kw) == from_paths
  assert sorted(set(loaded)) == [0, 1, 2]
  with pytest.raises(ValueError, match=r"example 0: a float image must be preprocessed"):
    evaluate.predict(params, cfg, tok, np.zeros((3, 8, 8, 3), np.float32), prefixes, **kw)
  with pytest.raises(ValueError, match="2 images but 3 prefixes"):
    evaluate.predict(params, cfg, tok, raw[:2], prefixes, **kw)


def test_evaluate_end_to_end_counts_truncation(model):
  cfg, params, tok = model
  images = _images(cfg, 3, seed=2)
  rows = [dict(image=images[0], prefix="caption en", suffix="a red bird"),
          dict(image=images[1], prefix="ocr", suffix="cat"),
          dict(image=images[2], prefix="answer en what", suffix="dog")]
  out = evaluate.evaluate(params, cfg, tok, rows, task="exact", max_len=evaluate.prompt_len(tok, PREFIXES), **KW)
  preds = out["predictions"]
  assert [p["prefix"] for p in preds] == [r["prefix"] for r in rows]
  m = out["metrics"]
  assert m["count"] == 3 and m["task"] == "exact"
  assert m["truncated"] == sum(not p["hit_eos"] for p in preds)
  assert m["exact_match"] == sum(p["prediction"] == r["suffix"] for p, r in zip(preds, rows)) / 3
  calls = []
  again = evaluate.evaluate(params, cfg, tok, rows, task="exact", max_len=evaluate.prompt_len(tok, PREFIXES), **KW,
                            progress=lambda done, total: calls.append((done, total)))
  assert again["predictions"] == preds
  assert calls == [(min(b + KW["batch_size"], 3), 3) for b in range(0, 3, KW["batch_size"])]  # per batch, to the end
  with pytest.raises(ValueError, match="row 1 has no target"):  # found before any decoding
    evaluate.evaluate(params, cfg, tok, [rows[0], dict(image=images[1], prefix="ocr")], **KW)


def test_prompt_for():
  assert evaluate.prompt_for("caption") == "caption en"
  assert evaluate.prompt_for("caption", lang="de") == "caption de"
  assert evaluate.prompt_for("vqa", "what is it?") == "answer en what is it?"
  assert evaluate.prompt_for("detect", ["cat", "dog"]) == "detect cat ; dog"
  assert evaluate.prompt_for("detect", "cat") == "detect cat"
  with pytest.raises(ValueError):
    evaluate.prompt_for("vqa")


def test_score_vqa():
  rows = [dict(prefix="answer en q", answers=["yes"] * 10), dict(prefix="answer en q", answers=["yes"] * 10),
          dict(prefix="answer en q", answers=["cat"] * 2 + ["dog"] * 8)]
  preds = [dict(prediction="yes", hit_eos=True), dict(prediction="no", hit_eos=False),
           dict(prediction="cat", hit_eos=True)]
  m = evaluate.score(rows, preds)
  # 1, 0, and two of ten humans agreeing: 0.6 (official VQAv2 rule).
  assert m["task"] == "vqa" and m["accuracy"] == pytest.approx((1 + 0 + 0.6) / 3)
  assert m["exact_match"] == pytest.approx(2 / 3)  # "cat" is one of the acceptable answers
  assert m["truncated"] == 1 and m["count"] == 3
  # A single suffix works as a one-answer VQA target when the task is forced.
  assert evaluate.score([dict(prefix="x", suffix="Two")], ["Two"], task="vqa")["accuracy"] == 1.0


def test_score_exact_and_mixed():
  rows = [dict(prefix="ocr", suffix="a cat"), dict(prefix="ocr", suffix="dog"), dict(prefix="ocr", suffix="cat")]
  m = evaluate.score(rows, ["a cat", " dog ", "Cat"])
  assert m == {"exact_match": pytest.approx(2 / 3), "truncated": 0, "count": 3, "task": "exact"}
  mixed = evaluate.score(rows[:1] + [dict(prefix="answer en q", answers=["yes"] * 3)], ["a cat", "no"])
  assert mixed["task"] == "mixed" and mixed["vqa/accuracy"] == 0.0 and mixed["exact_match"] == 0.5


def test_score_caption():
  rows = [dict(prefix="caption en", suffix="a red bird flies over the house"),
          dict(prefix="caption en", references=["two dogs run in green grass"])]
  m = evaluate.score(rows, ["a red bird flies over the house", "two dogs run in green grass"])
  # Identical captions with no n-gram shared between the images: BLEU-4 and ROUGE-L are 1, and CIDEr-D is
  # 10 (cosine 1 for every n, no length penalty, times 10).
  assert m["task"] == "caption"
  assert m["bleu4"] == pytest.approx(1.0, abs=1e-6) and m["rouge_l"] == pytest.approx(1.0)
  assert m["cider"] == pytest.approx(10.0)


def test_score_detect():
  target = "<loc0000><loc0000><loc0511><loc0511> cat ; <loc0512><loc0512><loc1023><loc1023> dog"
  pred = ("<loc0000><loc0000><loc0511><loc0511> cat ; <loc0010><loc0000><loc0511><loc0511> cat ; "
          "<loc0000><loc0000><loc0300><loc0300> dog ; <loc0001><loc0002> broken")
  m = evaluate.score([dict(prefix="detect cat ; dog", suffix=target)], [pred])
  # cat matched once (its duplicate is a false positive), dog's box is off (IoU < 0.5), one broken group.
  assert m["task"] == "detect" and m["num_predicted_boxes"] == 3 and m["num_target_boxes"] == 2
  assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == pytest.approx(1 / 2)
  assert m["f1"] == pytest.approx(0.4) and m["malformed"] == 1
  # Labels must agree: the right box with the wrong name is not a hit.
  m = evaluate.score([dict(prefix="detect cat", suffix=target.split(" ; ")[0])],
                     ["<loc0000><loc0000><loc0511><loc0511> dog"])
  assert m["precision"] == 0.0 and m["recall"] == 0.0
  # Nothing there and nothing predicted is right.
  m = evaluate.score([dict(prefix="detect cat", suffix="")], [""])
  assert m["precision"] == 1.0 and m["recall"] == 1.0


def test_score_rejects_bad_input():
  with pytest.raises(ValueError, match="2 rows but 1 predictions"):
    evaluate.score([dict(prefix="a", suffix="b")] * 2, ["b"])
  with pytest.raises(ValueError, match="row 1 has no target"):
    evaluate.score([dict(prefix="a", suffix="b"), dict(prefix="caption en")], ["b", "c"])
  with pytest.raises(ValueError, match="row 0: 'answers' must be a list of strings"):
    evaluate.score([dict(prefix="a", answers="yes")], ["yes"])
  with pytest.raises(ValueError, match="row 0: detection needs a string 'suffix'"):
    evaluate.score([dict(prefix="detect cat", references=["<loc0001> cat"])], ["x"], task="detect")
  with pytest.raises(ValueError, match="unknown task 'depth'"):
    evaluate.score([dict(prefix="a", suffix="b")], ["b"], task="depth")
  with pytest.raises(ValueError, match="row 0: a segmentation row is scored with the segmentation VAE"):
    evaluate.score([dict(prefix="segment cat", suffix="b")], ["b"])
  # Rows read from a JSONL are named by file and line.
  with pytest.raises(ValueError, match="val.jsonl:7 has no target"):
    evaluate.score([dict(prefix="a", suffix="b"), dict(prefix="caption en", _source="val.jsonl:7")], ["b", "c"])


# --- <loc> boxes (their text format and IoU: test_detection.py).


def test_moved_names_stay_importable_from_evaluate():
  """evaluate.detection_metrics is public contract; the rest of the <loc> and task names lived here too."""
  from pgjax import detection, metrics
  for name in ("NUM_BINS", "box_iou", "detection_metrics", "encode_detections", "match_detections",
               "parse_detections"):
    assert getattr(evaluate, name) is getattr(detection, name), name
  for name in ("TASKS", "detect_task", "vqa_accuracy", "caption_metrics"):
    assert getattr(evaluate, name) is getattr(metrics, name), name


def test_malformed_target_boxes_are_refused_before_decoding():
  """A target group with three locs or an inverted box would drop out of the target count (recall 1.0 over
  one box instead of 1/3): refused, naming the row and the count."""
  L = lambda *b: "".join(f"<loc{x:04d}>" for x in b)  # noqa: E731
  target = L(0, 0, 500, 500) + " cat ; " + L(600, 600, 900) + " dog ; " + L(900, 900, 100, 100) + " bird"
  with pytest.raises(ValueError, match=r"val.jsonl:3: 2 target box\(es\) in 'suffix' are malformed"):
    evaluate.score([dict(prefix="detect cat ; dog ; bird", suffix=target, _source="val.jsonl:3")],
                   [L(0, 0, 500, 500) + " cat"])


def test_a_zero_area_box_scores_as_a_match_of_itself():
  """A one-bin-thin box has no area (detection.box_iou gives the same box IoU 1): a row whose target is one is
  scored, not refused, and its own box matches it."""
  L = lambda *b: "".join(f"<loc{x:04d}>" for x in b)  # noqa: E731
  m = evaluate.score([dict(prefix="detect cat", suffix=L(5, 5, 5, 5) + " cat")], [L(5, 5, 5, 5) + " cat"])
  assert m["precision"] == 1.0 and m["recall"] == 1.0


@pytest.mark.parametrize("task, key, expected", [("caption", "answers", 1.0), ("vqa", "references", 1.0)])
def test_a_forced_task_scores_against_the_list_a_row_has(task, key, expected):
  """--task caption on VQA rows (answers, no suffix) or --task vqa on caption rows: scored against the list
  the row has, not a KeyError after the decoding."""
  rows = [dict(prefix="caption en", **{key: ["a red circle"] * 4})]
  m = evaluate.score(rows, ["a red circle"], task=task)
  assert m["task"] == task
  assert (m["accuracy"] if task == "vqa" else m["bleu1"]) == pytest.approx(expected)


def test_predict_of_nothing_is_nothing(model):
  cfg, params, tok = model
  assert evaluate.predict(params, cfg, tok, [], []) == []


# ---------------------------------------------------------------------------------------------------
# Other decodings through predict, constrained outputs and scoring candidates.


def test_sampled_predictions_do_not_depend_on_the_batch_and_beam_runs_row_by_row(model):
  cfg, params, tok = model
  images = _images(cfg, len(PREFIXES))
  sampled = decode.Decoding(mode="sample", temperature=1.5, top_p=0.9, seed=4)
  a = evaluate.predict(params, cfg, tok, images, PREFIXES, decoding=sampled, **KW)
  b = evaluate.predict(params, cfg, tok, images, PREFIXES, decoding=sampled, **dict(KW, batch_size=3))
  # The same texts whatever the batching (example i draws from fold_in(key(seed), i)); scores to float32.
  for x, y in zip(a, b):
    same_prediction(x, y)
  other = evaluate.predict(params, cfg, tok, images, PREFIXES, decoding=dataclasses.replace(sampled, seed=5), **KW)
  assert [p["prediction"] for p in other] != [p["prediction"] for p in a]
  beam = decode.Decoding(mode="beam", beam_size=3)
  preds = evaluate.predict(params, cfg, tok, images, PREFIXES, decoding=beam, **KW)
  max_len = evaluate.prompt_len(tok, PREFIXES)
  for i, p in enumerate(preds):
    ex = tok.encode_example(PREFIXES[i], None, max_len=max_len)
    tokens, score, info = decode.beam_search(params, images[i:i + 1], ex["text"][None], ex["mask_input"][None],
                                             cfg=cfg, beam_size=3, max_new_tokens=MAX_NEW, eos_id=tok.eos_id,
                                             return_info=True)
    k = int(info["num_tokens"][0])
    same_prediction(p, dict(prediction=tok.decode(np.asarray(tokens[0, :k])), num_tokens=k,
                            hit_eos=bool(info["hit_eos"][0]), score=float(score[0])))
  res = evaluate.evaluate(params, cfg, tok, [{"image": images[i], "prefix": p, "suffix": "x"}
                                             for i, p in enumerate(PREFIXES)], decoding=beam, **KW)
  assert res["metrics"]["decoding"] == {"mode": "beam", "beam_size": 3}


def test_detect_constraint_gives_well_formed_boxes(model):
  cfg, params, tok = model
  from pgjax import detection, grammar
  images = _images(cfg, len(PREFIXES))
  free = evaluate.predict(params, cfg, tok, images, PREFIXES, **dict(KW, max_new_tokens=12))
  bad_free = sum(detection.parse_detections(p["prediction"], 1, 1, return_malformed=True)[1] for p in free)
  g = grammar.for_task(tok, cfg.llm.vocab_size, "detect")
  constrained = decode.Decoding(constrain="detect")
  preds = evaluate.predict(params, cfg, tok, images, PREFIXES, decoding=constrained, **dict(KW, max_new_tokens=12))
  max_len = evaluate.prompt_len(tok, PREFIXES)
  for i, p in enumerate(preds):
    ex = tok.encode_example(PREFIXES[i], None, max_len=max_len)
    tokens, _, info = decode.greedy(params, images[i:i + 1], ex["text"][None], ex["mask_input"][None], cfg=cfg,
                                    max_new_tokens=12, eos_id=tok.eos_id, grammar=g, return_info=True)
    ids = np.asarray(tokens[0, :int(info["num_tokens"][0])])
    assert grammar.accepts(g, ids)
    if p["hit_eos"]:  # a finished output is whole objects: 4 locs, then a label with a letter or digit
      groups = re.findall(r"((?:<loc\d{4}>)+)([^<]*)", p["prediction"])
      assert groups and all(len(locs) == 4 * 9 and re.search(r"\w", label.split(";")[0])
                            for locs, label in groups), p
  # Unconstrained, this model writes broken groups; constrained, the only malformed ones left are inverted
  # boxes (y1 < y0 or x1 < x0), which a grammar over token classes cannot see (pgjax/grammar.py).
  assert bad_free > 0


def test_score_candidates_is_the_summed_log_prob_of_each_suffix(model):
  cfg, params, tok = model
  images = _images(cfg, 2)
  prefixes = ["answer en what is on the mat", "caption en"]
  # Oracle: the candidate's summed log-prob from the cached decoder, fed the candidate's tokens one by one.
  candidates = [["a cat", "the red dog sits", "mat"], ["a bird"]]
  scores = evaluate.score_candidates(params, cfg, tok, images, prefixes, candidates, batch_size=3)
  assert [len(s) for s in scores] == [3, 1]
  for i, cands in enumerate(candidates):
    for c, got in zip(cands, scores[i]):
      ids = tok.encode(c) + [tok.eos_id]
      ex = tok.encode_example(prefixes[i], None, max_len=32)
      logits, cache = decode.prefill(params, images[i:i + 1], ex["text"][None], ex["mask_input"][None], cfg=cfg,
                                     cache_size=cfg.num_image_tokens + 32 + len(ids))
      want = 0.0
      for t in ids:
        want += float(jax.nn.log_softmax(logits[0])[t])
        logits, cache = decode.decode_step(params, jnp.array([t]), cache, cfg=cfg)
      assert abs(got - want) <= 64 * 2 ** -23 * abs(want), (c, got, want)
  with pytest.raises(ValueError, match="non-empty list of strings"):
    evaluate.score_candidates(params, cfg, tok, images, prefixes, [["a"], []])
