"""spanet-jax: SPANet (ICCV 2023) in JAX/Flax.

  model = spanet_jax.create_model("spanet_s")
  model, variables = spanet_jax.load_pretrained("converted/spanet_s")
  logits = model.apply(variables, images_nhwc, train=False)
"""

from spanet_jax.checkpoint import load_pretrained, save_pretrained
from spanet_jax.registry import ModelInfo, create_model, list_models, model_info
from spanet_jax.spanet import SPANet

__all__ = ["ModelInfo", "SPANet", "create_model", "list_models", "load_pretrained",
           "model_info", "save_pretrained"]
__version__ = "0.1.0"
