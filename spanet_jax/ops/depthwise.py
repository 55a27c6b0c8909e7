"""Depthwise convolution as a sum of shifted, scaled copies of the input (faster than
XLA:CPU's grouped convolution), with a hand-written gradient that keeps the input alone,
and the one-pass per-tap gradient sum it shares with grouped.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _shifted_views(x: jax.Array, kh: int, kw: int,
                   channels_first: bool = False) -> list[jax.Array]:
  """The kh * kw zero-padded, shifted copies of x (B, H, W, C), or (B, C, H, W) when
  `channels_first`, that the taps of a (kh, kw) depthwise kernel multiply, in kernel
  order. For a column kernel (kh, 1) on (B, H, W, C) they are shifts of the flattened
  (B, H * W, C) rows."""
  if channels_first:
    height, width = x.shape[2:]
    padded = jnp.pad(x, ((0, 0), (0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)))
    return [padded[:, :, i:i + height, j:j + width] for i in range(kh) for j in range(kw)]
  batch, height, width, channels = x.shape
  if kw == 1:
    rows = x.reshape(batch, height * width, channels)
    padded = jnp.pad(rows, ((0, 0), ((kh // 2) * width,) * 2, (0, 0)))
    return [padded[:, i * width:i * width + height * width, :] for i in range(kh)]
  padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  return [padded[:, i:i + height, j:j + width, :] for i in range(kh) for j in range(kw)]


def _shifted_sum(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                 channels_first: bool = False) -> jax.Array:
  views = _shifted_views(x, *kernel.shape[:2], channels_first)
  per_channel = (lambda v: v[:, None, None]) if channels_first else (lambda v: v)
  y = per_channel(bias) if bias.ndim else bias
  for view, tap in zip(views, kernel.reshape(len(views), -1)):
    y = y + view * per_channel(tap)
  return jnp.broadcast_to(y, views[0].shape).reshape(x.shape)


def _fold_count(batch: int, rows: int, target: int = 8) -> int:
  """How many slices of the positions `tap_gradients` adds up inside one fusion: the
  largest divisor of the batch up to `target`, or, when that is the whole batch, the
  batch times the largest power of two up to `target` that divides the next axis."""
  count = max(d for d in range(1, min(batch, target) + 1) if batch % d == 0)
  if count == batch:
    while count < target and rows % (2 * (count // batch)) == 0:
      count *= 2
  return count


def _add_slices(stacked: jax.Array) -> jax.Array:
  """stacked[0] + stacked[1] + ...: elementwise adds, which XLA fuses into one pass with
  the products that make them (a reduction over axis 0 would materialise them first)."""
  total = stacked[0]
  for i in range(1, stacked.shape[0]):
    total = total + stacked[i]
  return total


def tap_gradients(views: list[jax.Array], grad_y: jax.Array) -> jax.Array:
  """sum over positions of view * grad_y for each view (B, S, ..., C), grad_y shaped like
  the views: (taps, C), float32.

  The positions are cut into F slices (F = 8 for a batch of 8) that are added
  elementwise, every tap at once, into a (positions / F, taps, C) array: XLA fuses this
  into one pass that reads x and dy once, where per-tap products read them once per tap
  (and a reduction of each product, handed to YNNPACK on CPU, materialises it first).
  A plain reduction of that array finishes the sum. For SPANet-S's first stage this is
  about 2-3x faster than the per-tap form and needs a quarter of its scratch. More
  slices were slower (16 and 32 were tried; with 32 XLA materialised the products
  again).
  """
  shape = views[0].shape
  channels = shape[-1]
  count = _fold_count(shape[0], shape[1])

  def folded(view):
    return _add_slices((view * grad_y).astype(jnp.float32).reshape(count, -1, channels))

  return jnp.sum(jnp.stack([folded(view) for view in views], axis=-2), axis=0)


def _channels_first_tap_gradients(views: list[jax.Array], grad_y: jax.Array) -> jax.Array:
  """tap_gradients for (B, C, H, W) views: each tap's products added over the batch
  elementwise in one pass (as tap_gradients folds the positions), then reduced."""
  folded = lambda view: _add_slices((view * grad_y).astype(jnp.float32))
  return jnp.sum(jnp.stack([folded(view) for view in views]), axis=(2, 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def shifted_depthwise_sum(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                          channels_first: bool = False) -> jax.Array:
  """bias + sum over taps of shifted, per-channel scaled copies of x (B, H, W, C), or
  (B, C, H, W) with `channels_first`: a depthwise convolution, stride 1, zero padding
  of kernel // 2, kernel (kh, kw, C), bias (C,) or a scalar.

  Two details keep XLA:CPU from recomputing every tap inside each consumer of the
  result: the bias goes in first, so the last operation adds two full-size arrays, and
  a column kernel (kh, 1) shifts the flattened (B, H * W, C) rows, so the result has
  the layout the (batched) products that read it expect. XLA then materialises it once.

  The gradient is written out by hand: differentiated automatically, the sum keeps
  every shifted copy of x for the kernel's gradient (kh * kw - 1 extra activations per
  convolution, over a quarter of SPANet-S's training scratch). This one keeps x alone.
  """
  return _shifted_sum(x, kernel, bias, channels_first)


def _shifted_depthwise_sum_fwd(x, kernel, bias, channels_first):
  return _shifted_sum(x, kernel, bias, channels_first), (x, kernel, bias)


def _shifted_depthwise_sum_bwd(channels_first, residuals, grad_y):
  x, kernel, bias = residuals
  kh, kw, channels = kernel.shape
  # y[p] = sum_t k[t] x[p + t - r], so dx[q] = sum_t k[t] dy[q - t + r]: the same sum
  # of dy with the kernel flipped.
  grad_x = _shifted_sum(grad_y, kernel[::-1, ::-1], jnp.zeros((channels,), grad_y.dtype),
                        channels_first)
  views = _shifted_views(x, kh, kw, channels_first)
  grad_y = grad_y.reshape(views[0].shape)
  if channels_first:
    grad_kernel = _channels_first_tap_gradients(views, grad_y)
    channel_axis = 1
  else:
    grad_kernel = tap_gradients(views, grad_y)
    channel_axis = grad_y.ndim - 1
  # XLA:CPU hands a plain reduction to YNNPACK, which reads dy from memory, so dy is
  # materialised once. With no such reader XLA fuses dy's producer (in SPAM, the next
  # convolution's input gradient, itself a kh * kw-tap sum) into the kernel-gradient
  # pass above, which reads dy once per tap, computing it kh * kw times over (with the
  # earlier per-tap reductions: an HLO module twice as large, kept in memory with the
  # executable, and a SPANet-S training step 7% slower). The bias gradient is that
  # reduction; the kernel gradient takes a zero made from it, so that it stays when
  # there is no bias or its gradient is not asked for.
  grad_bias = jnp.sum(grad_y.astype(jnp.float32),
                      axis=tuple(a for a in range(grad_y.ndim) if a != channel_axis))
  grad_kernel = grad_kernel + grad_bias * 0
  if bias.ndim == 0:  # a scalar stand-in for "no bias"
    grad_bias = jnp.sum(grad_bias)
  return (grad_x, grad_kernel.reshape(kernel.shape).astype(kernel.dtype),
          grad_bias.astype(bias.dtype))


shifted_depthwise_sum.defvjp(_shifted_depthwise_sum_fwd, _shifted_depthwise_sum_bwd)
