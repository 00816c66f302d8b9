"""finetune.TrainConfig (validation, the schedule rule, what a resume compares) and the README's finetune snippet."""

import dataclasses
import pathlib
import re
import subprocess
import sys

import pytest

from pgjax import finetune, train

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.parametrize("field, value", [("steps", 0), ("steps", True), ("batch_size", 0), ("lr", 0.0),
                                          ("lr", float("nan")), ("warmup", 1.0), ("clip", 0.0), ("accum", 0),
                                          ("schedule", "step"), ("remat", "some"), ("frozen_dtype", "int8"),
                                          ("truncate", "drop"), ("eval_every", -1), ("seed", -1)])
def test_bad_settings_are_refused_naming_the_field(field, value):
  with pytest.raises(finetune.SettingError) as e:
    finetune.TrainConfig(**{field: value})
  assert e.value.field == field and str(e.value).startswith(f"{field} must be")


def test_a_pattern_that_does_not_compile_is_refused_up_front():
  with pytest.raises(finetune.SettingError, match=r"trainable pattern 'llm/\(attn' is not a valid regular expression"):
    finetune.TrainConfig(trainable=["llm/(attn"])


def test_config_is_hashable_and_lists_become_tuples():
  tc = finetune.TrainConfig(trainable=["llm/.*", "img/head/.*"])
  assert tc.trainable == ("llm/.*", "img/head/.*") and hash(tc) == hash(dataclasses.replace(tc))


def test_schedule_spans_steps_plus_one():
  # Cosine over steps + 1 = 11 with warmup round(0.1 * 11) = 1: lr(s) = 0.5 * (1 + cos(pi (s - 1) / 10)) at base 1,
  # so the last step (10) gets 0.5 * (1 + cos(0.9 pi)) = 0.0244717, not 0.
  lr = finetune.TrainConfig(steps=10, lr=1.0, warmup=0.1).lr_schedule()
  assert lr(1) == pytest.approx(1.0, rel=1e-12) and lr(10) == pytest.approx(0.0244717418, rel=1e-8)


def test_resume_identity_is_the_resume_fields_as_json():
  tc = finetune.TrainConfig(seed=3, batch_size=16, optimizer=train.Optimizer(name="adamw", weight_decay=0.1))
  ident = tc.resume_identity()
  assert set(ident) == set(finetune.TrainConfig.RESUME_FIELDS) == {
      "seed", "optimizer", "trainable", "batch_size", "lora_rank", "lora_alpha", "lora_targets", "quantize"}
  assert ident["seed"] == 3 and ident["batch_size"] == 16 and ident["trainable"] == ["llm/layers/attn/.*"]
  assert ident["optimizer"]["name"] == "adamw" and ident["optimizer"]["weight_decay"] == 0.1


def test_model_config_removes_gemma2s_final_softcap_unless_kept():
  from pgjax import config
  cfg = config.get("tiny-gemma2-gqa")
  assert cfg.llm.final_logits_softcap > 0
  assert finetune.TrainConfig(remat="full").model_config(cfg).llm.final_logits_softcap == 0.0
  assert finetune.TrainConfig(remat="full").model_config(cfg).remat == "full"
  assert finetune.TrainConfig(keep_final_softcap=True).model_config(cfg).llm.final_logits_softcap == cfg.llm.final_logits_softcap


@pytest.mark.slow
def test_readme_finetune_snippet_runs_and_learns(tmp_path):
  blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "finetune.finetune(" in b]
  assert len(blocks) == 1
  out = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  before, after = map(float, re.search(r"VQA accuracy ([\d.]+) -> ([\d.]+)", out.stdout).groups())
  # The shipped demo model answers 0.34 of these 256 questions before fine-tuning (0.36 of all 9,673, README).
  # 200 steps of the demo recipe reached 0.484 on a 2-core AMD EPYC. The bound asks for a gain of 0.05, above
  # the 0.031 standard error of a 256-question accuracy, so a run that learned nothing cannot pass it.
  assert before < 0.5 and after > before + 0.05, (before, after)
  for name in ("summary.json", "metrics.jsonl", "report.html", "checkpoints/LATEST"):
    assert (tmp_path / "runs" / "python-demo" / name).exists(), name
