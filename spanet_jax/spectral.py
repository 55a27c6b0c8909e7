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


def spectral_filter(x: jax.Array, mask_half: jax.Array) -> jax.Array:
  """Apply a half-spectrum mask (H, W // 2 + 1, C) to x (B, H, W, C), in float32."""
  height, width = x.shape[1:3]
  spectrum = jnp.fft.rfft2(x.astype(jnp.float32), axes=(1, 2), norm="ortho")
  spectrum = spectrum * mask_half.astype(jnp.float32)
  return jnp.fft.irfft2(spectrum, s=(height, width), axes=(1, 2), norm="ortho")


def reference_spectral_filter(x: np.ndarray, centred: np.ndarray) -> np.ndarray:
  """The official full-FFT formulation for (B, H, W, C) x and a centred (H, W) mask (numpy)."""
  spectrum = np.fft.fftshift(np.fft.fft2(x, axes=(1, 2), norm="ortho"), axes=(1, 2))
  spectrum = spectrum * centred[None, :, :, None]
  return np.fft.ifft2(np.fft.ifftshift(spectrum, axes=(1, 2)), axes=(1, 2), norm="ortho").real
