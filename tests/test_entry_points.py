"""timm-style entry points of both families: forward_features, forward_head(pre_logits),
feature_info and features_only's out_indices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spanet_jax
from conftest import TINY, TINY_V2


@pytest.fixture(scope="module", params=[TINY, TINY_V2["hybrid"]])
def classifier(request):
  model = spanet_jax.create_model(request.param, num_classes=7)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), images)
  return model, variables, images


def test_forward_features_then_head_is_the_model(classifier):
  model, variables, images = classifier
  features = model.apply(variables, images, method="forward_features")
  assert features.shape == (2, 2, 2, model.dims[-1])
  logits = model.apply(variables, features, method="forward_head")
  np.testing.assert_array_equal(logits, model.apply(variables, images))
  pooled = model.apply(variables, features, pre_logits=True, method="forward_head")
  assert pooled.shape == (2, model.dims[-1])
  # pre_logits are what a headless model (num_classes=0) returns.
  headless = model.clone(num_classes=0)
  params = {k: v for k, v in variables["params"].items() if k != "head"}
  np.testing.assert_array_equal(pooled, headless.apply({"params": params}, images))


def test_feature_info_describes_the_stage_maps(classifier):
  model, variables, images = classifier
  maps = model.apply(variables, images, method="stage_features")
  info = model.feature_info
  assert [m.shape[-1] for m in maps] == [i["num_chs"] for i in info]
  assert [64 // m.shape[1] for m in maps] == [i["reduction"] for i in info] == [4, 8, 16, 32]


def test_out_indices_select_stages_of_a_dense_backbone():
  full = spanet_jax.create_model(TINY, features_only=True)
  images = jnp.ones((1, 64, 64, 3))
  variables = jax.jit(full.init)(jax.random.PRNGKey(0), images)
  picked = full.clone(out_indices=(1, 3))
  maps = picked.apply(variables, images)  # same parameters: all four norms are kept
  everything = full.apply(variables, images)
  assert len(maps) == 2
  np.testing.assert_array_equal(maps[0], everything[1])
  np.testing.assert_array_equal(maps[1], everything[3])
  assert [i["num_chs"] for i in picked.feature_info] == [16, 32]
  with pytest.raises(ValueError, match=r"out_indices=\(4,\)"):
    full.clone(out_indices=(4,)).init(jax.random.PRNGKey(0), images)


def test_the_tools_share_one_vocabulary(tmp_path):
  """--batch-size and --output mean the same in every tool (older spellings still work)."""
  import predict
  import spectral_analysis
  import train
  from conftest import run_main
  from spanet_jax.data import preprocess
  photo = preprocess.sample_photo_paths()[0]
  code, _, stderr = run_main(predict.main, photo, "--checkpoint", f"init:{TINY}",
                             "--batch-size", 2, "--output", tmp_path / "p.json")
  assert code == 0 and (tmp_path / "p.json").is_file(), stderr
  code, _, stderr = run_main(spectral_analysis.main, "--checkpoint", f"init:{TINY}",
                             "--images", photo, "--batch-size", 2,
                             "--output", tmp_path / "s.png")
  assert code == 0 and (tmp_path / "s.png").is_file(), stderr
  assert train.with_aliases(["train.py", "--batch-size", "8", "--output=/w",
                             "--checkpoint", "ck", "--config.lr=1"]) == [
      "train.py", "--config.batch_size=8", "--workdir=/w", "--config.init_from=ck",
      "--config.lr=1"]
