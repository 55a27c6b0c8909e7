"""export.py: StableHLO, TensorFlow SavedModel and TFLite artifacts give the JAX model's
logits; formulations follow the target platforms; bad input is one line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

import export
import spanet_jax
from conftest import TINY, run_main
from spanet_jax.models import registry
from spanet_jax.ops import platform
from spanet_jax.tools import export as exporting


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  model = spanet_jax.create_model(TINY, num_classes=10)
  params = jax.jit(model.init)(jax.random.PRNGKey(5), jnp.zeros((1, 64, 64, 3)))["params"]
  directory = tmp_path_factory.mktemp("export") / "tiny"
  spanet_jax.save_pretrained(str(directory), TINY, params, {"num_classes": 10})
  return str(directory), model, {"params": params}


def logits(model, variables, images):
  return np.asarray(jax.jit(model.apply)(variables, images))


def images(batch, size=64):
  return np.random.default_rng(batch).standard_normal((batch, size, size, 3)).astype(np.float32)


def test_stablehlo_artifact_runs_any_batch_on_every_platform_it_names(tiny, tmp_path):
  directory, model, variables = tiny
  out = tmp_path / "tiny.stablehlo"
  code, _, stderr = run_main(export.main, "--checkpoint", directory, "--format", "stablehlo",
                             "--output", out, "--size", 64, 64)
  assert code == 0, stderr
  assert "verified on: cpu; written unverified for cuda, tpu" in stderr
  contract = json.loads((tmp_path / "tiny.stablehlo.json").read_text())
  assert contract["input"]["shape"] == [None, 64, 64, 3] and contract["input"]["normalised"]
  assert contract["preprocessing"]["mean"] == list(registry.model_info(TINY).mean)
  assert contract["preprocessing"]["resize_shorter_side_to"] == 71  # floor(64 / 0.9)
  assert len(contract["class_names"]) == 10 and contract["platforms_verified"] == ["cpu"]
  assert contract["platforms_unverified"] == ["cuda", "tpu"]
  exported = jax.export.deserialize(bytearray(out.read_bytes()))
  assert exported.platforms == ("cpu", "cuda", "tpu")
  for batch in (1, 3):
    x = images(batch)
    assert exporting.compare(logits(model, variables, x), exported.call(x)) <= 1e-5


def test_savedmodel_serves_images_to_logits_from_tensorflow_alone(tiny, tmp_path):
  directory, model, variables = tiny
  out = tmp_path / "saved"
  code, _, stderr = run_main(export.main, "--checkpoint", directory, "--format", "savedmodel",
                             "--output", out, "--size", 64, 64)
  assert code == 0, stderr
  assert json.loads((tmp_path / "saved.json").read_text())["format"] == "savedmodel"
  serve = tf.saved_model.load(str(out)).signatures["serving_default"]
  for batch in (1, 4):
    x = images(batch)
    got = serve(images=tf.constant(x))["logits"].numpy()
    assert exporting.compare(logits(model, variables, x), got) <= 1e-5


def test_tflite_artifact_gives_the_logits(tiny, tmp_path):
  directory, model, variables = tiny
  out = tmp_path / "tiny.tflite"
  code, _, stderr = run_main(export.main, "--checkpoint", directory, "--format", "tflite",
                             "--output", out, "--size", 64, 64, "--batch-size", 2)
  assert code == 0, stderr
  assert "Warning" not in stderr and "deprecated" not in stderr  # TensorFlow's notices
  assert json.loads((tmp_path / "tiny.tflite.json").read_text())["input"]["shape"] == [
      2, 64, 64, 3]
  x = images(2)
  assert exporting.compare(logits(model, variables, x), exporting.run_tflite(str(out), x)) <= 1e-5


def test_formulations_follow_the_traced_target(tiny):
  """Traced for a TPU, the model takes the accelerator formulations (another program),
  which compute the same logits."""
  _, model, variables = tiny
  x = images(2)
  cpu_text = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, x).as_text()
  with platform.target("tpu"):
    assert platform.backend() == "tpu" and not platform.single_cpu_device()
    tpu_fn = jax.jit(lambda v, x: model.apply(v, x))
    tpu_text = tpu_fn.lower(variables, x).as_text()
    tpu_logits = np.asarray(tpu_fn(variables, x))
  assert platform.backend() == "cpu"
  assert "convolution" in tpu_text and tpu_text != cpu_text
  assert exporting.compare(logits(model, variables, x), tpu_logits) <= 1e-5
  assert platform.backend_for_platforms(("cpu", "cuda")) == "gpu"


@pytest.mark.parametrize("args,message", [
    (("--batch", "0"), "--batch 0: give a positive number or dynamic"),
    (("--platforms", "cpu,quantum"), "unknown platform 'quantum'"),
    (("--size", "60", "64"), "multiples of 32"),
])
def test_bad_arguments_are_one_line(tiny, tmp_path, args, message):
  directory, _, _ = tiny
  out = tmp_path / "never"
  code, _, stderr = run_main(export.main, "--checkpoint", directory, "--format", "stablehlo",
                             "--output", out, *args)
  assert code == 2 and message in stderr and "Traceback" not in stderr
  assert not out.exists()


def test_an_existing_output_is_kept_without_overwrite(tiny, tmp_path):
  directory, _, _ = tiny
  out = tmp_path / "kept.stablehlo"
  out.write_bytes(b"precious")
  code, _, stderr = run_main(export.main, "--checkpoint", directory, "--format", "stablehlo",
                             "--output", out)
  assert code == 2 and "exists" in stderr
  assert out.read_bytes() == b"precious"
