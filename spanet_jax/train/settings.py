"""Typed views of the training config for the model, the optimiser, the schedule and
the training step (data/settings.py has the data pipeline's). Built once from the
ml_collections config; the step takes them as static arguments (they are frozen)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from spanet_jax.data.settings import DatasetSource, Settings, TrainInput
from spanet_jax.models import registry


@dataclasses.dataclass(frozen=True)
class StepOptions(Settings):
  """What the training step does besides the forward pass and the update: random
  erasing, mixup/cutmix, label smoothing (over num_classes) and the EMA of the weights."""
  num_classes: int
  random_erasing: float
  mixup: float
  cutmix: float
  mixup_switch_prob: float
  label_smoothing: float
  ema_decay: float


@dataclasses.dataclass(frozen=True)
class Optimiser(Settings):
  optimizer: str
  b1: float
  b2: float
  eps: float
  weight_decay: float
  grad_clip: float
  grad_accum_steps: int


@dataclasses.dataclass(frozen=True)
class Schedule(Settings):
  """The learning rate over the run (schedules.py)."""
  lr_schedule: str
  lr: float
  lr_base_batch: int
  batch_size: int
  grad_accum_steps: int
  num_epochs: int
  cooldown_epochs: int
  warmup_epochs: float
  warmup_lr: float
  min_lr: float

  @property
  def peak_lr(self) -> float:
    """lr scaled linearly with the images per update: lr * batch_size *
    grad_accum_steps / lr_base_batch."""
    return self.lr * self.batch_size * self.grad_accum_steps / self.lr_base_batch

  @property
  def total_epochs(self) -> int:
    """The epochs a run trains: num_epochs plus the cooldown epochs."""
    return self.num_epochs + self.cooldown_epochs


# How the model trains, not what it computes: left out of saved checkpoints' metadata.
TRAINING_ONLY_OPTIONS = ("drop_path_rate", "head_dropout", "remat")


@dataclasses.dataclass(frozen=True)
class ModelOptions(Settings):
  """The model a run trains. `create_options` is the one place a config's keys become
  create_model options: train.py and the tools (from a run's config.json) use it."""
  model: str
  num_classes: int
  drop_path_rate: float
  learnable_masks: bool
  model_overrides: dict
  # Absent from the config.json of runs written before these keys existed.
  remat: bool = False
  head_dropout: float = 0.0

  def create_options(self) -> dict[str, Any]:
    """create_model options (without dtype)."""
    options = {"num_classes": self.num_classes, "drop_path_rate": self.drop_path_rate,
               "remat": bool(self.remat), **dict(self.model_overrides)}
    family = registry.model_info(self.model).family
    if family == "spanet":
      options["learnable_masks"] = bool(self.learnable_masks)
    elif self.learnable_masks:
      raise ValueError(f"config.learnable_masks: {self.model}'s masks are always learned; "
                       "leave it False")
    if family == "spanetv2":
      options["head_dropout"] = self.head_dropout
    elif self.head_dropout:
      raise ValueError(f"config.head_dropout: {self.model} has no MLP head (SPANetV2 only)")
    return options


def described_options(options: dict[str, Any]) -> dict[str, Any]:
  """create_options without TRAINING_ONLY_OPTIONS: what saved weights are described with."""
  return {k: v for k, v in options.items() if k not in TRAINING_ONLY_OPTIONS}


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """Every typed group of a training config, built once (`of`)."""
  source: DatasetSource
  input: TrainInput
  model: ModelOptions
  optimiser: Optimiser
  schedule: Schedule
  step: StepOptions


def of(config: Mapping[str, Any]) -> TrainSettings:
  """The typed groups of a training config (a ConfigDict, or a run's config.json)."""
  return TrainSettings(
      source=DatasetSource.from_config(config), input=TrainInput.from_config(config),
      model=ModelOptions.from_config(config), optimiser=Optimiser.from_config(config),
      schedule=Schedule.from_config(config), step=StepOptions.from_config(config))
