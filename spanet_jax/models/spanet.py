"""SPANet (ICCV 2023) in Flax, NHWC. Architecture facts: docs/architecture.md, SPANet."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from spanet_jax.models import layers, metaformer, spectral
from spanet_jax.ops import platform

Dtype = Any


class SPAM(nn.Module):
  """Spectral Pooling Aggregation Modulation: the SPANet token mixer."""
  radius: float
  mask_size: tuple[int, int]  # feature size the learnable masks are initialised at
  kernel_size: int = 7
  learnable_masks: bool = False
  spectral_impl: str = "auto"
  depthwise_impl: str = "auto"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    platform.check_filter_options(self.spectral_impl, self.depthwise_impl,
                                  fixed_masks=not self.learnable_masks)
    super().__post_init__()

  def _spectral_impl(self) -> str:
    return platform.resolve_spectral_impl(self.spectral_impl,
                                          fixed_masks=not self.learnable_masks)

  def _filter(self, x: jax.Array) -> jax.Array:
    """The spectral pooling filter of every channel chunk by FFT or DFT, in float32
    (the low-rank path never forms it: see __call__)."""
    height, width, channels = x.shape[1:]
    masks = self._half_masks(height, width, channels)
    if self._spectral_impl() == "dft":
      return spectral.dft_spectral_filter(x, masks)
    return spectral.spectral_filter(x, masks)

  def _half_masks(self, height: int, width: int, channels: int) -> jax.Array:
    """Per-channel half-spectrum masks (H, W // 2 + 1, C) for this feature size."""
    if not self.learnable_masks:
      return jnp.asarray(spectral.channel_mask(height, width, self.radius, channels))
    init_masks = lambda _: jnp.stack([
        jnp.asarray(spectral.centred_mask(*self.mask_size, self.radius, lamb))
        for lamb in spectral.SPAM_LAMBDAS])
    centred = self.param("spectral_masks", init_masks).astype(jnp.float32)
    if centred.shape[1:] != (height, width):
      centred = jax.image.resize(centred, (centred.shape[0], height, width), "cubic")
    half = spectral.hermitian_half(centred)  # (chunks, H, W // 2 + 1)
    sizes = spectral.chunk_sizes(channels, len(spectral.SPAM_LAMBDAS))
    return jnp.repeat(jnp.moveaxis(half, 0, -1), np.array(sizes), axis=-1,
                      total_repeat_length=channels)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    dense = lambda features, in_features, name: layers.torch_dense(
        features, in_features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    depthwise = lambda size, name: layers.DepthwiseConv(
        size, impl=self.depthwise_impl, dtype=self.dtype, param_dtype=self.param_dtype,
        name=name)
    k = self.kernel_size
    shape = x.shape
    flat = lambda y: y.reshape(-1, y.shape[-1])  # 1x1 convs as 2-D products: see layers.GeluMlp
    x = dense(channels, channels, "proj_in")(flat(x)).reshape(shape)
    x = depthwise((1, k), "conv_w")(x)
    x = depthwise((k, 1), "conv_h")(x)

    # ctx = sum_j pws_j(filter(chunk_j)) is one product with the pws kernels stacked along
    # their inputs: slicing the chunks out would cost more than the products themselves.
    sizes = spectral.chunk_sizes(channels, len(spectral.SPAM_LAMBDAS))
    kernels, biases = zip(*[
        layers.DenseParams(size, channels, self.param_dtype, name=f"pws_{j}")()
        for j, size in enumerate(sizes)])
    kernel, bias = jnp.concatenate(kernels, axis=0), sum(biases)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if self._spectral_impl() == "lowrank":
      # Folds the filter into the product: one full-size pass less (spectral.py).
      ctx = spectral.lowrank_filter_matmul(x, self.radius, kernel) + bias
    else:
      ctx = flat(self._filter(x).astype(x.dtype)) @ kernel + bias
    return dense(channels, channels, "proj_out")(flat(x) * ctx).reshape(shape)


class SPANet(metaformer.MetaFormer):
  """SPANet classifier, or a dense-prediction backbone with `features_only=True`.

  `model.apply(variables, images, train=False)` maps NHWC float images to logits
  (to the four normalised stage outputs when `features_only`).
  `model.apply(variables, images, method="stage_features")` gives the four stage
  outputs of any SPANet. The options shared with SPANetV2 are MetaFormer's.
  """
  radii: Sequence[float] = (2, 2, 1, 1)
  # Feature sizes of the four stages at the 224 training resolution.
  mask_sizes: Sequence[int] = (56, 28, 14, 7)
  kernel_size: int = 7
  learnable_masks: bool = False

  def downsampling(self) -> list[metaformer.ModuleDef]:
    """A 7x7 stride-4 stem, then 3x3 stride-2 convolutions; no norms."""
    conv = lambda kernel, stride, pad, dim, name: functools.partial(
        layers.StridedConv, dim, (kernel, kernel), stride, pad, impl=self.conv_impl,
        dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    return [conv(7, 4, 2, dim, "patch_embed") if i == 0 else conv(3, 2, 1, dim, f"downsample{i}")
            for i, dim in enumerate(self.dims)]

  def stage_parts(self) -> list[metaformer.StageParts]:
    norm = functools.partial(layers.SingleGroupNorm, epsilon=1e-5, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    mlp = functools.partial(layers.GeluMlp, dropout_rate=self.drop_rate, dtype=self.dtype,
                            param_dtype=self.param_dtype)
    return [metaformer.StageParts(
        token_mixer=functools.partial(
            SPAM, radius=self.radii[i], mask_size=(self.mask_sizes[i],) * 2,
            kernel_size=self.kernel_size, learnable_masks=self.learnable_masks,
            spectral_impl=self.spectral_impl, depthwise_impl=self.depthwise_impl,
            dtype=self.dtype, param_dtype=self.param_dtype),
        norm=norm, mlp=mlp, res_scale=self.res_scale_stages[i]) for i in range(len(self.dims))]

  def out_norm(self) -> nn.Module:
    # The official dense-prediction backbones' norm0/2/4/6.
    return layers.group_norm(None, self.dtype, self.param_dtype)

  def setup_head(self) -> None:
    self.norm = layers.group_norm(None, self.dtype, self.param_dtype)
    if self.num_classes > 0:
      self.head = nn.Dense(self.num_classes, kernel_init=layers.trunc_normal_init,
                           bias_init=nn.initializers.zeros, dtype=self.dtype,
                           param_dtype=self.param_dtype)

  def forward_head(self, x: jax.Array, pre_logits: bool = False,
                   train: bool = False) -> jax.Array:
    """Norm, global average pool and classifier of forward_features' output;
    `pre_logits=True` stops before the classifier (the pooled, normalised features)."""
    del train  # no dropout in SPANet's head
    x = self.norm(x)
    x = jnp.mean(x, axis=(1, 2), dtype=jnp.float32)
    return x if pre_logits or self.num_classes == 0 else self.head(x)
