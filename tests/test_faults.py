"""Faults a user meets: nothing they do loses their data or silently changes a result,
and each ends in one line. Training faults run train.py on a small class-per-folder set
of real digit images (240 training, 60 validation: 7 steps of 32 per epoch)."""

import contextlib
import json
import os
import pathlib
import signal
import socket
import struct
import subprocess
import time
import zlib

import jax
import numpy as np
import pytest

import convert_torch_weights
import evaluate
import predict
import spanet_jax
from configs import demo
from spanet_jax.train import loop, run_lock
from conftest import TINY, run_main, tiny_reference
from test_train import FAST, metrics, run_train, why


def digit_folder(root: pathlib.Path, count: int = 300) -> pathlib.Path:
  from PIL import Image
  from sklearn.datasets import load_digits
  digits = load_digits()
  for index, (image, label) in enumerate(zip(digits.images[:count], digits.target[:count])):
    split = "val" if index % 5 == 0 else "train"
    path = root / split / f"class_{label}"
    path.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.uint8(image * 15)).convert("RGB").save(path / f"{index}.png")
  return root


# The fault runs' schedule and data are the same throughout: their training and
# evaluation steps compile once for all of them (the tests' shared compilation cache).
SCHEDULE = ("--config.num_epochs=2", "--config.warmup_epochs=1", "--config.cooldown_epochs=1",
            "--config.lr_schedule=cosine_per_epoch", "--config.log_every_steps=1")


def folder_run(workdir, root, *extra, wait=True):
  return run_train(workdir, f"--config.folder={root}", "--config.eval_split=val",
                   "--config.batch_size=32", *extra, wait=wait, data_dir=str(root),
                   fast=(FAST[0], "--config.log_every_steps=5", "--config.eval_every_epochs=1"))


def one_error_line(result) -> str:
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in result.stderr, why(result.stderr)
  return errors[0]


def snapshot(workdir: pathlib.Path) -> dict:
  return {str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in workdir.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_run_survives_a_bad_eval_image_ctrl_c_a_refused_resume_and_a_stale_lock(tmp_path):
  """Three epochs on the official per-epoch schedule (warm-up, cosine, cooldown), a line
  per step, through every fault: at the end each update has exactly one row, with
  timm's lr for its epoch."""
  from test_recipe import official_update_lrs
  root = digit_folder(tmp_path / "digits")
  bad = root / "val" / "class_0" / "bad.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
  workdir = tmp_path / "run"
  common = SCHEDULE + ("--config.checkpoint_every_steps=100",)

  # An undecodable validation image: the epoch is saved first, the file is named.
  result = folder_run(workdir, root, *common, "--config.profile_steps=(2, 2)")
  assert result.returncode == 2
  line = one_error_line(result)
  assert f"evaluation at step 7 failed: cannot decode {bad} as an image" in line
  assert "The state of step 7 is saved" in line
  assert (workdir / "checkpoints" / "7").is_dir()
  assert "240 images" in result.stdout and "7 steps/epoch, 21 steps" in result.stdout
  assert "(first step; compiled in" in result.stdout and "/device)" in result.stdout
  traces = list((workdir / "profile").rglob("*.xplane.pb"))
  assert traces and "profile of steps 3-4 written under" in result.stdout
  assert json.loads((workdir / "class_names.json").read_text()) == [
      f"class_{i}" for i in range(10)]

  # Fixed, rerun: it resumes at step 7; Ctrl-C saves the step it is at and exits.
  bad.unlink()
  process = folder_run(workdir, root, *common, "--config.checkpoint_every_steps=1",
                       wait=False)
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / "9").exists():
    assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
    time.sleep(0.1)
  process.send_signal(signal.SIGINT)
  stdout, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, why(stderr)
  assert "at step 7" in stdout and "received signal 2" in stdout and "Traceback" not in stderr
  stopped_at = max(int(d) for d in os.listdir(workdir / "checkpoints"))
  assert 9 <= stopped_at < 21

  # Another architecture on the same workdir: refused, every file of the run as it was.
  before = snapshot(workdir)
  config = folder_config(root)
  config.model_overrides.layers = (1, 1, 2, 1)
  assert "holds a run of another model (model_overrides" in in_process_run(config, workdir)
  assert snapshot(workdir) == before

  # A live run's lock refuses a second run; a dead run's lock is taken over.
  lock = workdir / run_lock.LOCK_FILE
  lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
  assert "is in use by another train.py run" in in_process_run(folder_config(root), workdir)
  gone = subprocess.Popen(["true"])
  gone.wait()
  lock.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid}))
  finished = folder_run(workdir, root, *common)
  assert finished.returncode == 0, why(finished.stderr)
  assert "took over the lock of an earlier run" in finished.stdout
  assert f"at step {stopped_at}" in finished.stdout and not lock.exists()
  rows = metrics(workdir)
  logged = [r for r in rows if "train/lr" in r]
  assert [r["step"] for r in logged] == list(range(1, 22))  # one row per step
  expected = official_update_lrs(2e-3 * 32 / 64, 2, 1, 1, 1e-6, 1e-5, updates_per_epoch=7)
  np.testing.assert_allclose([r["train/lr"] for r in logged], expected, rtol=1e-5)
  rates = [r for r in logged if "train/images_per_s_per_device" in r]
  assert len(rates) >= 17 and all(r["train/images_per_s_per_device"] > 0 for r in rates)
  assert [r["step"] for r in rows if "eval/top1" in r] == [14, 21]
  assert (workdir / "final").is_dir()


def folder_config(root):
  """The config folder_run gives train.py, for runs in this process."""
  config = demo.get_config()
  config.folder, config.eval_split, config.batch_size = str(root), "val", 32
  config.data_dir, config.model_overrides.dims = str(root), (8, 16, 24, 32)
  return config


@pytest.mark.slow
def test_an_undecodable_training_image_is_named_and_the_step_saved(tmp_path):
  root = digit_folder(tmp_path / "digits")
  bad = root / "train" / "class_3" / "empty.png"
  bad.write_bytes(b"")
  result = folder_run(tmp_path / "run", root, *SCHEDULE)
  assert result.returncode == 2
  line = one_error_line(result)
  assert f"cannot decode the training image {bad}" in line
  assert "replace it with a readable image" in line and "is saved in" in line


def in_process_run(config, workdir):
  with pytest.raises(loop.ConfigError) as raised:
    loop.run(config, str(workdir))
  text = str(raised.value)
  assert "\n" not in text
  return text


def test_labels_beyond_num_classes_and_unmatched_val_classes_are_refused(tmp_path):
  root = digit_folder(tmp_path / "digits", count=60)
  config = demo.get_config()
  config.folder, config.eval_split, config.num_classes = str(root), "val", 5
  assert "config.num_classes=5, but the dataset has 10 classes" in in_process_run(
      config, tmp_path / "few")
  config.num_classes = 10
  renamed = sorted((root / "val").iterdir())[0]
  renamed.rename(root / "val" / "seven")
  text = in_process_run(config, tmp_path / "renamed")
  assert "class folders that" in text and "seven" in text
  assert not (tmp_path / "few").exists() and not (tmp_path / "renamed").exists()


def test_init_from_a_checkpoint_that_does_not_fit_is_refused(tmp_path):
  """A checkpoint of other widths: only the 10-way head would load."""
  other = spanet_jax.create_model("spanet_s", layers=(1, 1, 1, 1), dims=(16, 32, 48, 64),
                                  num_classes=10)
  shapes = jax.eval_shape(other.init, jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3)))
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])
  spanet_jax.save_pretrained(str(tmp_path / "other"), "spanet_s", params,
                             {"layers": [1, 1, 1, 1], "dims": [16, 32, 48, 64],
                              "num_classes": 10})
  root = digit_folder(tmp_path / "digits", count=100)
  config = demo.get_config()
  config.folder, config.eval_split, config.batch_size = str(root), "val", 16
  config.model_overrides.dims = (8, 16, 24, 32)
  config.init_from = str(tmp_path / "other")
  text = in_process_run(config, tmp_path / "run")
  assert "none of the" in text and "init_from_partial=True" in text
  assert not (tmp_path / "run").exists()


def test_evaluation_counts_each_file_once_through_symlink_loops(tmp_path):
  from spanet_jax.data import preprocess
  val = tmp_path / "val"
  for index, photo in enumerate(preprocess.sample_photo_paths()[:4]):
    folder = val / registry_synset(index)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / os.path.basename(photo)).write_bytes(pathlib.Path(photo).read_bytes())
  first = val / registry_synset(0)
  (first / "loop").symlink_to("..")  # val/<synset>/loop -> val
  (first / "again.png").symlink_to(first / os.listdir(first)[0])  # the same file twice
  (first / "broken.png").symlink_to(tmp_path / "nowhere.png")
  out = tmp_path / "result.json"
  code, _, stderr = run_main(evaluate.main, "--checkpoint", f"init:{TINY}", "--data", val,
                             "--output", out)
  assert code == 0, stderr
  assert json.loads(out.read_text())["num_images"] == 4


def registry_synset(index: int) -> str:
  from spanet_jax.data import labels
  return labels.imagenet_synsets()[[281, 967, 404, 1][index % 4]]


def png_declaring(width: int, height: int) -> bytes:
  """A few bytes of PNG whose header declares width x height pixels."""
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
          + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_one_line(tmp_path):
  bomb = tmp_path / "bomb.png"
  bomb.write_bytes(png_declaring(20000, 20000))
  code, _, stderr = run_main(predict.main, bomb, "--checkpoint", f"init:{TINY}")
  lines = stderr.strip().splitlines()
  assert code == 2 and "Traceback" not in stderr, stderr
  assert lines[-1].startswith(f"error: refusing {bomb}") and "decompression bomb" in lines[-1]


@contextlib.contextmanager
def small_filesystem(path: pathlib.Path, size: str):
  """A tmpfs of `size` at `path` for the duration (mounting needs root, as CI runs)."""
  path.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, check=False)
  if mounted.returncode != 0:
    pytest.skip("needs a small filesystem (mount -t tmpfs, as root): "
                + mounted.stderr.decode().strip())
  try:
    yield path
  finally:
    subprocess.run(["umount", str(path)], check=False)


def test_a_full_disk_during_conversion_is_one_line_and_leaves_nothing(tmp_path):
  with small_filesystem(tmp_path / "small_disk", "16k") as disk:
    pth = tmp_path / "tiny.pth"
    import torch
    torch.save(tiny_reference().state_dict(), pth)
    code, _, stderr = run_main(convert_torch_weights.main, "--input", pth, "--model", TINY,
                               "--output", disk / "converted")
    assert code == 2 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"error: cannot write {disk / 'converted'}: no space left on the device; "
        "nothing was written")
    assert os.listdir(disk) == []
    converted = tmp_path / "converted"
    code, _, stderr = run_main(convert_torch_weights.main, "--input", pth, "--model", TINY,
                               "--output", converted)
    assert code == 0, stderr
    code, _, stderr = run_main(convert_torch_weights.main, "--to-torch", "--input",
                               converted, "--output", disk / "back.pth")
    assert code == 2 and "no space left on the device" in stderr.strip().splitlines()[-1]
    assert os.listdir(disk) == []


@pytest.mark.slow
def test_a_full_disk_during_training_is_one_line(tmp_path):
  """A workdir on a 600 KB filesystem: its state checkpoints do not fit."""
  with small_filesystem(tmp_path / "small_disk", "600k") as disk:
    root = digit_folder(tmp_path / "digits")
    result = folder_run(disk / "run", root, *SCHEDULE, "--config.checkpoint_every_steps=1",
                        "--config.keep_checkpoints=100")
    assert result.returncode == 2, why(result.stderr)
    line = one_error_line(result)
    assert "no space left on the device; training stopped at step" in line
