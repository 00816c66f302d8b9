"""The `pgjax` command: the demo fine-tune writes every output, the report renders, bad input exits 2."""

import json
import os
import shutil

import numpy as np
import pytest

from helpers import screenshot
from pgjax import checkpoint, cli, decode, finetune, rundir, tree


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
  part = checkpoint.flatten(checkpoint.load(os.path.join(rundir.latest(out), "trainable.npz")))
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


# ------------------------------------------------------------------ a small run of your own (the audit's B)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
  from pgjax import demo
  folder = tmp_path_factory.mktemp("data")
  demo.write_jsonl(str(folder / "good.jsonl"), demo.questions("train")[:16])
  demo.write_jsonl(str(folder / "other.jsonl"), demo.questions("train")[1:17])
  return folder


def _b(jsonl, out, *extra, train="good.jsonl"):
  """The audit's command `B`, with batch 8: the tests run on 8 CPU devices (conftest), one example each."""
  from pgjax import demo
  return ["finetune", "--checkpoint", os.path.join(demo.DEMO_DIR, "demo.npz"), "--tokenizer",
          os.path.join(demo.DEMO_DIR, "tokenizer.model"), "--max-len", "16", "--batch-size", "8",
          "--train", str(jsonl / train), "--out", str(out), *extra]


def _loss_steps(out):
  return [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if "loss" in l]


def test_no_resume_keeps_the_checkpoint_it_writes(jsonl, tmp_path):
  out = tmp_path / "r"
  assert cli.main(_b(jsonl, out, "--steps", "4", "--save-every", "2")) == 0
  assert cli.main(_b(jsonl, out, "--steps", "1", "--no-resume")) == 0
  assert (out / "checkpoints" / "LATEST").read_text() == "step_000001\n"
  assert sorted(os.listdir(out / "checkpoints")) == ["LATEST", "step_000001"]
  assert sorted(os.listdir(out / "checkpoints.old-1")) == ["LATEST", "step_000002", "step_000004"]
  # The earlier run's log and summary went aside with its checkpoints, under the same number.
  assert [json.loads(l)["step"] for l in (out / "metrics.old-1.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
  assert json.loads((out / "summary.old-1.json").read_text())["steps"] == 4 and (out / "report.old-1.html").exists()
  assert cli.main(_b(jsonl, out, "--steps", "2")) == 0  # the next run resumes the fresh run
  assert _loss_steps(out) == [1, 2]


def test_resume_with_other_settings_or_nothing_to_train_exits_2(jsonl, tmp_path, capsys):
  out = tmp_path / "r"
  assert cli.main(_b(jsonl, out, "--steps", "2")) == 0
  summary = (out / "summary.json").read_text()
  capsys.readouterr()
  assert cli.main(_b(jsonl, out, "--steps", "4", "--seed", "1", "--batch-size", "16")) == 2
  err = capsys.readouterr().err
  assert "seed: 0 in the checkpoint, 1 now" in err and "batch_size: 8 in the checkpoint, 16 now" in err
  assert "--resume-anyway" in err
  assert cli.main(_b(jsonl, out, "--steps", "4", train="other.jsonl")) == 2
  assert "train_data.sha256" in capsys.readouterr().err
  assert cli.main(_b(jsonl, out, "--steps", "4", "--optimizer", "momentum", "--trainable", "llm/layers/.*")) == 2
  err = capsys.readouterr().err
  assert "optimizer.name" in err and 'trainable: ["llm/layers/attn/.*"] in the checkpoint, ["llm/layers/.*"] now' in err
  assert cli.main(_b(jsonl, out, "--steps", "2")) == 2
  assert "is at step 2, which already reaches the 2 steps asked" in capsys.readouterr().err
  # Refused runs leave the finished run's outputs as they were.
  assert (out / "summary.json").read_text() == summary and _loss_steps(out) == [1, 2]
  assert cli.main(_b(jsonl, out, "--steps", "3", "--seed", "1", "--resume-anyway")) == 0
  assert _loss_steps(out) == [1, 2, 3]
  (out / "checkpoints" / "step_000003" / "state.json").write_text("{}")
  assert cli.main(_b(jsonl, out, "--steps", "4")) == 2
  assert f'{out / "checkpoints" / "step_000003" / "state.json"}: key "step" is missing' in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
    (["--steps", "-3"], "argument --steps"),
    (["--lr", "0"], "argument --lr: expected a finite number > 0"),
    (["--lr", "-0.1"], "argument --lr"),
    (["--lr", "nan"], "argument --lr"),
    (["--lr", "inf"], "argument --lr"),
    (["--clip", "0"], "argument --clip"),
    (["--warmup", "1"], "argument --warmup: expected a fraction in [0, 1), got 1"),
    (["--warmup", "-0.1"], "argument --warmup"),
    (["--accum", "0"], "argument --accum"),
    (["--model-parallel", "0"], "argument --model-parallel"),
    (["--save-every", "-1"], "argument --save-every: expected an integer >= 0, got -1"),
    (["--val-limit", "0"], "argument --val-limit"),
    (["--val-limit", "-2"], "argument --val-limit"),
    (["--eval-examples", "-1"], "argument --eval-examples"),
    (["--batch-size", "0"], "argument --batch-size"),
    (["--eval-batch-size", "0"], "argument --eval-batch-size"),
    (["--steps", "two"], "argument --steps: expected an integer >= 1, got 'two'"),
    (["--trainable", "llm/(attn"], "argument --trainable: 'llm/(attn' is not a valid regular expression"),
])
def test_bad_finetune_flags_exit_2_naming_the_flag(jsonl, tmp_path, extra, message, capsys):
  assert cli.main(_b(jsonl, tmp_path / "r", *extra)) == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "r").exists()  # refused before anything is written


def test_bad_paths_and_dtype_exit_2_naming_them(jsonl, tmp_path, capsys):
  (tmp_path / "file").write_text("x")
  assert cli.main(_b(jsonl, tmp_path / "file", "--steps", "1")) == 2
  assert f"--out {tmp_path / 'file'}: exists and is not a folder" in capsys.readouterr().err
  assert cli.main(_b(jsonl, tmp_path / "r", "--steps", "1", train="")) == 2  # --train names the folder
  assert f"--train {jsonl}: is a folder" in capsys.readouterr().err
  assert cli.main(["eval", "--data", str(jsonl / "good.jsonl"), "--dtype", "bogus"]) == 2
  assert "argument --dtype: invalid choice: 'bogus'" in capsys.readouterr().err


def test_schedule_matches_big_vision_recipe():
  # big_vision's notebook: TRAIN_STEPS = 64, create_learning_rate_schedule(total_steps=65, base=0.03,
  # decay_type="cosine", warmup_percent=0.10) at steps 1..64; warmup round(6.5) = 6 steps.
  lr = finetune.TrainConfig(schedule="cosine", lr=0.03, steps=64, warmup=0.1).lr_schedule()
  assert round(lr(20), 5) == 0.02602 and round(lr(32), 5) == 0.01778 and f"{lr(64):.1e}" == "2.1e-05"
  assert lr(1) == pytest.approx(0.005, rel=1e-12) and lr(6) == pytest.approx(0.03, rel=1e-12)
  # linear over 9 + 1 steps, warmup round(1.0) = 1: lr(s) = 0.9 * (1 - (s - 1) / 9).
  lin = finetune.TrainConfig(schedule="linear", lr=0.9, steps=9, warmup=0.1).lr_schedule()
  assert [round(lin(s), 12) for s in (1, 5, 9)] == [0.9, 0.5, 0.1]


def test_demo_run_uses_the_cli_schedule(demo_run):
  # Demo: lr 0.7, warmup round(0.05 * 5) = 0 steps, cosine over 4 + 1 steps: lr(s) = 0.35 * (1 + cos(pi s / 5)),
  # cos(pi/5) = 0.80901699, cos(2 pi/5) = 0.30901699.
  lines = [json.loads(l) for l in (demo_run / "metrics.jsonl").read_text().splitlines() if "loss" in l]
  expected = [0.35 * 1.80901699, 0.35 * 1.30901699, 0.35 * 0.69098301, 0.35 * 0.19098301]
  np.testing.assert_allclose([l["lr"] for l in lines], expected, rtol=1e-6)


def test_validate_images_full_refuses_a_truncated_jpeg_up_front(jsonl, tmp_path, capsys):
  """A JPEG cut short passes the header check (it fails only when decoded, mid-run); --validate-images full
  decodes every image before anything loads and names the row."""
  import io

  from PIL import Image
  from pgjax import demo
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "JPEG")
  (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 9 // 10])
  rows = demo.questions("train")[:3]
  demo.write_jsonl(str(tmp_path / "bad.jsonl"), rows)
  lines = (tmp_path / "bad.jsonl").read_text().splitlines()
  lines[2] = json.dumps({**json.loads(lines[2]), "image": str(tmp_path / "cut.jpg")})
  (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
  assert len(cli._rows(str(tmp_path / "bad.jsonl"), None, False, "train")) == 3  # the header check passes it
  assert cli.main(_b(tmp_path, tmp_path / "out", "--steps", "1", "--validate-images", "full", train="bad.jsonl")) == 2
  err = capsys.readouterr().err
  assert "bad.jsonl:3" in err and "cut.jpg" in err
  assert not (tmp_path / "out" / "checkpoints").exists()


def test_batch_size_that_does_not_split_over_the_devices_is_named(jsonl, tmp_path, capsys):
  """The tests run on 8 CPU devices (conftest): a batch of 4 cannot be split over them; refused before the
  model loads, naming the flag and the multiple to use."""
  argv = _b(jsonl, tmp_path / "out", "--steps", "1")
  argv[argv.index("--batch-size") + 1] = "4"
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "--batch-size 4 does not split over the 8 data-parallel devices" in err and "multiple of 8" in err
  assert not (tmp_path / "out" / "checkpoints").exists()


def test_eval_html_shows_the_first_report_examples_and_scores_all(tmp_path, capsys):
  from pgjax import demo
  demo.write_jsonl(str(tmp_path / "val.jsonl"), demo.questions("test")[:3])
  assert cli.main(["eval", "--data", str(tmp_path / "val.jsonl"), "--max-new-tokens", "4", "--batch-size", "8",
                   "--html", str(tmp_path / "e.html"), "--report-examples", "2",
                   "--predictions", str(tmp_path / "p.jsonl")]) == 0
  page = (tmp_path / "e.html").read_text()
  assert page.count('<img src="data:image/') == 2 and "the first 2 of 3 rows" in page
  assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 3


def test_predict_refuses_a_prompt_that_is_not_utf8(capsys):
  """Bytes that are not UTF-8 reach Python as lone surrogates (os.fsdecode); refused naming the flag."""
  from pgjax import demo
  image = demo.questions("test")[0]["image"]
  assert cli.main(["predict", "--image", image, "--prompt", "caption \udcff"]) == 2
  assert "--prompt" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_saves_the_last_step_and_exits_143_in_one_line(jsonl, tmp_path):
  """What `timeout`, Slurm and preemptible VMs send: the run saves its last completed step, logs it, prints one
  line naming where, and exits 128 + 15 with no traceback; the same command then resumes after that step."""
  import signal
  import subprocess
  import sys
  import time
  out = tmp_path / "r"
  argv = [sys.executable, "-m", "pgjax.cli", *_b(jsonl, out, "--steps", "100000", "--save-every", "0")]
  proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.exists(out / "metrics.jsonl") and len(_loss_steps(out)) >= 3):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-2000:]
  assert "Traceback" not in err and "pgjax finetune: stopped by SIGTERM;" in err
  saved = rundir.latest(out)
  assert f"{saved} holds the last saved step" in err
  step = rundir.read_state(saved)["step"]
  assert _loss_steps(out) == list(range(1, step + 1))  # every completed step logged once, up to the saved one
  assert cli.main(_b(jsonl, out, "--steps", str(step + 2))) == 0
  assert _loss_steps(out) == list(range(1, step + 3))


def test_resume_after_a_hard_kill_logs_each_step_once(jsonl, tmp_path):
  """kill -9 after step 3 was logged but before step 4's save: the checkpoint holds step 2, the log runs to 3 and
  ends in half a line. The resumed run cuts the log back to step 2, so every step appears once."""
  out = tmp_path / "r"
  assert cli.main(_b(jsonl, out, "--steps", "4", "--save-every", "2")) == 0
  root = out / "checkpoints"
  shutil.rmtree(root / "step_000004")
  (root / "LATEST").write_text("step_000002\n")
  lines = (out / "metrics.jsonl").read_text().splitlines()
  (out / "metrics.jsonl").write_text("\n".join(lines[:3]) + '\n{"step": 4, "lo')
  assert cli.main(_b(jsonl, out, "--steps", "4", "--save-every", "2")) == 0
  assert _loss_steps(out) == [1, 2, 3, 4]


def test_a_second_run_on_the_same_folder_is_refused(jsonl, tmp_path, capsys):
  out = tmp_path / "r"
  out.mkdir()
  with rundir.hold(out):  # the first run, still going
    assert cli.main(_b(jsonl, out, "--steps", "1")) == 2
  err = capsys.readouterr().err
  assert f"{out} is in use by another run ({os.getpid()}@" in err
  assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_special_files_exit_2_naming_what_they_are(jsonl, tmp_path, capsys):
  """A FIFO would hang the open forever, /dev/zero would be read until the kernel kills the process, a folder
  gave a traceback: each is refused before it is opened, naming the flag's path and what it is."""
  from pgjax import demo
  fifo = tmp_path / "pipe"
  os.mkfifo(fifo)
  (tmp_path / "zero.npz").symlink_to("/dev/zero")
  tok = os.path.join(demo.DEMO_DIR, "tokenizer.model")
  image = demo.questions("test")[0]["image"]
  cases = [
      (["inspect", str(fifo)], f"{fifo}: is a FIFO"),
      (["predict", "--checkpoint", str(tmp_path / "zero.npz"), "--tokenizer", tok, "--image", image, "--prompt", "x"],
       f"{tmp_path / 'zero.npz'}: is a character device"),
      (["predict", "--checkpoint", os.path.join(demo.DEMO_DIR, "demo.npz"), "--tokenizer", str(fifo), "--image", image,
        "--prompt", "x"], f"tokenizer model {fifo}: is a FIFO"),
      (["predict", "--image", str(fifo), "--prompt", "caption en"], f"image {fifo}: is a FIFO"),
      (["eval", "--data", str(fifo)], f"JSONL {fifo}: is a FIFO"),
      (["eval", "--data", str(jsonl / "good.jsonl"), "--predictions", str(tmp_path)],
       f"--predictions {tmp_path}: exists and is not a regular file"),
  ]
  for argv, message in cases:
    assert cli.main(argv) == 2, argv
    assert message in capsys.readouterr().err, argv


def test_a_batch_larger_than_the_data_is_refused_naming_the_flag(jsonl, tmp_path, capsys):
  argv = _b(jsonl, tmp_path / "r", "--steps", "1")
  argv[argv.index("--batch-size") + 1] = "24"
  assert cli.main(argv) == 2
  assert "--batch-size 24 is more than the 16 training examples" in capsys.readouterr().err


def test_inspect_counts_past_int64(tmp_path, capsys):
  """A header whose shape product overflows int64 (a damaged or hostile file) is counted in Python ints."""
  import zipfile
  with zipfile.ZipFile(tmp_path / "big.npz", "w") as zf:
    with zf.open("llm/x.npy", "w") as f:
      np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (2**40, 2**40)})
  assert cli.main(["inspect", str(tmp_path / "big.npz")]) == 0
  assert f"{2**80:,d} parameters" in capsys.readouterr().out


def test_resume_compares_the_base_checkpoint_by_content(jsonl, tmp_path, capsys):
  """An identical copy of the base checkpoint elsewhere is the same base; a file replaced at the same path is not."""
  from pgjax import demo
  base = tmp_path / "base.npz"
  shutil.copy(os.path.join(demo.DEMO_DIR, "demo.npz"), base)
  out = tmp_path / "r"
  argv = lambda ckpt, steps: [*_b(jsonl, out, "--steps", steps)[:1], "--checkpoint", str(ckpt),
                              *_b(jsonl, out, "--steps", steps)[3:]]
  assert cli.main(argv(base, "1")) == 0
  moved = tmp_path / "elsewhere.npz"
  shutil.move(base, moved)
  assert cli.main(argv(moved, "2")) == 0  # the same content: resumed
  assert _loss_steps(out) == [1, 2]
  tree = checkpoint.load(moved)
  tree["llm"]["final_norm"]["scale"] = np.asarray(tree["llm"]["final_norm"]["scale"]) + 1
  checkpoint.save(moved, tree)
  capsys.readouterr()
  assert cli.main(argv(moved, "3")) == 2
  assert "base_checkpoint.sha256" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")
def test_a_full_disk_exits_2_naming_the_file_and_keeps_the_last_checkpoint(jsonl, tmp_path, capsys):
  """A disk that fills during the second save: one line naming the file and ENOSPC's words, exit 2; LATEST still
  names the first checkpoint, which loads."""
  import subprocess
  disk = tmp_path / "disk"
  disk.mkdir()
  # The demo's trainable params take 0.79 MB as npz: room for one checkpoint and the log, not for two.
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(disk)], check=True)
  try:
    out = disk / "r"
    assert cli.main(_b(jsonl, out, "--steps", "4", "--save-every", "2")) == 2
    err = capsys.readouterr().err
    assert f"pgjax finetune: error: {out / 'checkpoints'}" in err and "No space left on device" in err
    assert "Traceback" not in err
    assert rundir.latest(out).endswith("step_000002")
    checkpoint.load(os.path.join(rundir.latest(out), "trainable.npz"))
  finally:
    subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only mount needs root (CI runs as root)")
def test_a_read_only_out_exits_2_naming_it(jsonl, tmp_path, capsys):
  import subprocess
  ro = tmp_path / "ro"
  ro.mkdir()
  subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], check=True)
  try:
    assert cli.main(_b(jsonl, ro, "--steps", "1")) == 2
    assert f"{ro / 'pgjax.lock'}: Read-only file system" in capsys.readouterr().err
    assert cli.main(_b(jsonl, ro / "sub", "--steps", "1")) == 2
    assert f"--out {ro / 'sub'}: cannot make the folder (Read-only file system)" in capsys.readouterr().err
  finally:
    subprocess.run(["umount", str(ro)], check=True)


def test_a_folder_without_write_permission_exits_2_naming_it(jsonl, tmp_path, capsys, monkeypatch):
  # EACCES as a non-root user meets it: root (CI) may write anywhere, so the OS is made to refuse, as
  # os.makedirs does on a folder the user cannot write.
  import errno
  real = os.makedirs

  def refuse(path, *a, **k):
    if str(path).startswith(str(tmp_path / "locked")):
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    return real(path, *a, **k)

  monkeypatch.setattr(os, "makedirs", refuse)
  assert cli.main(_b(jsonl, tmp_path / "locked", "--steps", "1")) == 2
  assert f"--out {tmp_path / 'locked'}: cannot make the folder (Permission denied)" in capsys.readouterr().err


def test_eval_and_predict_decode_as_the_flags_say(tmp_path, capsys):
  from pgjax import demo, evaluate
  rows = demo.questions("test")[:3]
  demo.write_jsonl(str(tmp_path / "val.jsonl"), rows)
  argv = ["eval", "--data", str(tmp_path / "val.jsonl"), "--max-new-tokens", "4", "--batch-size", "4",
          "--predictions", str(tmp_path / "p.jsonl"), "--decode", "beam", "--beam-size", "2", "--compute-dtype", "float32"]
  assert cli.main(argv) == 0
  metrics = json.loads(capsys.readouterr().out)
  assert metrics["decoding"] == {"mode": "beam", "beam_size": 2}
  preds = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
  # The same as the library's beam search over the demo model (what the flags promise).
  cfg = demo.load_config().with_compute_dtype("float32")
  tok = finetune.load_tokenizer(os.path.join(demo.DEMO_DIR, "tokenizer.model"), cfg)
  params = checkpoint.load(os.path.join(demo.DEMO_DIR, "demo.npz"), cfg)
  want = evaluate.predict(params, cfg, tok, [r["image"] for r in rows], [r["prefix"] for r in rows], batch_size=4,
                          max_new_tokens=4, decoding=decode.Decoding(mode="beam", beam_size=2))
  assert [p["prediction"] for p in preds] == [p["prediction"] for p in want]
  image = rows[0]["image"]
  sample = ["predict", "--image", image, image, "--prompt", rows[0]["prefix"], "--max-new-tokens", "4",
            "--decode", "sample", "--temperature", "2", "--top-p", "0.95", "--seed", "3"]
  assert cli.main(sample) == 0
  first = capsys.readouterr().out
  assert cli.main(sample) == 0 and capsys.readouterr().out == first  # the seed makes it reproducible
  assert cli.main(["predict", "--image", image, "--prompt", "x", "--top-k", "3"]) == 2
  assert "--top-k do(es) not apply to --decode greedy" in capsys.readouterr().err
  assert cli.main(["predict", "--image", image, "--prompt", "x", "--decode", "sample", "--top-p", "1.5"]) == 2
  assert "--top-p: expected a number in (0, 1], got 1.5" in capsys.readouterr().err


# ------------------------------------------------------------------ the detection and segmentation demos


@pytest.mark.parametrize("task,metric", [("detect", "map50"), ("segment", "miou")])
def test_detect_and_segment_demos_run_and_report_their_metric(tmp_path, task, metric, monkeypatch):
  from pgjax import demo
  monkeypatch.setattr(demo, "MASK_DIR", str(tmp_path / "masks"))
  out = tmp_path / "run"
  assert cli.main(["finetune", "--demo", task, "--out", str(out), "--steps", "2", "--batch-size", "8",
                   "--val-limit", "8", "--eval-every", "0", "--report-examples", "4"]) == 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["demo"] == task
  for when in ("before", "after"):
    assert summary[when]["task"] == task and summary[when]["count"] == 8
    assert 0.0 <= summary[when][metric] <= 1.0
  page = (out / "report.html").read_text()
  assert page.count('<img src="data:image/') == (8 if task == "segment" else 4)  # segment: target | prediction
  if task == "segment":
    assert len(list((tmp_path / "masks").glob("*.png"))) > 3000  # the train and test masks, written once


def test_demo_flag_needs_no_train_file(jsonl, tmp_path, capsys):
  assert cli.main(_b(jsonl, tmp_path / "r", "--demo", "detect")) == 2
  assert "--demo picks the embedded demo's task" in capsys.readouterr().err


# ------------------------------------------------------------------ LoRA and quantized bases from the command line


def test_lora_run_then_predict_with_its_adapter_pgjax_or_peft(tmp_path, capsys):
  from pgjax import demo, hf
  out = tmp_path / "run"
  assert cli.main(["finetune", "--out", str(out), "--lora", "4", "--lora-alpha", "8", "--quantize", "int8",
                   "--steps", "3", "--batch-size", "8", "--val-limit", "8", "--lr", "2.0"]) == 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["trained"].startswith("LoRA rank 4, alpha 8") and summary["trained"].endswith("int8")
  image = demo._image_paths("test")[0]
  capsys.readouterr()
  answers = {}
  for name, extra in (("run", ["--adapter", str(out)]), ("run-int8", ["--adapter", str(out), "--quantize", "int8"])):
    assert cli.main(["predict", "--image", image, "--prompt", "answer en what shape is in the image?", *extra]) == 0
    answers[name] = capsys.readouterr().out.strip().split("\t")[1]
  adapters, alpha = cli._adapter(str(out), demo.load_config())
  assert alpha == 8.0 and all(k.endswith(("/a", "/b")) for k in tree.flatten(adapters))
  hf.export_peft(adapters, demo.load_config(), tmp_path / "peft", alpha=alpha)
  assert cli.main(["predict", "--image", image, "--prompt", "answer en what shape is in the image?",
                   "--adapter", str(tmp_path / "peft")]) == 0
  assert capsys.readouterr().out.strip().split("\t")[1] == answers["run"]  # the same adapters, through PEFT's files
  assert cli.main(["predict", "--image", image, "--prompt", "x", "--adapter", str(tmp_path)]) == 2
  assert "neither a PEFT adapter" in capsys.readouterr().err
  assert cli.main(["finetune", "--out", str(out), "--quantize", "int3"]) == 2
  assert "expected int8 or int4, got 'int3'" in capsys.readouterr().err


def test_lora_without_lr_or_optimizer_takes_adamw_at_1e3():
  tc = cli.train_config(cli._parser().parse_args(["finetune", "--lora", "8"]))
  assert (tc.lora_rank, tc.optimizer.name, tc.lr, tc.adapter_alpha) == (8, "adamw", 1e-3, 16.0)
  tc = cli.train_config(cli._parser().parse_args(["finetune", "--lora", "8", "--lr", "0.5"]))
  assert (tc.optimizer.name, tc.lr) == ("sgd", 0.5)  # the preset's optimizer at the given lr
