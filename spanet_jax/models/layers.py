"""The Flax layers both SPANet families are built from (NHWC throughout). Faster exact
formulations with hand-written gradients live in spanet_jax.ops; `auto` options resolve
in ops/platform.py."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from spanet_jax.ops import activations, depthwise, im2col, norms, platform

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


def group_norm(name: str | None = None, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32) -> "SingleGroupNorm":
  """GroupNorm with one group: statistics over (H, W, C) per sample, per-channel affine."""
  return SingleGroupNorm(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, name=name)


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
    y = norms.single_group_norm(x, scale, bias, self.epsilon)
    return y.astype(self.dtype or jnp.result_type(x, scale, bias))


class ChannelLayerNorm(nn.Module):
  """LayerNorm over the last axis: nn.LayerNorm(use_fast_variance=False)'s function and
  parameters ("scale", and "bias" if use_bias), statistics in at least float32; the
  means as norms.channel_mean computes them."""
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
    y = norms.layer_norm(x, scale.astype(dtype), None if bias is None else bias.astype(dtype),
                         self.epsilon)
    params = (scale,) if bias is None else (scale, bias)
    return y.astype(self.dtype or jnp.result_type(x, *params))


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

  def __post_init__(self):
    platform.check_option("conv_impl", self.impl, platform.STRIDED_CONV_IMPLS)
    super().__post_init__()

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
      impl = platform.strided_conv_impl(in_features)
    if impl == "conv":
      y = jax.lax.conv_general_dilated(
          x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
      y = im2col.strided_conv(x, kernel, stride, pad)
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


class DepthwiseConv(nn.Module):
  """Depthwise 2-D convolution, stride 1, 'same' zero padding of kernel // 2.

  The kernel is stored as (kh, kw, 1, C), the layout of a grouped nn.Conv.
  `impl="shift"` writes the convolution as a sum of shifted, scaled copies of the
  input: XLA's CPU backend runs grouped convolutions far slower than this. Inputs are
  (B, H, W, C), or (B, C, H, W) with `channels_first`.
  """
  kernel_size: tuple[int, int]
  impl: str = "auto"  # "conv", "shift" or "auto" (shift on CPU, conv elsewhere)
  use_bias: bool = True
  # None: PyTorch's default Conv2d init (SPANet); SPANetV2 uses truncated normal / zeros.
  kernel_init: Initializer | None = None
  bias_init: Initializer | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    platform.check_option("depthwise_impl", self.impl, platform.DEPTHWISE_IMPLS)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, channels_first: bool = False) -> jax.Array:
    channels = x.shape[1] if channels_first else x.shape[-1]
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init or torch_default_kernel_init,
                        (kh, kw, 1, channels), self.param_dtype)
    bias = (self.param("bias", self.bias_init or torch_default_bias_init(kh * kw), (channels,),
                       self.param_dtype) if self.use_bias else jnp.zeros((), self.param_dtype))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    impl = self.impl
    if impl == "auto":
      impl = platform.depthwise_impl()
    if impl == "shift":
      return depthwise.shifted_depthwise_sum(x, kernel[:, :, 0], bias, channels_first)
    layout = "NCHW" if channels_first else "NHWC"
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=(layout, "HWIO", layout), feature_group_count=channels)
    if not self.use_bias:
      return y
    return y + (bias[:, None, None] if channels_first else bias)


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
  """What a MetaFormer block's MLP is built with (metaformer.StageParts.mlp); each
  family's MLP defines __call__(x, train)."""
  hidden_features: int
  dropout_rate: float = 0.0
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32


class GeluMlp(Mlp):
  """1x1 conv C -> hidden, exact GELU, dropout, 1x1 conv hidden -> C, dropout."""

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
      x = dropout(activations.gelu(x @ kernel1 + bias1), deterministic=False)
      x = dropout(x @ kernel2 + bias2, deterministic=False)
    else:
      x = activations.gelu_mlp(x, kernel1, bias1, kernel2, bias2)
    return x.reshape(shape)
