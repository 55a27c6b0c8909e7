"""Which exact formulation the models pick where they have several (`auto` options and
the CPU forms in layers.py): the one for the backend they run on, or for a target a
caller names while tracing, as `export` does for another platform or for TensorFlow.

  with platform.target("tpu"):          # trace TPU/GPU formulations on this CPU
    exported = jax.export.export(jax.jit(fn), platforms=("cpu", "cuda", "tpu"))(...)
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

_TARGET: contextvars.ContextVar[tuple[str | None, bool]] = contextvars.ContextVar(
    "spanet_jax_platform_target", default=(None, False))

# jax.export platform names -> jax.default_backend() names.
_BACKEND_OF = {"cpu": "cpu", "cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu"}


def backend() -> str:
  """'cpu', 'gpu' or 'tpu': the target being traced for, else JAX's default backend."""
  return _TARGET.get()[0] or jax.default_backend()


def portable() -> bool:
  """True while tracing for TensorFlow: only operations its StableHLO reader knows
  (GELU through erfc: TensorFlow cannot read the composite op `erf` now lowers to)."""
  return _TARGET.get()[1]


def single_cpu_device() -> bool:
  return backend() == "cpu" and jax.device_count() == 1


def backend_for_platforms(platforms) -> str:
  """The formulations an artifact for all of `platforms` carries: the accelerators' when
  it runs on one (every formulation is exact everywhere; the CPU forms are only faster
  on XLA:CPU)."""
  try:
    backends = {_BACKEND_OF[p] for p in platforms}
  except KeyError as err:
    raise ValueError(f"unknown platform {err.args[0]!r}: use cpu, cuda, rocm or tpu") from None
  for preferred in ("tpu", "gpu", "cpu"):
    if preferred in backends:
      return preferred
  raise ValueError("no platform given")


@contextlib.contextmanager
def target(backend_name: str | None = None, portable_ops: bool = False) -> Iterator[None]:
  """Trace for `backend_name` ('cpu', 'gpu', 'tpu') and, with `portable_ops`, for
  TensorFlow. Functions jitted before keep what they were traced with: trace afresh."""
  token = _TARGET.set((backend_name, portable_ops))
  try:
    yield
  finally:
    _TARGET.reset(token)
