"""The model registry: every published variant, its architecture and its metadata."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

from flax import linen as nn

from spanet_jax.models import spanet, spanetv2

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
  release_file: str | None = None


_BUILDERS: dict[str, Callable[..., nn.Module]] = {"spanet": spanet.SPANet,
                                                  "spanetv2": spanetv2.SPANetV2}
_SMALL_DIMS = (64, 128, 320, 512)
_BASE_DIMS = (96, 192, 384, 768)
# name: (layers, dims, top-1, params M, MACs G, crop_pct, official release file). The
# training recipes (drop path and the rest) are in configs/.
_SPANET_FACTS = {
    "spanet_s": ((4, 4, 12, 4), _SMALL_DIMS, 83.1, 28.7, 4.6, 0.9, "spanet-small.pth"),
    "spanet_m": ((6, 6, 18, 6), _SMALL_DIMS, 83.5, 41.8, 6.8, 0.9, "spanet-medium.pth"),
    "spanet_mx": ((8, 8, 24, 8), _SMALL_DIMS, 83.8, 54.9, 9.0, 0.9, "spanet-mediumX.pth"),
    "spanet_b": ((6, 6, 18, 6), _BASE_DIMS, 84.0, 75.9, 12.0, 0.95, "spanet-base.pth"),
    "spanet_bx": ((8, 8, 24, 8), _BASE_DIMS, 84.4, 99.8, 15.8, 0.95, "spanet-baseX.pth"),
}

_V2_LAYERS = {"s18": (3, 3, 9, 3), "s36": (3, 12, 18, 3), "m36": (3, 12, 18, 3),
              "b36": (3, 12, 18, 3)}
_V2_DIMS = {"s18": _SMALL_DIMS, "s36": _SMALL_DIMS, "m36": (96, 192, 384, 576),
            "b36": (128, 256, 512, 768)}
_V2_MIXERS = {"pure": ("exspam",) * 4,
              "hybrid": ("exspam", "exspam", "mixattention", "attention")}
# (top-1, params M, MACs G) from the paper; the training recipes are in configs/.
_V2_FACTS = {
    ("s18", "pure"): (83.4, 29, 4.2), ("s18", "hybrid"): (83.9, 27, 4.2),
    ("s36", "pure"): (84.4, 44, 8.1), ("s36", "hybrid"): (84.7, 41, 8.1),
    ("m36", "pure"): (84.9, 61, 13.7), ("m36", "hybrid"): (85.3, 58, 13.6),
    ("b36", "pure"): (85.0, 100, 24.3), ("b36", "hybrid"): (85.6, 100, 23.9),
}


def _published_models() -> list[ModelInfo]:
  spanet_models = [
      ModelInfo(name=name, family="spanet", architecture=dict(layers=layers, dims=dims),
                crop_pct=crop_pct, paper_top1=top1, paper_params_m=params_m,
                paper_macs_g=macs_g, release_file=release)
      for name, (layers, dims, top1, params_m, macs_g, crop_pct, release)
      in _SPANET_FACTS.items()]
  spanetv2_models = [
      ModelInfo(name=f"spanetv2_{size}_{kind}", family="spanetv2",
                architecture=dict(layers=_V2_LAYERS[size], dims=_V2_DIMS[size],
                                  token_mixers=_V2_MIXERS[kind]),
                crop_pct=1.0, paper_top1=top1, paper_params_m=params_m, paper_macs_g=macs_g)
      for (size, kind), (top1, params_m, macs_g)
      in _V2_FACTS.items()]
  return spanet_models + spanetv2_models


_MODELS: dict[str, ModelInfo] = {info.name: info for info in _published_models()}


def register(info: ModelInfo) -> ModelInfo:
  """Add a model (or replace one of the same name) for every later lookup."""
  _MODELS[info.name] = info
  return info


def list_models() -> list[str]:
  return sorted(_MODELS)


def model_info(name: str) -> ModelInfo:
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
  return _MODELS[name]


def build_model(name: str, **overrides: Any) -> nn.Module:
  """The Flax module of a registered model, untrained.

  Args:
    name: a registered model name (`list_models()`).
    **overrides: module fields to replace (num_classes, dtype, drop_path_rate, ...).

  Returns:
    The Flax module.

  Raises:
    ValueError: an unknown name or option.
  """
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


@contextlib.contextmanager
def registered(*infos: ModelInfo) -> Iterator[None]:
  """Models registered for the duration of a block (test fixtures, experiments), the
  registry left as it was afterwards."""
  saved = dict(_MODELS)
  for info in infos:
    register(info)
  try:
    yield
  finally:
    _MODELS.clear()
    _MODELS.update(saved)
