"""The `pgjax` command: the demo fine-tune writes every output, the report renders, bad input exits 2."""

import json
import os
import shutil

import numpy as np
import pytest

from helpers import screenshot
from pgjax import checkpoint, cli, loop


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("run")
  code = cli.main(["finetune", "--out", str(out), "--steps", "4", "--val-limit", "24", "--eval-every", "2",
                   "--eval-examples", "8", "--save-full", "--safetensors", "--report-examples", "8"])
  assert code == 0
  return out


def test_demo_finetune_writes_every_output(demo_run):
  out = demo_run
  for name in ("summary.json", "metrics.jsonl", "report.html", "final.npz", "checkpoints/LATEST"):
    assert os.path.exists(out / name), name
  summary = json.loads((out / "summary.json").read_text())
  assert summary["demo"] and summary["steps"] == 4
  for when in ("before", "after"):
    assert summary[when]["task"] == "vqa" and summary[when]["count"] == 24
    assert 0.0 <= summary[when]["accuracy"] <= 1.0
  lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  steps = [l["step"] for l in lines if "loss" in l]
  assert steps == [1, 2, 3, 4] and all(np.isfinite(l["loss"]) for l in lines if "loss" in l)
  assert [l["step"] for l in lines if "eval" in l] == [0, 2, 4]
  # The final checkpoint is a full param tree in the official layout; the loop's holds the trainable part.
  full = checkpoint.flatten(checkpoint.load(out / "final.npz"))
  part = checkpoint.flatten(checkpoint.load(os.path.join(loop.latest(out), "trainable.npz")))
  assert set(part) == {k for k in full if k.startswith("llm/layers/attn/")}
  for k in part:
    np.testing.assert_array_equal(np.asarray(part[k]), np.asarray(full[k]))
  from pgjax import hf
  st = hf.load_safetensors(out / "final_trainable.safetensors")
  assert set(st) == set(part) and all(np.array_equal(st[k], np.asarray(part[k])) for k in part)
  assert set(hf.load_safetensors(out / "final.safetensors")) == set(full)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium on PATH (apt-get install chromium)")
def test_report_renders_with_its_images(demo_run, tmp_path):
  page = (demo_run / "report.html").read_text()
  assert page.count('<img src="data:image/') == 8 and "<polyline" in page
  px = screenshot(demo_run / "report.html", tmp_path / "report.png").astype(int)
  assert px.var() > 0
  # easy-vqa images have coloured shapes on light backgrounds: saturated pixels prove images were drawn.
  sat = px.max(-1) - px.min(-1)
  assert (sat > 120).sum() > 2000, (sat > 120).sum()


def test_resume_continues_the_run(demo_run, tmp_path):
  out = tmp_path / "resume"
  shutil.copytree(demo_run, out)
  code = cli.main(["finetune", "--out", str(out), "--steps", "6", "--val-limit", "8", "--eval-every", "0"])
  assert code == 0
  lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if "loss" in l] == [1, 2, 3, 4, 5, 6]  # appended after step 4


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--train", "/nonexistent/train.jsonl"], "/nonexistent/train.jsonl"),
    (["finetune", "--checkpoint", "x.npz"], "--train is required"),
    (["predict", "--checkpoint", "x.npz", "--image", "a.png", "--prompt", "caption en"], "--tokenizer"),
    (["eval", "--data", "/nonexistent/val.jsonl"], "/nonexistent/val.jsonl"),
])
def test_bad_input_exits_2_naming_the_problem(argv, message, capsys):
  assert cli.main(argv) == 2
  assert message in capsys.readouterr().err


def test_bad_jsonl_line_is_named(tmp_path, capsys):
  (tmp_path / "train.jsonl").write_text('{"image": "a.png", "prefix": "x", "suffix": "y"}\n{not json\n')
  assert cli.main(["finetune", "--train", str(tmp_path / "train.jsonl"), "--steps", "1"]) == 2
  err = capsys.readouterr().err
  assert "train.jsonl:1" in err or "train.jsonl:2" in err


def test_predict_inspect_and_show_data_on_the_demo(tmp_path, capsys):
  from pgjax import demo
  rows = demo.questions("test")[:3]
  assert cli.main(["predict", "--image", rows[0]["image"], rows[1]["image"], "--prompt", rows[0]["prefix"],
                   "--max-new-tokens", "4", "--html", str(tmp_path / "p.html")]) == 0
  out = capsys.readouterr().out
  assert out.count(".png\t") == 2 and (tmp_path / "p.html").exists()
  assert cli.main(["inspect", os.path.join(demo.DEMO_DIR, "demo.npz")]) == 0
  out = capsys.readouterr().out
  assert "llm/layers/attn/qkv_einsum/w" in out and "parameters" in out
  demo.write_jsonl(str(tmp_path / "d.jsonl"), rows)
  assert cli.main(["show-data", str(tmp_path / "d.jsonl"), "--html", str(tmp_path / "d.html"),
                   "--tokenizer", os.path.join(demo.DEMO_DIR, "tokenizer.model")]) == 0
  assert (tmp_path / "d.html").read_text().count('<img src="data:image/') == 3
