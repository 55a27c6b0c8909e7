"""One-group normalisation (GroupNorm(1)) with a leaner hand-written gradient, and the
per-position channel mean in the form each backend runs fastest."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from spanet_jax.ops import platform, recompute


# The name scope of normalisation statistics in traces and profiles: they stay float32
# when the model computes in bfloat16.
STATISTICS_SCOPE = "norm_statistics"


def _sample_axes(x: jax.Array) -> tuple[int, ...]:
  return tuple(range(1, x.ndim))


def _normalise_one_group(x, scale, bias, epsilon):
  """(y, mean, 1 / std) of one-group normalisation, statistics in float32."""
  axes = _sample_axes(x)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  with jax.named_scope(STATISTICS_SCOPE):
    mean = jnp.mean(x, axes, keepdims=True)
    centred = x - mean
    inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axes, keepdims=True) + epsilon)
  return centred * (inv_std * scale) + bias, mean, inv_std


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def single_group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array,
                      epsilon: float) -> jax.Array:
  """(x - mean) / sqrt(var + epsilon) * scale + bias, mean and (biased) variance over
  all axes of each sample but the batch, in at least float32; scale and bias per channel
  (the last axis). Returned in float32 (or wider); callers cast.

  The gradient is written out: differentiated automatically, the formula keeps x - mean
  for the backward pass, an activation-sized array per norm beside the input itself.
  This keeps the input and two scalars per sample, and recomputes x - mean where used.
  """
  return _normalise_one_group(x, scale, bias, epsilon)[0]


def _single_group_norm_fwd(x, scale, bias, epsilon):
  y, mean, inv_std = _normalise_one_group(x, scale, bias, epsilon)
  return y, (x, scale, bias, inv_std, mean)


def _single_group_norm_bwd(epsilon, residuals, grad_y):
  with jax.named_scope(STATISTICS_SCOPE):
    return _single_group_norm_grads(residuals, grad_y)


def _single_group_norm_grads(residuals, grad_y):
  x, scale, bias, inv_std, mean = residuals
  x = recompute.recompute_here(x, grad_y)
  dtype = inv_std.dtype
  grad_y = grad_y.astype(dtype)
  count = math.prod(x.shape[1:])
  # Only two full-size reductions, both of arrays that contain grad_y: XLA could
  # otherwise compute a reduction's input (x - mean, or scale broadcast to x's shape)
  # early in the forward pass and hold it until here. x - mean is recomputed inside
  # the products that need it.
  centred = lambda: x.astype(dtype) - mean
  spatial = tuple(range(1, x.ndim - 1))
  sum_grad = jnp.sum(grad_y, spatial).reshape(x.shape[0], -1)  # (B, C)
  sum_grad_x_hat = jnp.sum(grad_y * (centred() * inv_std), spatial).reshape(x.shape[0], -1)
  grad_scale = jnp.sum(sum_grad_x_hat, 0)
  grad_bias = jnp.sum(sum_grad, 0)
  # d/dx of (x - mean) / std for a per-sample mean and std over the same axes:
  # inv_std * (g - mean(g) - x_hat * mean(g * x_hat)), with g = grad_y * scale.
  scale = scale.astype(dtype)
  per_sample = lambda sums: (sums @ scale / count).reshape(inv_std.shape)
  mean_g, mean_g_x_hat = per_sample(sum_grad), per_sample(sum_grad_x_hat)
  grad_x = (inv_std * (grad_y * scale - mean_g)
            - centred() * (inv_std * inv_std * mean_g_x_hat))
  return (grad_x.astype(x.dtype), grad_scale.astype(scale.dtype).reshape(scale.shape),
          grad_bias.astype(bias.dtype).reshape(bias.shape))


single_group_norm.defvjp(_single_group_norm_fwd, _single_group_norm_bwd)


def channel_mean(x: jax.Array) -> jax.Array:
  """The mean over the last axis, kept as a (..., 1) axis.

  On CPU it is a product with a (C, 1) column of 1 / C rather than a reduction: XLA:CPU
  hands a last-axis reduction to YNNPACK together with every product and elementwise
  operation around it as one graph, with each broadcast constant in it (the GELU's and
  ReLU's scalars, the norm's epsilon) written out as a full-size array first.
  SPANetV2-S18's forward pass took 0.88 (pure) and 0.91 (hybrid) of the time with the
  products (alternating A/B).
  """
  with jax.named_scope(STATISTICS_SCOPE):
    if platform.channel_mean_as_product():
      return x @ jnp.full((x.shape[-1], 1), 1.0 / x.shape[-1], x.dtype)
    return jnp.mean(x, axis=-1, keepdims=True)


def _layer_norm(x, scale, bias, epsilon):
  """(y, mean, 1 / std) of a LayerNorm over the last axis, statistics in float32."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = channel_mean(x)
  centred = x - mean
  with jax.named_scope(STATISTICS_SCOPE):
    inv_std = jax.lax.rsqrt(channel_mean(jnp.square(centred)) + epsilon)
  y = centred * inv_std * scale
  return (y if bias is None else y + bias), mean, inv_std


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None,
               epsilon: float) -> jax.Array:
  """LayerNorm over the last axis (biased variance, statistics in at least float32),
  scale and optional bias per channel; returned in float32 (or wider): callers cast.

  The gradient is written out with its channel means taken as channel_mean takes them:
  autodiff of the products with the column of 1 / C gave outer products with a row of
  1 / C, which XLA:CPU ran as (N, 1) x (1, C) matrix products (SPANetV2-S18's 36
  norms: ~0.2 s of a ~2 s training step). It keeps the input and two numbers per row.
  """
  return _layer_norm(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
  y, mean, inv_std = _layer_norm(x, scale, bias, epsilon)
  return y, (x, scale, bias, mean, inv_std)


def _layer_norm_bwd(epsilon, residuals, grad_y):
  del epsilon
  x, scale, bias, mean, inv_std = residuals
  x = recompute.recompute_here(x, grad_y)
  dtype = inv_std.dtype
  grad_y = grad_y.astype(dtype)
  x_hat = (x.astype(dtype) - mean) * inv_std
  rows = tuple(range(x.ndim - 1))
  grad_scale = jnp.sum(grad_y * x_hat, rows).astype(scale.dtype)
  grad_bias = None if bias is None else jnp.sum(grad_y, rows).astype(bias.dtype)
  g = grad_y * scale.astype(dtype)
  with jax.named_scope(STATISTICS_SCOPE):
    mean_g, mean_g_x_hat = channel_mean(g), channel_mean(g * x_hat)
  grad_x = inv_std * (g - mean_g - x_hat * mean_g_x_hat)
  return grad_x.astype(x.dtype), grad_scale, grad_bias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)
