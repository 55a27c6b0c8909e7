"""The device mesh and every sharding of training and evaluation, declared in one place."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class Partitioning:
  """A (data, model) device mesh and the shardings of batches and state.

  The batch is split over every device. With a model axis of 1 the state is
  replicated; otherwise each parameter (and its optimizer moments) is split along
  its largest axis that the model axis divides, as in FSDP.

  Build with `Partitioning.create(model_axis, devices)`:
    model_axis: devices per model replica (1: plain data parallelism); it must divide
      the device count.
    devices: default every device of every process.

  Attributes:
    mesh: the (data, model) jax.sharding.Mesh.
    batch: the sharding of batches (split over every device).
    replicated: the sharding of values every device holds whole.
  """
  mesh: Mesh

  @classmethod
  def create(cls, model_axis: int = 1, devices=None) -> "Partitioning":
    devices = list(jax.devices() if devices is None else devices)
    if model_axis < 1 or len(devices) % model_axis:
      raise ValueError(f"mesh_model={model_axis} does not divide the {len(devices)} devices")
    # Auto axes: XLA propagates shardings from the inputs (no sharding in types).
    auto = (jax.sharding.AxisType.Auto,) * 2
    return cls(jax.make_mesh((len(devices) // model_axis, model_axis), ("data", "model"),
                             axis_types=auto, devices=devices))

  @property
  def batch(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(("data", "model")))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def for_array(self, shape: tuple[int, ...]) -> NamedSharding:
    size = self.mesh.shape["model"]
    if size == 1:
      return self.replicated
    axes = sorted(range(len(shape)), key=lambda a: -shape[a])
    for axis in axes:
      if shape[axis] % size == 0 and shape[axis] >= size:
        spec = [None] * len(shape)
        spec[axis] = "model"
        return NamedSharding(self.mesh, P(*spec))
    return self.replicated

  def state(self, abstract_state) -> Any:
    return jax.tree.map(lambda a: self.for_array(a.shape), abstract_state)


def global_batch(partitioning: Partitioning, local: dict) -> dict:
  """Assemble this process's share into global arrays sharded over the batch axis."""
  return {k: jax.make_array_from_process_local_data(partitioning.batch, np.asarray(v))
          for k, v in local.items()}


def prefetch_to_device(local_batches: Iterable[dict], partitioning: Partitioning,
                       size: int = 2) -> Iterator[dict]:
  """Global batches put on the devices `size` ahead of their use: the next batch's
  host-to-device copy runs while the current step does (as the Flax ImageNet example's
  prefetch_to_device)."""
  queue = collections.deque()
  for local in local_batches:
    queue.append(global_batch(partitioning, local))
    if len(queue) >= size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
