"""SPANet's spectral pooling filter (SPF): masks and the filter itself.

The official module computes, per channel,
    y = Re(ifft2(ifftshift(M * fftshift(fft2(x, norm="ortho"))), norm="ortho"))
with a mask M stored in the centred (fftshifted) layout. For a real input the
real part of that inverse transform equals an inverse real FFT of the mask made
Hermitian-symmetric, so we evaluate the filter as
    y = irfft2(rfft2(x, norm="ortho") * M_half, s=(H, W), norm="ortho")
which does half the work and needs no shifts.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# torch.arange(0.7, 0.9, 0.1) in float32: the three chunk lambdas of SPAM.
SPAM_LAMBDAS = tuple(float(np.float32(0.7 + 0.1 * j)) for j in range(3))
# Value of the mask on the circle of radius r itself (neither low nor high pass).
CUTOFF_VALUE = 1.0 / 3.0


def _squared_distance(freq_rows: np.ndarray, freq_cols: np.ndarray) -> np.ndarray:
  return freq_rows[:, None] ** 2 + freq_cols[None, :] ** 2


def _mask_from_squared_distance(d2: np.ndarray, radius: float, lamb: float) -> np.ndarray:
  """lambda inside the circle, 1 - lambda outside, 1/3 on it (float32 like the official).

  The result is cached by its callers, so it is returned read-only.
  """
  lamb32 = np.float32(lamb)
  r2 = radius * radius
  mask = np.where(d2 < r2, lamb32, np.float32(1) - lamb32)
  mask = np.where(d2 == r2, np.float32(CUTOFF_VALUE), mask).astype(np.float32)
  mask.setflags(write=False)
  return mask


def _signed_centred_freqs(n: int) -> np.ndarray:
  # Index i of an fftshifted axis holds signed frequency i - n // 2.
  return np.arange(n) - n // 2


@functools.lru_cache(maxsize=None)
def centred_mask(height: int, width: int, radius: float, lamb: float) -> np.ndarray:
  """The SPF mask (H, W) in the centred layout, as stored in official checkpoints."""
  d2 = _squared_distance(_signed_centred_freqs(height), _signed_centred_freqs(width))
  return _mask_from_squared_distance(d2, radius, lamb)


@functools.lru_cache(maxsize=None)
def half_spectrum_mask(height: int, width: int, radius: float, lamb: float) -> np.ndarray:
  """The SPF mask (H, W // 2 + 1) on the unshifted rfft2 frequency grid."""
  rows = np.rint(np.fft.fftfreq(height) * height)
  cols = np.arange(width // 2 + 1)
  return _mask_from_squared_distance(_squared_distance(rows, cols), radius, lamb)


def chunk_sizes(channels: int, num_chunks: int = 3) -> tuple[int, ...]:
  """Channel chunk sizes with torch.chunk semantics: ceil(C / n) each, last one smaller."""
  size = -(-channels // num_chunks)
  sizes = []
  remaining = channels
  while remaining > 0:
    sizes.append(min(size, remaining))
    remaining -= size
  return tuple(sizes)


def channel_mask(height: int, width: int, radius: float, channels: int,
                 lambdas: Sequence[float] = SPAM_LAMBDAS) -> np.ndarray:
  """Per-channel half-spectrum masks (H, W // 2 + 1, C): chunk j uses lambdas[j]."""
  sizes = chunk_sizes(channels, len(lambdas))
  if len(sizes) != len(lambdas):
    raise ValueError(f"{channels} channels cannot be split into {len(lambdas)} chunks")
  masks = [np.repeat(half_spectrum_mask(height, width, radius, lamb)[..., None], size, axis=-1)
           for lamb, size in zip(lambdas, sizes)]
  return np.concatenate(masks, axis=-1)


def hermitian_half(centred: jax.Array) -> jax.Array:
  """Half-spectrum equivalent (..., H, W // 2 + 1) of an arbitrary centred mask (..., H, W).

  Re(ifft2(M * X)) of a real signal only sees (M(k) + M(-k)) / 2, so a learned mask
  that is not symmetric acts exactly like its symmetrised half.
  """
  height, width = centred.shape[-2:]
  unshifted = jnp.fft.ifftshift(centred, axes=(-2, -1))
  flipped = jnp.roll(jnp.flip(unshifted, axis=(-2, -1)), shift=(1, 1), axis=(-2, -1))
  return (0.5 * (unshifted + flipped))[..., : width // 2 + 1]


# The name scope of the filters' operations in traces and profiles (models/flops.py
# counts the work inside it apart).
FILTER_SCOPE = "spectral_filter"


def spectral_filter(x: jax.Array, mask_half: jax.Array) -> jax.Array:
  """Apply a half-spectrum mask (H, W // 2 + 1, C) to x (B, H, W, C), in float32."""
  height, width = x.shape[1:3]
  with jax.named_scope(FILTER_SCOPE):
    spectrum = jnp.fft.rfft2(x.astype(jnp.float32), axes=(1, 2), norm="ortho")
    spectrum = spectrum * mask_half.astype(jnp.float32)
    return jnp.fft.irfft2(spectrum, s=(height, width), axes=(1, 2), norm="ortho")


def channels_first_spectral_filter(x: jax.Array, mask_half: jax.Array) -> jax.Array:
  """spectral_filter for x (B, C, H, W) and a mask (C, H, W // 2 + 1): XLA transforms
  the innermost axes, so this layout needs no transposes around the FFTs."""
  height, width = x.shape[2:]
  with jax.named_scope(FILTER_SCOPE):
    spectrum = jnp.fft.rfft2(x.astype(jnp.float32), axes=(2, 3), norm="ortho")
    spectrum = spectrum * mask_half.astype(jnp.float32)
    return jnp.fft.irfft2(spectrum, s=(height, width), axes=(2, 3), norm="ortho")


def reference_spectral_filter(x: np.ndarray, centred: np.ndarray) -> np.ndarray:
  """The official full-FFT formulation for (B, H, W, C) x and a centred (H, W) mask (numpy)."""
  spectrum = np.fft.fftshift(np.fft.fft2(x, axes=(1, 2), norm="ortho"), axes=(1, 2))
  spectrum = spectrum * centred[None, :, :, None]
  return np.fft.ifft2(np.fft.ifftshift(spectrum, axes=(1, 2)), axes=(1, 2), norm="ortho").real


# ---------------------------------------------------------------------------------------
# Other exact formulations of the same filter, chosen by SPAM's `spectral_impl`.


@functools.lru_cache(maxsize=None)
def lowrank_factors(height: int, width: int, radius: float,
                    lambdas: tuple[float, ...] = SPAM_LAMBDAS):
  """The fixed-mask filter as (1 - lambda) * x plus a rank-K correction.

  Outside the circle of radius r the mask is the constant 1 - lambda, so
      y = (1 - lambda) x + sum_{|k| <= r} (M(k) - (1 - lambda)) <x, e_k> e_k.
  The frequencies k and -k share one cosine and one sine basis function, so K is at most
  13 for r = 2 and 5 for r = 1. Returns
      basis (H, W, K): orthogonal real Fourier functions,
      weights (K, n): the correction per basis function and lambda, 1/(HW) included,
      identity (n,): 1 - lambda.
  """
  rows = np.rint(np.fft.fftfreq(height) * height)
  cols = np.rint(np.fft.fftfreq(width) * width)
  d2 = _squared_distance(rows, cols)
  h = np.arange(height)[:, None]
  w = np.arange(width)[None, :]
  basis, weights, seen = [], [], set()
  for u, v in zip(*np.nonzero(d2 <= radius * radius)):
    conjugate = ((-u) % height, (-v) % width)
    if (u, v) in seen:
      continue
    seen.update({(u, v), conjugate})
    phase = 2 * np.pi * (u * h / height + v * w / width)
    deltas = np.array([_mask_from_squared_distance(d2[u, v], radius, lamb) - (1 - np.float32(lamb))
                       for lamb in lambdas], np.float64) / (height * width)
    if conjugate == (u, v):  # a real frequency (DC or Nyquist): its sine vanishes
      basis.append(np.cos(phase))
      weights.append(deltas)
    else:  # k and -k: the cosine and sine parts, each counted twice
      basis += [np.cos(phase), np.sin(phase)]
      weights += [2 * deltas, 2 * deltas]
  identity = np.array([1 - np.float32(lamb) for lamb in lambdas], np.float32)
  return (np.stack(basis, -1).astype(np.float32), np.stack(weights).astype(np.float32), identity)


def _lowrank_terms(x: jax.Array, radius: float, lambdas: Sequence[float]):
  """The low-rank terms of x (B, H, W, C), per channel: x as (B, HW, C), its projections
  (B, K, C) on the basis, the basis broadcast as (B, HW, K) to expand them, and the
  factors' weights (K, C) and identity (C,)."""
  batch, height, width, channels = x.shape
  basis, weights, identity = lowrank_factors(height, width, radius, tuple(lambdas))
  sizes = chunk_sizes(channels, len(lambdas))
  basis = basis.reshape(height * width, -1)
  # Batched products against the broadcast basis keep x in its (B, HW, C) layout;
  # contracting HW in an einsum over (B, H, W, C) made XLA:CPU transpose x first.
  project = jnp.broadcast_to(basis.T, (batch,) + basis.T.shape)  # (B, K, HW)
  expand = jnp.broadcast_to(basis, (batch,) + basis.shape)  # (B, HW, K)
  x = x.reshape(batch, height * width, channels)
  with jax.named_scope(FILTER_SCOPE):
    projections = jnp.matmul(project, x.astype(jnp.float32),
                             precision=jax.lax.Precision.HIGHEST)
  return (x, projections, expand, np.repeat(weights, sizes, axis=1),
          np.repeat(identity, sizes))


def lowrank_spectral_filter(x: jax.Array, radius: float,
                            lambdas: Sequence[float] = SPAM_LAMBDAS) -> jax.Array:
  """The fixed-mask filter of x (B, H, W, C) by two small matrix products, in float32."""
  rows, projections, expand, weights, identity = _lowrank_terms(x, radius, lambdas)
  y = rows.astype(jnp.float32) * identity + jnp.matmul(
      expand, projections * weights, precision=jax.lax.Precision.HIGHEST)
  return y.reshape(x.shape)


def lowrank_filter_matmul(x: jax.Array, radius: float, kernel: jax.Array,
                          lambdas: Sequence[float] = SPAM_LAMBDAS) -> jax.Array:
  """filter(x) @ kernel, (B * H * W, N), for x (B, H, W, C) and kernel (C, N).

  With filter(x) = x * identity + expand @ coefficients (lowrank_spectral_filter) and
  kernel' = identity * kernel (row-scaled),
      filter(x) @ kernel = x @ kernel' + expand @ ((coefficients / identity) @ kernel'),
  so the full-size filtered features are never formed: one full-size product, as the
  projection alone needs, plus products of rank K (at most 13).
  """
  rows, projections, expand, weights, identity = _lowrank_terms(x, radius, lambdas)
  kernel = identity[:, None].astype(kernel.dtype) * kernel
  with jax.named_scope(FILTER_SCOPE):
    coefficients = projections * (weights / identity).astype(np.float32)  # (B, K, C)
    hi = jax.lax.Precision.HIGHEST
    low = jnp.matmul(coefficients, kernel.astype(jnp.float32), precision=hi)
    correction = jnp.matmul(expand, low, precision=hi)  # (B, HW, N)
  main = rows.reshape(-1, x.shape[-1]) @ kernel
  return main + correction.reshape(main.shape).astype(main.dtype)


@functools.lru_cache(maxsize=None)
def _dft_matrices(height: int, width: int):
  """Real and imaginary parts of the DFT along H (H x H) and the real DFT along W."""
  u = np.arange(height)
  theta_h = 2 * np.pi * np.outer(u, u) / height
  k = np.arange(width // 2 + 1)
  theta_w = 2 * np.pi * np.outer(np.arange(width), k) / width  # (W, W // 2 + 1)
  # irfft counts every bin but DC (and Nyquist, for even W) twice.
  multiplicity = np.full(width // 2 + 1, 2.0)
  multiplicity[0] = 1.0
  if width % 2 == 0:
    multiplicity[-1] = 1.0
  scale = 1.0 / np.sqrt(height * width)
  as32 = lambda a: np.asarray(a, np.float32)
  return (as32(np.cos(theta_h)), as32(np.sin(theta_h)),
          as32(np.cos(theta_w) * scale), as32(np.sin(theta_w) * scale),
          as32((np.cos(theta_w) * multiplicity).T * scale),
          as32((np.sin(theta_w) * multiplicity).T * scale))


def dft_spectral_filter(x: jax.Array, mask_half: jax.Array) -> jax.Array:
  """The filter of `spectral_filter` with the DFTs written as dense matrix products.

  Matrix units run these far better than FFTs at SPANet's feature sizes (7 to 56).
  """
  with jax.named_scope(FILTER_SCOPE):
    return _dft_spectral_filter(x, mask_half)


def _dft_spectral_filter(x: jax.Array, mask_half: jax.Array) -> jax.Array:
  height, width = x.shape[1:3]
  cos_h, sin_h, cos_w, sin_w, icos_w, isin_w = _dft_matrices(height, width)
  hi = jax.lax.Precision.HIGHEST
  mm = lambda spec, a, b: jnp.einsum(spec, a, b, precision=hi)
  x = x.astype(jnp.float32)
  # Forward: real DFT along W, then the complex DFT (cos - i sin) along H.
  re = mm("bhwc,wk->bhkc", x, cos_w)
  im = -mm("bhwc,wk->bhkc", x, sin_w)
  re, im = (mm("uh,bhkc->bukc", cos_h, re) + mm("uh,bhkc->bukc", sin_h, im),
            mm("uh,bhkc->bukc", cos_h, im) - mm("uh,bhkc->bukc", sin_h, re))
  mask = mask_half.astype(jnp.float32)
  re, im = re * mask, im * mask
  # Inverse: complex DFT (cos + i sin) along H, then the real inverse along W.
  re, im = (mm("uh,bukc->bhkc", cos_h, re) - mm("uh,bukc->bhkc", sin_h, im),
            mm("uh,bukc->bhkc", cos_h, im) + mm("uh,bukc->bhkc", sin_h, re))
  return mm("bhkc,kw->bhwc", re, icos_w) - mm("bhkc,kw->bhwc", im, isin_w)


# ---------------------------------------------------------------------------------------
# Resizing learned spectral filters (SPANetV2).

_TORCH_CUBIC_A = -0.75  # PyTorch's bicubic kernel coefficient (PIL and TF use -0.5)


@functools.lru_cache(maxsize=None)
def bicubic_align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) interpolation matrix of PyTorch's bicubic resize with align_corners=True.

  Output i samples the input at i * (in - 1) / (out - 1) with the cubic convolution
  kernel (a = -0.75) over four neighbours, clamped at the borders. The source positions
  and weights are computed in float32, as PyTorch computes them for float32 tensors.
  """
  scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
  a = np.float32(_TORCH_CUBIC_A)
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
  matrix = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    source = scale * np.float32(i)
    base = int(np.floor(source))
    t = np.float32(source - np.float32(base))
    weights = (far(t + 1), near(t), near(1 - t), far(2 - t))
    for offset, weight in zip((-1, 0, 1, 2), weights):
      matrix[i, min(max(base + offset, 0), in_size - 1)] += weight
  return matrix


def resize_bicubic_align_corners(x: jax.Array, height: int, width: int) -> jax.Array:
  """Resize the last two axes of x like F.interpolate(mode="bicubic", align_corners=True).

  jax.image.resize has no align_corners mode; this is the same separable kernel written
  as two matrix products.
  """
  rows = jnp.asarray(bicubic_align_corners_matrix(x.shape[-2], height))
  cols = jnp.asarray(bicubic_align_corners_matrix(x.shape[-1], width))
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,...hw->...ow", rows, x.astype(jnp.float32), precision=hi)
  return jnp.einsum("...hw,pw->...hp", x, cols, precision=hi)
