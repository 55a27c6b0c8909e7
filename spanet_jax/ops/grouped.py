"""Grouped 1x1 projection with few inputs and outputs per group, as broadcast
multiply-adds, with a hand-written gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spanet_jax.ops import depthwise


@jax.custom_vjp
def grouped_projection(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """y[..., g, o] = sum_i x[..., i, g] * kernel[g, i, o] for x (B, H, W, I, G) and kernel
  (G, I, O): a grouped 1x1 convolution with I inputs and O outputs per group, its groups
  on the last axis of y (B, H, W, G, O).

  With I and O small (4 and 8 in SPANetV2), XLA:CPU runs the einsum as G tiny batched
  products behind transposes of x and y. Here it is I broadcast multiply-adds that fuse
  with the neighbouring elementwise work. The gradient is written out: the input's as O
  multiply-adds per input, the kernel's as `depthwise.tap_gradients` sums (one pass).
  """
  y = x[..., 0, :, None] * kernel[:, 0, :]
  for i in range(1, x.shape[-2]):
    y = y + x[..., i, :, None] * kernel[:, i, :]
  return y


def _grouped_projection_fwd(x, kernel):
  return grouped_projection(x, kernel), (x, kernel)


def _grouped_projection_bwd(residuals, grad_y):
  x, kernel = residuals
  groups, inputs, outputs = kernel.shape
  grad_x = []
  for i in range(inputs):
    total = grad_y[..., 0] * kernel[:, i, 0]
    for o in range(1, outputs):
      total = total + grad_y[..., o] * kernel[:, i, o]
    grad_x.append(total)
  grad_x = jnp.stack(grad_x, axis=-2)
  # The kernel's gradient: for each input i, sum over positions of x_i (broadcast over
  # the outputs) times grad_y, as taps of one depthwise.tap_gradients pass over (G * O) channels.
  flat = grad_y.shape[:-2] + (groups * outputs,)
  views = [jnp.broadcast_to(x[..., i, :, None], grad_y.shape).reshape(flat)
           for i in range(inputs)]
  grad_kernel = depthwise.tap_gradients(views, grad_y.reshape(flat)).reshape(inputs, groups, outputs)
  return (grad_x.astype(x.dtype),
          jnp.transpose(grad_kernel, (1, 0, 2)).astype(kernel.dtype))


grouped_projection.defvjp(_grouped_projection_fwd, _grouped_projection_bwd)
