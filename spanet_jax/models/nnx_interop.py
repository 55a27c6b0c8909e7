"""The models and their weights from Flax NNX.

The models are Flax linen modules; NNX code uses them through Flax's bridge:

  model, variables = spanet_jax.load_pretrained("weights/spanet_s")
  module = spanet_jax.nnx_interop.to_nnx(model, variables)   # an nnx.Module
  logits = module(images)                                      # = model.apply(variables, images)

The weights become the module's nnx.Param state, so nnx.split / nnx.Optimizer see and
train them like any NNX parameters.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx


def to_nnx(model, variables: Mapping[str, Any], sample_shape=(1, 64, 64, 3),
           seed: int = 0) -> nnx.Module:
  """An NNX module that runs `model` with `variables["params"]` as its parameters.

  Args:
    model: a linen module from create_model or load_pretrained.
    variables: its variables ({"params": ...}).
    sample_shape: an NHWC input shape used once to create the parameter slots (any
      size the model accepts; the values are replaced).
    seed: for the bridge's RNG streams (dropout in training).

  Returns:
    An nnx.Module; call it as `module(images, train=False)`.
  """
  module = nnx.bridge.ToNNX(model, rngs=nnx.Rngs(seed))
  nnx.bridge.lazy_init(module, jnp.zeros(sample_shape, jnp.float32))
  state = nnx.state(module, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, dict(variables["params"])))
  nnx.update(module, state)
  return module
