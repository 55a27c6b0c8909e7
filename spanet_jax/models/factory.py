"""create_model: a registered model, untrained or with the weights of a pretrained
directory."""

from __future__ import annotations

from typing import Any

from spanet_jax.models import pretrained as pretrained_dirs
from spanet_jax.models import registry


def create_model(name: str, pretrained: str | None = None, **overrides: Any):
  """Build a registered model.

  Args:
    name: a registered model name (`list_models()`).
    pretrained: a pretrained directory (converted official weights or a train.py
      `final/`) holding weights of this model; then its weights are loaded as
      `load_pretrained(pretrained, **overrides)` loads them, fitting a new
      num_classes, learnable_masks or features_only.
    **overrides: module fields to replace (num_classes, dtype, drop_path_rate, ...).

  Returns:
    The Flax module; with `pretrained`, (module, variables).

  Raises:
    ValueError: an unknown name or option.
    CheckpointError: `pretrained` holds another model's weights, or cannot be read.
  """
  if pretrained is None:
    return registry.build_model(name, **overrides)
  stored = pretrained_dirs.read_metadata(pretrained)["model"]
  if stored != name:
    raise pretrained_dirs.CheckpointError(f"{pretrained} holds {stored} weights, not {name}")
  return pretrained_dirs.load_pretrained(pretrained, **overrides)
