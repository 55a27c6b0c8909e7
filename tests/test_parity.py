"""Flax models vs the PyTorch reference on the same (random, official-layout) weights.

Tolerance: the Bar's relative L2 difference of 2e-5 on logits and stage features,
with identical top-1; float32 rounding gives about 1e-6 here.
"""

import jax
import numpy as np
import pytest
torch = pytest.importorskip("torch")  # the PyTorch references need it

import spanet_jax
from spanet_jax import convert
from spanet_jax.models import registry
from spanet_jax.reference import spanet_torch, verify
from conftest import (assert_full_size_conversion, assert_gradients_match_autograd,
                      one_block_per_stage, state_dict_numpy, tiny_reference)


def converted(reference):
  name, overrides, params = convert.torch_to_flax(state_dict_numpy(reference))
  return spanet_jax.create_model(name, **overrides), {"params": params}


def run_both(reference, model, variables, x_nhwc, method=None):
  with torch.no_grad():
    x = torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())
    expected = reference.stage_features(x) if method else reference(x)
  expected = ([e.numpy() for e in expected] if isinstance(expected, list)
              else expected.numpy())
  actual = jax.jit(model.apply, static_argnames="method")(variables, x_nhwc, method=method)
  return expected, jax.device_get(actual)


def assert_parity(expected, actual, inputs="random", size=0):
  result = verify.compare_outputs(expected, actual, inputs, size)
  assert result.passed, str(result)
  return result


@pytest.mark.parametrize("height,width", [(64, 64), (96, 96), (128, 128), (64, 96), (160, 96)])
def test_tiny_logits_and_features(height, width, rng):
  reference = tiny_reference()
  model, variables = converted(reference)
  x = rng.standard_normal((2, height, width, 3)).astype(np.float32)
  assert_parity(*run_both(reference, model, variables, x))
  assert_parity(*run_both(reference, model, variables, x, method="stage_features"))


def test_tiny_dense_prediction_backbone(rng):
  reference = tiny_reference(fork_feat=True)
  model, variables = converted(reference)
  assert model.features_only
  x = rng.standard_normal((2, 96, 64, 3)).astype(np.float32)
  expected, actual = run_both(reference, model, variables, x)
  assert [a.shape for a in actual] == [e.transpose(0, 2, 3, 1).shape for e in expected]
  assert_parity(expected, actual)


FULL_SIZE = "spanet_s"  # every block of a published depth, against the reference


@pytest.mark.slow
@pytest.mark.parametrize("name", ["spanet_s", "spanet_m", "spanet_mx", "spanet_b", "spanet_bx"])
def test_every_variant_at_224_and_256(name, rng):
  """spanet_s at full size; every other variant's full-size weights convert to exactly
  its Flax parameter tree, and its widths run against the reference with one block per
  stage (depth repeats identical blocks: spanet_s's 24 cover it)."""
  torch.manual_seed(0)
  info = registry.model_info(name)
  if name != FULL_SIZE:
    assert_full_size_conversion(name, spanet_torch.SPANet(**info.architecture))
    info = one_block_per_stage(name)
  with registry.registered(info):
    reference = spanet_torch.randomize_(spanet_torch.SPANet(**info.architecture)).eval()
    model, variables = converted(reference)
    for size in (224, 256):
      x = rng.standard_normal((2, size, size, 3)).astype(np.float32)
      assert_parity(*run_both(reference, model, variables, x), size=size)


def test_official_quirk_odd_feature_size_from_even_trained_mask(rng):
  """docs/architecture.md: the official module pads its even-sized stored mask off-centre when the feature
  size is odd; we compute the mask at the actual size, so there (and only there) we differ."""
  reference = tiny_reference()
  model, variables = converted(reference)
  x = rng.standard_normal((1, 228, 228, 3)).astype(np.float32)  # stage 0 is 57 x 57
  result = verify.compare_outputs(*run_both(reference, model, variables, x), "random", 228)
  assert result.rel_l2 > 1e-3


def test_tiny_gradients_match_pytorch_autograd(rng):
  """Training computes the reference's gradients: every parameter's gradient within
  float32 rounding of PyTorch's float64 autograd gradient (conftest's check). Covers
  the hand-written gradients (GELU, the MLP, one-group norms, depthwise convolutions,
  the low-rank spectral filter)."""
  reference = tiny_reference()
  assert_gradients_match_autograd(reference, *converted(reference), rng)
