"""The spectral pooling filter: masks, chunking and the rfft2 formulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
torch = pytest.importorskip("torch")  # the PyTorch references need it

from spanet_jax.models import spectral


def official_recipe_mask(size, radius, lamb):
  """The mask built as docs/architecture.md describes, in torch, independently of spectral.py."""
  rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
  distance = torch.sqrt(((rows - size // 2) ** 2 + (cols - size // 2) ** 2).float())
  lamb = torch.tensor(lamb, dtype=torch.float32)
  mask = (distance < radius).float() * lamb + (distance > radius).float() * (1 - lamb)
  mask[~(distance < radius) & ~(distance > radius)] = 1 / 3
  return mask.numpy()


def test_lambdas_are_torch_arange_float32():
  assert spectral.SPAM_LAMBDAS == tuple(float(v) for v in torch.arange(0.7, 0.9, 0.1))


@pytest.mark.parametrize("channels", [64, 128, 320, 512, 96, 192, 384, 768, 8, 20, 32, 5])
def test_chunk_sizes_follow_torch_chunk(channels):
  expected = tuple(c.shape[0] for c in torch.chunk(torch.ones(channels), 3))
  assert spectral.chunk_sizes(channels) == expected


def test_chunk_sizes_of_spec_examples():
  assert spectral.chunk_sizes(64) == (22, 22, 20)
  assert spectral.chunk_sizes(320) == (107, 107, 106)
  assert spectral.chunk_sizes(512) == (171, 171, 170)
  assert spectral.chunk_sizes(96) == (32, 32, 32)


@pytest.mark.parametrize("size,radius", [(56, 2), (28, 2), (14, 1), (7, 1), (8, 1), (9, 2)])
@pytest.mark.parametrize("lamb", spectral.SPAM_LAMBDAS)
def test_centred_mask_matches_official_recipe(size, radius, lamb):
  np.testing.assert_array_equal(spectral.centred_mask(size, size, radius, lamb),
                                official_recipe_mask(size, radius, lamb))


@pytest.mark.parametrize("radius,inside", [(2, 13), (1, 5)])
def test_only_a_few_bins_differ_from_high_pass(radius, inside):
  lamb = spectral.SPAM_LAMBDAS[0]
  mask = spectral.centred_mask(28, 28, radius, lamb)
  assert np.sum(mask != np.float32(1) - np.float32(lamb)) == inside
  assert np.sum(mask == np.float32(1 / 3)) == 4  # the four bins at distance exactly r


@pytest.mark.parametrize("height,width,radius", [(56, 56, 2), (28, 28, 2), (14, 14, 1),
                                                  (7, 7, 1), (9, 12, 2), (13, 6, 1)])
def test_rfft_filter_equals_full_fft_formulation(height, width, radius, rng):
  x = rng.standard_normal((2, height, width, 6)).astype(np.float32)
  lambdas = spectral.SPAM_LAMBDAS
  half = spectral.channel_mask(height, width, radius, 6, lambdas)
  got = np.asarray(spectral.spectral_filter(jnp.asarray(x), jnp.asarray(half)))
  for j, lamb in enumerate(lambdas):
    centred = spectral.centred_mask(height, width, radius, lamb)
    want = spectral.reference_spectral_filter(x[..., 2 * j:2 * j + 2].astype(np.float64), centred)
    np.testing.assert_allclose(got[..., 2 * j:2 * j + 2], want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("height,width", [(8, 8), (7, 7), (6, 9)])
def test_hermitian_half_of_an_arbitrary_mask(height, width, rng):
  """A learned (asymmetric) centred mask acts through its symmetrised half spectrum."""
  centred = rng.uniform(0, 1, (height, width)).astype(np.float32)
  x = rng.standard_normal((1, height, width, 3)).astype(np.float32)
  half = spectral.hermitian_half(jnp.asarray(centred))
  got = spectral.spectral_filter(jnp.asarray(x), jnp.repeat(half[..., None], 3, axis=-1))
  want = spectral.reference_spectral_filter(x.astype(np.float64), centred.astype(np.float64))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6, rtol=0)


def test_filter_computes_in_float32_for_bfloat16_input():
  x = jnp.ones((1, 8, 8, 3), jnp.bfloat16)
  half = jnp.asarray(spectral.channel_mask(8, 8, 2, 3))
  jaxpr = str(jax.make_jaxpr(spectral.spectral_filter)(x, half))
  assert "fft" in jaxpr and "complex64" in jaxpr
  assert spectral.spectral_filter(x, half).dtype == jnp.float32


SIZES = [(56, 56, 2), (28, 28, 2), (14, 14, 1), (7, 7, 1), (9, 12, 2), (13, 6, 1), (2, 3, 1),
         (1, 1, 1), (4, 4, 2)]


@pytest.mark.parametrize("height,width,radius", SIZES)
def test_lowrank_filter_equals_rfft_filter(height, width, radius, rng):
  channels = 7  # chunks of 3, 3, 1: every lambda in play
  x = rng.standard_normal((2, height, width, channels)).astype(np.float32)
  half = spectral.channel_mask(height, width, radius, channels)
  want = np.asarray(spectral.spectral_filter(jnp.asarray(x), jnp.asarray(half)))
  got = np.asarray(spectral.lowrank_spectral_filter(jnp.asarray(x), radius))
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("height,width,radius", SIZES)
def test_lowrank_filter_matmul_equals_filter_then_product(height, width, radius, rng):
  channels, outputs = 7, 5
  x = rng.standard_normal((2, height, width, channels)).astype(np.float32)
  kernel = rng.standard_normal((channels, outputs)).astype(np.float32)
  half = spectral.channel_mask(height, width, radius, channels)
  filtered = np.asarray(spectral.spectral_filter(jnp.asarray(x), jnp.asarray(half)), np.float64)
  want = filtered.reshape(-1, channels) @ kernel
  got = np.asarray(spectral.lowrank_filter_matmul(jnp.asarray(x), radius, jnp.asarray(kernel)))
  assert got.shape == (2 * height * width, outputs)
  np.testing.assert_allclose(got, want, atol=5e-6, rtol=0)


@pytest.mark.parametrize("radius,rank", [(2, 13), (1, 5)])
def test_lowrank_rank_is_at_most_13(radius, rank):
  basis, weights, identity = spectral.lowrank_factors(56, 56, radius)
  assert basis.shape == (56, 56, rank) and weights.shape == (rank, 3)
  np.testing.assert_array_equal(identity, [np.float32(1) - np.float32(l)
                                           for l in spectral.SPAM_LAMBDAS])


@pytest.mark.parametrize("height,width,radius", SIZES)
def test_dft_filter_equals_rfft_filter_for_any_mask(height, width, radius, rng):
  x = rng.standard_normal((2, height, width, 4)).astype(np.float32)
  half = rng.uniform(0, 1, (height, width // 2 + 1, 4)).astype(np.float32)
  want = np.asarray(spectral.spectral_filter(jnp.asarray(x), jnp.asarray(half)))
  got = np.asarray(spectral.dft_spectral_filter(jnp.asarray(x), jnp.asarray(half)))
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
