"""Multi-head softmax attention, in the formulation the backend runs fastest."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from spanet_jax.ops import platform


def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _keys_first_attention(q, k, v, scale):
  # Keys on axis 2 and the softmax's division after the product: no reduction over the
  # last axis, which XLA:CPU would hand to YNNPACK with both products as one graph.
  logits = (jnp.einsum("bqhd,bkhd->bhkq", q, k) * scale).astype(jnp.float32)
  exponentials = jnp.exp(logits - jnp.max(logits, axis=2, keepdims=True))
  totals = jnp.transpose(jnp.sum(exponentials, axis=2), (0, 2, 1))[..., None]  # (B, Q, H, 1)
  out = jnp.einsum("bhkq,bkhd->bqhd", exponentials.astype(v.dtype), v)
  return (out / totals).astype(v.dtype)


def _keys_first_attention_fwd(q, k, v, scale):
  # Under differentiation the plain formulation, forward and backward, was the faster.
  return jax.vjp(lambda q, k, v: _softmax_attention(q, k, v, scale), q, k, v)


def _keys_first_attention_bwd(scale, pullback, grad_out):
  del scale
  return pullback(grad_out)


_keys_first_attention.defvjp(_keys_first_attention_fwd, _keys_first_attention_bwd)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  """softmax(q k^T * scale) v per head for q, k, v (B, N, heads, head_dim); the softmax in
  at least float32.

  On CPU the forward pass keeps the keys on axis 2 and divides by the softmax's sums
  after the product with v: XLA:CPU ran the usual form (softmax over the last axis) at
  under 10 GFLOP/s, as one YNNPACK graph with both products, about 3.5x slower than this
  at SPANetV2's stage-3 shapes. Its gradient is the usual form's, which differentiated
  ran faster than this one.
  """
  if platform.keys_first_attention():
    return _keys_first_attention(q, k, v, scale)
  return _softmax_attention(q, k, v, scale)
