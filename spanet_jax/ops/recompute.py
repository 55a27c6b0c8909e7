"""Saved inputs made to wait for the backward pass, for hand-written gradients that
recompute intermediates instead of keeping them."""

from __future__ import annotations

import jax


def recompute_here(residual: jax.Array, grad: jax.Array) -> jax.Array:
  """`residual`, made to depend on the incoming gradient `grad` (same shape but for the
  last axis), for backward rules that recompute intermediates from a saved input.

  Without this XLA:CPU merges the recomputation with the forward pass's identical one,
  or, as it depends on forward values only, schedules it in the forward pass; either
  way the intermediate stays alive until the backward pass: the memory those rules
  exist to save. An optimisation barrier alone stops the merging but not the early
  scheduling, so the residual also takes a zero made from the gradient's first column
  (x * 0 is not folded for floats, as it is NaN for infinite x). That column is
  indexed like the residual on every other axis, so under sharding it is local data.
  Adding zero changes no value: -0.0 becomes 0.0, which every use here treats alike.
  """
  residual, grad = jax.lax.optimization_barrier((residual, grad))
  return residual + (grad[..., :1] * 0).astype(residual.dtype)
