"""The model registry: every published variant, its architecture and its metadata."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import linen as nn

from spanet_jax import spanet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What a user needs to know to build, feed and judge a model."""
  name: str
  family: str
  architecture: dict[str, Any]  # keyword arguments of the Flax module
  input_size: int = 224
  crop_pct: float = 0.9
  interpolation: str = "bicubic"
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  num_classes: int = 1000
  paper_top1: float | None = None
  paper_params_m: float | None = None
  paper_macs_g: float | None = None
  train_drop_path: float | None = None  # the official recipe's stochastic depth rate
  release_file: str | None = None


_BUILDERS: dict[str, Callable[..., nn.Module]] = {"spanet": spanet.SPANet}
_MODELS: dict[str, ModelInfo] = {}


def register(info: ModelInfo) -> ModelInfo:
  _MODELS[info.name] = info
  return info


def _spanet(name, layers, dims, top1, params_m, macs_g, crop_pct, drop_path, release):
  register(ModelInfo(
      name=name, family="spanet", architecture=dict(layers=layers, dims=dims),
      crop_pct=crop_pct, paper_top1=top1, paper_params_m=params_m, paper_macs_g=macs_g,
      train_drop_path=drop_path, release_file=release))


_SMALL_DIMS = (64, 128, 320, 512)
_BASE_DIMS = (96, 192, 384, 768)
_spanet("spanet_s", (4, 4, 12, 4), _SMALL_DIMS, 83.1, 28.7, 4.6, 0.9, 0.1, "spanet-small.pth")
_spanet("spanet_m", (6, 6, 18, 6), _SMALL_DIMS, 83.5, 41.8, 6.8, 0.9, 0.2, "spanet-medium.pth")
_spanet("spanet_mx", (8, 8, 24, 8), _SMALL_DIMS, 83.8, 54.9, 9.0, 0.9, None,
        "spanet-mediumX.pth")
_spanet("spanet_b", (6, 6, 18, 6), _BASE_DIMS, 84.0, 75.9, 12.0, 0.95, 0.3, "spanet-base.pth")
_spanet("spanet_bx", (8, 8, 24, 8), _BASE_DIMS, 84.4, 99.8, 15.8, 0.95, None,
        "spanet-baseX.pth")


def list_models() -> list[str]:
  return sorted(_MODELS)


def model_info(name: str) -> ModelInfo:
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
  return _MODELS[name]


def create_model(name: str, **overrides: Any) -> nn.Module:
  """Build a registered model; keyword overrides replace module fields (num_classes, dtype, ...)."""
  info = model_info(name)
  module_cls = _BUILDERS[info.family]
  fields = {f.name for f in dataclasses.fields(module_cls)} - {"parent", "name"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"{name} has no option(s) {', '.join(unknown)}; "
                     f"options: {', '.join(sorted(fields))}")
  # Sequences arrive as lists from JSON and command lines; module fields must hash.
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  kwargs = {**info.architecture, "num_classes": info.num_classes, **overrides}
  return module_cls(**kwargs)
