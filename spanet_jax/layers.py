"""Small building blocks shared by the SPANet models (NHWC throughout)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from spanet_jax import platform

Dtype = Any
Initializer = Callable[..., jax.Array]

# PyTorch's default Conv2d/Linear init (kaiming_uniform with a = sqrt(5)) is a uniform
# distribution with bound 1 / sqrt(fan_in); its bias uses the same bound.
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# timm's trunc_normal_(std=.02) used for the head and the MLP.
trunc_normal_init = nn.initializers.truncated_normal(stddev=0.02)


def torch_default_bias_init(fan_in: int) -> Initializer:
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def feature_info(dims, indices=None) -> list[dict]:
  """timm-style feature_info of a four-stage backbone with strides 4, 8, 16, 32."""
  indices = range(len(dims)) if indices is None else indices
  return [{"num_chs": int(dims[i]), "reduction": 4 * 2**i, "module": f"stage{i}"}
          for i in indices]


def fields_for(module_cls: type, source: nn.Module) -> dict[str, Any]:
  """The values of `source`'s fields that `module_cls` also declares (to build a
  submodule, such as a backbone, from its parent's configuration)."""
  names = [f.name for f in dataclasses.fields(module_cls) if f.name not in ("parent", "name")]
  return {name: getattr(source, name) for name in names}


def batch_parts_for(batch: int, parts: int | None) -> int:
  """How many parts `in_batch_parts` cuts a batch into: `parts` if given (it must
  divide the batch), else 2 on a single CPU device when the batch is even, else 1."""
  if parts is None:
    single_cpu = platform.single_cpu_device()
    return 2 if single_cpu and batch % 2 == 0 else 1
  if parts < 1 or batch % parts:
    raise ValueError(f"batch_parts={parts} must be a positive divisor of the batch ({batch})")
  return parts


def in_batch_parts(fn: Callable[[jax.Array], Any], x: jax.Array, parts: int | None):
  """fn(x) for a per-sample fn, computed on `parts` consecutive slices of the batch and
  put back together (every output a pytree of arrays with the batch first).

  The parts are independent chains of operations, which XLA:CPU runs side by side: on
  a 2-core machine a SPANet-S forward pass and training step ran 2-5% faster in two
  parts than whole (alternating A/B), as one chain's small operations and reductions
  leave a core idle that the other chain fills. Each sample's result is unchanged (but
  for float32 rounding inside matrix products of another height). Random layers draw
  their numbers per part, so dropout masks differ from the whole batch's.
  """
  count = batch_parts_for(x.shape[0], parts)
  if count == 1:
    return fn(x)
  outputs = [fn(part) for part in jnp.split(x, count)]
  return jax.tree.map(lambda *pieces: jnp.concatenate(pieces), *outputs)


def _recompute_here(residual: jax.Array, grad: jax.Array) -> jax.Array:
  """`residual`, made to depend on the incoming gradient `grad` (same shape but for the
  last axis), for backward rules that recompute intermediates from a saved input.

  Without this XLA:CPU merges the recomputation with the forward pass's identical one,
  or, as it depends on forward values only, schedules it in the forward pass; either
  way the intermediate stays alive until the backward pass: the memory those rules
  exist to save. An optimisation barrier alone stops the merging but not the early
  scheduling, so the residual also takes a zero made from the gradient's first column
  (x * 0 is not folded for floats, as it is NaN for infinite x). That column is
  indexed like the residual on every other axis, so under sharding it is local data.
  Adding zero changes no value: -0.0 becomes 0.0, which every use here treats alike.
  """
  residual, grad = jax.lax.optimization_barrier((residual, grad))
  return residual + (grad[..., :1] * 0).astype(residual.dtype)


def group_norm(name: str | None = None, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32) -> "SingleGroupNorm":
  """GroupNorm with one group: statistics over (H, W, C) per sample, per-channel affine."""
  return SingleGroupNorm(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, name=name)


def _sample_axes(x: jax.Array) -> tuple[int, ...]:
  return tuple(range(1, x.ndim))


def _normalise_one_group(x, scale, bias, epsilon):
  """(y, mean, 1 / std) of one-group normalisation, statistics in float32."""
  axes = _sample_axes(x)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(x, axes, keepdims=True)
  centred = x - mean
  inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axes, keepdims=True) + epsilon)
  return centred * (inv_std * scale) + bias, mean, inv_std


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def single_group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array,
                      epsilon: float) -> jax.Array:
  """(x - mean) / sqrt(var + epsilon) * scale + bias, mean and (biased) variance over
  all axes of each sample but the batch, in at least float32; scale and bias per channel
  (the last axis). Returned in float32 (or wider); callers cast.

  The gradient is written out: differentiated automatically, the formula keeps x - mean
  for the backward pass, an activation-sized array per norm beside the input itself.
  This keeps the input and two scalars per sample, and recomputes x - mean where used.
  """
  return _normalise_one_group(x, scale, bias, epsilon)[0]


def _single_group_norm_fwd(x, scale, bias, epsilon):
  y, mean, inv_std = _normalise_one_group(x, scale, bias, epsilon)
  return y, (x, scale, bias, inv_std, mean)


def _single_group_norm_bwd(epsilon, residuals, grad_y):
  del epsilon  # inv_std carries it
  x, scale, bias, inv_std, mean = residuals
  x = _recompute_here(x, grad_y)
  dtype = inv_std.dtype
  grad_y = grad_y.astype(dtype)
  count = math.prod(x.shape[1:])
  # Only two full-size reductions, both of arrays that contain grad_y: XLA could
  # otherwise compute a reduction's input (x - mean, or scale broadcast to x's shape)
  # early in the forward pass and hold it until here. x - mean is recomputed inside
  # the products that need it.
  centred = lambda: x.astype(dtype) - mean
  spatial = tuple(range(1, x.ndim - 1))
  sum_grad = jnp.sum(grad_y, spatial).reshape(x.shape[0], -1)  # (B, C)
  sum_grad_x_hat = jnp.sum(grad_y * (centred() * inv_std), spatial).reshape(x.shape[0], -1)
  grad_scale = jnp.sum(sum_grad_x_hat, 0)
  grad_bias = jnp.sum(sum_grad, 0)
  # d/dx of (x - mean) / std for a per-sample mean and std over the same axes:
  # inv_std * (g - mean(g) - x_hat * mean(g * x_hat)), with g = grad_y * scale.
  scale = scale.astype(dtype)
  per_sample = lambda sums: (sums @ scale / count).reshape(inv_std.shape)
  mean_g, mean_g_x_hat = per_sample(sum_grad), per_sample(sum_grad_x_hat)
  grad_x = (inv_std * (grad_y * scale - mean_g)
            - centred() * (inv_std * inv_std * mean_g_x_hat))
  return (grad_x.astype(x.dtype), grad_scale.astype(scale.dtype).reshape(scale.shape),
          grad_bias.astype(bias.dtype).reshape(bias.shape))


single_group_norm.defvjp(_single_group_norm_fwd, _single_group_norm_bwd)


class SingleGroupNorm(nn.Module):
  """GroupNorm with one group (nn.GroupNorm(num_groups=1, use_fast_variance=False)'s
  function and parameters, "scale" and "bias"), with a leaner gradient: see
  single_group_norm."""
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
    y = single_group_norm(x, scale, bias, self.epsilon)
    return y.astype(self.dtype or jnp.result_type(x, scale, bias))


class ChannelLayerNorm(nn.Module):
  """LayerNorm over the last axis: nn.LayerNorm(use_fast_variance=False)'s function and
  parameters ("scale", and "bias" if use_bias), statistics in at least float32.

  On CPU the two means over channels are products with a (C, 1) column of 1 / C rather
  than reductions: XLA:CPU hands a last-axis reduction to YNNPACK together with every
  product and elementwise operation around it as one graph, with each broadcast
  constant in it (the GELU's and ReLU's scalars, the norm's epsilon) written out as a
  full-size array first. SPANetV2-S18's forward pass took 0.88 (pure) and 0.91 (hybrid)
  of the time with the products (alternating A/B).
  """
  epsilon: float = 1e-6
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
    bias = (self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
            if self.use_bias else None)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    values = x.astype(dtype)
    if platform.backend() == "cpu":
      column = jnp.full((channels, 1), 1.0 / channels, dtype)
      channel_mean = lambda y: y @ column
    else:
      channel_mean = lambda y: jnp.mean(y, axis=-1, keepdims=True)
    centred = values - channel_mean(values)
    inv_std = jax.lax.rsqrt(channel_mean(jnp.square(centred)) + self.epsilon)
    y = centred * inv_std * scale.astype(dtype)
    if bias is not None:
      y = y + bias.astype(dtype)
    params = (scale,) if bias is None else (scale, bias)
    return y.astype(self.dtype or jnp.result_type(x, *params))


def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _keys_first_attention(q, k, v, scale):
  # Keys on axis 2 and the softmax's division after the product: no reduction over the
  # last axis, which XLA:CPU would hand to YNNPACK with both products as one graph.
  logits = (jnp.einsum("bqhd,bkhd->bhkq", q, k) * scale).astype(jnp.float32)
  exponentials = jnp.exp(logits - jnp.max(logits, axis=2, keepdims=True))
  totals = jnp.transpose(jnp.sum(exponentials, axis=2), (0, 2, 1))[..., None]  # (B, Q, H, 1)
  out = jnp.einsum("bhkq,bkhd->bqhd", exponentials.astype(v.dtype), v)
  return (out / totals).astype(v.dtype)


def _keys_first_attention_fwd(q, k, v, scale):
  # Under differentiation the plain formulation, forward and backward, was the faster.
  return jax.vjp(lambda q, k, v: _softmax_attention(q, k, v, scale), q, k, v)


def _keys_first_attention_bwd(scale, pullback, grad_out):
  del scale
  return pullback(grad_out)


_keys_first_attention.defvjp(_keys_first_attention_fwd, _keys_first_attention_bwd)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  """softmax(q k^T * scale) v per head for q, k, v (B, N, heads, head_dim); the softmax in
  at least float32.

  On CPU the forward pass keeps the keys on axis 2 and divides by the softmax's sums
  after the product with v: XLA:CPU ran the usual form (softmax over the last axis) at
  under 10 GFLOP/s, as one YNNPACK graph with both products, about 3.5x slower than this
  at SPANetV2's stage-3 shapes. Its gradient is the usual form's, which differentiated
  ran faster than this one.
  """
  if platform.backend() == "cpu":
    return _keys_first_attention(q, k, v, scale)
  return _softmax_attention(q, k, v, scale)


_INV_SQRT2 = np.float32(1.0 / np.sqrt(2.0))
_INV_SQRT_2PI = np.float32(1.0 / np.sqrt(2.0 * np.pi))


def _gelu(x: jax.Array) -> jax.Array:
  if platform.portable():  # the same function; TensorFlow cannot read erf's composite op
    return 0.5 * x * jax.lax.erfc(-x * _INV_SQRT2).astype(x.dtype)
  return 0.5 * x * (1.0 + jax.lax.erf(x * _INV_SQRT2).astype(x.dtype))


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, written as PyTorch writes it: 0.5 x (1 + erf(x / sqrt 2)).

  jax.nn.gelu(approximate=False) goes through erfc, which XLA:CPU evaluates about six
  times slower; both agree with PyTorch to float32 rounding.

  The gradient is PyTorch's, written out: differentiated automatically, the formula
  keeps four activation-sized intermediates (0.5 x, 1 + erf, the exp inside erf's
  derivative, the output) for the backward pass; this keeps x alone and recomputes
  the derivative, Phi(x) + x phi(x), where it is used.
  """
  return _gelu(x)


def _gelu_fwd(x):
  return _gelu(x), x


def _gelu_bwd(x, grad_y):
  x = _recompute_here(x, grad_y)
  cdf = 0.5 * (1.0 + jax.lax.erf(x * _INV_SQRT2).astype(x.dtype))
  pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
  return (grad_y * (cdf + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def _gelu_mlp(x, kernel1, bias1, kernel2, bias2):
  hidden = x @ kernel1 + bias1
  return _gelu(hidden) @ kernel2 + bias2, hidden


@jax.custom_vjp
def gelu_mlp(x: jax.Array, kernel1: jax.Array, bias1: jax.Array, kernel2: jax.Array,
             bias2: jax.Array) -> jax.Array:
  """gelu(x @ kernel1 + bias1) @ kernel2 + bias2 for x (N, C).

  The gradient is written out so that the backward pass needs only x and the hidden
  pre-activation: autodiff would also keep the GELU's output (as large as the hidden
  layer) for kernel2's gradient. Here it is recomputed from the pre-activation together
  with the GELU's derivative, which needs the same erf.
  """
  return _gelu_mlp(x, kernel1, bias1, kernel2, bias2)[0]


def _gelu_mlp_fwd(x, kernel1, bias1, kernel2, bias2):
  y, hidden = _gelu_mlp(x, kernel1, bias1, kernel2, bias2)
  return y, (x, kernel1, kernel2, hidden)


def _gelu_mlp_bwd(residuals, grad_y):
  x, kernel1, kernel2, hidden = residuals
  hidden = _recompute_here(hidden, grad_y)
  erf = jax.lax.erf(hidden * _INV_SQRT2).astype(hidden.dtype)
  activation = 0.5 * hidden * (1.0 + erf)  # _gelu(hidden), sharing the erf
  grad_kernel2 = activation.T @ grad_y
  grad_activation = grad_y @ kernel2.T
  pdf = jnp.exp(-0.5 * hidden * hidden) * _INV_SQRT_2PI
  grad_hidden = grad_activation * (0.5 * (1.0 + erf) + hidden * pdf)
  return (grad_hidden @ kernel1.T, x.T @ grad_hidden, jnp.sum(grad_hidden, 0),
          grad_kernel2, jnp.sum(grad_y, 0))


gelu_mlp.defvjp(_gelu_mlp_fwd, _gelu_mlp_bwd)


class StridedConv(nn.Module):
  """Dense (ungrouped) convolution with PyTorch's explicit symmetric padding and init.

  Kernel (kh, kw, C_in, C_out) as in nn.Conv. `impl="im2col"` gathers the kh * kw
  strided windows into channels and runs one matrix product, which beats XLA:CPU's
  convolution for SPANet's downsampling layers but not for the 3-channel stem (whose
  windows are too narrow to gather efficiently); "auto" picks accordingly.
  """
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: int = 0
  impl: str = "auto"  # "conv", "im2col" or "auto"
  # None: PyTorch's default Conv2d init (SPANet); SPANetV2 uses truncated normal / zeros.
  kernel_init: Initializer | None = None
  bias_init: Initializer | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    in_features = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init or torch_default_kernel_init,
                        (kh, kw, in_features, self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init or torch_default_bias_init(kh * kw * in_features),
                      (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    pad, stride = self.padding, self.strides
    impl = self.impl
    if impl == "auto":
      impl = "im2col" if platform.backend() == "cpu" and in_features >= 16 else "conv"
    if impl == "conv":
      y = jax.lax.conv_general_dilated(
          x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    elif impl == "im2col":
      batch, height, width, _ = x.shape
      out_h = (height + 2 * pad - kh) // stride + 1
      out_w = (width + 2 * pad - kw) // stride + 1
      padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
      windows = [padded[:, i:i + stride * (out_h - 1) + 1:stride,
                        j:j + stride * (out_w - 1) + 1:stride, :]
                 for i in range(kh) for j in range(kw)]
      columns = jnp.concatenate(windows, axis=-1).reshape(-1, kh * kw * in_features)
      y = (columns @ kernel.reshape(-1, self.features)).reshape(
          batch, out_h, out_w, self.features)
    else:
      raise ValueError(f"unknown convolution impl {self.impl!r}")
    return y + bias


def torch_dense(features: int, in_features: int, dtype: Dtype | None = None,
                param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Dense:
  """A 1x1 convolution as a Dense layer over channels, PyTorch default init."""
  return nn.Dense(features, kernel_init=torch_default_kernel_init,
                  bias_init=torch_default_bias_init(in_features),
                  dtype=dtype, param_dtype=param_dtype, name=name)


class DenseParams(nn.Module):
  """The kernel (in, out) and bias of a Dense layer, for callers that combine layers into
  one product or differentiate them by hand. Initialised as PyTorch does unless told."""
  in_features: int
  features: int
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer | None = None
  bias_init: Initializer | None = None

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", self.kernel_init or torch_default_kernel_init,
                        (self.in_features, self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init or torch_default_bias_init(self.in_features),
                      (self.features,), self.param_dtype)
    return kernel, bias


def _shifted_views(x: jax.Array, kh: int, kw: int) -> list[jax.Array]:
  """The kh * kw zero-padded, shifted copies of x (B, H, W, C) that the taps of a
  (kh, kw) depthwise kernel multiply, in kernel order. For a column kernel (kh, 1) they
  are shifts of the flattened (B, H * W, C) rows."""
  batch, height, width, channels = x.shape
  if kw == 1:
    rows = x.reshape(batch, height * width, channels)
    padded = jnp.pad(rows, ((0, 0), ((kh // 2) * width,) * 2, (0, 0)))
    return [padded[:, i * width:i * width + height * width, :] for i in range(kh)]
  padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  return [padded[:, i:i + height, j:j + width, :] for i in range(kh) for j in range(kw)]


def _shifted_sum(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  views = _shifted_views(x, *kernel.shape[:2])
  y = bias
  for view, tap in zip(views, kernel.reshape(len(views), -1)):
    y = y + view * tap
  return jnp.broadcast_to(y, views[0].shape).reshape(x.shape)


def _fold_count(batch: int, rows: int, target: int = 8) -> int:
  """How many slices of the positions `_tap_gradients` adds up inside one fusion: the
  largest divisor of the batch up to `target`, or, when that is the whole batch, the
  batch times the largest power of two up to `target` that divides the next axis."""
  count = max(d for d in range(1, min(batch, target) + 1) if batch % d == 0)
  if count == batch:
    while count < target and rows % (2 * (count // batch)) == 0:
      count *= 2
  return count


def _tap_gradients(views: list[jax.Array], grad_y: jax.Array) -> jax.Array:
  """sum over positions of view * grad_y for each view (B, S, ..., C), grad_y shaped like
  the views: (taps, C), float32.

  The positions are cut into F slices (F = 8 for a batch of 8) that are added
  elementwise, every tap at once, into a (positions / F, taps, C) array: XLA fuses this
  into one pass that reads x and dy once, where per-tap products read them once per tap
  (and a reduction of each product, handed to YNNPACK on CPU, materialises it first).
  A plain reduction of that array finishes the sum. For SPANet-S's first stage this is
  about 2-3x faster than the per-tap form and needs a quarter of its scratch. More
  slices were slower (16 and 32 were tried; with 32 XLA materialised the products
  again).
  """
  shape = views[0].shape
  channels = shape[-1]
  count = _fold_count(shape[0], shape[1])

  def folded(view):
    product = (view * grad_y).astype(jnp.float32).reshape(count, -1, channels)
    total = product[0]
    for i in range(1, count):
      total = total + product[i]
    return total

  return jnp.sum(jnp.stack([folded(view) for view in views], axis=-2), axis=0)


@jax.custom_vjp
def grouped_projection(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """y[..., g, o] = sum_i x[..., i, g] * kernel[g, i, o] for x (B, H, W, I, G) and kernel
  (G, I, O): a grouped 1x1 convolution with I inputs and O outputs per group, its groups
  on the last axis of y (B, H, W, G, O).

  With I and O small (4 and 8 in SPANetV2), XLA:CPU runs the einsum as G tiny batched
  products behind transposes of x and y. Here it is I broadcast multiply-adds that fuse
  with the neighbouring elementwise work. The gradient is written out: the input's as O
  multiply-adds per input, the kernel's as `_tap_gradients` sums (one pass).
  """
  y = x[..., 0, :, None] * kernel[:, 0, :]
  for i in range(1, x.shape[-2]):
    y = y + x[..., i, :, None] * kernel[:, i, :]
  return y


def _grouped_projection_fwd(x, kernel):
  return grouped_projection(x, kernel), (x, kernel)


def _grouped_projection_bwd(residuals, grad_y):
  x, kernel = residuals
  groups, inputs, outputs = kernel.shape
  grad_x = []
  for i in range(inputs):
    total = grad_y[..., 0] * kernel[:, i, 0]
    for o in range(1, outputs):
      total = total + grad_y[..., o] * kernel[:, i, o]
    grad_x.append(total)
  grad_x = jnp.stack(grad_x, axis=-2)
  # The kernel's gradient: for each input i, sum over positions of x_i (broadcast over
  # the outputs) times grad_y, as taps of one _tap_gradients pass over (G * O) channels.
  flat = grad_y.shape[:-2] + (groups * outputs,)
  views = [jnp.broadcast_to(x[..., i, :, None], grad_y.shape).reshape(flat)
           for i in range(inputs)]
  grad_kernel = _tap_gradients(views, grad_y.reshape(flat)).reshape(inputs, groups, outputs)
  return (grad_x.astype(x.dtype),
          jnp.transpose(grad_kernel, (1, 0, 2)).astype(kernel.dtype))


grouped_projection.defvjp(_grouped_projection_fwd, _grouped_projection_bwd)


@jax.custom_vjp
def shifted_depthwise_sum(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """bias + sum over taps of shifted, per-channel scaled copies of x (B, H, W, C): a
  depthwise convolution, stride 1, zero padding of kernel // 2, kernel (kh, kw, C).

  Two details keep XLA:CPU from recomputing every tap inside each consumer of the
  result: the bias goes in first, so the last operation adds two full-size arrays, and
  a column kernel (kh, 1) shifts the flattened (B, H * W, C) rows, so the result has
  the layout the (batched) products that read it expect. XLA then materialises it once.

  The gradient is written out by hand: differentiated automatically, the sum keeps
  every shifted copy of x for the kernel's gradient (kh * kw - 1 extra activations per
  convolution, over a quarter of SPANet-S's training scratch). This one keeps x alone.
  """
  return _shifted_sum(x, kernel, bias)


def _shifted_depthwise_sum_fwd(x, kernel, bias):
  return _shifted_sum(x, kernel, bias), (x, kernel, bias)


def _shifted_depthwise_sum_bwd(residuals, grad_y):
  x, kernel, bias = residuals
  kh, kw, channels = kernel.shape
  # y[p] = sum_t k[t] x[p + t - r], so dx[q] = sum_t k[t] dy[q - t + r]: the same sum
  # of dy with the kernel flipped.
  grad_x = _shifted_sum(grad_y, kernel[::-1, ::-1], jnp.zeros((channels,), grad_y.dtype))
  views = _shifted_views(x, kh, kw)
  grad_y = grad_y.reshape(views[0].shape)
  grad_kernel = _tap_gradients(views, grad_y)
  # XLA:CPU hands a plain reduction to YNNPACK, which reads dy from memory, so dy is
  # materialised once. With no such reader XLA fuses dy's producer (in SPAM, the next
  # convolution's input gradient, itself a kh * kw-tap sum) into the kernel-gradient
  # pass above, which reads dy once per tap, computing it kh * kw times over (with the
  # earlier per-tap reductions: an HLO module twice as large, kept in memory with the
  # executable, and a SPANet-S training step 7% slower). The bias gradient is that
  # reduction; the kernel gradient takes a zero made from it, so that it stays when
  # there is no bias or its gradient is not asked for.
  grad_bias = jnp.sum(grad_y.astype(jnp.float32), axis=tuple(range(grad_y.ndim - 1)))
  grad_kernel = grad_kernel + grad_bias * 0
  if bias.ndim == 0:  # a scalar stand-in for "no bias"
    grad_bias = jnp.sum(grad_bias)
  return (grad_x, grad_kernel.reshape(kernel.shape).astype(kernel.dtype),
          grad_bias.astype(bias.dtype))


shifted_depthwise_sum.defvjp(_shifted_depthwise_sum_fwd, _shifted_depthwise_sum_bwd)


class DepthwiseConv(nn.Module):
  """Depthwise 2-D convolution, stride 1, 'same' zero padding of kernel // 2.

  The kernel is stored as (kh, kw, 1, C), the layout of a grouped nn.Conv.
  `impl="shift"` writes the convolution as a sum of shifted, scaled copies of the
  input: XLA's CPU backend runs grouped convolutions far slower than this.
  """
  kernel_size: tuple[int, int]
  impl: str = "auto"  # "conv", "shift" or "auto" (shift on CPU, conv elsewhere)
  use_bias: bool = True
  # None: PyTorch's default Conv2d init (SPANet); SPANetV2 uses truncated normal / zeros.
  kernel_init: Initializer | None = None
  bias_init: Initializer | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init or torch_default_kernel_init,
                        (kh, kw, 1, channels), self.param_dtype)
    bias = (self.param("bias", self.bias_init or torch_default_bias_init(kh * kw), (channels,),
                       self.param_dtype) if self.use_bias else jnp.zeros((), self.param_dtype))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    impl = self.impl
    if impl == "auto":
      impl = "shift" if platform.backend() == "cpu" else "conv"
    if impl == "shift":
      return shifted_depthwise_sum(x, kernel[:, :, 0], bias)
    if impl != "conv":
      raise ValueError(f"unknown depthwise convolution impl {self.impl!r}")
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)
    return y + bias if self.use_bias else y


class DropPath(nn.Module):
  """Stochastic depth: drop the whole residual branch per sample (rng stream 'dropout')."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class ResScale(nn.Module):
  """Per-channel multiply of the residual path (MetaFormer's res scale), init 1."""
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    return x * scale.astype(x.dtype)


class Mlp(nn.Module):
  """1x1 conv C -> hidden, exact GELU, dropout, 1x1 conv hidden -> C, dropout."""
  hidden_features: int
  dropout_rate: float = 0.0
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    channels = x.shape[-1]
    dense = lambda in_features, features, name: DenseParams(
        in_features, features, self.param_dtype, kernel_init=trunc_normal_init,
        bias_init=nn.initializers.zeros, name=name)()
    kernel1, bias1 = dense(channels, self.hidden_features, "fc1")
    kernel2, bias2 = dense(self.hidden_features, channels, "fc2")
    shape = x.shape
    # One (B * H * W, C) matrix throughout: XLA:CPU fuses and vectorises the 2-D
    # products and the GELU between them far better than their 4-D forms.
    x, kernel1, bias1, kernel2, bias2 = nn.dtypes.promote_dtype(
        x.reshape(-1, channels), kernel1, bias1, kernel2, bias2, dtype=self.dtype)
    dropout = nn.Dropout(self.dropout_rate)
    if train and self.dropout_rate > 0:
      x = dropout(gelu(x @ kernel1 + bias1), deterministic=False)
      x = dropout(x @ kernel2 + bias2, deterministic=False)
    else:
      x = gelu_mlp(x, kernel1, bias1, kernel2, bias2)
    return x.reshape(shape)
