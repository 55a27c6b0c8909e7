"""Training: augmentation, optimizer pieces, sharding equivalence, and train.py itself
(demo dataset, resume after SIGTERM, NaN stop, bad configs)."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from spanet_jax.data import augment
from spanet_jax.train import schedules, steps
from spanet_jax.data import settings as data_settings
from spanet_jax.train import settings
from conftest import shared_across_workers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A fast demo: tiny widths, two epochs of 22 steps, a checkpoint every 10 steps.
FAST = ["--config.model_overrides.dims=(8, 16, 24, 32)", "--config.num_epochs=2",
        "--config.checkpoint_every_steps=10", "--config.log_every_steps=11",
        "--config.eval_every_epochs=1"]


def run_train(workdir, *extra, wait=True, data_dir=None, fast=tuple(FAST)):
  env = {**os.environ, "PYTHONPATH": REPO}
  command = [sys.executable, "train.py", "--config", "configs/demo.py", "--workdir",
             str(workdir), f"--config.data_dir={data_dir}", *fast, *extra]
  if not wait:
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)


def why(stderr: str) -> str:
  """The part of a failed run's stderr that says why: fatal log lines first, then the tail
  with the interpreter's list of extension modules (printed on an abort) cut off."""
  fatal = [line for line in stderr.splitlines()
           if re.match(r"(F\d{4} |E\d{4} |Fatal Python error|terminate called|.*Error: )", line)]
  tail = stderr.split("\nExtension modules:")[0][-3000:]
  return "\n".join(fatal[:20]) + "\n...\n" + tail


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def prepare_digits(path):
  from spanet_jax.data import pipeline
  config = default.get_config()
  config.dataset, config.data_dir = "sklearn_digits", str(path)
  pipeline.make_builder(data_settings.DatasetSource.from_config(config))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """sklearn_digits as a TFDS dataset, prepared once for the run (train.py reads it)."""
  return shared_across_workers(tmp_path_factory, "tfds", prepare_digits)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, data_dir):
  """(workdir, stdout, stderr) of a finished FAST run: 44 steps, state checkpoints kept at
  steps 30, 40 and 44. Made once for the run; tests that change it work on a copy."""
  def train(path):
    result = run_train(path / "run", data_dir=data_dir)
    assert result.returncode == 0, why(result.stderr)
    (path / "stdout").write_text(result.stdout)
    (path / "stderr").write_text(result.stderr)
  path = pathlib.Path(shared_across_workers(tmp_path_factory, "finished_run", train))
  return path / "run", (path / "stdout").read_text(), (path / "stderr").read_text()


# ---------------------------------------------------------------------------------------
# Pieces.


def test_label_smoothing_and_no_mixing():
  images = jnp.ones((4, 8, 8, 3))
  out, targets = augment.mix_batch(jax.random.PRNGKey(0), images, jnp.array([0, 1, 2, 3]), 10,
                                   0.0, 0.0, 0.5, 0.1)
  np.testing.assert_array_equal(out, images)
  np.testing.assert_allclose(targets[0, 0], 0.9 + 0.01, rtol=1e-6)
  np.testing.assert_allclose(targets[0, 1], 0.01, rtol=1e-6)


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixing_targets_follow_the_pixels(mixup, cutmix):
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(size=(6, 16, 16, 3)).astype(np.float32))
  labels = jnp.arange(6)
  for seed in range(5):
    out, targets = augment.mix_batch(jax.random.PRNGKey(seed), images, labels, 6, mixup, cutmix,
                                     0.5, 0.0)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    lam = float(targets[0, 0])  # share of the image's own label
    assert float(targets[0, 5]) == pytest.approx(1 - lam, abs=1e-6)
    own = np.isclose(np.asarray(out[0]), np.asarray(images[0])).all(-1).mean()
    if cutmix and not mixup:  # every pixel comes from image 0 or image 5, in lam's shares
      assert own == pytest.approx(lam, abs=1e-6)
    if mixup and not cutmix:
      np.testing.assert_allclose(out[0], lam * images[0] + (1 - lam) * images[5], atol=1e-5)


def test_per_update_schedule_warms_up_then_decays_to_min_lr():
  config = default.get_config()
  config.num_epochs, config.warmup_epochs, config.batch_size = 10, 2, 512
  config.lr_schedule = "cosine_per_update"
  schedule = schedules.learning_rate_schedule(settings.of(config).schedule, batches_per_epoch=100)
  assert float(schedule(0)) == pytest.approx(1e-6, rel=1e-5)
  assert float(schedule(200)) == pytest.approx(5e-4, rel=1e-5)  # 1e-3 * 512 / 1024
  assert float(schedule(1000)) == pytest.approx(1e-5, rel=1e-5)
  assert float(schedule(100)) < float(schedule(200)) > float(schedule(600))
  assert float(schedule(1099)) == pytest.approx(1e-5, rel=1e-5)  # the cooldown epoch



def test_weight_decay_skips_one_dimensional_parameters():
  mask = steps.decay_mask({"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3),
                             "scale": jnp.ones(3), "conv": jnp.ones((1, 7, 1, 4))})
  assert mask == {"kernel": True, "bias": False, "scale": False, "conv": True}


def test_pretrained_merge_keeps_matching_tensors_and_reports_new_head():
  from spanet_jax.models import pretrained
  params = {"backbone": {"w": jnp.zeros((2, 2))}, "head": {"kernel": jnp.zeros((4, 10))}}
  stored = {"backbone": {"w": jnp.ones((2, 2))}, "head": {"kernel": jnp.ones((4, 1000))},
            "norm": {"scale": jnp.ones((4,))}}
  merged, report = pretrained.merge_pretrained(params, stored)
  np.testing.assert_array_equal(merged["backbone"]["w"], 1.0)
  np.testing.assert_array_equal(merged["head"]["kernel"], 0.0)
  assert report.added == ("head/kernel",)
  assert report.dropped == ("head/kernel", "norm/scale")


@pytest.mark.slow
def test_eight_devices_and_fsdp_match_one_device(tmp_path):
  """Same global batch: loss and every gradient agree to float32 rounding: 1e-5 of the
  largest gradient, plus 1e-7 for reading gradients off an SGD step (params - new params
  rounds at the parameters' ulp)."""
  env = {**os.environ, "PYTHONPATH": REPO,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8 " + os.environ.get("XLA_FLAGS", "")}
  out = subprocess.run([sys.executable, "tests/helpers/sharded_step.py", str(tmp_path), "1:1",
                        "8:1", "8:2"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, why(out.stderr)
  results = json.loads(out.stdout.strip().splitlines()[-1])
  grads = {mesh: dict(np.load(tmp_path / f"{mesh.replace(':', '_')}.npz")) for mesh in results}
  one, grads_one = results["1:1"], grads["1:1"]
  assert any("model" in spec for spec in results["8:2"]["param_specs"])  # really sharded
  for mesh in ("8:1", "8:2"):
    assert results[mesh]["loss"] == pytest.approx(one["loss"], rel=1e-6)
    for key, value in grads_one.items():
      scale = max(np.abs(value).max(), 1e-12)
      assert np.abs(grads[mesh][key] - value).max() < 1e-5 * scale + 1e-7, (mesh, key)


# ---------------------------------------------------------------------------------------
# train.py end to end on the demo dataset.


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, finished_run, data_dir):
  """SIGTERM right after a scheduled checkpoint (one every step until then), restart with
  the usual schedule: the final weights are bit-identical to the uninterrupted run's."""
  whole, stdout, stderr = finished_run
  evals = [r for r in metrics(whole) if "eval/top1" in r]
  assert [r["step"] for r in evals] == [22, 44]
  assert all(0.0 <= r["eval/top1"] <= 1.0 for r in evals)
  assert os.path.isfile(whole / "config.json")
  assert os.listdir(whole / "tensorboard")
  # A readable console: train.py's own lines; library INFO lines go to train.log.
  console = (stdout + stderr).splitlines()
  absl_format = [line for line in console if re.match(r"[IWEF]\d{4} ", line)]
  assert len(console) <= 30 and len(absl_format) <= 3, "\n".join(console)
  assert "compiling the training step..." in stdout and "(first step; compiled in" in stdout
  assert "oneDNN" not in stdout + stderr  # TensorFlow's start-up notice
  assert "checkpoint" in (whole / "train.log").read_text().lower()

  workdir = tmp_path / "resumed"
  process = run_train(workdir, "--config.checkpoint_every_steps=1", wait=False,
                      data_dir=data_dir)
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / "2").exists():
    assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
    time.sleep(0.1)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, why(stderr)
  assert "received signal 15" in stdout and "Traceback" not in stderr
  stopped_at = max(int(d) for d in os.listdir(workdir / "checkpoints"))
  assert 2 <= stopped_at < 44

  again = run_train(workdir, data_dir=data_dir)
  assert again.returncode == 0, why(again.stderr)
  assert "resumed from" in again.stdout and f"at step {stopped_at}" in again.stdout
  first_logged = [r["step"] for r in metrics(workdir) if r["step"] > stopped_at][0]
  assert first_logged > stopped_at > 0

  import spanet_jax
  _, a = spanet_jax.load_pretrained(str(whole / "final"))
  _, b = spanet_jax.load_pretrained(str(workdir / "final"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_nan_loss_stops_without_overwriting_the_checkpoint(tmp_path, data_dir):
  result = run_train(tmp_path / "nan", "--config.lr=1e12", "--config.warmup_epochs=0",
                     data_dir=data_dir)
  # Exit status 1, not a hang or an abort: the input pipeline and the checkpoint
  # managers are shut down before the interpreter is.
  assert result.returncode == 1, why(result.stderr)
  match = re.search(r"the loss became (nan|inf|-inf) at step (\d+); stopping without saving "
                    r"\((.*)\): lower config.lr", result.stderr)
  assert match and "Traceback" not in result.stderr, why(result.stderr)
  bad_step = int(match.group(2))
  checkpoints = tmp_path / "nan" / "checkpoints"
  saved = [int(d) for d in os.listdir(checkpoints)] if checkpoints.exists() else []
  assert all(step < bad_step for step in saved)
  assert match.group(3) == (f"the last good checkpoint (step {max(saved)}) is in {checkpoints}"
                            if saved else "no checkpoint was saved before it")
  assert not (tmp_path / "nan" / "final").exists()


@pytest.mark.slow
def test_the_loop_reads_device_values_only_at_log_eval_and_checkpoint_steps(
    tmp_path, data_dir, monkeypatch):
  """Between sync points (a log, evaluation or checkpoint step) the host only dispatches:
  every read of a device array's value in the loop's thread is recorded with the number
  of batches handed to the step so far, and each falls on a sync step."""
  import logging as std_logging
  import threading
  from jax._src import array
  from configs import demo
  from spanet_jax.train import loop, mesh
  events, main = [], threading.get_ident()
  value = array.ArrayImpl._value

  def recording_value(self):
    if threading.get_ident() == main:
      events.append("read")
    return value.fget(self)

  prefetch = mesh.prefetch_to_device

  def counting_prefetch(*args, **kwargs):
    for batch in prefetch(*args, **kwargs):
      events.append("batch")
      yield batch

  config = demo.get_config()
  config.data_dir, config.model_overrides.dims = data_dir, (8, 16, 24, 32)  # as FAST
  config.num_epochs, config.log_every_steps, config.checkpoint_every_steps = 2, 5, 15
  config.eval_every_epochs = 1
  handlers = list(std_logging.getLogger().handlers)
  sigterm = signal.getsignal(signal.SIGTERM)
  monkeypatch.setattr(array.ArrayImpl, "_value", property(recording_value))
  monkeypatch.setattr(mesh, "prefetch_to_device", counting_prefetch)
  try:
    loop.run(config, str(tmp_path / "run"))
  finally:
    signal.signal(signal.SIGTERM, sigterm)
    for handler in set(std_logging.getLogger().handlers) - set(handlers):
      std_logging.getLogger().removeHandler(handler)
  batches, read_after = 0, set()
  for event in events:
    if event == "batch":
      batches += 1
    else:
      read_after.add(batches)
  assert batches == 44
  sync_steps = ({0, 1, 44} | set(range(5, 45, 5)) | {22} | {15, 30})  # start, logs, evals, saves
  assert read_after <= sync_steps, sorted(read_after - sync_steps)
  assert {1, 5, 10, 15, 22, 44} <= read_after


@pytest.mark.parametrize("override,message", [
    ("batch_size=0", "config.batch_size=0 must be positive"),
    ("dtype='float16'", "use float32 or bfloat16"),
    ("model='spanet_xl'", "not one of"),
    ("dataset='no_such_dataset_xyz'", "TFDS has no dataset 'no_such_dataset_xyz'"),
    ("folder='/nonexistent/imagenet'", "no such folder: /nonexistent/imagenet"),
    ("randaugment='rand-m9'", "config.randaugment: randaugment spec 'rand-m9': only"),
    ("random_erasing=1.5", "config.random_erasing=1.5 is a probability"),
    ("head_dropout=0.2", "config.head_dropout: spanet_s has no MLP head"),
    ("optimizer='sgd'", "config.optimizer='sgd': use adamw or lamb"),
    ("head_dropout=1.5", "config.head_dropout=1.5 must be in [0, 1)"),
    ("model='spanetv2_s18_hybrid'",  # the tests' widths (8, 16, 24, 32): 24 % 32 != 0
     "cannot be built: MixAttention needs channels divisible by 32"),
    ("lr=float('nan')", "config.lr=nan must be a finite number"),
    ("lr_schedule='linear'", "config.lr_schedule='linear': use one of cosine_per_epoch, "
                             "cosine_per_update"),
    ("cooldown_epochs=-1", "config.cooldown_epochs=-1 must not be negative"),
    ("eval_every_epochs=0", "config.eval_every_epochs=0 must be positive"),
    ("lr_base_batch=0", "config.lr_base_batch=0 must be positive"),
    ("mesh_model=3", "config.mesh_model=3 does not divide the 1 devices"),
    ("eval_batch_size=-1", "config.eval_batch_size=-1 must be positive (or 0: batch_size)"),
    ("label_smoothing=1.5", "config.label_smoothing=1.5 must be below 1"),
    ("prefetch=0", "config.prefetch=0 must be positive"),
    ("crop_pct=1.5", "config.crop_pct=1.5: use a fraction in (0, 1], or -1"),
    ("crop_scale=(0.5, 0.1)", "config.crop_scale=(0.5, 0.1): give (min, max) area fractions"),
    ("crop_ratio=(0.0, 1.0)", "config.crop_ratio=(0.0, 1.0): give (min, max) aspect ratios"),
    ("b2=1.0", "config.b2=1.0 must be in [0, 1)"),
    ("eps=0.0", "config.eps=0.0 must be positive"),
    ("num_classes=5", "config.num_classes=5, but the dataset has 10 classes"),
    ("model_overrides", "config.model_overrides.layers=(3,): give four positive whole"),
    ("profile_steps=(3,)", "config.profile_steps=(3,): give (first step, number of steps)"),
])
def test_bad_config_values_are_named(override, message, tmp_path, data_dir):
  """Every value is checked before any work (in-process: the loop train.py runs)."""
  from configs import demo
  from spanet_jax.train import loop
  config = demo.get_config()
  config.data_dir, config.model_overrides.dims = data_dir, (8, 16, 24, 32)  # as FAST
  if override == "model_overrides":  # a nested key
    config.model_overrides.layers = (3,)
  else:
    key, value = override.split("=", 1)
    config[key] = eval(value)  # pylint: disable=eval-used  # the test's own literals
  with pytest.raises(loop.ConfigError) as raised:
    loop.run(config, str(tmp_path / "bad"))
  text = str(raised.value)
  assert message in text and "\n" not in text and "\\n" not in text
  assert not (tmp_path / "bad").exists()  # a mistake leaves no workdir behind


@pytest.mark.parametrize("override,message", [
    ("--config.lr=nan", "error: config.lr=nan must be a finite number"),
    ("--config.num_epochs=abc", "invalid literal for int() with base 10: 'abc')"),
    ("--config.learning_rate=0.1", "bad flag or config override (learning_rate)"),
])
def test_bad_config_on_the_command_line_is_one_line(override, message, tmp_path, data_dir):
  result = run_train(tmp_path / "bad", override, data_dir=data_dir)
  assert result.returncode == 2, why(result.stderr)
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr and "\\n" not in errors[0]
  assert not (tmp_path / "bad").exists()


def test_bad_paths_are_one_line_and_leave_nothing(tmp_path, data_dir):
  a_file = tmp_path / "a_file"
  a_file.write_text("keep")
  for args, message in [
      (["--workdir", str(a_file)], "is a file, not a directory"),
      (["--workdir", str(a_file / "run")], "a_file is not a writable directory"),
      (["--config", "configs/no_such_config.py"], "--config: no such file: "
                                                  "configs/no_such_config.py")]:
    env = {**os.environ, "PYTHONPATH": REPO}
    command = [sys.executable, "train.py", "--config", "configs/demo.py", "--workdir",
               str(tmp_path / "run"), f"--config.data_dir={data_dir}", *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert message in errors[0] and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["a_file"] and a_file.read_text() == "keep"


@pytest.mark.slow
def test_two_processes_through_jax_distributed(tmp_path, data_dir):
  """Two local processes (CPU collectives) train a few steps and agree on every number."""
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  workdir = tmp_path / "multi"
  # One epoch, a line every 4 steps, one state checkpoint (the last step's).
  one_epoch = [FAST[0], "--config.num_epochs=1", "--config.log_every_steps=4",
               "--config.checkpoint_every_steps=100", "--config.eval_every_epochs=1"]
  processes = [run_train(workdir, "--distributed", f"--coordinator_address=localhost:{port}",
                         "--num_processes=2", f"--process_id={i}", wait=False,
                         data_dir=data_dir, fast=one_epoch) for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in processes]
  codes = [p.returncode for p in processes]
  # One process failing takes the other down (the coordination service aborts it), so
  # report both: the first one to fail is not necessarily process 0.
  assert codes == [0, 0], f"exit codes {codes}\n" + "\n".join(
      f"--- process {index}:\n{why(stderr)}" for index, (_, stderr) in enumerate(outputs))
  logged = [[line for line in stdout.splitlines() if line.startswith("step ")]
            for stdout, _ in outputs]
  assert "on 2 devices" in outputs[0][0]
  strip_rate = lambda lines: [line.split(" img/s")[0].rsplit("  ", 1)[0] for line in lines]
  assert strip_rate(logged[0]) == strip_rate(logged[1]) and len(logged[0]) >= 5
  assert any("eval top-1" in line for line in logged[0])
  assert os.path.isdir(workdir / "final")

  # The two processes' state checkpoint restores here, on one device.
  import spanet_jax
  state = spanet_jax.restore_train_state(str(workdir))
  assert int(state["step"]) == 22
  _, final = spanet_jax.load_pretrained(str(workdir / "final"))
  for restored, saved in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(final["params"])):
    np.testing.assert_array_equal(np.asarray(restored), np.asarray(saved))

  # One process resumes the two's run: the batches do not depend on the process count.
  more = run_train(workdir, data_dir=data_dir)
  assert more.returncode == 0, why(more.stderr)
  assert "at step 22" in more.stdout and "step 44/44" in more.stdout
  assert "note: checkpoint" not in more.stdout  # the checksums hold on another layout
  assert "note: the learning-rate schedule differs from the run's before: num_epochs 1 -> 2" \
      in more.stdout


def copy_run(finished_run, target):
  shutil.copytree(finished_run[0], target)
  return target


def largest_data_file(workdir, step):
  data = workdir / "checkpoints" / str(step) / "default" / "ocdbt.process_0" / "d"
  return max(data.iterdir(), key=lambda path: path.stat().st_size)


@pytest.mark.slow
def test_resume_falls_back_past_damaged_checkpoints(tmp_path, finished_run, data_dir):
  """Flipped bytes fail the recorded checksum, a deleted or truncated data file fails the
  read: each is said in one line, the run resumes from the newest intact checkpoint and
  finishes, saving the damaged steps again. A stale final.old does not stop it."""
  from spanet_jax.models import pretrained
  from spanet_jax.train import checkpoints
  flipped = copy_run(finished_run, tmp_path / "flipped")
  path = largest_data_file(flipped, 44)
  intact = path.read_bytes()
  # Where the arrays lie in the file varies from run to run, and flipped bytes inside a
  # compressed block fail to decompress instead: flip where only the checksum can tell.
  for fraction in (0.5, 0.3, 0.7, 0.2, 0.8, 0.1, 0.9):
    at, raw = int(len(intact) * fraction), bytearray(intact)
    raw[at:at + 64] = bytes(b ^ 0xFF for b in raw[at:at + 64])
    path.write_bytes(bytes(raw))
    with pytest.raises(pretrained.CheckpointError, match="checkpoint 44 .* (fails its checksum|"
                       "cannot be restored)") as refused:
      checkpoints.restore_train_state(str(flipped))
    if "fails its checksum" in str(refused.value):
      break
  else:
    pytest.fail("every flipped range failed to decompress; none reached the checksums")
  with pytest.raises(pretrained.CheckpointError, match="no checkpoint for step 7: steps"):
    checkpoints.restore_train_state(str(flipped), step=7)
  with pytest.raises(pretrained.CheckpointError, match="no train.py checkpoints in"):
    checkpoints.restore_train_state(str(tmp_path / "nowhere"))
  with pytest.raises(pretrained.CheckpointError, match="has no checkpoint at all"):
    checkpoints.restore_train_state(str(tmp_path))
  (flipped / "final.old").mkdir()  # left by an overwrite interrupted earlier
  (flipped / "final.old" / "params").write_text("stale")
  broken = copy_run(finished_run, tmp_path / "broken")
  largest_data_file(broken, 44).unlink()
  with open(largest_data_file(broken, 40), "r+b") as f:
    f.truncate(100)
  with pytest.raises(pretrained.CheckpointError, match="checkpoint 44 .* cannot be restored"):
    checkpoints.restore_train_state(str(broken))
  for workdir, notes, resumed_at in [
      (flipped, [r"checkpoint 44 .* fails its checksum \(first damaged array: \S+\)"], 40),
      (broken, [r"checkpoint 44 .* cannot be restored", r"checkpoint 40 .* cannot be restored"],
       30)]:
    result = run_train(workdir, data_dir=data_dir)
    assert result.returncode == 0, why(result.stderr)
    console = (result.stdout + result.stderr).splitlines()
    said = [line for line in console if line.startswith("note: checkpoint")]
    assert len(said) == len(notes) and all(re.search(n, line) for n, line in zip(notes, said)), \
        "\n".join(console)
    assert f"at step {resumed_at}" in result.stdout
    assert "Traceback" not in result.stderr and len(console) <= 20, "\n".join(console)
    assert sorted(os.listdir(workdir / "damaged_checkpoints")) == sorted(
        str(step) for step in (44, 40) if step > resumed_at)
    assert "44" in os.listdir(workdir / "checkpoints")  # saved again
    assert os.path.isfile(workdir / "final" / "spanet.json")
    assert not (workdir / "final.old").exists()


def test_resume_with_no_intact_checkpoint_stops_without_touching_them(tmp_path, finished_run,
                                                                       data_dir):
  workdir = copy_run(finished_run, tmp_path / "ruined")
  shutil.rmtree(workdir / "final")
  for step in (30, 40, 44):
    largest_data_file(workdir, step).unlink()
  result = run_train(workdir, data_dir=data_dir)
  assert result.returncode == 2, why(result.stderr)
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "none of the checkpoints" in errors[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert sorted(os.listdir(workdir / "checkpoints")) == ["30", "40", "44"]
  assert not (workdir / "damaged_checkpoints").exists() and not (workdir / "final").exists()


def test_resume_with_another_data_order_stops_with_one_line(tmp_path, finished_run, data_dir):
  workdir = copy_run(finished_run, tmp_path / "order")
  again = run_train(workdir, "--config.batch_size=32", data_dir=data_dir)
  assert again.returncode == 2
  errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "batch_size 64 -> 32" in errors[0], again.stderr[-2000:]
  assert "Traceback" not in again.stderr


@pytest.mark.slow
def test_options_and_init_from_a_checkpoint_with_another_head(tmp_path, data_dir):
  """bfloat16, gradient accumulation, clipping, EMA, remat and init_from in one short run."""
  import spanet_jax
  model = spanet_jax.create_model("spanet_s", layers=(1, 1, 1, 1), dims=(8, 16, 24, 32))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  spanet_jax.save_pretrained(str(tmp_path / "pretrained"), "spanet_s", params,
                             {"layers": [1, 1, 1, 1], "dims": [8, 16, 24, 32]})
  result = run_train(tmp_path / "options", "--config.num_epochs=1", "--config.dtype=bfloat16",
                     "--config.grad_accum_steps=2", "--config.grad_clip=1.0",
                     "--config.ema_decay=0.9", "--config.remat=True",
                     f"--config.init_from={tmp_path / 'pretrained'}",
                     data_dir=data_dir)
  assert result.returncode == 0, why(result.stderr)
  assert "newly initialised: head/bias, head/kernel" in result.stdout
  evals = [r for r in metrics(tmp_path / "options") if "eval/top1" in r]
  assert len(evals) == 1 and 0.0 <= evals[0]["eval/top1"] <= 1.0


@pytest.mark.slow
def test_spanetv2_trains_and_its_weights_serve_the_tools(tmp_path, data_dir):
  """A tiny SPANetV2 hybrid (ExSPAM, MixAttention, Attention) through train.py with LAMB
  and head dropout; evaluate.py on its workdir reproduces the run's last evaluation."""
  import evaluate
  from conftest import run_main
  workdir = tmp_path / "v2"
  result = run_train(workdir, "--config.model=spanetv2_s18_hybrid",
                     "--config.model_overrides.layers=(1, 1, 1, 1)",
                     "--config.model_overrides.dims=(8, 16, 32, 64)", "--config.num_epochs=1",
                     "--config.optimizer=lamb", "--config.head_dropout=0.1",
                     "--config.drop_path_rate=0.1", data_dir=data_dir, fast=FAST[1:])
  assert result.returncode == 0, why(result.stderr)
  last = [r for r in metrics(workdir) if "eval/top1" in r][-1]
  output = tmp_path / "result.json"
  code, _, stderr = run_main(evaluate.main, "--checkpoint", workdir, "--data",
                             "sklearn_digits:test", "--data-dir", data_dir, "--output", output)
  assert code == 0, stderr
  result = json.loads(output.read_text())
  assert result["model"] == "spanetv2_s18_hybrid" and result["num_images"] == 360
  assert result["top1"] == pytest.approx(last["eval/top1"], abs=1 / 360)
  refused = run_train(tmp_path / "bad", "--config.model=spanetv2_s18_pure",
                      "--config.learnable_masks=True", data_dir=data_dir)
  assert refused.returncode == 2 and "masks are always learned" in refused.stderr


def test_unknown_spanetv2_variant_is_named(tmp_path):
  result = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/spanetv2.py:s99", "--workdir",
       str(tmp_path)], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True,
      text=True, timeout=300)
  assert result.returncode == 2
  assert "configs/spanetv2.py:s99: choose one of s18_pure" in result.stderr
  assert "Traceback" not in result.stderr


def default_config_for(data_dir):
  config = default.get_config()
  config.dataset, config.data_dir = "sklearn_digits", str(data_dir)
  return config


@pytest.mark.slow
def test_a_tfds_dataset_prepared_as_tfrecord_trains_and_resumes(tmp_path):
  """TFDS's default format: train.py writes an ArrayRecord copy beside it once (the same
  examples in the same order), trains, and a longer rerun resumes without copying again."""
  import tensorflow as tf
  from spanet_jax.data import pipeline
  data_dir = tmp_path / "tfds"
  builder = pipeline.SklearnDigits(data_dir=str(data_dir), file_format="tfrecord")
  builder.download_and_prepare()
  # The shared finished run's options: its compiled steps serve this run too.
  first = run_train(tmp_path / "run", data_dir=str(data_dir))
  assert first.returncode == 0, why(first.stderr)
  assert "is stored as tfrecord; writing an ArrayRecord copy beside it" in first.stdout
  assert "step 44/44" in first.stdout

  reopened = pipeline.make_builder(
      data_settings.DatasetSource.from_config(default_config_for(data_dir)))
  copy = reopened.as_data_source("train", file_format="array_record")
  original = [r.numpy() for r in tf.data.TFRecordDataset(
      sorted(str(p) for p in (data_dir / "sklearn_digits" / "1.1.0").glob("*train.tfrecord*")))]
  assert len(copy) == len(original) == 1437
  assert [copy[i]["label"] for i in range(5)] == [
      tf.train.Example.FromString(r).features.feature["label"].int64_list.value[0]
      for r in original[:5]]

  three_epochs = [f for f in FAST if "num_epochs" not in f] + ["--config.num_epochs=3"]
  again = run_train(tmp_path / "run", data_dir=str(data_dir), fast=three_epochs)
  assert again.returncode == 0, why(again.stderr)
  assert "writing an ArrayRecord copy" not in again.stdout
  assert "at step 44" in again.stdout and "step 66/66" in again.stdout


def test_recipe_warnings_name_settings_that_make_no_sense_for_the_data():
  config = default.get_config()
  config.batch_size, config.num_epochs, config.warmup_epochs = 2, 2, 5
  warnings = loop_module().recipe_warnings(config, steps_per_epoch=40, num_classes=4)
  assert any("peak learning rate is 2e-06" in w and "lr_base_batch" in w for w in warnings)
  assert any("warmup_epochs=5 is not below config.num_epochs=2" in w for w in warnings)
  assert any("log_every_steps=50 is longer than an epoch (40 steps)" in w for w in warnings)
  assert any("top-5 is always 100% with 4 classes" in w for w in warnings)
  config = default.get_config()
  assert loop_module().recipe_warnings(config, steps_per_epoch=1251, num_classes=1000) == []


def loop_module():
  from spanet_jax.train import loop
  return loop


@pytest.mark.slow
def test_finetune_config_adapts_trained_weights_to_a_new_class_set(tmp_path, finished_run):
  """configs/finetune.py from the demo run's weights (10 digits) to 4 of the digits in a
  class-per-folder set: a sensible accuracy within a few epochs, no recipe warning."""
  from PIL import Image
  from sklearn.datasets import load_digits
  digits = load_digits()
  root = tmp_path / "four"
  kept = [i for i, label in enumerate(digits.target) if label in (0, 3, 5, 8)][:320]
  for number, index in enumerate(kept):
    split = "val" if number % 5 == 0 else "train"
    path = root / split / f"digit_{digits.target[index]}"
    path.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.uint8(digits.images[index] * 15)).convert("RGB").save(
        path / f"{index}.png")
  workdir = tmp_path / "finetuned"
  env = {**os.environ, "PYTHONPATH": REPO}
  result = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/finetune.py", "--workdir",
       str(workdir), f"--config.init_from={finished_run[0]}",  # the workdir: its final/
       f"--config.folder={root}", "--config.num_epochs=8",
       "--config.image_size=32", "--config.crop_pct=1.0", "--config.hflip=0.0"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, why(result.stderr)
  assert "model from" in result.stdout and "spanet_s" in result.stdout
  assert "4 classes in" in result.stdout  # configs/finetune.py takes the dataset's count
  assert "initialised" in result.stdout and "newly initialised: head/bias, head/kernel" \
      in result.stdout
  assert "warning: the peak learning rate" not in result.stdout
  final = [r for r in metrics(workdir) if "eval/top1" in r][-1]
  assert final["eval/top1"] >= 0.8, final  # 0.875 on the test machine
