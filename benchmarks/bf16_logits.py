"""bfloat16 against float32 logits of the same weights on real photographs.

  python benchmarks/bf16_logits.py [--models spanet_s spanetv2_s18_hybrid]

No official weights ship here: each model gets random official-layout weights (the
parity tests' PyTorch reference, randomised so that every layer matters), converted.
Prints the relative L2 difference of the logits and the share of photos whose top-1
class agrees.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import spanet_jax
from spanet_jax import convert
from spanet_jax.models import registry
from spanet_jax.reference import spanet_torch, spanetv2_torch, verify


def reference_weights(name: str) -> dict:
  info = registry.model_info(name)
  arch = dict(info.architecture)
  module = (spanet_torch.SPANet(**arch) if info.family == "spanet"
            else spanetv2_torch.SPANetV2(**arch))
  spanet_torch.randomize_(module, seed=0)
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["spanet_s", "spanetv2_s18_hybrid"])
  args = parser.parse_args()
  for name in args.models:
    _, overrides, params = convert.torch_to_flax(reference_weights(name), name)
    photos = verify.verification_inputs(224, registry.model_info(name).crop_pct)["photos"]
    logits = {}
    for dtype in (jnp.float32, jnp.bfloat16):
      model = spanet_jax.create_model(name, dtype=dtype, **overrides)
      out = jax.jit(model.apply)({"params": params}, photos)
      logits[dtype] = np.asarray(out, np.float32)
    f32, bf16 = logits[jnp.float32], logits[jnp.bfloat16]
    relative = np.linalg.norm(bf16 - f32) / np.linalg.norm(f32)
    agree = np.mean(f32.argmax(-1) == bf16.argmax(-1))
    print(f"{name}: {len(photos)} photos at 224, logits relative L2 {relative:.2e}, "
          f"top-1 agreement {agree:.0%}")


if __name__ == "__main__":
  main()
