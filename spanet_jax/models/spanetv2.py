"""SPANetV2 (IEEE TPAMI 2026) in Flax, NHWC. Architecture facts: docs/architecture.md, SPANetV2.

Its token mixer, ExSPAM, filters four channel groups in the frequency domain with
learned sigmoid masks; the hybrid variants use self-attention in the last two stages.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from spanet_jax.models import layers, metaformer, spectral
from spanet_jax.ops import activations, attention, grouped, platform

Dtype = Any
TOKEN_MIXERS = ("exspam", "mixattention", "attention")
SPECTRAL_IMPLS = platform.LEARNED_MASK_SPECTRAL_IMPLS

# SPANetV2 initialises every Linear and Conv2d weight with trunc_normal(0.02), biases 0.
_weight_init = layers.trunc_normal_init
_bias_init = nn.initializers.zeros


def _dense(features: int, use_bias: bool, dtype, param_dtype, name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, kernel_init=_weight_init, bias_init=_bias_init,
                  dtype=dtype, param_dtype=param_dtype, name=name)


def _layer_norm(use_bias: bool, epsilon: float, dtype, param_dtype,
                name: str | None) -> layers.ChannelLayerNorm:
  return layers.ChannelLayerNorm(epsilon=epsilon, use_bias=use_bias, dtype=dtype,
                                 param_dtype=param_dtype, name=name)


class StarReLU(nn.Module):
  """s * relu(x)^2 + b with learnable scalars s (init 1) and b (init 0)."""
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (1,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (1,), self.param_dtype)
    return scale.astype(x.dtype) * jnp.square(jax.nn.relu(x)) + bias.astype(x.dtype)


class ExSPAM(nn.Module):
  """Expanded SPAM: q = GELU(query(x)); four groups of ctx(x), each a depthwise conv
  (kernel 3, 5, 7, 9) then an rfft2 filter by its learned sigmoid mask; the groups
  interleaved on channels, mixed by a grouped 1x1 conv, norm, GELU and 1x1 conv;
  the result modulates q."""
  filter_size: tuple[int, int]  # the feature size the learned masks are stored at
  num_groups: int = 4
  expand_ratio: int = 2
  spectral_impl: str = "auto"
  depthwise_impl: str = "auto"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    platform.check_filter_options(self.spectral_impl, self.depthwise_impl, fixed_masks=False,
                                  allowed=SPECTRAL_IMPLS)
    super().__post_init__()

  def _spectral_impl(self) -> str:
    return platform.resolve_spectral_impl(self.spectral_impl, fixed_masks=False)

  def _half_masks(self, group: int, height: int, width: int) -> jax.Array:
    """sigmoid(filter_i) of every group at this feature size, as (H, W // 2 + 1, C)."""
    stored_h, stored_w = self.filter_size
    masks = []
    for i in range(self.num_groups):
      init = lambda key, shape: 0.02 * jax.random.normal(key, shape, self.param_dtype)
      weight = self.param(f"filter_{i + 1}", init, (group, stored_h, stored_w // 2 + 1))
      weight = weight.astype(jnp.float32)
      if weight.shape[1:] != (height, width // 2 + 1):
        weight = spectral.resize_bicubic_align_corners(weight, height, width // 2 + 1)
      masks.append(jax.nn.sigmoid(weight))
    return jnp.moveaxis(jnp.concatenate(masks, axis=0), 0, -1)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    if channels % self.num_groups:
      raise ValueError(f"ExSPAM needs channels divisible by {self.num_groups}, got {channels}")
    group = channels // self.num_groups
    dense = lambda features, name: _dense(features, False, self.dtype, self.param_dtype, name)
    # The 1x1 convolutions as (B * H * W, C) products: see layers.GeluMlp.
    rows = x.reshape(-1, channels)
    q = activations.gelu(dense(channels, "query")(rows))
    spectral_impl = self._spectral_impl()
    channels_first = spectral_impl == "fft" and platform.channels_first_fft()
    if channels_first:
      # ctx straight into (B, C, H, W), where the convolutions and FFTs run without
      # transposes: XLA:CPU fused the convolutions into the transposes otherwise, with
      # strided reads for every tap (SPANetV2-S18's first-stage ExSPAM: 0.6 of the time,
      # forward and with its gradient).
      ctx = ChannelsFirstDense(channels, self.dtype, self.param_dtype, name="ctx")(x)
      group_of = lambda i: ctx[:, i * group:(i + 1) * group]
    else:
      ctx = dense(channels, "ctx")(rows).reshape(x.shape)
      group_of = lambda i: ctx[..., i * group:(i + 1) * group]
    convolved = [
        layers.DepthwiseConv((3 + 2 * i,) * 2, impl=self.depthwise_impl,
                             kernel_init=_weight_init, bias_init=_bias_init, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=f"local_conv_{i + 1}")(
                                 group_of(i), channels_first)
        for i in range(self.num_groups)]
    # All groups in one transform: each channel has its own mask.
    with jax.named_scope(spectral.FILTER_SCOPE):  # the masks are part of the filter
      masks = self._half_masks(group, height, width)
    if channels_first:
      filtered = spectral.channels_first_spectral_filter(
          jnp.concatenate(convolved, axis=1), jnp.moveaxis(masks, -1, 0))
      filtered = jnp.transpose(filtered, (0, 2, 3, 1))
    elif spectral_impl == "dft":
      filtered = spectral.dft_spectral_filter(jnp.concatenate(convolved, axis=-1), masks)
    else:
      filtered = spectral.spectral_filter(jnp.concatenate(convolved, axis=-1), masks)
    filtered = filtered.astype(q.dtype)
    # The official code interleaves the groups (channel g * 4 + i holds channel g of group
    # i) and then convolves with one group per g. Grouping by g directly is the same
    # product without the transpose: (..., 4, G) against kernels (G, 4, expand * 4).
    per_group_out = self.expand_ratio * self.num_groups
    kernel = self.param("proj_0", _weight_init, (group, self.num_groups, per_group_out),
                        self.param_dtype)
    filtered, kernel = nn.dtypes.promote_dtype(filtered, kernel, dtype=self.dtype)
    mixed = grouped.grouped_projection(
        filtered.reshape(batch, height, width, self.num_groups, group), kernel)
    mixed = mixed.reshape(batch, height, width, channels * self.expand_ratio)
    mixed = layers.group_norm("proj_1", self.dtype, self.param_dtype)(mixed)
    mixed = dense(channels, "proj_3")(activations.gelu(mixed.reshape(-1, mixed.shape[-1])))
    return dense(channels, "proj_out")(q * mixed).reshape(x.shape)


class ChannelsFirstDense(nn.Module):
  """nn.Dense without bias (same parameter) from (B, H, W, C_in) to (B, C, H, W): the
  transpose becomes part of the product."""
  features: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    kernel = self.param("kernel", _weight_init, (channels, self.features), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = jnp.einsum("bpk,kc->bcp", x.reshape(batch, height * width, channels), kernel)
    return y.reshape(batch, self.features, height, width)


class SplitDense(nn.Module):
  """nn.Dense without bias (same parameter, `parts * features` outputs) as `parts`
  separate products: the gradients of the parts then need not be gathered into one
  array (with the hybrid attention's layout, a transposed copy XLA:CPU fused the
  gradient products into)."""
  parts: int
  features: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    kernel = self.param("kernel", _weight_init, (x.shape[-1], self.parts * self.features),
                        self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return [x @ kernel[:, i * self.features:(i + 1) * self.features]
            for i in range(self.parts)]


class Attention(nn.Module):
  """Multi-head self-attention over all H x W tokens, head dim 32, no biases.
  `mix=True` is MixAttention: a depthwise 7x7 conv of v is added before the projection."""
  head_dim: int = 32
  mix: bool = False
  depthwise_impl: str = "auto"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    heads = max(channels // self.head_dim, 1)
    inner = heads * self.head_dim
    dense = lambda features, name: _dense(features, False, self.dtype, self.param_dtype, name)
    q, k, v = (y.reshape(batch, height * width, heads, self.head_dim)  # (B, N, heads, dim)
               for y in SplitDense(3, inner, self.dtype, self.param_dtype, name="qkv")(
                   x.reshape(-1, channels)))
    out = attention.dot_product_attention(q, k, v, self.head_dim ** -0.5).reshape(
        batch, height, width, inner)
    if self.mix:
      if inner != channels:
        raise ValueError(f"MixAttention needs channels divisible by {self.head_dim}")
      out = out + layers.DepthwiseConv(
          (7, 7), impl=self.depthwise_impl, use_bias=False, kernel_init=_weight_init,
          dtype=self.dtype, param_dtype=self.param_dtype, name="local_conv")(
              v.reshape(batch, height, width, channels))
    return dense(channels, "proj")(out)


class StarReLUMlp(layers.Mlp):
  """Linear C -> hidden (no bias), StarReLU, dropout, Linear hidden -> C (no bias), dropout."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    channels, shape = x.shape[-1], x.shape
    x = x.reshape(-1, channels)  # (B * H * W, C) products: see layers.GeluMlp
    x = _dense(self.hidden_features, False, self.dtype, self.param_dtype, "fc1")(x)
    x = StarReLU(self.param_dtype, name="act")(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    x = _dense(channels, False, self.dtype, self.param_dtype, "fc2")(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=not train).reshape(shape)


class MlpHead(nn.Module):
  """Linear C -> 4C, squared ReLU, LayerNorm, dropout, Linear 4C -> classes."""
  num_classes: int
  mlp_ratio: float = 4.0
  dropout_rate: float = 0.0
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    hidden = int(self.mlp_ratio * x.shape[-1])
    x = _dense(hidden, True, self.dtype, self.param_dtype, "fc1")(x)
    x = jnp.square(jax.nn.relu(x))
    x = _layer_norm(True, 1e-5, self.dtype, self.param_dtype, "norm")(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return _dense(self.num_classes, True, self.dtype, self.param_dtype, "fc2")(x)


class Downsampling(nn.Module):
  """Stage 0: conv 7x7 s4 p2 then LayerNorm; later stages: LayerNorm then conv 3x3 s2 p1.
  The norms are LayerNorm over C without bias, eps 1e-6."""
  features: int
  stem: bool
  conv_impl: str = "auto"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    norm = lambda name: _layer_norm(False, 1e-6, self.dtype, self.param_dtype, name)
    kernel, stride, pad = (7, 4, 2) if self.stem else (3, 2, 1)
    conv = layers.StridedConv(self.features, (kernel, kernel), stride, pad, impl=self.conv_impl,
                              kernel_init=_weight_init, bias_init=_bias_init, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="conv")
    if self.stem:
      return norm("post_norm")(conv(x))
    return conv(norm("pre_norm")(x))


class SPANetV2(metaformer.MetaFormer):
  """SPANetV2 classifier, or a dense-prediction backbone with `features_only=True`.

  `model.apply(variables, images, train=False)` maps NHWC float images to logits (to
  the stage outputs through the official mmdet/mmseg backbone's per-stage LayerNorms
  when `features_only`); `method="stage_features"` gives the four stage outputs. The
  options shared with SPANet are MetaFormer's."""
  layers: Sequence[int] = (3, 3, 9, 3)
  token_mixers: Sequence[str] = ("exspam",) * 4
  # Feature sizes of the four stages at the 224 training resolution: the learned masks'.
  filter_sizes: Sequence[int] = (56, 28, 14, 7)
  head_dropout: float = 0.0
  spectral_impls: ClassVar[tuple[str, ...]] = SPECTRAL_IMPLS

  def downsampling(self) -> list[metaformer.ModuleDef]:
    return [functools.partial(Downsampling, dim, stem=i == 0, conv_impl=self.conv_impl,
                              dtype=self.dtype, param_dtype=self.param_dtype,
                              name=f"downsample{i}")
            for i, dim in enumerate(self.dims)]

  def stage_parts(self) -> list[metaformer.StageParts]:
    norm = functools.partial(layers.ChannelLayerNorm, epsilon=1e-6, use_bias=False,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    mlp = functools.partial(StarReLUMlp, dropout_rate=self.drop_rate, dtype=self.dtype,
                            param_dtype=self.param_dtype)
    return [metaformer.StageParts(self._token_mixer(i), norm, mlp, self.res_scale_stages[i])
            for i in range(len(self.dims))]

  def _token_mixer(self, stage: int) -> metaformer.ModuleDef:
    kind = self.token_mixers[stage]
    if kind == "exspam":
      return functools.partial(ExSPAM, (self.filter_sizes[stage],) * 2,
                               spectral_impl=self.spectral_impl,
                               depthwise_impl=self.depthwise_impl, dtype=self.dtype,
                               param_dtype=self.param_dtype)
    if kind in ("attention", "mixattention"):
      return functools.partial(Attention, mix=kind == "mixattention",
                               depthwise_impl=self.depthwise_impl, dtype=self.dtype,
                               param_dtype=self.param_dtype)
    raise ValueError(f"unknown token mixer {kind!r}; choose from {', '.join(TOKEN_MIXERS)}")

  def out_norm(self) -> nn.Module:
    # The official dense-prediction backbone's norm{i}: LayerNorm without bias.
    return _layer_norm(False, 1e-6, self.dtype, self.param_dtype, None)

  def setup_head(self) -> None:
    self.norm = _layer_norm(True, 1e-6, self.dtype, self.param_dtype, None)
    if self.num_classes > 0:
      self.head = MlpHead(self.num_classes, self.mlp_ratio, self.head_dropout, self.dtype,
                          self.param_dtype)

  def auto_batch_parts(self) -> int | None:
    return 1  # two batch parts did not help SPANetV2 on CPU (docs/performance.md)

  def forward_head(self, x: jax.Array, pre_logits: bool = False,
                   train: bool = False) -> jax.Array:
    """Global average pool, norm and MLP head of forward_features' output;
    `pre_logits=True` stops before the head (the pooled, normalised features)."""
    x = self.norm(jnp.mean(x, axis=(1, 2), dtype=jnp.float32).astype(x.dtype))
    return x if pre_logits or self.num_classes == 0 else self.head(x, train)
