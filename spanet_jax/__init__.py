"""spanet-jax: SPANet (ICCV 2023) in JAX/Flax.

  model = spanet_jax.create_model("spanet_s")
  model, variables = spanet_jax.load_pretrained("converted/spanet_s")
  logits = model.apply(variables, images_nhwc, train=False)
"""

import importlib

# Public names and the submodules that define them, imported on first use so that
# `from spanet_jax.train import host_memory` runs before NumPy or JAX start any thread.
_EXPORTS = {"load_pretrained": "models.pretrained", "save_pretrained": "models.pretrained",
            "merge_pretrained": "models.pretrained", "CheckpointError": "models.pretrained",
            "restore_train_state": "train.checkpoints", "create_model": "models.factory",
            "ModelInfo": "models.registry", "list_models": "models.registry",
            "model_info": "models.registry", "SPANet": "models.spanet",
            "SPANetV2": "models.spanetv2", "model_flops": "models.flops",
            "FlopCount": "models.flops"}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(f"spanet_jax.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'spanet_jax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
