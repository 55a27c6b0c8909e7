"""model_flops: the analytic forward FLOPs against XLA's cost analysis and the paper."""

import math

import jax
import jax.numpy as jnp
import pytest

import spanet_jax
from spanet_jax.models import registry
from spanet_jax.ops import platform


def xla_flops(name, size, **options):
  """XLA's cost analysis of the forward pass of one image, in the accelerators' forms."""
  with platform.target("gpu"):
    model = registry.build_model(name, **options)
    images = jnp.zeros((1, size, size, 3))
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images)
  return lowered.cost_analysis()["flops"]


@pytest.mark.parametrize("name,options", [
    ("spanet_s", {"batch_parts": 1}),
    ("spanetv2_s18_hybrid", {}),  # ExSPAM, MixAttention and Attention
])
def test_flops_agree_with_xla_cost_analysis(name, options):
  """With the spectral filter as DFT products (no FFT, whose cost XLA counts its own way)
  every operation is one XLA counts too: totals within 2%."""
  forms = {"spectral_impl": "dft", "depthwise_impl": "conv", "conv_impl": "conv", **options}
  ours = spanet_jax.model_flops(name, image_size=64, **forms)
  assert ours.fft == 0 and ours.spectral_filter > 0
  assert ours.total == pytest.approx(xla_flops(name, 64, **forms), rel=0.02)


def test_spanet_s_macs_match_the_paper_and_the_fft_is_counted_apart():
  count = spanet_jax.model_flops("spanet_s")
  assert count.macs == pytest.approx(4.6e9, rel=0.01)  # the paper's 4.6G MACs
  # Every SPAM block filters C channels at its stage's size with one rfft2 and one irfft2.
  blocks = ((4, 64, 56), (4, 128, 28), (12, 320, 14), (4, 512, 7))
  fft = sum(depth * channels * 2 * 2.5 * size * size * math.log2(size * size)
            for depth, channels, size in blocks)
  assert count.fft == pytest.approx(fft, rel=1e-9)
  assert count.total == pytest.approx(count.conv_matmul + count.fft + count.spectral_filter
                                      + count.elementwise)
