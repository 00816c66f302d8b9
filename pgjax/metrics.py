"""Evaluation metrics as pure functions over strings: VQAv2 accuracy, exact match, COCO caption metrics, and
which task (so which metric) scores a row. Detection's metric is detection.py's.

VQA follows the official GT-Vision-Lab/VQA `vqaEval.py` (master since 2021), which is also what
big_vision's PaliGemma VQAv2 evaluator computes, so published numbers reproduce. Caption metrics are
pycocoevalcap's scorers (BLEU, CIDEr-D, ROUGE-L) after PTB tokenisation, as in the COCO caption
toolkit and big_vision's COCO evaluator. All values are fractions (CIDEr ~1.4 where papers print 141).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Sequence

# ---------------------------------------------------------------------------------------------------
# VQA answer normalisation (processPunctuation + processDigitArticle of the official vqaEval.py).

# The 21 marks the official code treats; `.`, `'`, `:`, `#`, `$`, `%`, `&`, `*` are not among them.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a malformed look-behind that always
# passes at a ".", so the rule is just "a period not followed by a digit". The official code passes
# re.UNICODE as `count` (at most 32 removals); big_vision removes all of them, and so do we.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})

# The official contractions table (120 entries, straight apostrophes since the 2016 fix), as key>value.
# Kept verbatim, quirks included: "Id've", "I'dve", "Im", "Ive" never match (lookup is after lowercasing),
# "somebody'd" maps to "somebodyd", and a few entries map a word to itself.
CONTRACTIONS = dict(pair.split(">") for pair in """
aint>ain't arent>aren't cant>can't couldve>could've couldnt>couldn't couldn'tve>couldn't've
couldnt've>couldn't've didnt>didn't doesnt>doesn't dont>don't hadnt>hadn't hadnt've>hadn't've
hadn'tve>hadn't've hasnt>hasn't havent>haven't hed>he'd hed've>he'd've he'dve>he'd've hes>he's
howd>how'd howll>how'll hows>how's Id've>I'd've I'dve>I'd've Im>I'm Ive>I've isnt>isn't itd>it'd
itd've>it'd've it'dve>it'd've itll>it'll let's>let's maam>ma'am mightnt>mightn't
mightnt've>mightn't've mightn'tve>mightn't've mightve>might've mustnt>mustn't mustve>must've
neednt>needn't notve>not've oclock>o'clock oughtnt>oughtn't ow's'at>'ow's'at 'ows'at>'ow's'at
'ow'sat>'ow's'at shant>shan't shed've>she'd've she'dve>she'd've she's>she's shouldve>should've
shouldnt>shouldn't shouldnt've>shouldn't've shouldn'tve>shouldn't've somebody'd>somebodyd
somebodyd've>somebody'd've somebody'dve>somebody'd've somebodyll>somebody'll somebodys>somebody's
someoned>someone'd someoned've>someone'd've someone'dve>someone'd've someonell>someone'll
someones>someone's somethingd>something'd somethingd've>something'd've something'dve>something'd've
somethingll>something'll thats>that's thered>there'd thered've>there'd've there'dve>there'd've
therere>there're theres>there's theyd>they'd theyd've>they'd've they'dve>they'd've theyll>they'll
theyre>they're theyve>they've twas>'twas wasnt>wasn't wed've>we'd've we'dve>we'd've weve>we've
werent>weren't whatll>what'll whatre>what're whats>what's whatve>what've whens>when's whered>where'd
wheres>where's whereve>where've whod>who'd whod've>who'd've who'dve>who'd've wholl>who'll whos>who's
whove>who've whyll>why'll whyre>why're whys>why's wont>won't wouldve>would've wouldnt>wouldn't
wouldnt've>wouldn't've wouldn'tve>wouldn't've yall>y'all yall'll>y'all'll y'allll>y'all'll
yall'd've>y'all'd've y'alld've>y'all'd've y'all'dve>y'all'd've youd>you'd youd've>you'd've
you'dve>you'd've youll>you'll youre>you're youve>you've
""".split())


def process_punctuation(text: str) -> str:
  """Official processPunctuation: `t-shirt` -> `t shirt`, `1,000 t-shirts` -> `1000 tshirts`, `5.` -> `5`.

  Each mark is deleted when the ORIGINAL text has it next to a space or has a digit-comma-digit anywhere
  (an official slip, kept: it makes `1,000 t-shirts` lose its hyphen), else replaced by a space.
  """
  delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
  out = text
  for p in PUNCTUATION:
    out = out.replace(p, "" if delete_all or p + " " in text or " " + p in text else " ")
  return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def process_digit_article(text: str) -> str:
  """Official processDigitArticle: lowercase, number words -> digits, drop articles, fix contractions."""
  words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
  return process_digit_article(process_punctuation(text))


def _strip_space(text: str) -> str:
  return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: Sequence[str], *, legacy: bool = False) -> float:
  """The official VQAv2 accuracy of one prediction against the human answers (10 in VQAv2).

  Default (official master since 2021, big_vision): `\\n`/`\\t` -> space and strip on both sides; then,
  only if the stripped answers are not all identical, `normalize_answer` on both sides. With all answers
  identical the comparison is plain and case-sensitive ("Yes" vs ten "yes" scores 0).
  `legacy=True` is the 2016 rule (still in some ports, e.g. LAVIS): the stripped prediction is always
  normalised, the answers are left raw, or only punctuation-processed when the raw answers differ.

  Score: for each answer position, leave it out and count the others equal to the prediction; score
  min(1, count / 3); average over positions. k matching of 10 give 0, .3, .6, .9, then 1.0 for k >= 4.
  Other answer counts n: the threshold becomes min(3, n - 1), so full credit means "all other annotators
  agree" when n <= 3 (n = 2: 1.0 if both match, 0.5 if one does); n = 1 is plain equality (and, the
  answers being trivially "all identical", un-normalised unless `legacy`). n >= 4 is the official rule.
  """
  if isinstance(answers, str) or not len(answers):
    raise ValueError(f"answers must be a non-empty list of strings, got {answers!r}")
  if legacy:
    pred = normalize_answer(_strip_space(prediction))
    gts = list(answers)
    if len(set(gts)) > 1:
      gts = [process_punctuation(a) for a in gts]
  else:
    pred = _strip_space(prediction)
    gts = [_strip_space(a) for a in answers]
    if len(set(gts)) > 1:
      pred, gts = normalize_answer(pred), [normalize_answer(a) for a in gts]
  n = len(gts)
  if n == 1:
    return float(pred == gts[0])
  matches = sum(a == pred for a in gts)
  threshold = min(3, n - 1)
  # A matching position left out sees matches - 1 agreeing others; a non-matching one sees matches.
  total = matches * min(1.0, (matches - 1) / threshold) + (n - matches) * min(1.0, matches / threshold)
  return total / n


def vqa_accuracy_batch(predictions: Sequence[str], answers_list: Sequence[Sequence[str]], *,
                       legacy: bool = False) -> float:
  """Mean `vqa_accuracy` over questions (the VQAv2 "overall" number, as a fraction)."""
  _check_pairs(predictions, answers_list, "answers_list")
  return sum(vqa_accuracy(p, a, legacy=legacy) for p, a in zip(predictions, answers_list)) / len(predictions)


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
  """Fraction of predictions equal to their reference after stripping outer whitespace only.

  Case, inner spacing and punctuation count ("Cat" != "cat"). A reference may be a list of acceptable
  strings; the prediction then needs to equal any one of them.
  """
  _check_pairs(predictions, references, "references")
  hits = 0
  for pred, ref in zip(predictions, references):
    refs = [ref] if isinstance(ref, str) else list(ref)
    hits += pred.strip() in {r.strip() for r in refs}
  return hits / len(predictions)


def _check_pairs(predictions, references, name):
  if isinstance(predictions, str) or isinstance(references, str):
    raise ValueError("predictions and references must be lists, not single strings")
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions but {len(references)} {name}")
  if not len(predictions):
    raise ValueError("no predictions to score")


# ---------------------------------------------------------------------------------------------------
# Caption tokenisation: Stanford PTBTokenizer (Java) as the COCO toolkit runs it, or a Python stand-in.

# Tokens the COCO toolkit drops after PTB tokenisation. Its list also names -LRB- -RRB- -LCB- -RCB-, but
# in upper case while the tokenizer runs with -lowerCase, so bracket tokens survive ("-lrb-").
PTB_DROPPED = frozenset({"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"})
# Python's str.splitlines breaks on these; PTBTokenizer breaks on most, so they must not reach it.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


@functools.cache
def _ptb_jar() -> str | None:
  """The Stanford CoreNLP jar shipped in pycocoevalcap, if that and `java` are installed."""
  if shutil.which("java") is None:
    return None
  try:
    from pycocoevalcap.tokenizer import ptbtokenizer
  except ImportError:
    return None
  jar = os.path.join(os.path.dirname(ptbtokenizer.__file__), ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
  return jar if os.path.isfile(jar) else None


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
  """COCO-toolkit tokenisation via Java: lowercased PTB tokens minus punctuation, space-joined.

  One JVM for all texts, fed on stdin (pycocoevalcap's own wrapper writes a temp file into its package
  folder, which fails on read-only installs); one output line per input line, checked.
  """
  jar = _ptb_jar()
  if jar is None:
    raise RuntimeError("PTB tokenisation needs `java` on PATH and the pycocoevalcap package")
  lines = [_LINE_BREAKS.sub(" ", t) for t in texts]
  proc = subprocess.run(
      ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"],
      input="\n".join(lines) + "\n", capture_output=True, text=True, encoding="utf-8", check=False)
  out = proc.stdout.splitlines()
  if proc.returncode != 0 or len(out) != len(lines):
    raise RuntimeError(f"PTBTokenizer failed (exit {proc.returncode}, {len(out)} lines for {len(lines)}): "
                       f"{proc.stderr.strip()[-500:]}")
  return [" ".join(w for w in line.split() if w not in PTB_DROPPED) for line in out]


_OPENERS = {'"': "``", "'": "`", "`": "`", "(": "-lrb-", "[": "-lsb-", "{": "-lcb-"}
_CLOSERS = {'"': "''", "'": "'", ")": "-rrb-", "]": "-rsb-", "}": "-rcb-", ",": ",", ";": ";", ":": ":"}
# Words PTB keeps a final period on (besides single letters and words with an inner period: "u.s.").
_ABBREVIATIONS = frozenset("mr mrs ms dr prof st ave jr sr vs etc inc corp co ltd mt no".split())
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_SPECIAL_SPLITS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                   "wanna": ("wan", "na")}
_UNICODE_PUNCT = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                                "\u2014": " -- ", "\u2013": " -- ", "\u2026": " ... "})


def _split_word(word: str) -> list[str]:
  head, tail = [], []
  while word and word[0] in _OPENERS:
    head.append(_OPENERS[word[0]])
    word = word[1:]
  while word:
    if word[-1] in _CLOSERS:
      tail.append(_CLOSERS[word[-1]])
      word = word[:-1]
    elif word[-1] in "?!":  # PTB keeps a run ("!!!", "?!") as one token, and that one is not dropped
      stem = word.rstrip("?!")
      tail.append(word[len(stem):])
      word = stem
    elif word[-1] == ".":
      stem = word.rstrip(".")
      if len(word) - len(stem) > 1:
        tail.append("...")
      elif len(stem) == 1 or "." in stem or stem in _ABBREVIATIONS:
        break
      else:
        tail.append(".")
      word = stem
    else:
      break
  if len(word) > 1 and not word.strip("-"):  # a run of hyphens is PTB's "--"
    core = ["--"]
  elif word in _SPECIAL_SPLITS:
    core = list(_SPECIAL_SPLITS[word])
  elif m := _CLITIC.match(word):
    core = [m.group(1), m.group(2)]
  else:
    # "$5" -> "$ 5", "50%" -> "50 %", "a+b" -> "a + b"; a comma splits unless between digits ("1,000").
    core = [t for t in re.split(r"([$%#+=]|(?<!\d),|,(?!\d))", word) if t]
  return head + core + tail[::-1]


def python_tokenize(text: str) -> str:
  """A pure-Python stand-in for `ptb_tokenize` (no Java). Agrees with it on ordinary captions (case,
  sentence punctuation, quotes, brackets, clitics such as "it's" -> "it 's", abbreviations); rare
  constructs ("rock'n'roll", "'tis", XML-like "<tag>") may tokenise differently."""
  words = _LINE_BREAKS.sub(" ", text).lower().translate(_UNICODE_PUNCT).split()
  tokens = [t for w in words for t in _split_word(w)]
  return " ".join(t for t in tokens if t not in PTB_DROPPED)


def tokenize(texts: Sequence[str], tokenizer: str = "auto") -> tuple[list[str], str]:
  """Tokenise captions; returns (texts, name of the tokenizer used).

  tokenizer: "ptb" (Java, error if unavailable), "python" (the stand-in), "none" (only collapse
  whitespace; for text that is already tokenised) or "auto": "ptb" when Java and pycocoevalcap are there,
  else "python" with a warning, since scores on raw text then differ slightly from the official ones.
  """
  if tokenizer == "auto":
    if _ptb_jar() is not None:
      try:
        return ptb_tokenize(texts), "ptb"
      except RuntimeError as e:
        warnings.warn(f"{e}; using the Python stand-in tokenizer", stacklevel=2)
    else:
      warnings.warn("no `java` or pycocoevalcap: caption metrics use the Python stand-in for the PTB "
                    "tokenizer (tokenizer='python-fallback' in the results)", stacklevel=2)
    return [python_tokenize(t) for t in texts], "python-fallback"
  if tokenizer == "ptb":
    return ptb_tokenize(texts), "ptb"
  if tokenizer == "python":
    return [python_tokenize(t) for t in texts], "python-fallback"
  if tokenizer == "none":
    return [" ".join(t.split()) for t in texts], "none"
  raise ValueError(f"unknown tokenizer {tokenizer!r}: use 'auto', 'ptb', 'python' or 'none'")


# ---------------------------------------------------------------------------------------------------
# Caption metrics.


def caption_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]], *,
                    tokenizer: str = "auto", per_example: bool = False) -> dict:
  """COCO caption metrics of one predicted caption per image against that image's references.

  Returns {"cider", "bleu4", "rouge_l", "bleu1", "bleu2", "bleu3", "tokenizer"}: pycocoevalcap's
  Cider() (CIDEr-D, idf over this corpus's references, so a one-image corpus scores 0), Bleu(4) (corpus
  level, "closest" reference length) and Rouge() (ROUGE-L, beta 1.2), all as fractions, plus which
  tokenizer ran (see `tokenize`). per_example=True adds "per_example": per-image cider, bleu4, rouge_l.
  """
  try:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
  except ImportError as e:
    raise ImportError("caption metrics need pycocoevalcap: pip install pycocoevalcap") from e
  _check_pairs(predictions, references, "reference lists")
  for i, refs in enumerate(references):
    if isinstance(refs, str) or not len(refs):
      raise ValueError(f"references[{i}] must be a non-empty list of captions, got {refs!r}")
  flat = list(predictions) + [r for refs in references for r in refs]
  toks, used = tokenize(flat, tokenizer)
  res, gts, k = {}, {}, len(predictions)
  for i, refs in enumerate(references):
    res[i], gts[i] = [toks[i]], toks[k:k + len(refs)]
    k += len(refs)
  if not any(r for refs in gts.values() for r in refs):
    raise ValueError("every reference caption is empty after tokenisation")
  bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
  cider, cider_per = Cider().compute_score(gts, res)
  rouge, rouge_per = Rouge().compute_score(gts, res)
  out = {"cider": float(cider), "bleu4": float(bleu[3]), "rouge_l": float(rouge),
         "bleu1": float(bleu[0]), "bleu2": float(bleu[1]), "bleu3": float(bleu[2]), "tokenizer": used}
  if per_example:
    out["per_example"] = {"cider": [float(x) for x in cider_per], "bleu4": [float(x) for x in bleu_per[3]],
                          "rouge_l": [float(x) for x in rouge_per]}
  return out


# ---------------------------------------------------------------------------------------------------
# Which metric scores a row.

TASKS = ("vqa", "caption", "exact", "detect", "segment")


def detect_task(row: dict) -> str:
  """The task of one row from its fields, then its prefix: "answers" -> vqa (an "answer en ..." row with
  only a suffix is scored by exact match), "references" or "caption ..." -> caption, "detect ..." ->
  detect, "segment ..." -> segment, anything else -> exact."""
  prefix = row.get("prefix", "").lstrip()
  word = prefix.split(maxsplit=1)[0] if prefix else ""
  if row.get("answers"):
    return "vqa"
  if row.get("references") or word == "caption":
    return "caption"
  if word == "detect":
    return "detect"
  if word == "segment":
    return "segment"
  return "exact"
