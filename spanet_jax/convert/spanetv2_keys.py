"""SPANetV2's official key table and what a SPANetV2 state_dict says
about its architecture (docs/architecture.md: the official model's modules)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from spanet_jax.convert.entries import (AS_IS, CONV, GROUPED, LINEAR, POINTWISE, VECTOR,
                                       ConversionError, Entry, block_depths, weights)

FAMILY = "spanetv2"
# A key only this family's files hold (the stem): how a file's family is told.
IDENTIFYING_KEY = STEM_KEY = "downsample_layers.0.conv.weight"
_BLOCK_KEY = re.compile(r"^stages\.(\d+)\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class ArchitectureV2:
  """What a SPANetV2 state_dict says about the model it came from."""
  layers: tuple[int, ...]
  dims: tuple[int, ...]
  token_mixers: tuple[str, ...]
  num_classes: int
  filter_sizes: tuple[int, ...]
  features_only: bool = False
  family = "spanetv2"

  def overrides(self) -> dict[str, Any]:
    """create_model keyword arguments that rebuild this architecture."""
    return dict(num_classes=self.num_classes, filter_sizes=self.filter_sizes,
                features_only=self.features_only)

  def describe(self) -> str:
    return (f"layers {list(self.layers)}, dims {list(self.dims)}, "
            f"mixers {list(self.token_mixers)}"
            + (", dense-prediction backbone" if self.features_only else ""))

  def unused_keys(self, state_dict: Mapping[str, np.ndarray]) -> set[str]:
    """Keys the model never reads: the official dense-prediction backbone keeps the
    classifier's norm and head, which its forward pass does not use."""
    if not self.features_only:
      return set()
    return {k for k in state_dict if k.startswith(("norm.", "head."))}

  @classmethod
  def of_model(cls, model) -> "ArchitectureV2":
    return cls(tuple(model.layers), tuple(model.dims), tuple(model.token_mixers),
               model.num_classes, tuple(model.filter_sizes), model.features_only)


def _norm(prefix: str, path: tuple[str, ...], bias: bool) -> list[Entry]:
  return weights(prefix, path, VECTOR, bias, weight_name="scale")


def key_map(arch: ArchitectureV2, res_scale_stages=(False, False, True, True)) -> list[Entry]:
  """Every official key of `arch`, in official order, with its Flax path."""
  bb = ("backbone",)
  entries = []
  for i in range(len(arch.layers)):
    t, f = f"downsample_layers.{i}", bb + (f"downsample{i}",)
    if i > 0:
      entries += _norm(f"{t}.pre_norm", f + ("pre_norm",), bias=False)
    entries += weights(f"{t}.conv", f + ("conv",), CONV, bias=True)
    if i == 0:
      entries += _norm(f"{t}.post_norm", f + ("post_norm",), bias=False)
  for i, depth in enumerate(arch.layers):
    for j in range(depth):
      t, f = f"stages.{i}.{j}", bb + (f"stage{i}_block{j}",)
      mixer, fmixer = f"{t}.token_mixer", f + ("token_mixer",)
      entries += _norm(f"{t}.norm1", f + ("norm1",), bias=False)
      if arch.token_mixers[i] == "exspam":
        entries += [Entry(f"{mixer}.filter_{g}", fmixer + (f"filter_{g}",), AS_IS)
                    for g in range(1, 5)]
        entries += weights(f"{mixer}.query.0", fmixer + ("query",), LINEAR, bias=False)
        entries += weights(f"{mixer}.ctx", fmixer + ("ctx",), LINEAR, bias=False)
        for g in range(1, 5):
          entries += weights(f"{mixer}.local_conv_{g}", fmixer + (f"local_conv_{g}",), CONV,
                              bias=True)
        entries.append(Entry(f"{mixer}.proj.0.weight", fmixer + ("proj_0",), GROUPED))
        entries += _norm(f"{mixer}.proj.1", fmixer + ("proj_1",), bias=True)
        entries += weights(f"{mixer}.proj.3", fmixer + ("proj_3",), POINTWISE, bias=False)
        entries += weights(f"{mixer}.proj_out", fmixer + ("proj_out",), LINEAR, bias=False)
      else:
        entries += weights(f"{mixer}.qkv", fmixer + ("qkv",), LINEAR, bias=False)
        if arch.token_mixers[i] == "mixattention":
          entries += weights(f"{mixer}.local_conv", fmixer + ("local_conv",), CONV,
                              bias=False)
        entries += weights(f"{mixer}.proj", fmixer + ("proj",), LINEAR, bias=False)
      if res_scale_stages[i]:
        entries.append(Entry(f"{t}.res_scale1.scale", f + ("res_scale1", "scale"), VECTOR))
      entries += _norm(f"{t}.norm2", f + ("norm2",), bias=False)
      entries += weights(f"{t}.mlp.fc1", f + ("mlp", "fc1"), LINEAR, bias=False)
      entries += [Entry(f"{t}.mlp.act.{n}", f + ("mlp", "act", n), VECTOR)
                  for n in ("scale", "bias")]
      entries += weights(f"{t}.mlp.fc2", f + ("mlp", "fc2"), LINEAR, bias=False)
      if res_scale_stages[i]:
        entries.append(Entry(f"{t}.res_scale2.scale", f + ("res_scale2", "scale"), VECTOR))
  if arch.features_only:
    for i in range(len(arch.dims)):
      entries += _norm(f"norm{i}", (f"out_norms_{i}",), bias=False)
    return entries
  entries += _norm("norm", ("norm",), bias=True)
  if arch.num_classes > 0:
    entries += weights("head.fc1", ("head", "fc1"), LINEAR, bias=True)
    entries += _norm("head.norm", ("head", "norm"), bias=True)
    entries += weights("head.fc2", ("head", "fc2"), LINEAR, bias=True)
  return entries


def infer_architecture(state_dict: Mapping[str, np.ndarray]) -> ArchitectureV2:
  """Read layers, widths, token mixers, head and mask sizes off a SPANetV2 state_dict."""
  depths = block_depths(state_dict, _BLOCK_KEY)
  if sorted(depths) != [0, 1, 2, 3]:
    raise ConversionError("the file's stages.* keys do not form four SPANetV2 stages "
                          f"(found stages {sorted(depths)})")
  dims, mixers, filter_sizes = [], [], []
  for i in range(4):
    prefix = f"stages.{i}.0"
    norm = state_dict.get(f"{prefix}.norm1.weight")
    if norm is None:
      raise ConversionError(f"stage {i} of the file has no '{prefix}.norm1.weight'")
    dims.append(int(norm.shape[0]))
    mask = state_dict.get(f"{prefix}.token_mixer.filter_1")
    if mask is not None and mask.ndim == 3:
      mixers.append("exspam")
      filter_sizes.append(int(mask.shape[1]))
    elif f"{prefix}.token_mixer.qkv.weight" in state_dict:
      mixers.append("mixattention" if f"{prefix}.token_mixer.local_conv.weight" in state_dict
                    else "attention")
      filter_sizes.append(224 // 2 ** (i + 2))  # unused by attention; the 224 default
    else:
      raise ConversionError(f"stage {i} of the file has neither an ExSPAM "
                            f"('{prefix}.token_mixer.filter_1') nor an attention mixer")
  features_only = "norm0.weight" in state_dict  # the mmdet/mmseg backbone's stage norms
  head = state_dict.get("head.fc2.weight")
  num_classes = int(head.shape[0]) if head is not None and not features_only else 0
  return ArchitectureV2(tuple(depths[i] for i in range(4)), tuple(dims), tuple(mixers),
                        num_classes, tuple(filter_sizes), features_only)


def architecture_of(model) -> ArchitectureV2:
  return ArchitectureV2.of_model(model)
