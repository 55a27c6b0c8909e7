"""Pretrained directories in users' pipelines: loading with options that change the
parameters (a new head, trainable masks, a dense-prediction backbone)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import spanet_jax
from conftest import TINY
from spanet_jax.models import pretrained


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  model = spanet_jax.create_model(TINY)
  params = jax.jit(model.init)(jax.random.PRNGKey(3), jnp.zeros((1, 64, 64, 3)))["params"]
  directory = tmp_path_factory.mktemp("ckpt") / "tiny"
  spanet_jax.save_pretrained(str(directory), TINY, params)
  return str(directory), traverse_util.flatten_dict(jax.device_get(params), sep="/")


def flat(params):
  return traverse_util.flatten_dict(jax.device_get(params), sep="/")


def test_plain_load_returns_the_stored_weights_and_reports_nothing(tiny_checkpoint):
  directory, stored = tiny_checkpoint
  _, variables, report = spanet_jax.load_pretrained(directory, return_report=True)
  assert report.added == () and report.dropped == ()
  loaded = flat(variables["params"])
  assert loaded.keys() == stored.keys()
  for key in stored:
    np.testing.assert_array_equal(loaded[key], stored[key])


def test_new_head_and_learnable_masks_fine_tune_from_the_backbone(tiny_checkpoint):
  directory, stored = tiny_checkpoint
  model, variables, report = spanet_jax.load_pretrained(
      directory, num_classes=10, learnable_masks=True, return_report=True)
  logits = jax.jit(model.apply)(variables, jnp.ones((2, 96, 96, 3)))  # masks resized
  assert logits.shape == (2, 10)
  assert {"head/kernel", "head/bias"} <= set(report.added)
  assert any("spectral_masks" in key for key in report.added)
  assert set(report.dropped) == {"head/kernel", "head/bias"}
  loaded = flat(variables["params"])
  kept = [key for key in stored if key in loaded and key not in report.added]
  assert len(kept) == len(stored) - 2  # every backbone tensor is the stored one
  for key in kept:
    np.testing.assert_array_equal(loaded[key], stored[key])
  # Gradients reach the masks: they are parameters now.
  grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, jnp.ones((1, 64, 64, 3)),
                                                 train=False).sum()))(variables["params"])
  assert any("spectral_masks" in key and np.abs(value).sum() > 0
             for key, value in flat(grads).items())


def test_features_only_gives_the_four_stage_maps(tiny_checkpoint):
  directory, _ = tiny_checkpoint
  model, variables = spanet_jax.create_model(TINY, pretrained=directory, features_only=True)
  maps = jax.jit(model.apply)(variables, jnp.ones((1, 64, 64, 3)))
  assert [m.shape for m in maps] == [(1, 16, 16, 8), (1, 8, 8, 16), (1, 4, 4, 20), (1, 2, 2, 32)]


def test_create_model_refuses_weights_of_another_model(tiny_checkpoint):
  directory, _ = tiny_checkpoint
  with pytest.raises(pretrained.CheckpointError, match="holds spanet_tiny_test weights"):
    spanet_jax.create_model("spanet_s", pretrained=directory)


def test_spanet_json_describes_the_model_without_the_registry(tiny_checkpoint):
  import json
  import os
  directory, _ = tiny_checkpoint
  with open(os.path.join(directory, "spanet.json")) as f:
    metadata = json.load(f)
  assert metadata["architecture"] == {"family": "spanet", "num_classes": 1000,
                                      "layers": [1, 1, 2, 1], "dims": [8, 16, 20, 32]}
  assert metadata["data"] == {"input_size": 224, "crop_pct": 0.9, "interpolation": "bicubic",
                              "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
  # The architecture alone rebuilds the module the weights belong to.
  arch = {k: v for k, v in metadata["architecture"].items() if k != "family"}
  model = spanet_jax.SPANet(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in arch.items()})
  _, variables = spanet_jax.load_pretrained(directory)
  assert model.apply(variables, jnp.ones((1, 64, 64, 3))).shape == (1, 1000)


def test_weights_that_do_not_fit_their_description_are_refused(tiny_checkpoint, tmp_path):
  """Weights under another model's description (here: an edited spanet.json) are never
  used, not even by a load whose options would re-initialise the misfit."""
  import json
  import shutil
  directory, _ = tiny_checkpoint
  edited = tmp_path / "edited"
  shutil.copytree(directory, edited)
  metadata = json.loads((edited / "spanet.json").read_text())
  metadata["overrides"] = {"dims": [8, 16, 20, 40]}
  (edited / "spanet.json").write_text(json.dumps(metadata))
  for overrides in ({}, {"num_classes": 10}):
    with pytest.raises(pretrained.CheckpointError,
                       match=r"do not fit the model its metadata describes.*shape"):
      spanet_jax.load_pretrained(str(edited), **overrides)


def test_converted_weights_run_from_flax_nnx(tiny_checkpoint):
  from flax import nnx
  from spanet_jax.models import nnx_interop
  directory, _ = tiny_checkpoint
  model, variables = spanet_jax.load_pretrained(directory)
  module = nnx_interop.to_nnx(model, variables)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
  np.testing.assert_array_equal(module(images, train=False), model.apply(variables, images))
  params = nnx.state(module, nnx.Param)
  assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(variables["params"]))


def test_a_train_workdir_points_at_its_final_weights(tmp_path):
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / "config.json").write_text("{}")
  with pytest.raises(pretrained.CheckpointError, match=r"train.py workdir: .*run/final"):
    spanet_jax.load_pretrained(str(workdir))


def test_damaged_parameter_data_is_refused(tiny_checkpoint, tmp_path):
  """Other array data under a checkpoint's spanet.json (here: another save's params/), or
  flipped bytes in its data files, are refused by load_pretrained and --to-torch."""
  import os
  import shutil
  import convert_torch_weights
  from conftest import run_main
  directory, stored = tiny_checkpoint
  swapped = tmp_path / "swapped"
  shutil.copytree(directory, swapped)
  model = spanet_jax.create_model(TINY)
  other = jax.jit(model.init)(jax.random.PRNGKey(4), jnp.zeros((1, 64, 64, 3)))["params"]
  spanet_jax.save_pretrained(str(tmp_path / "other"), TINY, other)
  shutil.rmtree(swapped / "params")
  shutil.copytree(tmp_path / "other" / "params", swapped / "params")
  with pytest.raises(pretrained.CheckpointError, match=r"parameter data in .* is damaged: "
                                                       r"backbone/\S+ and \d+ more differ"):
    spanet_jax.load_pretrained(str(swapped))
  code, _, stderr = run_main(convert_torch_weights.main, "--to-torch", "--input", swapped,
                             "--output", tmp_path / "x.pth")
  assert code == 2 and "is damaged" in stderr and not (tmp_path / "x.pth").exists()

  flipped = tmp_path / "flipped"
  shutil.copytree(directory, flipped)
  data_files = [os.path.join(root, name) for root, _, names in os.walk(flipped / "params")
                for name in names]
  largest = max(data_files, key=os.path.getsize)
  blob = bytearray(open(largest, "rb").read())
  middle = len(blob) // 2
  blob[middle:middle + 64] = bytes(b ^ 0xFF for b in blob[middle:middle + 64])
  open(largest, "wb").write(bytes(blob))
  with pytest.raises(pretrained.CheckpointError):
    spanet_jax.load_pretrained(str(flipped))


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.pop("overrides"), "its 'overrides' entry is missing"),
    (lambda m: m.update(overrides="dims=8"), "its 'overrides' entry is malformed"),
    (lambda m: m.update(model=["spanet_s"]), "its 'model' entry is malformed"),
    (lambda m: m.update(model="spanet_xl"), "unknown model 'spanet_xl'"),
])
def test_malformed_metadata_is_one_clear_error(edit, message, tiny_checkpoint, tmp_path):
  import json
  import shutil
  directory, _ = tiny_checkpoint
  edited = tmp_path / "edited"
  shutil.copytree(directory, edited)
  metadata = json.loads((edited / "spanet.json").read_text())
  edit(metadata)
  (edited / "spanet.json").write_text(json.dumps(metadata))
  with pytest.raises(pretrained.CheckpointError, match=f"spanet.json is unreadable: {message}"):
    spanet_jax.load_pretrained(str(edited))
