"""predict.py, evaluate.py and spectral_analysis.py, on converted and trained checkpoints."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
torch = pytest.importorskip("torch")  # the PyTorch references need it

import convert_torch_weights
import evaluate
import predict
import spanet_jax
import spectral_analysis
from configs import default
from spanet_jax.data import labels, preprocess
from spanet_jax.tools import frequency_analysis, inference
from conftest import TINY, TINY_ARCH, run_main, tiny_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREY_PHOTO = "camera.png"  # scikit-image's grey photograph: must become RGB


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  """An official-layout .pth of the tiny model (random, non-trivial weights), converted."""
  reference = tiny_reference(seed=3)
  root = tmp_path_factory.mktemp("official")
  pth = root / "tiny.pth"
  torch.save({"model": reference.state_dict()}, pth)
  converted = root / "converted"
  code, _, stderr = run_main(convert_torch_weights.main, "--input", pth, "--output", converted)
  assert code == 0, stderr
  return str(pth), str(converted), reference


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
  """Real photographs in ImageNet synset folders (val/<synset>/<image>), one grey, plus a
  file that is not an image and must be ignored."""
  root = tmp_path_factory.mktemp("photos") / "val"
  photos = preprocess.sample_photo_paths()
  photos.append(os.path.join(os.path.dirname(photos[0]), GREY_PHOTO))
  synsets = labels.imagenet_synsets()
  for number, path in enumerate(photos):
    folder = root / synsets[[281, 967, 404][number % 3]]  # tabby, espresso, airliner
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, folder / os.path.basename(path))
  (root / synsets[281] / "notes.txt").write_text("not an image")
  return str(root)


def torch_top5(reference, paths, data):
  """The official-layout PyTorch model's top-5 classes and probabilities per image."""
  images = np.stack([data.transform(preprocess.load_image(p)) for p in paths])
  with torch.no_grad():
    logits = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  return inference.top_k(logits, 5)


def read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------
# Class names and checkpoint loading.


def test_imagenet_labels_come_from_tfds_in_class_order():
  synsets, names = labels.imagenet_synsets(), labels.imagenet_class_names()
  assert len(synsets) == len(names) == 1000 and len(set(synsets)) == 1000
  assert synsets[0] == "n01440764" and names[0].startswith("tench")
  assert synsets[281] == "n02123045" and labels.short_name(names[281]) == "tabby"
  assert labels.short_name(names[999]) == "toilet tissue"


def test_load_refuses_what_is_not_a_checkpoint(tmp_path, official, tiny_variables):
  pth, _, _ = official
  cases = [(tmp_path / "missing", "no such checkpoint"),
           (pth, "PyTorch file.*convert_torch_weights.py"),
           (tmp_path, "neither a spanet-jax checkpoint")]
  lying = tmp_path / "lying"  # tiny weights described as SPANet-S
  spanet_jax.save_pretrained(str(lying), "spanet_s", tiny_variables["params"])
  cases.append((lying, "do not fit the model.*missing"))
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(default.get_config().to_json())
  cases.append((workdir, "no weights yet"))
  for path, message in cases:
    with pytest.raises(spanet_jax.CheckpointError, match=message):
      inference.load(str(path))


def test_load_reads_a_train_workdir_before_it_finishes(tmp_path, tiny_variables):
  import orbax.checkpoint as ocp
  config = default.get_config()
  config.model, config.num_classes, config.image_size = TINY, 1000, 64
  config.model_overrides.layers = TINY_ARCH["layers"]  # as a run that overrides them
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  with ocp.CheckpointManager(str(tmp_path / "best")) as manager:
    manager.save(30, args=ocp.args.StandardSave(tiny_variables["params"]),
                 metrics={"eval/top1": 0.5})
  loaded = inference.load(str(tmp_path))
  assert loaded.name == TINY and loaded.data.input_size == 64 and loaded.num_classes == 1000
  assert loaded.class_names[1].startswith("goldfish")  # ImageNet's, lacking the dataset's
  names = [f"dataset class {i}" for i in range(1000)]
  (tmp_path / "class_names.json").write_text(json.dumps(names))
  assert inference.load(str(tmp_path)).class_names[8] == "dataset class 8"
  jax.tree.map(np.testing.assert_array_equal, loaded.variables["params"],
               jax.device_get(tiny_variables["params"]))


# ---------------------------------------------------------------------------------------
# predict.py


def test_predict_gives_the_official_models_top5_with_imagenet_names(tmp_path, official):
  pth, converted, reference = official
  photos = preprocess.sample_photo_paths()[:5]
  out = tmp_path / "out" / "predictions.json"
  code, stdout, stderr = run_main(predict.main, *photos, "--checkpoint", converted,
                                  "--json", out, "--batch-size", 2)
  assert code == 0, stderr
  result = json.loads(out.read_text())
  names = labels.imagenet_class_names()
  classes, probs = torch_top5(reference, photos, inference.data_config(TINY))
  assert [p["image"] for p in result["predictions"]] == photos
  for row, want_classes, want_probs in zip(result["predictions"], classes, probs):
    assert [t["class"] for t in row["top"]] == list(want_classes)
    assert [t["name"] for t in row["top"]] == [names[c] for c in want_classes]
    np.testing.assert_allclose([t["probability"] for t in row["top"]], want_probs, atol=2e-6)
  assert names[classes[0][0]] in stdout and photos[0] in stdout


def test_predict_bad_input_is_one_message_and_writes_nothing(tmp_path, official):
  pth, converted, _ = official
  backbone = tmp_path / "backbone"  # a dense-prediction checkpoint: no classifier
  model = spanet_jax.create_model(TINY, features_only=True)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]
  spanet_jax.save_pretrained(str(backbone), TINY, params, {"features_only": True})
  diverged = tmp_path / "diverged"  # a classifier whose head holds a NaN
  _, variables = spanet_jax.load_pretrained(converted)
  params = jax.tree.map(np.asarray, variables["params"])
  params["head"]["bias"] = params["head"]["bias"].copy()
  params["head"]["bias"][3] = np.nan
  spanet_jax.save_pretrained(str(diverged), TINY, params)
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(b"\xff\xd8 this is not a JPEG")
  photo = preprocess.sample_photo_paths()[0]
  out = tmp_path / "predictions.json"
  for args, message in [((broken, "--checkpoint", converted), "cannot decode.*broken.jpg"),
                        ((tmp_path / "nope.png", "--checkpoint", converted), "no such image"),
                        ((photo, "--checkpoint", pth), "PyTorch file"),
                        ((photo, "--checkpoint", backbone), "without a classifier head"),
                        ((photo, "--checkpoint", converted, "--top-k", 0), "positive"),
                        ((photo, "--checkpoint", diverged), "NaN or infinite logits")]:
    code, _, stderr = run_main(predict.main, *args, "--json", out)
    lines = stderr.splitlines()
    # One error line, last; only the model's description may precede it (once loaded).
    assert code == 2 and lines[-1].startswith("error: ") and len(lines) <= 2, stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, stderr
    assert re.search(message, lines[-1]), stderr
    assert not out.exists()


def test_wide_image_modes_load_as_their_content(tmp_path):
  """16- and 32-bit integer and float images are scaled to 8 bits, not clipped."""
  from PIL import Image
  grey8 = np.asarray(preprocess.load_image(preprocess.sample_photo_paths()[0]).convert("L"))
  want = np.stack([grey8] * 3, axis=-1)
  files = {"grey16.png": Image.fromarray(grey8.astype(np.uint16) * 257),
           "grey32.tif": Image.fromarray(grey8.astype(np.int32) * 257, "I"),
           "unit_float.tif": Image.fromarray(grey8.astype(np.float32) / 255.0, "F"),
           "wide_float.tif": Image.fromarray(grey8.astype(np.float32) * 4.0 - 300.0, "F")}
  for name, image in files.items():
    image.save(tmp_path / name)
    with Image.open(tmp_path / name) as opened:
      assert opened.mode in ("I;16", "I", "F"), (name, opened.mode)  # the case under test
    loaded = np.asarray(preprocess.load_image(str(tmp_path / name)))
    if name == "wide_float.tif":  # any float range maps linearly onto 0..255
      span = float(grey8.max()) - float(grey8.min())
      want_wide = np.rint((grey8.astype(np.float64) - grey8.min()) * 255.0 / span)
      np.testing.assert_array_equal(loaded[..., 0], want_wide.astype(np.uint8))
    else:
      np.testing.assert_array_equal(loaded, want, err_msg=name)
  nan = grey8.astype(np.float32)
  nan[0, 0] = np.nan
  Image.fromarray(nan, "F").save(tmp_path / "nan.tif")
  with pytest.raises(preprocess.ImageError, match="NaN"):
    preprocess.load_image(str(tmp_path / "nan.tif"))


def test_predict_classifies_a_16_bit_grey_png_as_its_8_bit_version(tmp_path, official):
  from PIL import Image
  _, converted, _ = official
  grey8 = np.asarray(preprocess.load_image(preprocess.sample_photo_paths()[0]).convert("L"))
  Image.fromarray(grey8).save(tmp_path / "grey8.png")
  Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
  results = {}
  for name in ("grey8", "grey16"):
    out = tmp_path / f"{name}.json"
    code, _, stderr = run_main(predict.main, tmp_path / f"{name}.png", "--checkpoint",
                               converted, "--json", out)
    assert code == 0, stderr
    results[name] = json.loads(out.read_text())["predictions"][0]["top"]
  assert results["grey16"] == results["grey8"]


def test_predict_refuses_an_extreme_aspect_ratio_in_bounded_memory(tmp_path, official):
  """A 1x20000 strip would be resized to 248 x 4,960,000 pixels: refused with one line,
  the whole process staying far below 3 GB."""
  from PIL import Image
  _, converted, _ = official
  strip = tmp_path / "strip.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (20000, 1, 3), np.uint8)).save(strip)
  out = tmp_path / "predictions.json"
  script = ("import sys, predict\n"
            "from spanet_jax.models import registry\n"
            f"registry.register(registry.ModelInfo(name={TINY!r}, family='spanet', "
            f"architecture={TINY_ARCH!r}))\n"
            "code = predict.main(sys.argv[1:])\n"
            # VmHWM is this process's own peak; ru_maxrss would include the pytest
            # worker's, which Linux carries across exec.
            "peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
            "print(f'peak_kib={peak.split()[1]}', file=sys.stderr)\n"
            "sys.exit(code)\n")
  result = subprocess.run([sys.executable, "-c", script, str(strip), "--checkpoint",
                           converted, "--json", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
  lines = result.stderr.splitlines()
  errors = [line for line in lines if line.startswith("error: ")]
  assert result.returncode == 2 and len(errors) == 1, result.stderr
  assert "aspect ratio of 20000:1" in errors[0], result.stderr
  assert "Traceback" not in result.stderr
  peak_kib = int(lines[-1].split("=")[1])
  assert peak_kib < 3 * 1024 ** 2, peak_kib
  assert not out.exists()


# ---------------------------------------------------------------------------------------
# evaluate.py


def test_evaluate_agrees_image_by_image_with_the_official_model(tmp_path, official,
                                                               photo_folder):
  _, converted, reference = official
  output, predictions = tmp_path / "result.json", tmp_path / "predictions.csv"
  code, stdout, stderr = run_main(evaluate.main, "--checkpoint", converted, "--data",
                                  photo_folder, "--batch-size", 4, "--output", output,
                                  "--predictions", predictions)
  assert code == 0, stderr
  rows = read_csv(predictions)
  expected_paths = sorted(os.path.join(d, f) for d, _, files in os.walk(photo_folder)
                          for f in files if not f.endswith(".txt"))
  assert sorted(r["image"] for r in rows) == expected_paths  # each image once, no .txt
  classes, probs = torch_top5(reference, [r["image"] for r in rows],
                              inference.data_config(TINY))
  synsets = labels.imagenet_synsets()
  for row, want_classes, want_probs in zip(rows, classes, probs):
    assert int(row["label"]) == synsets.index(os.path.basename(os.path.dirname(row["image"])))
    assert [int(row[f"top{i}"]) for i in range(1, 6)] == list(want_classes), row["image"]
    assert abs(float(row["top1_probability"]) - want_probs[0]) < 2e-6
  result = json.loads(output.read_text())
  hits = [int(r["label"]) == c[0] for r, c in zip(rows, classes)]
  assert result["num_images"] == len(rows) == 9
  assert result["top1"] == pytest.approx(np.mean(hits))
  assert f"top-1 {100 * np.mean(hits):.2f}%" in stdout
  assert "folders matched to the model's classes by ImageNet synset id" in stderr
  assert result["class_mapping"] == {"by": "ImageNet synset id", "folders": {
      f: synsets.index(f) for f in os.listdir(photo_folder)}}


def test_evaluate_on_a_tfds_split_counts_every_example(tmp_path, tiny_variables):
  model = spanet_jax.create_model(TINY, num_classes=10)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))["params"]
  checkpoint = tmp_path / "digits"
  spanet_jax.save_pretrained(str(checkpoint), TINY, params, {"num_classes": 10},
                             extra={"data": {"input_size": 32, "crop_pct": 1.0},
                                    "class_names": [str(i) for i in range(10)]})
  output, predictions = tmp_path / "result.json", tmp_path / "predictions.csv"
  code, _, stderr = run_main(evaluate.main, "--checkpoint", checkpoint, "--data",
                             "sklearn_digits:test", "--data-dir", tmp_path / "tfds",
                             "--batch-size", 64, "--output", output, "--predictions",
                             predictions)
  assert code == 0, stderr
  rows = read_csv(predictions)
  result = json.loads(output.read_text())
  assert result["num_images"] == len(rows) == 360 == len({r["image"] for r in rows})
  assert result["top1"] == pytest.approx(np.mean([r["label"] == r["top1"] for r in rows]))
  assert result["top5"] == pytest.approx(np.mean(
      [r["label"] in [r[f"top{i}"] for i in range(1, 6)] for r in rows]))
  split = tfds.builder("sklearn_digits", data_dir=str(tmp_path / "tfds")).as_data_source("test")
  assert sorted(int(r["label"]) for r in rows) == sorted(  # the split's own labels
      int(example["label"]) for example in split)
  # Folders named neither by class name nor index, one per class: matched in sorted
  # order, and evaluate says so.
  folder = tmp_path / "letters"
  photo = preprocess.sample_photo_paths()[0]
  for letter in "jihgfedcba":
    (folder / letter).mkdir(parents=True)
    shutil.copy(photo, folder / letter / "photo.png")
  code, _, stderr = run_main(evaluate.main, "--checkpoint", checkpoint, "--data", folder,
                             "--output", output)
  assert code == 0, stderr
  assert "by sorted order (the i-th folder is class i)" in stderr
  assert json.loads(output.read_text())["class_mapping"]["folders"] == {
      letter: i for i, letter in enumerate("abcdefghij")}
  # A 1000-class model cannot be scored on 10 classes (--data_dir: train.py's spelling).
  code, _, stderr = run_main(evaluate.main, "--checkpoint", "init:" + TINY, "--data",
                             "sklearn_digits:test", "--data_dir", tmp_path / "tfds")
  assert code == 2 and "has 10 classes but the checkpoint's model has 1000" in stderr


def test_evaluate_bad_input_is_one_message_and_writes_nothing(tmp_path, official,
                                                               photo_folder):
  _, converted, _ = official
  broken_tree = tmp_path / "broken"
  shutil.copytree(photo_folder, broken_tree)
  bad = broken_tree / labels.imagenet_synsets()[404] / "truncated.jpg"
  bad.write_bytes(open(preprocess.sample_photo_paths()[3], "rb").read()[:200])
  unnamed = tmp_path / "unnamed"
  (unnamed / "cats").mkdir(parents=True)
  shutil.copy(preprocess.sample_photo_paths()[1], unnamed / "cats")
  output = tmp_path / "result.json"
  for args, message in [
      ((converted, "--data", broken_tree), "cannot decode .*truncated.jpg"),
      ((converted, "--data", tmp_path / "nowhere"), "not DATASET:SPLIT"),
      ((converted, "--data", "no_such_dataset_xyz:test"), "TFDS has no dataset"),
      ((converted, "--data", unnamed), "cannot tell which .* classes each of the 1 folders"),
      ((tmp_path / "missing", "--data", photo_folder), "no such checkpoint"),
      ((converted, "--data", photo_folder, "--batch-size", 0), "positive multiple")]:
    code, _, stderr = run_main(evaluate.main, "--checkpoint", *args, "--output", output)
    assert code == 2 and re.search(message, stderr), (args, stderr)
    assert stderr.strip().splitlines()[-1].startswith("error: ")
    assert not output.exists()


@pytest.mark.slow
def test_evaluate_over_8_devices_matches_1_device(tmp_path, official, photo_folder):
  _, converted, _ = official
  single = tmp_path / "single.csv"
  code, _, stderr = run_main(evaluate.main, "--checkpoint", converted, "--data", photo_folder,
                             "--batch-size", 4, "--predictions", single)
  assert code == 0, stderr
  env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
         + os.environ.get("XLA_FLAGS", "")}
  # The subprocess registers the tiny model as the test session does.
  script = ("import sys; sys.path.insert(0, 'tests'); import conftest, evaluate\n"
            "from spanet_jax.models import registry\n"
            "with registry.registered(*conftest.TINY_INFOS):\n"
            "  code = evaluate.main(sys.argv[1:])\n"
            "sys.exit(code)\n")
  sharded = tmp_path / "sharded.csv"
  run = lambda batch: subprocess.run(
      [sys.executable, "-c", script, "--checkpoint", converted, "--data", photo_folder,
       "--batch-size", str(batch), "--predictions", str(sharded)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  done = run(8)
  assert done.returncode == 0, done.stderr
  assert "over 8 devices" in done.stderr
  a, b = read_csv(single), read_csv(sharded)
  assert [r["image"] for r in a] == [r["image"] for r in b]
  for x, y in zip(a, b):
    assert [x[f"top{i}"] for i in range(1, 6)] == [y[f"top{i}"] for i in range(1, 6)]
    assert abs(float(x["top1_probability"]) - float(y["top1_probability"])) < 2e-6
  refused = run(12)
  assert refused.returncode == 2 and "multiple of the 8 devices" in refused.stderr


# ---------------------------------------------------------------------------------------
# spectral_analysis.py


def reference_relative_log_amplitude(feature):
  """docs/architecture.md's spectral analysis written out directly in NumPy for one (B, H, W, C) feature map."""
  amplitude = np.log(np.abs(np.fft.fft2(np.asarray(feature, np.float64), axes=(1, 2))) + 1e-6)
  centred = np.fft.fftshift(amplitude.mean(axis=(0, 3)))
  h = centred.shape[0]
  diagonal = np.array([centred[h // 2 + k, h // 2 + k] for k in range(h - h // 2)])
  return diagonal - diagonal[0]


def test_spectral_analysis_matches_the_definition(tiny_variables):
  model = spanet_jax.create_model(TINY)
  images = np.stack([preprocess.eval_transform(preprocess.load_image(p), 96)
                     for p in preprocess.sample_photo_paths()[:5]])
  spectra = frequency_analysis.analyse(model, tiny_variables, images, batch_size=2)
  assert [(s.stage, s.index_in_stage) for s in spectra] == [(0, 0), (1, 0), (2, 0), (2, 1),
                                                             (3, 0)]
  assert [s.height for s in spectra] == [24, 12, 6, 6, 3]
  # The last block of each stage is that stage's output.
  stage_outputs = jax.jit(model.apply, static_argnames="method")(
      tiny_variables, jnp.asarray(images), method="stage_features")
  last_blocks = [spectra[0], spectra[1], spectra[3], spectra[4]]
  for spectrum, feature in zip(last_blocks, stage_outputs):
    np.testing.assert_allclose(spectrum.relative_log_amplitude,
                               reference_relative_log_amplitude(feature), atol=2e-4)
    assert spectrum.relative_log_amplitude[0] == 0.0
    np.testing.assert_allclose(spectrum.frequencies,
                               2 * np.arange(len(spectrum.frequencies)) / spectrum.height)


def test_spectral_analysis_cli_draws_a_figure_and_writes_one_csv_row_per_block(
    tmp_path, official, photo_folder):
  _, converted, _ = official
  out = tmp_path / "plots" / "spectra.png"
  code, stdout, stderr = run_main(
      spectral_analysis.main, "--checkpoint", converted, "--checkpoint", "init:" + TINY,
      "--label", "converted", "--label", "untrained", "--images", photo_folder,
      "--max-images", 6, "--batch-size", 4, "--out", out)
  assert code == 0, stderr
  from PIL import Image
  with Image.open(out) as picture:
    pixels = np.asarray(picture.convert("RGB"))
  assert pixels.shape[0] > 200 and pixels.shape[1] > 600
  colours = np.unique(pixels.reshape(-1, 3), axis=0)
  assert len(colours) > 50  # curves, text and axes, not a blank canvas
  assert (pixels != 255).any(-1).mean() > 0.02
  rows = read_csv(tmp_path / "plots" / "spectra.csv")
  blocks = sum(TINY_ARCH["layers"])
  assert [r["model"] for r in rows] == ["converted"] * blocks + ["untrained"] * blocks
  assert [int(r["block"]) for r in rows] == list(range(blocks)) * 2
  for row in rows:
    curve = [float(v) for v in row["relative_log_amplitude"].split()]
    assert len(curve) == len(row["frequencies_pi"].split()) and curve[0] == 0.0
    assert float(row["high_frequency_relative_log_amplitude"]) == pytest.approx(curve[-1],
                                                                                abs=1e-6)
  assert "wrote" in stdout and "6 images" in stderr


def test_spectral_analysis_bad_input_writes_nothing(tmp_path, official):
  _, converted, _ = official
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"\x89PNG not really")
  photo = preprocess.sample_photo_paths()[0]
  out = tmp_path / "spectra.png"
  for args, message in [
      (("--checkpoint", converted, "--images", broken), "cannot decode.*broken.png"),
      (("--checkpoint", converted, "--images", tmp_path / "none"), "no such file"),
      (("--checkpoint", converted, "--label", "a", "--label", "b", "--images", photo),
       "2 --label for 1 --checkpoint"),
      (("--checkpoint", "init:resnet50", "--images", photo), "unknown model"),
      (("--checkpoint", converted, "--checkpoint", tmp_path, "--images", photo),
       "neither a spanet-jax checkpoint")]:
    code, _, stderr = run_main(spectral_analysis.main, *args, "--out", out)
    assert code == 2 and re.search(message, stderr), (args, stderr)
    assert not out.exists() and not (tmp_path / "spectra.csv").exists()
  code, _, stderr = run_main(spectral_analysis.main, "--checkpoint", converted, "--images",
                             photo, "--out", tmp_path / "spectra.txt")
  assert code == 2 and "use a .png" in stderr


def test_benchmark_layers_refuses_the_official_file(tmp_path):
  result = subprocess.run(
      [sys.executable, "benchmarks/benchmark.py", "--layers", "1", "1", "1", "1",
       "--official-file", str(tmp_path / "spanet.py")], cwd=REPO, capture_output=True,
      text=True, timeout=300)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.strip() == ("--layers builds our PyTorch reference; leave out "
                                   "--official-file")
  missing = subprocess.run(
      [sys.executable, "benchmarks/benchmark.py", "--official-file", str(tmp_path / "no.py")],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert missing.returncode == 1 and "Traceback" not in missing.stderr
  assert "no such file (the official repositories'" in missing.stderr


@pytest.mark.slow
def test_benchmark_script_reports_both_frameworks_and_memory(tmp_path):
  """benchmarks/benchmark.py end to end at a small size and depth (timings are not
  checked, only that every figure is measured and the ratios are the figures' ratios)."""
  out = tmp_path / "bench.json"
  result = subprocess.run(
      [sys.executable, "benchmarks/benchmark.py", "--models", "spanet_s", "--layers", "1", "1",
       "1", "1", "--batch", "1", "--size", "64", "--warmup", "0", "--repeats", "2", "--json",
       str(out)],
      cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
      timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "layers 1 1 1 1 (not the models' own)" in result.stdout
  assert re.search(r"^spanet_s\s+reference\s+forward\s", result.stdout, re.M), result.stdout
  assert re.search(r"^spanet_s\s+reference\s+train\s", result.stdout, re.M), result.stdout
  (measured,) = json.load(open(out))["results"]
  for mode in ("forward", "train"):
    jax_rate, torch_rate = measured[f"jax_{mode}_img_s"], measured[f"torch_{mode}_img_s"]
    assert jax_rate > 0 and torch_rate > 0
    assert measured[f"{mode}_ratio"] == pytest.approx(jax_rate / torch_rate)
    low, high = measured[f"{mode}_ratio_range"]  # the median's ratio lies between them
    assert low * (1 - 1e-9) <= measured[f"{mode}_ratio"] <= high * (1 + 1e-9)
    assert measured["jax_compile_s"][mode] > 0
  for framework in ("jax", "torch"):
    assert measured[f"{framework}_train_footprint_mib"] > 0
    assert measured[f"{framework}_train_step_growth_mib"] >= 0


def test_benchmark_memory_peak_sees_a_transient_allocation_and_not_file_pages(tmp_path):
  """The memory probe's peak: an array allocated, written and freed inside the watched
  block shows in it; mapping and reading a file (pages the kernel may drop) does not."""
  data = tmp_path / "pages.bin"
  data.write_bytes(b"\1" * (256 << 20))
  script = (
      "import sys, mmap; sys.path.insert(0, 'benchmarks'); import benchmark, numpy as np\n"
      f"f = open({str(data)!r}, 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\n"
      "with benchmark.AnonymousPeak() as file_read:\n"
      "  before = file_read.peak_kib\n"
      "  total = sum(m[i] for i in range(0, len(m), 4096))\n"
      "file_growth = file_read.peak_kib - before\n"
      "with benchmark.AnonymousPeak() as watched:\n"
      "  before = watched.peak_kib\n"
      "  block = np.ones(256 << 18, np.float32); block = None\n"
      "print(file_growth, watched.peak_kib - before, benchmark._anonymous_kib() - before)\n")
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  file_growth, transient_growth, after = (int(v) for v in result.stdout.split())
  assert file_growth < 32 << 10  # KiB: the 256 MiB of file pages are not counted
  assert transient_growth >= 240 << 10  # the 256 MiB array was seen while it lived
  assert after < 32 << 10  # and it is gone after the block


def test_block_benchmark_times_each_part_in_both_frameworks():
  """benchmarks/blocks.py at a small size, one stage (timings are not checked: every
  part is measured in both frameworks, the ratios are the times' ratios and the stage
  total weighs the parts by the stage's depth)."""
  result = subprocess.run(
      [sys.executable, "benchmarks/blocks.py", "--model", "spanetv2_s18_hybrid", "--stages",
       "2", "--size", "64", "--batch", "1", "--warmup", "0", "--repeats", "1"],
      cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {m.group(1): [float(v) for v in m.group(2).split()] for m in re.finditer(
      r"^(stage 2.*?|blocks of the stages above)\s+((?:[\d.]+\s+){5}[\d.]+)$",
      result.stdout, re.M)}
  parts = {"mixattention": "stage 2 (320 x 4^2) mixattention",
           "mlp": "stage 2 (320 x 4^2) mlp", "norm": "stage 2 (320 x 4^2) norm"}
  assert set(rows) == {*parts.values(), "stage 2: 9 blocks", "blocks of the stages above"}, (
      result.stdout)
  def ratio_of_rounded(torch_ms, jax_ms, ratio):  # every figure printed to 0.01
    low = (torch_ms - 0.005) / (jax_ms + 0.005) - 0.005
    high = (torch_ms + 0.005) / max(jax_ms - 0.005, 1e-9) + 0.005
    return low <= ratio <= high

  for jax_fwd, torch_fwd, fwd_ratio, jax_grad, torch_grad, grad_ratio in rows.values():
    assert min(jax_fwd, torch_fwd, jax_grad, torch_grad) > 0
    assert ratio_of_rounded(torch_fwd, jax_fwd, fwd_ratio), result.stdout
    assert ratio_of_rounded(torch_grad, jax_grad, grad_ratio), result.stdout
  for column in (0, 1, 3, 4):  # nine blocks: one mixer, one MLP and two norms each
    expected = 9 * (rows[parts["mixattention"]][column] + rows[parts["mlp"]][column]
                    + 2 * rows[parts["norm"]][column])
    assert rows["stage 2: 9 blocks"][column] == pytest.approx(expected, abs=0.2)  # 36 roundings
  assert rows["blocks of the stages above"] == rows["stage 2: 9 blocks"]
  for args, message in ((["--model", "spanet_s"], "spanet_s is not a SPANetV2 model"),
                        (["--model", "nope"], "unknown model 'nope'; available: "),
                        (["--stages", "4"], "--stages takes stage numbers 0 to 3"),
                        (["--official-file", "no/spanetv2.py"], "--official-file "
                         "no/spanetv2.py: no such file (the official repository's "
                         "image_classification/models/spanetv2.py)")):
    refused = subprocess.run([sys.executable, "benchmarks/blocks.py", *args], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": REPO}, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 1 and refused.stderr.startswith(message), refused.stderr
    assert "Traceback" not in refused.stderr


def test_spectral_analysis_takes_an_input_size_and_warns_on_tiny_maps(tmp_path):
  photo = preprocess.sample_photo_paths()[0]
  code, _, stderr = run_main(spectral_analysis.main, "--checkpoint", f"init:{TINY}",
                             "--checkpoint", f"init:{TINY}", "--images", photo,
                             "--image-size", 64, "--output", tmp_path / "s.png")
  assert code == 0, stderr
  assert "at 64px (compiling the model first)" in stderr
  assert "warning: at 64px the last stage's maps are 2x2" in stderr
  code, _, stderr = run_main(spectral_analysis.main, "--checkpoint", f"init:{TINY}",
                             "--images", photo, "--image-size", 50, "--output",
                             tmp_path / "t.png")
  assert code == 2 and "--image-size 50: use a multiple of 32" in stderr
