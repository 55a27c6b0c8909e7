"""train.py's state checkpoints: a checksum of every array recorded at each save, and a
resume that falls back past checkpoints that cannot be restored or fail their checksum.

The checksum is a position-weighted sum of each array's bit patterns modulo 2**32, run
on the devices over the sharded array. Integer addition is associative, so it does not
depend on how the array is laid out (a run written by 8 devices verifies on 1). Every
weight is odd, so changing any one element always changes the sum.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from spanet_jax import outputs
from spanet_jax.models.pretrained import CheckpointError
from spanet_jax.train import workdir as workdir_layout

CHECKSUM_FILE = "checkpoint_checksums.json"
DAMAGED_DIR = "damaged_checkpoints"

# Two sums with different odd weights: 64 bits of protection per array.
_MULTIPLIERS = (np.uint32(0x9E3779B1), np.uint32(0x85EBCA77))


class NoGoodCheckpoint(Exception):
  """Checkpoints exist but none restores and passes its checksum."""


def _array_checksum(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}"))
  bits = bits.reshape(-1).astype(jnp.uint32)
  position = jnp.arange(bits.size, dtype=jnp.uint32)
  return jnp.stack([jnp.sum(bits * (position * m * np.uint32(2) + np.uint32(1)),
                            dtype=jnp.uint32) for m in _MULTIPLIERS])


@jax.jit
def _checksums(tree):
  return jax.tree.map(_array_checksum, tree)


def state_checksums(state) -> dict[str, list[int]]:
  """{"a/b/c": [sum1, sum2]} for every array of a (possibly sharded) state pytree."""
  sums = jax.device_get(_checksums(flax.serialization.to_state_dict(state)))
  flat, _ = jax.tree_util.tree_flatten_with_path(sums)  # None (no EMA) has no leaves
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path):
          [int(v) for v in np.asarray(value)] for path, value in flat}


def _checksum_path(manager) -> str:
  return os.path.join(os.path.dirname(str(manager.directory)), CHECKSUM_FILE)


def _read_record(manager) -> dict[str, Any]:
  try:
    with open(_checksum_path(manager)) as f:
      record = json.load(f)
    return record if isinstance(record, dict) else {}
  except (OSError, ValueError):
    return {}  # a missing or damaged record only means no verification


def record_checksums(manager, step: int, state, primary: bool) -> None:
  """Record the checksums of the state being saved at `step` (call beside the save).

  Written atomically by process 0; entries of steps the manager no longer keeps go.
  """
  sums = state_checksums(state)
  if not primary:
    return
  record = _read_record(manager)
  keep = {str(s) for s in manager.all_steps()} | {str(step)}
  record = {k: v for k, v in record.items() if k in keep}
  record[str(step)] = sums
  outputs.write_text(_checksum_path(manager), json.dumps(record))


def _first_line(err: Exception) -> str:
  text = str(err).strip().splitlines()
  text = text[0].split(". See full TensorStore details")[0] if text else type(err).__name__
  return text if len(text) <= 200 else text[:200] + "..."


def _first_mismatch(got: dict, want: dict) -> str | None:
  for path in sorted(set(got) | set(want)):
    if got.get(path) != want.get(path):
      return path
  return None


def damaged_array(manager, step: int, state) -> str | None:
  """The first array of a restored state that fails the checksum recorded for `step`;
  None if all pass (or nothing was recorded: checkpoints of older versions)."""
  want = _read_record(manager).get(str(step))
  return None if want is None else _first_mismatch(state_checksums(state), want)


def restore_newest_good(manager, restore: Callable[[int], Any], primary: bool,
                        say: Callable[[str], None]) -> tuple[Any, int]:
  """Restore the newest checkpoint that restores and passes its recorded checksum.

  Newer ones that fail are said (one line each) and moved to `DAMAGED_DIR` beside the
  checkpoints, so the run can save those steps again. All processes agree on each
  verdict before acting on it.

  Args:
    manager: the orbax CheckpointManager of the state checkpoints.
    restore: step -> restored state.
    primary: whether this is process 0 (the one that moves directories).
    say: prints a line for the user.

  Returns:
    (state, step).

  Raises:
    NoGoodCheckpoint: none of the checkpoints can be used.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  damaged = []
  for step in steps:
    problem = None
    try:
      state = restore(step)
    except Exception as err:  # pylint: disable=broad-except
      state, problem = None, f"cannot be restored ({_first_line(err)})"
    if problem is None:
      wrong = damaged_array(manager, step, state)
      if wrong is not None:
        problem = f"fails its checksum (first damaged array: {wrong})"
    everyone_ok = multihost_utils.process_allgather(np.array(problem is None)).all() \
        if jax.process_count() > 1 else problem is None
    if everyone_ok:
      if damaged:
        _move_aside(manager, damaged, primary)
      return state, step
    say(f"note: checkpoint {step} in {manager.directory} "
        f"{problem or 'cannot be restored on another process'}; trying the one before")
    damaged.append(step)
  raise NoGoodCheckpoint(
      f"none of the checkpoints in {manager.directory} (steps "
      f"{', '.join(map(str, sorted(steps)))}) can be restored intact; to start from step 0, "
      f"move that directory away")


def _move_aside(manager, steps, primary: bool) -> None:
  directory = str(manager.directory)
  if primary:
    aside = os.path.join(os.path.dirname(directory), DAMAGED_DIR)
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      target = os.path.join(aside, str(step))
      if os.path.exists(target):
        shutil.rmtree(target)
      os.replace(os.path.join(directory, str(step)), target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("train_checkpoints: damaged moved aside")
  manager.reload()


def restore_train_state(workdir: str, step: int | None = None, sharding=None) -> dict:
  """A train.py state checkpoint (params, opt_state, ema_params, step, rng) restored on
  this machine's devices, whatever device count or process count wrote it (a pod's run
  read on one host, 8 devices' on 4).

  Args:
    workdir: the train.py workdir (or its `checkpoints/` directory).
    step: which checkpoint; default the newest.
    sharding: a jax.sharding.Sharding for every array; default the first local device.

  Returns:
    The state as nested dicts of jax.Arrays, keyed as train.py's TrainState.

  Raises:
    CheckpointError: no such checkpoint, its data cannot be read, or its arrays fail
      the checksums recorded when it was saved.
  """
  directory = os.path.abspath(workdir)
  if os.path.isdir(os.path.join(directory, workdir_layout.CHECKPOINTS_DIR)):
    directory = os.path.join(directory, workdir_layout.CHECKPOINTS_DIR)
  if not os.path.isdir(directory):
    raise CheckpointError(f"no train.py checkpoints in {workdir}")
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.CheckpointManager(directory,
                             item_handlers=ocp.StandardCheckpointHandler()) as manager:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise CheckpointError(f"{directory} has no checkpoint "
                            f"{'at all' if step is None else f'for step {step}'}: "
                            f"steps {sorted(manager.all_steps())}")
    stored = manager.item_metadata(step)
    stored = getattr(stored, "tree", stored)
    target = jax.tree.map(
        lambda meta: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=sharding), stored,
        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as err:  # pylint: disable=broad-except
      # Damaged data can fail to decompress before any checksum is compared.
      raise CheckpointError(f"checkpoint {step} in {directory} cannot be restored "
                            f"({_first_line(err)})") from None
    damaged = damaged_array(manager, step, state)
    if damaged:
      raise CheckpointError(f"checkpoint {step} in {directory} fails its checksum (first "
                            f"damaged array: {damaged})")
    return state
