"""Official PyTorch state_dicts <-> Flax params for both families.

  state_dict = convert.load_state_dict_file("spanet_s.pth")
  name, overrides, params = convert.torch_to_flax(state_dict)
  state_dict = convert.flax_to_torch(params, name, overrides)
"""

from spanet_jax.convert.core import (KEY_TABLES, describe, flax_to_torch, infer_architecture,
                                     key_map, key_table_markdown, load_state_dict_file,
                                     matching_model, save_state_dict_file, torch_to_flax,
                                     unwrap_state_dict)
from spanet_jax.convert.entries import ConversionError

__all__ = ["ConversionError", "KEY_TABLES", "describe", "flax_to_torch", "infer_architecture",
           "key_map", "key_table_markdown", "load_state_dict_file", "matching_model",
           "save_state_dict_file", "torch_to_flax", "unwrap_state_dict"]
