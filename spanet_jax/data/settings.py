"""Typed views of the training config for the data pipeline. The ml_collections config
(configs/default.py holds every default) stays the command line's surface; the loop
turns it into these frozen dataclasses once, and data/ and train/ take them as
explicit arguments."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

SettingsT = TypeVar("SettingsT", bound="Settings")


def _frozen(value: Any) -> Any:
  """Lists as tuples and nested configs as dicts: values a frozen dataclass can hold."""
  if hasattr(value, "to_dict"):
    return value.to_dict()
  if isinstance(value, list):
    return tuple(value)
  return value


@dataclasses.dataclass(frozen=True)
class Settings:
  """A group of config keys; each field is the config key of the same name."""

  @classmethod
  def from_config(cls: type[SettingsT], config: Mapping[str, Any]) -> SettingsT:
    """The fields from a ConfigDict or a dict (a run's config.json); a key the mapping
    lacks takes the field's default, where it has one (keys added after a run was
    written)."""
    values = {}
    for field in dataclasses.fields(cls):
      if field.name in config:
        values[field.name] = _frozen(config[field.name])
      elif field.default is dataclasses.MISSING:
        raise KeyError(f"the config has no {field.name!r}")
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class DatasetSource(Settings):
  """Which dataset: a class-per-folder tree (`folder`), else a TFDS dataset."""
  dataset: str
  data_dir: str
  manual_dir: str
  folder: str
  train_split: str


@dataclasses.dataclass(frozen=True)
class TrainInput(Settings):
  """How training batches are drawn and augmented on the host."""
  seed: int
  prefetch: int
  image_size: int
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  resize_antialias: bool
  hflip: float
  randaugment: str
