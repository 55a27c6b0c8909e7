"""A strided convolution as one matrix product over gathered windows ("im2col"), which
XLA:CPU runs faster than its convolution for SPANet's downsampling layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def strided_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """conv(x, kernel) for x (B, H, W, I), kernel (kh, kw, I, O), symmetric zero padding
  `pad` and equal strides: the kh * kw strided windows gathered into channels, then one
  (B * H' * W', kh * kw * I) x (kh * kw * I, O) product."""
  kh, kw, in_features, features = kernel.shape
  batch, height, width, _ = x.shape
  out_h = (height + 2 * pad - kh) // stride + 1
  out_w = (width + 2 * pad - kw) // stride + 1
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  windows = [padded[:, i:i + stride * (out_h - 1) + 1:stride,
                    j:j + stride * (out_w - 1) + 1:stride, :]
             for i in range(kh) for j in range(kw)]
  columns = jnp.concatenate(windows, axis=-1).reshape(-1, kh * kw * in_features)
  return (columns @ kernel.reshape(-1, features)).reshape(batch, out_h, out_w, features)
