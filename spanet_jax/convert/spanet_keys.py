"""SPANet's official key table and what a SPANet state_dict says about its architecture
(docs/architecture.md: the official model's modules and their names)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from spanet_jax.convert.entries import (CONV, LINEAR, MASK, POINTWISE, VECTOR, ConversionError,
                                       Entry, block_depths, weights)
from spanet_jax.models import spectral

FAMILY = "spanet"
# A key only this family's files hold: how a file's family is told.
IDENTIFYING_KEY = "patch_embed.proj.weight"


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What a state_dict says about the model it came from."""
  layers: tuple[int, ...]
  dims: tuple[int, ...]
  num_classes: int
  features_only: bool
  mask_sizes: tuple[int, ...]
  family = "spanet"

  def overrides(self) -> dict[str, Any]:
    """create_model keyword arguments that rebuild this architecture."""
    return dict(num_classes=self.num_classes, features_only=self.features_only,
                mask_sizes=self.mask_sizes)

  def describe(self) -> str:
    return f"layers {list(self.layers)}, dims {list(self.dims)}"

  def unused_keys(self, state_dict: Mapping[str, np.ndarray]) -> set[str]:
    """Keys the model never reads (none: every key of a SPANet file is used)."""
    del state_dict
    return set()

  @classmethod
  def of_model(cls, model) -> "Architecture":
    return cls(tuple(model.layers), tuple(model.dims), model.num_classes,
               model.features_only, tuple(model.mask_sizes))


def key_map(arch: Architecture, res_scale_stages=(False, False, True, True)) -> list[Entry]:
  """Every official key of `arch`, in official order, with its Flax path."""
  bb = ("backbone",)
  entries = weights("patch_embed.proj", bb + ("patch_embed",), CONV)
  for i, depth in enumerate(arch.layers):
    if i > 0:
      entries += weights(f"network.{2 * i - 1}.proj", bb + (f"downsample{i}",), CONV)
    for j in range(depth):
      t, f = f"network.{2 * i}.{j}", bb + (f"stage{i}_block{j}",)
      mixer, fmixer = f"{t}.token_mixer", f + ("token_mixer",)
      entries += weights(f"{t}.norm1", f + ("norm1",), VECTOR)
      entries += weights(f"{mixer}.proj_in", fmixer + ("proj_in",), POINTWISE)
      entries += weights(f"{mixer}.conv.0", fmixer + ("conv_w",), CONV)
      entries += weights(f"{mixer}.conv.1", fmixer + ("conv_h",), CONV)
      entries += weights(f"{mixer}.proj_out", fmixer + ("proj_out",), POINTWISE)
      entries += [Entry(f"{mixer}.sps.{k}.filter", fmixer + ("spectral_masks",), MASK, i, k)
                  for k in range(len(spectral.SPAM_LAMBDAS))]
      for k in range(len(spectral.SPAM_LAMBDAS)):
        entries += weights(f"{mixer}.pws.{k}", fmixer + (f"pws_{k}",), POINTWISE)
      entries += weights(f"{t}.norm2", f + ("norm2",), VECTOR)
      entries += weights(f"{t}.mlp.fc1", f + ("mlp", "fc1"), POINTWISE)
      entries += weights(f"{t}.mlp.fc2", f + ("mlp", "fc2"), POINTWISE)
      if res_scale_stages[i]:
        entries += [Entry(f"{t}.res_scale{n}.scale", f + (f"res_scale{n}", "scale"), VECTOR)
                    for n in (1, 2)]
  if arch.features_only:
    for i in range(len(arch.dims)):
      entries += weights(f"norm{2 * i}", (f"out_norms_{i}",), VECTOR)
  else:
    entries += weights("norm", ("norm",), VECTOR)
    if arch.num_classes > 0:
      entries += weights("head", ("head",), LINEAR)
  return entries


_BLOCK_KEY = re.compile(r"^network\.(\d+)\.(\d+)\.")


def infer_architecture(state_dict: Mapping[str, np.ndarray]) -> Architecture:
  """Read layers, widths, head and mask sizes off a SPANet state_dict."""
  depth_by_index = block_depths(state_dict, _BLOCK_KEY)
  stage_indices = sorted(i for i in depth_by_index if i % 2 == 0)
  if stage_indices != [0, 2, 4, 6]:
    raise ConversionError("the file's network.* keys do not form four SPANet stages "
                          f"(found stage indices {stage_indices})")
  layers = tuple(depth_by_index[i] for i in stage_indices)
  dims, mask_sizes = [], []
  for i in stage_indices:
    norm = state_dict.get(f"network.{i}.0.norm1.weight")
    mask = state_dict.get(f"network.{i}.0.token_mixer.sps.0.filter")
    if norm is None or mask is None or mask.ndim != 3:
      raise ConversionError(f"stage {i // 2} of the file lacks 'network.{i}.0.norm1.weight' or "
                            f"a (1, H, W) 'network.{i}.0.token_mixer.sps.0.filter'")
    dims.append(int(norm.shape[0]))
    mask_sizes.append(int(mask.shape[-1]))
  features_only = "norm0.weight" in state_dict and "head.weight" not in state_dict
  head = state_dict.get("head.weight")
  num_classes = int(head.shape[0]) if head is not None else 0
  return Architecture(layers, tuple(dims), num_classes, features_only, tuple(mask_sizes))


def architecture_of(model) -> Architecture:
  return Architecture.of_model(model)
