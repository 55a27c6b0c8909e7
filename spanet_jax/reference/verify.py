"""Numerical comparison of a Flax SPANet with the PyTorch reference on the same weights."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import numpy as np

from spanet_jax.data import preprocess
from spanet_jax.models import registry

# Relative L2 difference of logits allowed between the two frameworks (float32).
REL_L2_TOLERANCE = 2e-5


@dataclasses.dataclass
class Comparison:
  inputs: str
  size: int
  max_abs: float
  rel_l2: float
  top1_agreement: float | None  # None for feature outputs
  top5_agreement: float | None

  @property
  def passed(self) -> bool:
    return self.rel_l2 <= REL_L2_TOLERANCE and self.top1_agreement in (None, 1.0)

  def __str__(self) -> str:
    line = (f"{self.inputs:>7} @ {self.size}: max abs {self.max_abs:.3g}, "
            f"rel L2 {self.rel_l2:.3g}")
    if self.top1_agreement is not None:
      line += f", top-1 agree {self.top1_agreement:.0%}, top-5 agree {self.top5_agreement:.0%}"
    return line + ("" if self.passed else "  <-- FAIL")


def reference_model(model, state_dict: Mapping[str, np.ndarray]):
  """The PyTorch reference with the Flax model's architecture, loaded strictly."""
  import torch  # pylint: disable=g-import-not-at-top

  from spanet_jax.reference import spanet_torch, spanetv2_torch  # pylint: disable=g-import-not-at-top

  if hasattr(model, "token_mixers"):  # SPANetV2
    reference = spanetv2_torch.SPANetV2(
        layers=model.layers, dims=model.dims, token_mixers=model.token_mixers,
        filter_sizes=model.filter_sizes, res_scale_stages=model.res_scale_stages,
        mlp_ratio=model.mlp_ratio, num_classes=model.num_classes)
  else:
    reference = spanet_torch.SPANet(
        layers=model.layers, dims=model.dims, radii=model.radii, mask_sizes=model.mask_sizes,
        res_scale_stages=model.res_scale_stages, mlp_ratio=model.mlp_ratio,
        kernel_size=model.kernel_size, num_classes=model.num_classes,
        fork_feat=model.features_only)
  reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                            strict=True)
  return reference.eval()


def compare_outputs(expected, actual, inputs: str, size: int) -> Comparison:
  """Compare reference (NCHW features or logits) with Flax outputs (NHWC features or logits)."""
  if isinstance(expected, (list, tuple)):
    expected = np.concatenate([np.asarray(e).transpose(0, 2, 3, 1).ravel() for e in expected])
    actual = np.concatenate([np.asarray(a).ravel() for a in actual])
    top1 = top5 = None
  else:
    expected, actual = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
    top1 = float(np.mean(expected.argmax(-1) == actual.argmax(-1)))
    k = min(5, expected.shape[-1])
    top5 = float(np.mean([set(np.argsort(e)[-k:]) == set(np.argsort(a)[-k:])
                          for e, a in zip(expected, actual)]))
  diff = np.asarray(expected, np.float64) - np.asarray(actual, np.float64)
  rel = float(np.linalg.norm(diff) / max(np.linalg.norm(np.asarray(expected, np.float64)), 1e-30))
  return Comparison(inputs, size, float(np.max(np.abs(diff))), rel, top1, top5)


def verification_inputs(size: int, crop_pct: float, num_random: int = 4, seed: int = 0
                        ) -> dict[str, np.ndarray]:
  """NHWC batches: standard-normal noise, and the shipped photographs preprocessed."""
  noise = np.random.default_rng(seed).standard_normal((num_random, size, size, 3))
  photos = [preprocess.eval_transform(preprocess.load_image(p), size, crop_pct)
            for p in preprocess.sample_photo_paths()]
  return {"random": noise.astype(np.float32), "photos": np.stack(photos)}


def verify(model, variables, state_dict: Mapping[str, np.ndarray],
           sizes: Sequence[int] = (224, 256), model_name: str | None = None
           ) -> list[Comparison]:
  """Run both frameworks on random inputs and real photographs at each size."""
  import torch  # pylint: disable=g-import-not-at-top

  reference = reference_model(model, state_dict)
  crop_pct = registry.model_info(model_name).crop_pct if model_name else 0.9
  forward = jax.jit(model.apply)
  results = []
  for size in sizes:
    for kind, batch in verification_inputs(size, crop_pct).items():
      with torch.no_grad():
        expected = reference(torch.from_numpy(batch.transpose(0, 3, 1, 2).copy()))
      expected = ([e.numpy() for e in expected] if isinstance(expected, (list, tuple))
                  else expected.numpy())
      actual = jax.device_get(forward(variables, batch))
      results.append(compare_outputs(expected, actual, kind, size))
  return results
