"""Exact (erf) GELU and the two-layer GELU MLP, with hand-written gradients that keep
fewer activations than automatic differentiation does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spanet_jax.ops import platform, recompute


_INV_SQRT2 = np.float32(1.0 / np.sqrt(2.0))


_INV_SQRT_2PI = np.float32(1.0 / np.sqrt(2.0 * np.pi))


def _gelu(x: jax.Array) -> jax.Array:
  if platform.portable():  # the same function; TensorFlow cannot read erf's composite op
    return 0.5 * x * jax.lax.erfc(-x * _INV_SQRT2).astype(x.dtype)
  return 0.5 * x * (1.0 + jax.lax.erf(x * _INV_SQRT2).astype(x.dtype))


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, written as PyTorch writes it: 0.5 x (1 + erf(x / sqrt 2)).

  jax.nn.gelu(approximate=False) goes through erfc, which XLA:CPU evaluates about six
  times slower; both agree with PyTorch to float32 rounding.

  The gradient is PyTorch's, written out: differentiated automatically, the formula
  keeps four activation-sized intermediates (0.5 x, 1 + erf, the exp inside erf's
  derivative, the output) for the backward pass; this keeps x alone and recomputes
  the derivative, Phi(x) + x phi(x), where it is used.
  """
  return _gelu(x)


def _gelu_fwd(x):
  return _gelu(x), x


def _gelu_bwd(x, grad_y):
  x = recompute.recompute_here(x, grad_y)
  cdf = 0.5 * (1.0 + jax.lax.erf(x * _INV_SQRT2).astype(x.dtype))
  pdf = (jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI).astype(x.dtype)
  return (grad_y * (cdf + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def _gelu_mlp(x, kernel1, bias1, kernel2, bias2):
  hidden = x @ kernel1 + bias1
  return _gelu(hidden) @ kernel2 + bias2, hidden


@jax.custom_vjp
def gelu_mlp(x: jax.Array, kernel1: jax.Array, bias1: jax.Array, kernel2: jax.Array,
             bias2: jax.Array) -> jax.Array:
  """gelu(x @ kernel1 + bias1) @ kernel2 + bias2 for x (N, C).

  The gradient is written out so that the backward pass needs only x and the hidden
  pre-activation: autodiff would also keep the GELU's output (as large as the hidden
  layer) for kernel2's gradient. Here it is recomputed from the pre-activation together
  with the GELU's derivative, which needs the same erf.
  """
  return _gelu_mlp(x, kernel1, bias1, kernel2, bias2)[0]


def _gelu_mlp_fwd(x, kernel1, bias1, kernel2, bias2):
  y, hidden = _gelu_mlp(x, kernel1, bias1, kernel2, bias2)
  return y, (x, kernel1, kernel2, hidden)


def _gelu_mlp_bwd(residuals, grad_y):
  x, kernel1, kernel2, hidden = residuals
  hidden = recompute.recompute_here(hidden, grad_y)
  erf = jax.lax.erf(hidden * _INV_SQRT2).astype(hidden.dtype)
  activation = 0.5 * hidden * (1.0 + erf)  # _gelu(hidden), sharing the erf
  grad_kernel2 = activation.T @ grad_y
  grad_activation = grad_y @ kernel2.T
  # In the activations' dtype: a float32 constant would make every product below mixed.
  pdf = (jnp.exp(-0.5 * hidden * hidden) * _INV_SQRT_2PI).astype(hidden.dtype)
  grad_hidden = grad_activation * (0.5 * (1.0 + erf) + hidden * pdf)
  return (grad_hidden @ kernel1.T, x.T @ grad_hidden, jnp.sum(grad_hidden, 0),
          grad_kernel2, jnp.sum(grad_y, 0))


gelu_mlp.defvjp(_gelu_mlp_fwd, _gelu_mlp_bwd)
