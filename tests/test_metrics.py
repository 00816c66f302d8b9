"""Metrics against literal values: the official VQA normalisation examples, VQA scores worked out from the
leave-one-out rule, and BLEU-4 / ROUGE-L / CIDEr-D values computed by hand on tiny corpora."""

import hashlib
import math

import pytest

from pgjax import metrics

needs_ptb = pytest.mark.skipif(metrics._ptb_jar() is None, reason="needs java and pycocoevalcap")


# --- VQA normalisation: the official examples -------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("t-shirt", "t shirt"),               # no space next to "-": becomes a space
    ("1,000 t-shirts", "1000 tshirts"),   # digit-comma-digit anywhere: every mark is deleted
    ("1,2", "12"),
    ("1, 2", "1 2"),                      # comma next to a space: deleted
    ("3.5", "3.5"), (".5", ".5"),         # a period before a digit stays
    ("5.", "5"), ("a.m.", "am"),
    ("yes!", "yes "), ("what?!", "what  "),
    ("(left) side", " left side"),        # "(" not next to a space, ")" is: "(" -> " ", ")" deleted
    ("don't", "don't"), ("#1 & 50%: *", "#1 & 50%: *"),   # ' # & % : * are not among the 21 marks
    ("a/b; c", "a b c"), ("a/b ;c", "a b c"),
])
def test_process_punctuation(text, expected):
  assert metrics.process_punctuation(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("two", "2"), ("Ten", "10"), ("none", "0"), ("zero", "0"), ("eleven", "eleven"),
    ("A", ""), ("the two dogs", "2 dogs"), ("An apple", "apple"),
    ("dont", "don't"), ("oclock", "o'clock"), ("Youll  see", "you'll see"),
    ("Im", "im"),            # the table's capitalised keys never match: lookup comes after lowercasing
    ("somebody'd", "somebodyd"),   # an official quirk, kept
])
def test_process_digit_article(text, expected):
  assert metrics.process_digit_article(text) == expected


def test_contractions_table_is_the_official_one():
  # sha256 of the sorted "key>value" lines of the contractions dict in GT-Vision-Lab/VQA
  # PythonEvaluationTools/vqaEvaluation/vqaEval.py at a013f00, computed from that file.
  table = metrics.CONTRACTIONS
  assert len(table) == 120
  digest = hashlib.sha256("\n".join(f"{k}>{v}" for k, v in sorted(table.items())).encode()).hexdigest()
  assert digest == "42398d743e42aaaa3e72d28332f6628d0bf975c776e4ddf4104f93d410e89539"
  assert len(metrics.PUNCTUATION) == 21


# --- VQA accuracy ---------------------------------------------------------------------------------

# k of 10 humans match: k left-out rounds see k-1 matches, 10-k see k; mean of min(1, count/3).
# k=1: (0 + 9/3)/10 = .3; k=2: (2/3 + 8*2/3)/10 = .6; k=3: (3*2/3 + 7)/10 = .9; k>=4: 1.
@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (9, 1.0)])
def test_vqa_leave_one_out(k, expected):
  answers = ["2"] * k + ["3"] * (10 - k)
  assert metrics.vqa_accuracy("Two.", answers) == pytest.approx(expected)   # normalised: "2"


def test_vqa_all_identical_answers_are_not_normalised():
  assert metrics.vqa_accuracy("Yes", ["yes"] * 10) == 0.0
  assert metrics.vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0     # whitespace is always handled
  assert metrics.vqa_accuracy("two", ["2"] * 10) == 0.0
  assert metrics.vqa_accuracy("two", ["2"] * 9 + ["3"]) == 1.0


def test_vqa_normalisation_end_to_end():
  assert metrics.vqa_accuracy("1,000", ["1000"] * 3 + ["one thousand"] * 7) == pytest.approx(0.9)
  assert metrics.vqa_accuracy("a dog", ["dog"] * 4 + ["cat"] * 6) == 1.0
  assert metrics.vqa_accuracy("Dont know", ["don't know"] * 2 + ["no"] * 8) == pytest.approx(0.6)
  assert metrics.vqa_accuracy("t-shirt", ["t shirt", "T-Shirt", "shirt\t"] + ["shirt"] * 7) == pytest.approx(0.6)
  # Leave-one-out is by position: duplicates count separately.
  assert metrics.vqa_accuracy("red", ["red", "Red ", "blue"] + ["green"] * 7) == pytest.approx(0.6)


def test_vqa_legacy_rule():
  # 2016: prediction always normalised, answers only punctuation-processed (and only if they differ).
  assert metrics.vqa_accuracy("Yes", ["yes"] * 10, legacy=True) == 1.0
  assert metrics.vqa_accuracy("a dog", ["a dog"] * 4 + ["cat"] * 6) == 1.0
  assert metrics.vqa_accuracy("a dog", ["a dog"] * 4 + ["cat"] * 6, legacy=True) == 0.0
  assert metrics.vqa_accuracy("Dog!", ["dog"] * 4 + ["cat"] * 6, legacy=True) == 1.0
  # Answers get no strip after punctuation there: "dog!" becomes "dog " and never matches.
  assert metrics.vqa_accuracy("dog", ["dog!"] * 4 + ["cat"] * 6, legacy=True) == 0.0


def test_vqa_other_answer_counts():
  assert metrics.vqa_accuracy("dog", ["dog"]) == 1.0
  assert metrics.vqa_accuracy("Dog", ["dog"]) == 0.0       # one answer: "all identical", no normalisation
  # n=2, threshold 1: both match -> 1; one matches -> (0 + 1) / 2.
  assert metrics.vqa_accuracy("dog", ["dog", "a dog"]) == 1.0
  assert metrics.vqa_accuracy("dog", ["dog", "cat"]) == 0.5
  # n=3, threshold 2: two match -> (1/2 + 1/2 + 1) / 3.
  assert metrics.vqa_accuracy("dog", ["dog", "dog", "cat"]) == pytest.approx(2 / 3)
  # n=5, the official threshold 3: two match -> (2 * 1/3 + 3 * 2/3) / 5.
  assert metrics.vqa_accuracy("dog", ["dog", "dog", "cat", "cow", "pig"]) == pytest.approx(8 / 15)
  with pytest.raises(ValueError):
    metrics.vqa_accuracy("dog", [])
  with pytest.raises(ValueError):
    metrics.vqa_accuracy("dog", "dog")


def test_vqa_batch_and_exact_match():
  preds = ["two", "Yes", "blue"]
  answers = [["2"] * 9 + ["3"], ["yes"] * 10, ["blue"] * 2 + ["red"] * 8]
  assert metrics.vqa_accuracy_batch(preds, answers) == pytest.approx((1.0 + 0.0 + 0.6) / 3)
  with pytest.raises(ValueError):
    metrics.vqa_accuracy_batch(preds, answers[:2])
  with pytest.raises(ValueError):
    metrics.vqa_accuracy_batch([], [])
  assert metrics.exact_match([" cat\n", "Cat", "a  cat", "dog"], ["cat", "cat", "a cat", ["cow", "dog "]]) == 0.5


# --- caption tokenisation -------------------------------------------------------------------------

CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two zebras standing next to each other in a field",
    "A close up of a plate of food with broccoli, carrots and rice.",
    'The "red" double-decker bus (London) isn\'t moving...',
    "It's 5 p.m. at Mr. Smith's house; the dogs' toys are on the U.S. flag!",
    "A cat can't sit on 1,000 mats: 50% of $5 is #1?!",
    "“Curly” quotes — and dashes – aren’t hard… right?",
    "",
    "   ",
    "multi\nline\rcaption",
    "Mrs. Jones at a St. Patrick's day parade -- x --- y - z, go!? hi?? done.. plan b. 90's, 3:30 o'clock",
]


def test_python_tokenizer_literals():
  assert metrics.python_tokenize(CAPTIONS[0]) == "a man riding a wave on top of a surfboard"
  assert metrics.python_tokenize(CAPTIONS[3]) == "the red double-decker bus -lrb- london -rrb- is n't moving"
  assert metrics.python_tokenize(CAPTIONS[5]) == "a cat ca n't sit on 1,000 mats 50 % of $ 5 is # 1 ?!"
  assert metrics.python_tokenize(CAPTIONS[9]) == "multi line caption"
  assert metrics.tokenize(["a  b ", "C."], "none") == (["a b", "C."], "none")


@needs_ptb
def test_python_tokenizer_agrees_with_ptb():
  toks, name = metrics.tokenize(CAPTIONS, "ptb")
  assert name == "ptb" and len(toks) == len(CAPTIONS)
  assert toks == [metrics.python_tokenize(c) for c in CAPTIONS]


# --- caption metrics: values worked out by hand ---------------------------------------------------

def test_identical_caption_scores():
  out = metrics.caption_metrics(["a cat sat on the mat"], [["a cat sat on the mat"]], tokenizer="python")
  assert out["bleu4"] == pytest.approx(1.0, abs=1e-9)
  assert out["rouge_l"] == 1.0
  assert out["cider"] == 0.0            # one image: every n-gram has df = N, so idf = 0
  assert out["tokenizer"] == "python-fallback"


def test_rouge_l_by_hand():
  # "a cat sat on the mat" (6) vs "the cat sat on a red mat" (7): LCS "cat sat on mat" = 4, P 4/6, R 4/7,
  # F = 2.44 P R / (R + 1.44 P) = 122/201. Adding ref "a cat" (LCS 2: P 2/6, R 1) takes max P = 2/3 and
  # max R = 1 independently: F = 2.44 (2/3) / (1 + 1.44 (2/3)) = 122/147 (the best single ref gives 122/201).
  pred = "a cat sat on the mat"
  one = metrics.caption_metrics([pred], [["the cat sat on a red mat"]], tokenizer="none")
  assert one["rouge_l"] == pytest.approx(122 / 201, rel=1e-12)
  two = metrics.caption_metrics([pred], [["the cat sat on a red mat", "a cat"]], tokenizer="none")
  assert two["rouge_l"] == pytest.approx(122 / 147, rel=1e-12)
  # Corpus value: the mean over images.
  both = metrics.caption_metrics([pred, pred], [["the cat sat on a red mat"], ["the cat sat on a red mat", "a cat"]],
                                 tokenizer="none", per_example=True)
  assert both["rouge_l"] == pytest.approx((122 / 201 + 122 / 147) / 2, rel=1e-12)
  assert both["per_example"]["rouge_l"] == pytest.approx([122 / 201, 122 / 147], rel=1e-12)


def test_bleu4_by_hand():
  ref = "a dog is running on the grass"
  # "a dog is running on green grass" (7) vs ref (7): clipped matches 6/7, 4/6, 3/5, 2/4; no brevity penalty.
  one = metrics.caption_metrics(["a dog is running on green grass"], [[ref]], tokenizer="none")
  assert one["bleu4"] == pytest.approx((6 / 35) ** 0.25, rel=1e-9)
  assert one["bleu1"] == pytest.approx(6 / 7, rel=1e-9)
  # "a dog is running" (4): all n-grams match, brevity penalty exp(1 - 7/4).
  short = metrics.caption_metrics(["a dog is running"], [[ref]], tokenizer="none")
  assert short["bleu4"] == pytest.approx(math.exp(1 - 7 / 4), rel=1e-9)
  # Closest reference length (5 of 7 and 5): exp(1 - 5/4); a tie (3 and 5) takes the shorter: no penalty.
  closest = metrics.caption_metrics(["a dog is running"], [[ref, "a dog is running fast"]], tokenizer="none")
  assert closest["bleu4"] == pytest.approx(math.exp(1 - 5 / 4), rel=1e-9)
  tie = metrics.caption_metrics(["a dog is running"], [["a dog runs", "a dog is running fast"]], tokenizer="none")
  assert tie["bleu4"] == pytest.approx(1.0, rel=1e-9)
  # Corpus level sums counts first: 10/11, 7/9, 5/7, 3/5 -> product 10/33; lengths 11 vs 14.
  corpus = metrics.caption_metrics(["a dog is running on green grass", "a dog is running"], [[ref], [ref]],
                                   tokenizer="none")
  assert corpus["bleu4"] == pytest.approx((10 / 33) ** 0.25 * math.exp(1 - 14 / 11), rel=1e-9)
  # Clipping: "the the the" has 1 correct unigram of 3 against a ref with one "the".
  clip = metrics.caption_metrics(["the the the"], [["the cat"]], tokenizer="none")
  assert clip["bleu1"] == pytest.approx(1 / 3, rel=1e-9)


def test_cider_by_hand():
  # Two images, L = log 2. idf = log N - log df: "a" is in both images' refs (idf 0), all else idf L
  # (hypothesis n-grams absent from every reference too: df counts as 1).
  # Image A, hyp "a black cat", refs "a black cat" and "a cat":
  #   ref 1 identical: n = 1, 2, 3 give cosine 1, n = 4 has no n-grams (0); no length penalty.
  #   ref 2: n=1 hyp (0, L, L) . clipped ref (0, -, L) = L^2 over norms L*sqrt2 * L -> 1/sqrt2; n>=2 share
  #   nothing; bigram counts 2 vs 1 -> penalty e = exp(-1/72).
  #   score = 10 * mean_n(sum over refs) / 2 refs = 10 * (3 + e/sqrt2) / 4 / 2.
  # Image B, hyp "a dog", ref "a brown dog": n=1 gives 1/sqrt2, "a dog" is not in the ref, penalty e.
  #   score = 10 * (e/sqrt2) / 4.
  e, r2 = math.exp(-1 / 72), math.sqrt(2)
  expected = (10 * (3 + e / r2) / 8 + 10 * (e / r2) / 4) / 2
  out = metrics.caption_metrics(["a black cat", "a dog"], [["a black cat", "a cat"], ["a brown dog"]],
                                tokenizer="none", per_example=True)
  assert out["cider"] == pytest.approx(expected, rel=1e-12)
  assert out["per_example"]["cider"] == pytest.approx([10 * (3 + e / r2) / 8, 10 * (e / r2) / 4], rel=1e-12)
  # Clipping: hyp "cat cat" vs ref "cat" weighs min(2L, L) * L over norms 2L * L -> 1/2 (not 1).
  # "dog" vs "dog": only n=1 is non-empty -> 10 * 1/4.
  clip = metrics.caption_metrics(["cat cat", "dog"], [["cat"], ["dog"]], tokenizer="none")
  assert clip["cider"] == pytest.approx((10 * (e / 2) / 4 + 10 / 4) / 2, rel=1e-12)


def test_caption_metrics_tokenizers_and_errors():
  preds, refs = ["A Dog, running."], [["a dog running", "A dog!"]]
  out = metrics.caption_metrics(preds * 2, refs * 2, tokenizer="python")
  assert out["rouge_l"] == 1.0 and out["tokenizer"] == "python-fallback"
  raw = metrics.caption_metrics(preds * 2, refs * 2, tokenizer="none")
  assert raw["rouge_l"] < 1.0          # case and punctuation count when nothing tokenises
  assert set(out) == {"cider", "bleu4", "rouge_l", "bleu1", "bleu2", "bleu3", "tokenizer"}
  # An empty prediction (a model that emits eos at once) is scored 0, not an error.
  empty = metrics.caption_metrics(["", "a dog"], [["a cat"], ["a dog"]], tokenizer="python", per_example=True)
  assert empty["per_example"]["cider"][0] == 0.0 and empty["per_example"]["rouge_l"] == [0.0, 1.0]
  with pytest.raises(ValueError, match="references\\[1\\]"):
    metrics.caption_metrics(["a", "b"], [["a"], []], tokenizer="python")
  with pytest.raises(ValueError):
    metrics.caption_metrics(["a"], [["a"], ["b"]], tokenizer="python")
  with pytest.raises(ValueError):
    metrics.caption_metrics(["a"], [["a"]], tokenizer="bogus")


@needs_ptb
def test_caption_metrics_ptb():
  out = metrics.caption_metrics(["A Dog, running.", "Two cats."], [["a dog running"], ["two cats"]])
  assert out["tokenizer"] == "ptb"
  assert out["rouge_l"] == 1.0 and out["bleu1"] == pytest.approx(1.0, abs=1e-9)


def test_auto_tokenizer_falls_back_loudly(monkeypatch):
  monkeypatch.setattr(metrics, "_ptb_jar", lambda: None)   # as on a machine without java
  with pytest.warns(UserWarning, match="stand-in"):
    out = metrics.caption_metrics(["A Dog, running."], [["a dog running"]])
  assert out["tokenizer"] == "python-fallback" and out["rouge_l"] == 1.0
  with pytest.raises(RuntimeError, match="java"):
    metrics.tokenize(["a"], "ptb")


# --- Which task scores a row -------------------------------------------------------------------------

def test_detect_task():
  assert metrics.detect_task(dict(prefix="answer en what?", answers=["a", "b"])) == "vqa"
  assert metrics.detect_task(dict(prefix="answer en what?", suffix="a")) == "exact"
  assert metrics.detect_task(dict(prefix="caption en", suffix="a cat")) == "caption"
  assert metrics.detect_task(dict(prefix="describe", references=["a cat"])) == "caption"
  assert metrics.detect_task(dict(prefix="detect cat ; dog", suffix="<loc0001> cat")) == "detect"
  assert metrics.detect_task(dict(prefix="ocr", suffix="STOP")) == "exact"
  assert metrics.detect_task(dict(prefix="detection of things", suffix="x")) == "exact"
