"""The MetaFormer both families are (docs/architecture.md): per stage a downsampling
layer (the first is the stem) and blocks

  x = rs1(x) + drop_path(token_mixer(norm1(x)));  x = rs2(x) + drop_path(mlp(norm2(x)))

then a classifier head, or the stage outputs through per-stage norms (`features_only`,
the dense-prediction backbones). A family supplies its parts as module constructors
(functools.partial of a Module class), as timm's MetaFormer and Flax's ResNet do;
`MetaFormer` gives both families one API: stage_features, forward_features,
forward_head(pre_logits), feature_info, features_only, out_indices, batch_parts, remat.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from spanet_jax.models import layers
from spanet_jax.ops import batching, platform

Dtype = Any
ModuleDef = Any  # a Module class, or a functools.partial of one


@dataclasses.dataclass(frozen=True)
class StageParts:
  """The constructors of one stage's block parts, each called with its `name`; the MLP
  also with `hidden_features`."""
  token_mixer: ModuleDef
  norm: ModuleDef
  mlp: ModuleDef
  res_scale: bool


class MetaFormerBlock(nn.Module):
  """x = rs1(x) + drop_path(token_mixer(norm1(x))); x = rs2(x) + drop_path(mlp(norm2(x)))."""
  parts: StageParts
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    parts = self.parts
    residual = lambda name: (layers.ResScale(self.param_dtype, name=name)
                             if parts.res_scale else (lambda y: y))
    drop_path = layers.DropPath(self.drop_path_rate)
    mixer = parts.token_mixer(name="token_mixer")
    x = residual("res_scale1")(x) + drop_path(mixer(parts.norm(name="norm1")(x)), train)
    mlp = parts.mlp(hidden_features=int(x.shape[-1] * self.mlp_ratio), name="mlp")
    return residual("res_scale2")(x) + drop_path(mlp(parts.norm(name="norm2")(x), train), train)


class MetaFormerBackbone(nn.Module):
  """Each stage's downsampling layer and blocks; returns the output of every stage.
  Drop-path rates grow linearly over all blocks, from 0 to drop_path_rate."""
  layers: Sequence[int]
  downsampling: Sequence[ModuleDef]  # one per stage, each carrying its name
  stages: Sequence[StageParts]
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  # Recompute each block in the backward pass instead of storing its activations.
  remat: bool = False
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
    # `train` (argument 2, counting self) selects Python branches: static under remat.
    block_cls = nn.remat(MetaFormerBlock, static_argnums=(2,)) if self.remat else MetaFormerBlock
    total, index, outputs = sum(self.layers), 0, []
    for i, (depth, downsample, parts) in enumerate(
        zip(self.layers, self.downsampling, self.stages)):
      x = downsample()(x)
      for j in range(depth):
        rate = self.drop_path_rate * index / max(total - 1, 1)
        x = block_cls(parts, self.mlp_ratio, rate, self.param_dtype,
                      name=f"stage{i}_block{j}")(x, train)
        index += 1
      outputs.append(x)
    return tuple(outputs)


class MetaFormer(nn.Module):
  """A four-stage MetaFormer classifier, or a dense-prediction backbone with
  `features_only=True`. A family defines its parts: `downsampling()`, `stage_parts()`,
  `out_norm()` (the dense backbone's per-stage norms), `setup_head()` and
  `forward_head()`.

  `model.apply(variables, images, train=False)` maps NHWC float images to logits (to
  the normalised stage outputs of `out_indices` when `features_only`);
  `method="stage_features"` gives the four stage outputs of any model.
  """
  layers: Sequence[int] = (4, 4, 12, 4)
  dims: Sequence[int] = (64, 128, 320, 512)
  res_scale_stages: Sequence[bool] = (False, False, True, True)
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  features_only: bool = False
  # The stages a features_only model returns (all four norms are kept either way, so
  # official dense-prediction checkpoints load unchanged).
  out_indices: Sequence[int] = (0, 1, 2, 3)
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  spectral_impl: str = "auto"
  depthwise_impl: str = "auto"
  conv_impl: str = "auto"
  # Recompute each block in the backward pass instead of storing its activations.
  remat: bool = False
  # Run the batch through the backbone as this many independent parts (None: the
  # family's choice for the backend, see auto_batch_parts).
  batch_parts: int | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  # The spectral_impl values the family's token mixers know.
  spectral_impls: ClassVar[tuple[str, ...]] = platform.SPECTRAL_IMPLS

  def __post_init__(self):
    # Wrong option values fail when the model is built, not when first called.
    platform.check_option("spectral_impl", self.spectral_impl, self.spectral_impls)
    platform.check_option("depthwise_impl", self.depthwise_impl, platform.DEPTHWISE_IMPLS)
    platform.check_option("conv_impl", self.conv_impl, platform.STRIDED_CONV_IMPLS)
    super().__post_init__()

  # -- what a family defines ----------------------------------------------------------

  def downsampling(self) -> list[ModuleDef]:
    raise NotImplementedError

  def stage_parts(self) -> list[StageParts]:
    raise NotImplementedError

  def out_norm(self) -> nn.Module:
    raise NotImplementedError

  def setup_head(self) -> None:
    raise NotImplementedError

  def forward_head(self, x: jax.Array, pre_logits: bool = False,
                   train: bool = False) -> jax.Array:
    """The head on forward_features' output; `pre_logits=True` stops before the
    classifier (the pooled, normalised features)."""
    raise NotImplementedError

  def auto_batch_parts(self) -> int | None:
    """batch_parts=None: None lets ops.batching choose for the backend."""
    return None

  # -- the shared model ---------------------------------------------------------------

  @property
  def feature_info(self) -> list[dict]:
    """timm's feature_info: channels (`num_chs`) and stride (`reduction`) of each stage
    a features_only model returns (of all four otherwise)."""
    return layers.feature_info(self.dims, self.out_indices if self.features_only else None)

  def setup(self):
    if not self.out_indices or any(i not in range(len(self.dims)) for i in self.out_indices):
      raise ValueError(f"out_indices={tuple(self.out_indices)}: give stage indices in "
                       f"0..{len(self.dims) - 1}")
    self.backbone = MetaFormerBackbone(
        self.layers, self.downsampling(), self.stage_parts(), self.mlp_ratio,
        self.drop_path_rate, self.remat, self.param_dtype)
    if self.features_only:
      self.out_norms = [self.out_norm() for _ in self.dims]
    else:
      self.setup_head()

  def stage_features(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
    """The four stage outputs (B, H/4, W/4, C0) ... (B, H/32, W/32, C3), through the
    per-stage norms when features_only."""
    parts = self.batch_parts if self.batch_parts is not None else self.auto_batch_parts()
    if parts is None and self.is_mutable_collection("intermediates"):
      # Captured or sown intermediates then hold the whole batch, one entry per call,
      # as they would without parts (each part records its own otherwise).
      parts = 1
    features = batching.in_batch_parts(lambda part: self.backbone(part, train), x, parts)
    if self.features_only:
      features = tuple(norm(f) for norm, f in zip(self.out_norms, features))
    return features

  def forward_features(self, x: jax.Array, train: bool = False) -> jax.Array:
    """The last stage's output (B, H/32, W/32, C3), before the head (timm's
    forward_features)."""
    if self.features_only:
      raise ValueError("a features_only model has no head: its __call__ returns the stage maps")
    return self.stage_features(x, train)[-1]

  def __call__(self, x: jax.Array, train: bool = False):
    if self.features_only:
      features = self.stage_features(x, train)
      return tuple(features[i] for i in self.out_indices)
    return self.forward_head(self.forward_features(x, train), train=train)
