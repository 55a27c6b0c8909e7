"""Which exact formulation the models pick where they have several: every `auto` option
resolves here, to the form for the backend they run on, or for a target a caller names
while tracing, as `export` does for another platform or for TensorFlow. Every form is
exact on every backend; the CPU forms are only faster on XLA:CPU (docs/performance.md).

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


# The values each option takes; "auto" resolves below.
SPECTRAL_IMPLS = ("auto", "fft", "lowrank", "dft")
LEARNED_MASK_SPECTRAL_IMPLS = ("auto", "fft", "dft")  # no low-rank form of learned masks
DEPTHWISE_IMPLS = ("auto", "shift", "conv")
STRIDED_CONV_IMPLS = ("auto", "im2col", "conv")


def check_option(name: str, value: str, allowed: tuple[str, ...]) -> None:
  """ValueError naming the choices when `value` is not one of `allowed`; modules call
  this when they are built, not when first called."""
  if value not in allowed:
    raise ValueError(f"unknown {name} {value!r}; choose from {', '.join(allowed)}")


def check_filter_options(spectral_impl_option: str, depthwise_impl_option: str, *,
                         fixed_masks: bool, allowed: tuple[str, ...] = SPECTRAL_IMPLS) -> None:
  """The options of a spectral token mixer (SPAM, ExSPAM), checked when it is built."""
  check_option("spectral_impl", spectral_impl_option, allowed)
  check_option("depthwise_impl", depthwise_impl_option, DEPTHWISE_IMPLS)
  if spectral_impl_option == "lowrank" and not fixed_masks:
    raise ValueError("spectral_impl='lowrank' needs the fixed masks; with learnable masks "
                     "use 'fft' or 'dft'")


def resolve_spectral_impl(option: str, *, fixed_masks: bool) -> str:
  """A spectral_impl option with "auto" resolved (spectral_impl below)."""
  return spectral_impl(fixed_masks) if option == "auto" else option


def spectral_impl(fixed_masks: bool = False) -> str:
  """The spectral filter: with SPANet's fixed masks the low-rank form everywhere (two
  small products, exact); with learned or unconstrained masks FFTs on CPU, elsewhere
  DFTs as matrix products, which keep TPUs and GPUs on their matrix units."""
  if fixed_masks:
    return "lowrank"
  return "fft" if backend() == "cpu" else "dft"


def channels_first_fft() -> bool:
  """SPANetV2's depthwise convolutions and FFTs in (B, C, H, W) on CPU: XLA:CPU fuses the
  convolutions into the transposes around channels-last FFTs, computing every tap with
  strided reads (see spanetv2.ExSPAM)."""
  return backend() == "cpu"


def strided_conv_impl(in_features: int) -> str:
  """Downsampling convolutions: one matrix product over gathered windows on CPU, except
  for the 3-channel stem, whose windows are too narrow to gather efficiently."""
  return "im2col" if backend() == "cpu" and in_features >= 16 else "conv"


def depthwise_impl() -> str:
  """Depthwise convolutions: shifted sums on CPU (XLA:CPU runs grouped convolutions far
  slower), the native convolution elsewhere."""
  return "shift" if backend() == "cpu" else "conv"


def channel_mean_as_product() -> bool:
  """Channel means as products with a column of 1 / C on CPU (see norms.channel_mean)."""
  return backend() == "cpu"


def keys_first_attention() -> bool:
  """Attention with the keys on axis 2 on CPU (see attention.dot_product_attention)."""
  return backend() == "cpu"


def default_batch_parts(batch: int) -> int:
  """Two independent halves of an even batch on a single CPU device (batching.py)."""
  return 2 if single_cpu_device() and batch % 2 == 0 else 1


@contextlib.contextmanager
def target(backend_name: str | None = None, portable_ops: bool = False) -> Iterator[None]:
  """Trace for `backend_name` ('cpu', 'gpu', 'tpu') and, with `portable_ops`, for
  TensorFlow. Functions jitted before keep what they were traced with: trace afresh."""
  token = _TARGET.set((backend_name, portable_ops))
  try:
    yield
  finally:
    _TARGET.reset(token)
