"""spanet-jax: SPANet in JAX/Flax."""

from spanet_jax.registry import ModelInfo, create_model, list_models, model_info
