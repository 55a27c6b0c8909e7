"""Pretrained-weight directories: what the converter writes and `load_pretrained` reads.

A directory holds `spanet.json` (the model name, the create_model options that rebuild
it, the module's full arguments, the preprocessing the weights expect and, where known,
the class names) and `params/`, an Orbax checkpoint of the Flax params. It is written
into a temporary sibling and renamed into place, so a failed write leaves nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
from typing import Any, Mapping

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from spanet_jax import errors, outputs
from spanet_jax.models import registry

METADATA_FILE = "spanet.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


class CheckpointError(errors.UserError):
  """A pretrained directory that cannot be read; the message says why."""


def save_pretrained(directory: str, model_name: str, params: Mapping,
                    overrides: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None, overwrite: bool = False) -> None:
  """Write params and the model's description to `directory`, atomically.

  With several JAX processes every process must call it (Orbax writes collectively);
  process 0 writes the metadata and moves the result into place.

  Args:
    directory: the pretrained directory to create.
    model_name: the registered model the params belong to.
    params: the Flax params (any arrays: jax, numpy).
    overrides: create_model options that rebuild the model (num_classes, ...).
    extra: more metadata for spanet.json (class_names, data, source, ...).
    overwrite: replace an existing directory (its old copy is removed only once the
      new one is in place).

  Raises:
    CheckpointError: `directory` exists and `overwrite` is not set.
  """
  info = registry.model_info(model_name)  # fails early on an unknown name
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not overwrite:
    raise CheckpointError(f"{directory} already exists; choose a new directory or overwrite it")
  primary = jax.process_index() == 0
  parent = os.path.dirname(directory)
  staging = os.path.join(parent, f".{os.path.basename(directory)}.staging")
  host_params = jax.tree.map(np.asarray, dict(params))
  try:
    if primary:
      os.makedirs(parent, exist_ok=True)
      if os.path.exists(staging):
        shutil.rmtree(staging)
      os.makedirs(staging)
      metadata = {"format_version": FORMAT_VERSION, "model": model_name,
                  "overrides": _jsonable(dict(overrides or {})),
                  **describe_model(info, overrides), **dict(extra or {}),
                  "param_digests": param_digests(host_params)}
      with open(os.path.join(staging, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=2)
    _sync("spanet_jax.save_pretrained: staging ready")
    with _quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(staging, PARAMS_DIR), host_params)
      checkpointer.wait_until_finished()
    _sync("spanet_jax.save_pretrained: params written")
    if primary:
      outputs.replace(staging, directory)
  except (OSError, ValueError, RuntimeError) as err:  # a full disk, a lost permission
    raise CheckpointError(write_error(directory, err)) from None
  finally:
    if primary and os.path.exists(staging):
      shutil.rmtree(staging)
  _sync("spanet_jax.save_pretrained: done")


def _disk_full(err: BaseException) -> bool:
  text = str(err)
  return (getattr(err, "errno", None) == errno.ENOSPC or "No space left" in text
          or "os_error_code='28'" in text or "unexpected pos" in text)


def is_write_failure(err: BaseException) -> bool:
  """Whether `err` says the disk is full or a path cannot be written."""
  return _disk_full(err) or getattr(err, "errno", None) in (errno.EACCES, errno.EPERM,
                                                            errno.EROFS)


def write_error(path: str, err: BaseException) -> str:
  """One line for a failed write of `path`: the disk is full, or the cause's first line."""
  text = str(err)
  if _disk_full(err):
    return f"cannot write {path}: no space left on the device; nothing was written"
  if getattr(err, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS):
    return f"cannot write {path}: {err.strerror}; nothing was written"
  return f"cannot write {path}: {text.strip().splitlines()[0] if text.strip() else type(err).__name__}"


def param_digests(params: Mapping) -> dict[str, str]:
  """A SHA-256 of every parameter's dtype, shape and bytes, by its "a/b/c" path: what
  spanet.json records so that damaged array data is refused, not used."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(params)), sep="/")
  digests = {}
  for path in sorted(flat):
    array = np.ascontiguousarray(np.asarray(flat[path]))
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    digests[path] = digest.hexdigest()
  return digests


def check_digests(directory: str, params: Mapping, recorded: Mapping[str, str]) -> None:
  """Refuse params whose data differ from what was written (bit rot, a damaged copy)."""
  computed = param_digests(params)
  damaged = [path for path in sorted(set(recorded) | set(computed))
             if recorded.get(path) != computed.get(path)]
  if damaged:
    raise CheckpointError(
        f"the parameter data in {directory} is damaged: {damaged[0]}"
        + (f" and {len(damaged) - 1} more" if len(damaged) > 1 else "")
        + " differ from the checksums recorded when it was written; convert or export it "
          "again from its source")


def describe_model(info: registry.ModelInfo, overrides: Mapping[str, Any] | None) -> dict:
  """What spanet.json records beyond the name, so that a reader needs no registry: the
  module's full arguments and the preprocessing the weights expect."""
  overrides = dict(overrides or {})
  jsonable = lambda v: _jsonable(v) if isinstance(v, (int, float, str, bool, list, tuple,
                                                      dict, type(None))) else str(v)
  architecture = {"family": info.family, "num_classes": info.num_classes,
                  **{k: jsonable(v) for k, v in {**info.architecture, **overrides}.items()}}
  data = {"input_size": info.input_size, "crop_pct": info.crop_pct,
          "interpolation": info.interpolation, "mean": list(info.mean), "std": list(info.std)}
  return {"architecture": architecture, "data": data}


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def checkpoint_directory(directory: str) -> str:
  """`directory`, or the final weights of a finished train.py workdir given instead."""
  final = os.path.join(directory, "final")
  if (not os.path.isfile(os.path.join(directory, METADATA_FILE))
      and os.path.isfile(os.path.join(final, METADATA_FILE))):
    return final
  return directory


def read_metadata(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, METADATA_FILE)
  if not os.path.isdir(directory):
    raise CheckpointError(f"no such checkpoint directory: {directory}")
  if not os.path.isfile(path):
    if os.path.isfile(os.path.join(directory, "config.json")) and os.path.isdir(
        os.path.join(directory, "checkpoints")):
      raise CheckpointError(
          f"{directory} is a train.py workdir: its trained weights are in "
          f"{os.path.join(directory, 'final')} (written when training ends); "
          f"spanet_jax.restore_train_state reads its state checkpoints")
    raise CheckpointError(f"{directory} is not a spanet-jax checkpoint (no {METADATA_FILE})")
  try:
    with open(path) as f:
      metadata = json.load(f)
  except (OSError, ValueError) as err:
    raise CheckpointError(f"{path} is unreadable: {err}") from None
  if not isinstance(metadata, dict):
    raise CheckpointError(f"{path} is unreadable: not a JSON object")
  for key, kind in (("model", str), ("overrides", dict)):
    if not isinstance(metadata.get(key), kind):
      raise CheckpointError(f"{path} is unreadable: its {key!r} entry is "
                            f"{'missing' if key not in metadata else 'malformed'}")
  try:
    registry.model_info(metadata["model"])
  except (KeyError, ValueError) as err:
    raise CheckpointError(f"{path} is unreadable: {str(err).strip(chr(39))}") from None
  return metadata


@dataclasses.dataclass(frozen=True)
class MergeReport:
  """What `merge_pretrained` took from the checkpoint and what it could not."""
  added: tuple[str, ...]  # parameters of the new model initialised afresh
  dropped: tuple[str, ...]  # checkpoint tensors the new model has no place for

  def __str__(self) -> str:
    return (f"newly initialised: {', '.join(self.added) or 'nothing'}; "
            f"dropped from the checkpoint: {', '.join(self.dropped) or 'nothing'}")


def merge_pretrained(params: Mapping, pretrained: Mapping) -> tuple[Any, MergeReport]:
  """Fill `params` (a freshly initialised tree) with every tensor of `pretrained` whose
  path and shape match.

  Args:
    params: the target model's parameters, e.g. from `model.init`.
    pretrained: a checkpoint's parameters.

  Returns:
    (merged params, MergeReport): the merged tree has `params`' structure and dtypes;
    the report names, as "a/b/c" paths, the parameters kept from `params` (new or
    reshaped, such as a head of another width) and the checkpoint tensors left out.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(params)), sep="/")
  source = flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(pretrained)), sep="/")
  added = []
  for key, value in flat.items():
    if key in source and tuple(np.shape(source[key])) == tuple(np.shape(value)):
      flat[key] = np.asarray(source[key], np.asarray(value).dtype)
    else:
      added.append(key)
  dropped = [key for key, value in source.items()
             if key not in flat or tuple(np.shape(value)) != tuple(np.shape(flat[key]))]
  return (flax.traverse_util.unflatten_dict(flat, sep="/"),
          MergeReport(tuple(sorted(added)), tuple(sorted(dropped))))


def load_pretrained(directory: str, *, rng: jax.Array | None = None,
                    return_report: bool = False, **overrides: Any):
  """The model and variables of a directory written by convert_torch_weights.py or
  train.py (its `final/`).

  Overrides that change how the model computes (dtype=jnp.bfloat16, depthwise_impl=...,
  drop_path_rate=...) load the weights as they are. Overrides that change its parameters
  (num_classes, learnable_masks, features_only, out_indices, ...) take every stored
  tensor whose path and shape still fit and initialise the rest, as fine-tuning wants:
  a new head, trainable masks started from the stored ones' formula, the per-stage norms
  of a dense-prediction backbone. What was added or dropped is logged (and returned with
  `return_report=True`).

  Args:
    directory: a pretrained directory (`spanet.json` and `params/`), or a finished
      train.py workdir (its `final/` weights).
    rng: key for the parameters that must be initialised (default PRNGKey(0)).
    return_report: also return the MergeReport.
    **overrides: create_model options on top of those stored with the weights.

  Returns:
    (model, {"params": params}), or (model, variables, MergeReport) with return_report.
  """
  directory = checkpoint_directory(directory)
  metadata = read_metadata(directory)
  name = metadata["model"]
  try:
    described = registry.build_model(name, **metadata["overrides"])
  except (TypeError, ValueError) as err:
    raise CheckpointError(f"{directory}/{METADATA_FILE}: its overrides do not build "
                          f"{name}: {err}") from None
  model = registry.build_model(name, **{**metadata["overrides"], **overrides})
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      params = checkpointer.restore(os.path.join(os.path.abspath(directory), PARAMS_DIR))
  except (FileNotFoundError, ValueError, OSError) as err:
    raise CheckpointError(f"cannot read the params in {directory}: {err}") from None
  check_params(directory, described, params, metadata["overrides"])
  if "param_digests" in metadata:  # written since checksums were recorded
    check_digests(directory, params, metadata["param_digests"])
  size = registry.model_info(name).input_size
  images = jax.ShapeDtypeStruct((1, size, size, 3), np.float32)
  key = jax.random.PRNGKey(0) if rng is None else rng
  wanted = jax.eval_shape(model.init, key, images)["params"]
  report = MergeReport((), ())
  if not _same_structure(wanted, params):
    fresh = jax.jit(model.init)(key, np.zeros((1, size, size, 3), np.float32))["params"]
    params, report = merge_pretrained(jax.device_get(fresh), params)
    logging.getLogger(__name__).warning("%s loaded for %s: %s", directory,
                                        _describe(overrides), report)
  if return_report:
    return model, {"params": params}, report
  return model, {"params": params}


def check_params(path: str, model, params, options: Mapping[str, Any]) -> None:
  """Refuse weights that do not fit the model a checkpoint's metadata describes (the
  weights of another variant, a damaged or edited spanet.json), naming what differs."""
  size = 64
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, size, size, 3), np.float32))
  want = flax.traverse_util.flatten_dict(flax.core.unfreeze(expected["params"]), sep="/")
  have = flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(params)), sep="/")
  problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
  problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
  problems += [f"{k}: shape {tuple(np.shape(have[k]))}, the model needs {tuple(want[k].shape)}"
               for k in sorted(set(want) & set(have))
               if tuple(np.shape(have[k])) != tuple(want[k].shape)]
  if problems:
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5
                                       else "")
    raise CheckpointError(f"the weights in {path} do not fit the model its metadata describes "
                          f"({model.__class__.__name__} with {dict(options)}): {shown}")


def _same_structure(a, b) -> bool:
  shapes = lambda tree: {k: tuple(np.shape(v)) for k, v in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(dict(tree)), sep="/").items()}
  return shapes(a) == shapes(b)


def _describe(overrides: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "its own options"


def _jsonable(value):
  if isinstance(value, Mapping):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


@contextlib.contextmanager
def _quiet_orbax():
  """Orbax logs a failed write as ERROR lines from its threads before raising it; the
  caller reports the failure once, as one line."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)
