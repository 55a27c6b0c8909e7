"""SPANet (ICCV 2023) in Flax, NHWC. Architecture facts: docs/architecture.md, SPANet."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from spanet_jax.models import layers, spectral
from spanet_jax.ops import batching, platform

Dtype = Any
# How the spectral filter is computed; all are exact (see spectral.py).
SPECTRAL_IMPLS = ("auto", "fft", "lowrank", "dft")


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

  def _spectral_impl(self) -> str:
    impl = self.spectral_impl
    if impl not in SPECTRAL_IMPLS:
      raise ValueError(f"unknown spectral_impl {impl!r}; choose from {', '.join(SPECTRAL_IMPLS)}")
    if impl == "auto":
      if not self.learnable_masks:
        return "lowrank"
      return platform.spectral_impl()
    if impl == "lowrank" and self.learnable_masks:
      raise ValueError("spectral_impl='lowrank' needs the fixed masks; with learnable masks "
                       "use 'fft' or 'dft'")
    return impl

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
    flat = lambda y: y.reshape(-1, y.shape[-1])  # 1x1 convs as 2-D products: see layers.Mlp
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


class SPANetBlock(nn.Module):
  """x = rs1(x) + drop_path(SPAM(norm1(x))); x = rs2(x) + drop_path(MLP(norm2(x)))."""
  radius: float
  mask_size: tuple[int, int]
  mlp_ratio: float = 4.0
  kernel_size: int = 7
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  res_scale: bool = False
  learnable_masks: bool = False
  spectral_impl: str = "auto"
  depthwise_impl: str = "auto"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    channels = x.shape[-1]
    norm = lambda name: layers.group_norm(name, self.dtype, self.param_dtype)
    residual = lambda name: (layers.ResScale(self.param_dtype, name=name)
                             if self.res_scale else (lambda y: y))
    drop_path = layers.DropPath(self.drop_path_rate)
    mixer = SPAM(radius=self.radius, mask_size=self.mask_size, kernel_size=self.kernel_size,
                 learnable_masks=self.learnable_masks, spectral_impl=self.spectral_impl,
                 depthwise_impl=self.depthwise_impl, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="token_mixer")
    x = residual("res_scale1")(x) + drop_path(mixer(norm("norm1")(x)), train)
    mlp = layers.Mlp(int(channels * self.mlp_ratio), self.drop_rate, self.dtype,
                     self.param_dtype, name="mlp")
    return residual("res_scale2")(x) + drop_path(mlp(norm("norm2")(x), train), train)


class SPANetBackbone(nn.Module):
  """Stem and four stages; returns the output of every stage."""
  layers: Sequence[int]
  dims: Sequence[int]
  radii: Sequence[float]
  mask_sizes: Sequence[int]
  res_scale_stages: Sequence[bool]
  mlp_ratio: float = 4.0
  kernel_size: int = 7
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  learnable_masks: bool = False
  spectral_impl: str = "auto"
  depthwise_impl: str = "auto"
  conv_impl: str = "auto"
  # Recompute each block in the backward pass instead of storing its activations.
  remat: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
    conv = lambda features, kernel, stride, pad, name: layers.StridedConv(
        features, (kernel, kernel), stride, pad, impl=self.conv_impl, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)
    x = conv(self.dims[0], 7, 4, 2, "patch_embed")(x)
    total_blocks = sum(self.layers)
    block_index = 0
    # `train` (argument 2, counting self) selects Python branches: static under remat.
    block_cls = nn.remat(SPANetBlock, static_argnums=(2,)) if self.remat else SPANetBlock
    outputs = []
    for i, (depth, dim) in enumerate(zip(self.layers, self.dims)):
      if i > 0:
        x = conv(dim, 3, 2, 1, f"downsample{i}")(x)
      for j in range(depth):
        rate = self.drop_path_rate * block_index / max(total_blocks - 1, 1)
        x = block_cls(
            radius=self.radii[i], mask_size=(self.mask_sizes[i],) * 2,
            mlp_ratio=self.mlp_ratio, kernel_size=self.kernel_size, drop_rate=self.drop_rate,
            drop_path_rate=rate, res_scale=self.res_scale_stages[i],
            learnable_masks=self.learnable_masks, spectral_impl=self.spectral_impl,
            depthwise_impl=self.depthwise_impl, dtype=self.dtype,
            param_dtype=self.param_dtype, name=f"stage{i}_block{j}")(x, train)
        block_index += 1
      outputs.append(x)
    return tuple(outputs)


class SPANet(nn.Module):
  """SPANet classifier, or a dense-prediction backbone with `features_only=True`.

  `model.apply(variables, images, train=False)` maps NHWC float images to logits
  (to the four normalised stage outputs when `features_only`).
  `model.apply(variables, images, method="stage_features")` gives the four stage
  outputs of any SPANet.
  """
  layers: Sequence[int] = (4, 4, 12, 4)
  dims: Sequence[int] = (64, 128, 320, 512)
  radii: Sequence[float] = (2, 2, 1, 1)
  # Feature sizes of the four stages at the 224 training resolution.
  mask_sizes: Sequence[int] = (56, 28, 14, 7)
  res_scale_stages: Sequence[bool] = (False, False, True, True)
  mlp_ratio: float = 4.0
  kernel_size: int = 7
  num_classes: int = 1000
  features_only: bool = False
  # The stages a features_only model returns (all four norms are kept either way, so
  # official dense-prediction checkpoints load unchanged).
  out_indices: Sequence[int] = (0, 1, 2, 3)
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  learnable_masks: bool = False
  spectral_impl: str = "auto"
  depthwise_impl: str = "auto"
  conv_impl: str = "auto"
  # Recompute each block in the backward pass instead of storing its activations.
  remat: bool = False
  # Run the batch through the backbone as this many independent parts (None: auto).
  batch_parts: int | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @property
  def feature_info(self) -> list[dict]:
    """timm's feature_info: channels (`num_chs`) and stride (`reduction`) of each stage
    a features_only model returns (of all four otherwise)."""
    return layers.feature_info(self.dims, self.out_indices if self.features_only else None)

  def setup(self):
    if not self.out_indices or any(i not in range(len(self.dims)) for i in self.out_indices):
      raise ValueError(f"out_indices={tuple(self.out_indices)}: give stage indices in "
                       f"0..{len(self.dims) - 1}")
    self.backbone = SPANetBackbone(**layers.fields_for(SPANetBackbone, self))
    if self.features_only:
      # The per-stage norms of the official dense-prediction backbones (norm0/2/4/6).
      self.out_norms = [layers.group_norm(None, self.dtype, self.param_dtype)
                        for _ in self.dims]
    else:
      self.norm = layers.group_norm(None, self.dtype, self.param_dtype)
      if self.num_classes > 0:
        self.head = nn.Dense(self.num_classes, kernel_init=layers.trunc_normal_init,
                             bias_init=nn.initializers.zeros, dtype=self.dtype,
                             param_dtype=self.param_dtype)

  def stage_features(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
    """The four stage outputs (B, H/4, W/4, C0) ... (B, H/32, W/32, C3)."""
    parts = self.batch_parts
    if parts is None and self.is_mutable_collection("intermediates"):
      # Captured or sown intermediates then hold the whole batch, one entry per call,
      # as they would without parts (each part records its own otherwise).
      parts = 1
    features = batching.in_batch_parts(lambda part: self.backbone(part, train), x, parts)
    if self.features_only:
      features = tuple(norm(f) for norm, f in zip(self.out_norms, features))
    return features

  def forward_features(self, x: jax.Array, train: bool = False) -> jax.Array:
    """The last stage's output (B, H/32, W/32, C3), before the head's norm (timm's
    forward_features)."""
    if self.features_only:
      raise ValueError("a features_only model has no head: its __call__ returns the stage maps")
    return self.stage_features(x, train)[-1]

  def forward_head(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
    """Norm, global average pool and classifier of forward_features' output;
    `pre_logits=True` stops before the classifier (the pooled, normalised features)."""
    x = self.norm(x)
    x = jnp.mean(x, axis=(1, 2), dtype=jnp.float32)
    return x if pre_logits or self.num_classes == 0 else self.head(x)

  def __call__(self, x: jax.Array, train: bool = False):
    if self.features_only:
      features = self.stage_features(x, train)
      return tuple(features[i] for i in self.out_indices)
    return self.forward_head(self.forward_features(x, train))
