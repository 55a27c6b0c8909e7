"""Pretrained-weight directories: what the converter writes and `load_pretrained` reads.

A directory holds `spanet.json` (the model name and the create_model options that
rebuild it) and `params/`, an Orbax checkpoint of the Flax params. It is written
into a temporary sibling and renamed into place, so a failed write leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from spanet_jax import registry

METADATA_FILE = "spanet.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


class CheckpointError(Exception):
  """A pretrained directory that cannot be read; the message says why."""


def save_pretrained(directory: str, model_name: str, params: Mapping,
                    overrides: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None, overwrite: bool = False) -> None:
  """Write params and the model's description to `directory`, atomically.

  With several JAX processes every process must call it (Orbax writes collectively);
  process 0 writes the metadata and moves the result into place.
  """
  registry.model_info(model_name)  # fail early on an unknown name
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not overwrite:
    raise CheckpointError(f"{directory} already exists; choose a new directory or overwrite it")
  primary = jax.process_index() == 0
  parent = os.path.dirname(directory)
  staging = os.path.join(parent, f".{os.path.basename(directory)}.staging")
  if primary:
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(staging):
      shutil.rmtree(staging)
    os.makedirs(staging)
    metadata = {"format_version": FORMAT_VERSION, "model": model_name,
                "overrides": _jsonable(dict(overrides or {})), **dict(extra or {})}
    with open(os.path.join(staging, METADATA_FILE), "w") as f:
      json.dump(metadata, f, indent=2)
  _sync("spanet_jax.save_pretrained: staging ready")
  try:
    host_params = jax.tree.map(np.asarray, dict(params))
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(staging, PARAMS_DIR), host_params)
      checkpointer.wait_until_finished()
    _sync("spanet_jax.save_pretrained: params written")
    if primary:
      if os.path.exists(directory):
        old = directory + ".old"
        os.replace(directory, old)
        os.replace(staging, directory)
        shutil.rmtree(old)
      else:
        os.replace(staging, directory)
  finally:
    if primary and os.path.exists(staging):
      shutil.rmtree(staging)
  _sync("spanet_jax.save_pretrained: done")


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def read_metadata(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, METADATA_FILE)
  if not os.path.isdir(directory):
    raise CheckpointError(f"no such checkpoint directory: {directory}")
  if not os.path.isfile(path):
    raise CheckpointError(f"{directory} is not a spanet-jax checkpoint (no {METADATA_FILE})")
  try:
    with open(path) as f:
      metadata = json.load(f)
    registry.model_info(metadata["model"])
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
    raise CheckpointError(f"{path} is unreadable: {err}") from None
  return metadata


def load_pretrained(directory: str, **overrides: Any):
  """(model, variables) from a directory written by convert_torch_weights.py.

  Keyword overrides change how the model computes (dtype=jnp.bfloat16,
  depthwise_impl=..., drop_path_rate=...), not its parameters.
  """
  metadata = read_metadata(directory)
  model = registry.create_model(metadata["model"], **{**metadata["overrides"], **overrides})
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      params = checkpointer.restore(os.path.join(os.path.abspath(directory), PARAMS_DIR))
  except (FileNotFoundError, ValueError, OSError) as err:
    raise CheckpointError(f"cannot read the params in {directory}: {err}") from None
  return model, {"params": params}


def _jsonable(value):
  if isinstance(value, Mapping):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value
