"""Open any checkpoint a user points a tool at, with everything needed to feed it.

Accepted: a directory written by convert_torch_weights.py or save_pretrained (it holds
spanet.json); a train.py workdir (its final/ weights, or while training runs, its best/
ones rebuilt from config.json); or `init:NAME` (e.g. `init:spanet_s`), freshly
initialised weights (seed 0), the untrained baseline of an analysis. Anything else is a
CheckpointError that says what the path is and what to do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import zipfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from spanet_jax.data import labels, preprocess
from spanet_jax.models import pretrained, registry
from spanet_jax.train import settings
from spanet_jax.train import workdir as workdir_layout
from spanet_jax.models.pretrained import CheckpointError
from spanet_jax.data.preprocess import DataConfig


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  path: str
  name: str  # registry name, e.g. "spanet_s"
  model: Any
  variables: Any
  data: DataConfig
  class_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def data_config(model_name: str, stored: dict | None = None) -> DataConfig:
  """The model's registry metadata, overridden by what a checkpoint recorded."""
  info = registry.model_info(model_name)
  defaults = dict(input_size=info.input_size, crop_pct=info.crop_pct, mean=info.mean,
                  std=info.std, interpolation=info.interpolation)
  stored = {k: v for k, v in (stored or {}).items() if k in defaults and v is not None}
  merged = {**defaults, **stored}
  merged["mean"], merged["std"] = tuple(merged["mean"]), tuple(merged["std"])
  return DataConfig(**merged)


def default_class_names(num_classes: int) -> tuple[str, ...]:
  if num_classes == labels.NUM_IMAGENET_CLASSES:
    return labels.imagenet_class_names()
  return tuple(f"class {i}" for i in range(num_classes))


def load(path: str, **overrides: Any) -> LoadedModel:
  """Open `path` (see the module docstring); `overrides` as in load_pretrained."""
  if path.startswith(INIT_PREFIX):
    return _initialised(path[len(INIT_PREFIX):], overrides)
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise CheckpointError(f"no such checkpoint: {path}")
  if os.path.isfile(path):
    if zipfile.is_zipfile(path) or path.endswith((".pth", ".pt", ".bin")):
      raise CheckpointError(
          f"{path} is a PyTorch file, not a spanet-jax checkpoint; convert it first: "
          f"python convert_torch_weights.py --input {path} --output DIR")
    raise CheckpointError(f"{path} is a file; a checkpoint is a directory written by "
                          "convert_torch_weights.py or train.py")
  if os.path.isfile(os.path.join(path, pretrained.METADATA_FILE)):
    return _load_pretrained_dir(path, overrides)
  if os.path.isfile(os.path.join(path, workdir_layout.CONFIG_FILE)):
    final = os.path.join(path, workdir_layout.FINAL_DIR)
    if os.path.isfile(os.path.join(final, pretrained.METADATA_FILE)):
      return _load_pretrained_dir(final, overrides)
    return _load_workdir_best(path, overrides)
  raise CheckpointError(
      f"{path} is neither a spanet-jax checkpoint (no {pretrained.METADATA_FILE}) nor a "
      "train.py workdir (no config.json)")


INIT_PREFIX = "init:"


def _initialised(name: str, overrides: dict) -> LoadedModel:
  try:
    model = registry.build_model(name, **overrides)
  except ValueError as err:
    raise CheckpointError(str(err)) from None
  data = data_config(name)
  size = data.input_size
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  return LoadedModel(INIT_PREFIX + name, name, model, variables, data,
                     default_class_names(_num_classes(model)))


def _load_pretrained_dir(path: str, overrides: dict) -> LoadedModel:
  metadata = pretrained.read_metadata(path)
  model, variables = pretrained.load_pretrained(path, **overrides)
  name = metadata["model"]
  pretrained.check_params(path, model, variables["params"], metadata["overrides"])
  num_classes = _num_classes(model)
  class_names = tuple(metadata.get("class_names") or default_class_names(num_classes))
  if len(class_names) != num_classes:
    raise CheckpointError(f"{path}: spanet.json names {len(class_names)} classes but the "
                          f"head has {num_classes}")
  return LoadedModel(path, name, model, variables, data_config(name, metadata.get("data")),
                     class_names)


def _load_workdir_best(workdir: str, overrides: dict) -> LoadedModel:
  try:
    with open(os.path.join(workdir, workdir_layout.CONFIG_FILE)) as f:
      config = json.load(f)
    name = config["model"]
    registry.model_info(name)
    options = settings.described_options(
        settings.ModelOptions.from_config(config).create_options())
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
    raise CheckpointError(f"{workdir}/config.json is not a train.py config: {err}") from None
  best = os.path.join(workdir, workdir_layout.BEST_DIR)
  manager = ocp.CheckpointManager(best) if os.path.isdir(best) else None
  step = manager.latest_step() if manager else None
  if step is None:
    raise CheckpointError(f"{workdir} is a train.py workdir with no weights yet: neither "
                          "final/ nor an evaluated best/ checkpoint")
  try:
    params = manager.restore(step, args=ocp.args.StandardRestore())
  finally:
    manager.close()
  params = jax.tree.map(np.asarray, params)
  model = registry.build_model(name, **{**options, **overrides})
  variables = {"params": params}
  pretrained.check_params(best, model, variables["params"], options)
  num_classes = config["num_classes"]
  crop_pct = config.get("crop_pct", -1)
  data = data_config(name, {"input_size": config.get("image_size"),
                            "crop_pct": crop_pct if crop_pct and crop_pct > 0 else None})
  print(f"{workdir}: training has not finished; using best/ (step {step})", file=sys.stderr,
        flush=True)
  return LoadedModel(best, name, model, variables, data, _workdir_class_names(workdir, num_classes))


def _workdir_class_names(workdir: str, num_classes: int) -> tuple[str, ...]:
  """The dataset's class names train.py recorded in the workdir, if they fit."""
  try:
    with open(os.path.join(workdir, workdir_layout.CLASS_NAMES_FILE)) as f:
      names = json.load(f)
  except (OSError, ValueError):
    names = None
  if isinstance(names, list) and len(names) == num_classes:
    return tuple(str(n) for n in names)
  return default_class_names(num_classes)



def _num_classes(model) -> int:
  """Classes of the head (checked against the weights by pretrained.check_params); 0 for a
  dense-prediction backbone, which has none."""
  return 0 if getattr(model, "features_only", False) else int(model.num_classes)


def require_classifier(loaded: LoadedModel) -> None:
  if loaded.num_classes == 0:
    raise CheckpointError(f"{loaded.path} is a backbone without a classifier head "
                          f"({loaded.name}, features_only); predict and evaluate need one")


def predict_fn(loaded: LoadedModel):
  """A jitted images -> float32 logits function."""
  apply = jax.jit(lambda variables, images: loaded.model.apply(variables, images, train=False))

  def logits(images) -> np.ndarray:
    result = np.asarray(apply(loaded.variables, jnp.asarray(images)), np.float32)
    if not np.all(np.isfinite(result)):
      raise CheckpointError(f"the model from {loaded.path} computes NaN or infinite logits: "
                            f"its weights are damaged; nothing is reported")
    return result

  return logits


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices, softmax probabilities) of the k most likely classes, most likely first."""
  logits = np.asarray(logits, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  k = min(k, logits.shape[-1])
  order = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
  return order, np.take_along_axis(probs, order, -1)


def load_images(paths: Sequence[str], data: DataConfig) -> np.ndarray:
  """Decode and prepare image files (ImageError names the file that fails)."""
  return np.stack([data.transform(preprocess.load_image(p)) for p in paths])


def predict_step(params, images, *, model, k: int = 5):
  """The k most likely classes of each image and their softmax probabilities."""
  logits = model.apply({"params": params}, images, train=False).astype(jnp.float32)
  probs, classes = jax.lax.top_k(jax.nn.softmax(logits), min(k, logits.shape[-1]))
  return classes, probs
