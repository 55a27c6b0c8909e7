"""Forward FLOPs per image of every registered model, counted from the traced program.

The model is traced in its reference formulation (FFTs for the spectral filter, native
convolutions, one batch part), as the accelerators run it apart from the spectral
filter, and every operation of the trace is counted from its shapes:

- convolutions and matrix products: 2 x multiply-adds (the paper reports the
  multiply-adds, MACs, of these alone);
- FFTs: 5 N log2 N for a complex transform of N points, 2.5 N log2 N for a real one
  (the usual count; XLA:CPU and cuFFT do about this much arithmetic);
- the spectral filter: the elementwise work on the spectra (mask products) inside the
  spectral modules;
- everything else elementwise: one FLOP per output element (norms, activations,
  residual adds), as XLA's cost analysis counts them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from spanet_jax.models import registry, spectral
from spanet_jax.ops import platform

# Primitives that move or reinterpret data without arithmetic.
_FREE = frozenset({
    "reshape", "broadcast_in_dim", "squeeze", "expand_dims", "transpose", "slice",
    "dynamic_slice", "dynamic_update_slice", "concatenate", "pad", "gather", "select_n",
    "convert_element_type", "copy", "copy_p", "rev", "iota", "real", "imag", "complex",
    "stop_gradient", "sharding_constraint", "squeeze", "split", "bitcast_convert_type",
    "pjit", "jit", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
    "closed_call", "remat", "checkpoint", "scan", "while", "cond"})


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """Forward FLOPs per image by kind; `total` is their sum and `macs` the paper's
  measure (the multiply-adds of convolutions and matrix products)."""
  conv_matmul: float
  fft: float
  spectral_filter: float
  elementwise: float

  @property
  def total(self) -> float:
    return self.conv_matmul + self.fft + self.spectral_filter + self.elementwise

  @property
  def macs(self) -> float:
    return self.conv_matmul / 2


def _size(aval) -> int:
  return int(np.prod(aval.shape, dtype=np.int64))


def _conv_flops(eqn) -> float:
  rhs = eqn.invars[1].aval
  spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial) axes of rhs
  per_output = rhs.shape[spec[1]] * math.prod(rhs.shape[a] for a in spec[2:])
  return 2.0 * _size(eqn.outvars[0].aval) * per_output


def _dot_flops(eqn) -> float:
  lhs = eqn.invars[0].aval
  (contract, _), _ = eqn.params["dimension_numbers"]
  return 2.0 * _size(eqn.outvars[0].aval) * math.prod(lhs.shape[a] for a in contract)


def _fft_flops(eqn) -> float:
  lengths = eqn.params["fft_lengths"]
  points = math.prod(lengths)
  transforms = _size(eqn.invars[0].aval) // (
      math.prod(eqn.invars[0].aval.shape[-len(lengths):]))
  real = eqn.params["fft_type"] in (jax.lax.FftType.RFFT, jax.lax.FftType.IRFFT)
  per_point = 2.5 if real else 5.0
  return per_point * transforms * points * math.log2(points)


def _count(jaxpr, totals: dict, multiplier: float, scope: str = "") -> None:
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    stack = f"{scope}/{eqn.source_info.name_stack}"
    subs = [v for v in eqn.params.values() if isinstance(v, (jex.core.Jaxpr, jex.core.ClosedJaxpr))]
    if name == "cond":
      subs = [max(eqn.params["branches"], key=lambda b: len(b.jaxpr.eqns))]
    if subs:
      times = multiplier * (eqn.params.get("length", 1) if name == "scan" else 1)
      for sub in subs:
        _count(getattr(sub, "jaxpr", sub), totals, times, stack)
      continue
    if name == "conv_general_dilated":
      totals["conv_matmul"] += multiplier * _conv_flops(eqn)
    elif name == "dot_general":
      totals["conv_matmul"] += multiplier * _dot_flops(eqn)
    elif name == "fft":
      totals["fft"] += multiplier * _fft_flops(eqn)
    elif name in _FREE:
      continue
    else:
      kind = "spectral_filter" if spectral.FILTER_SCOPE in stack else "elementwise"
      totals[kind] += multiplier * max((_size(v.aval) for v in eqn.outvars), default=0)


def model_flops(name: str, image_size: int = 224, **overrides) -> FlopCount:
  """The forward FLOPs per image of model `name` at `image_size` (square), by kind.

  Args:
    name: a registered model (spanet_jax.list_models()).
    image_size: the input's height and width.
    **overrides: create_model options (layers, dims, num_classes, ...).

  Returns:
    a FlopCount: conv_matmul, fft, spectral_filter, elementwise, total and macs.
  """
  family = registry.model_info(name).family
  reference = {"spectral_impl": "fft", "depthwise_impl": "conv", "conv_impl": "conv"}
  if family == "spanet":
    reference["batch_parts"] = 1
  # The accelerators' forms of every other choice (channel means, attention layout).
  with platform.target("gpu"):
    model = registry.build_model(name, **{**reference, **overrides})
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, images)
  totals = {"conv_matmul": 0.0, "fft": 0.0, "spectral_filter": 0.0, "elementwise": 0.0}
  _count(closed.jaxpr, totals, 1.0)
  return FlopCount(**totals)
