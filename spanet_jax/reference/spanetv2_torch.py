"""A PyTorch reference of SPANetV2, written from docs/architecture.md, SPANetV2.

State_dict keys and shapes are those of the official checkpoints (an official `.pth`
loads with strict=True). Blocks work channels-last, as the official model does; the
learned masks are resized with F.interpolate(bicubic, align_corners=True) at other
feature sizes. What the converter's --verify and the parity tests compare against.

torch is imported here only; `import spanet_jax` does not need it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from spanet_jax.reference.spanet_torch import DropPath


class ChannelsLastLayerNorm(nn.Module):
  """LayerNorm over the last axis; `bias=False` keeps only the weight (SPANetV2's norms)."""

  def __init__(self, channels: int, eps: float, bias: bool):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(channels))
    self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

  def forward(self, x):
    return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class Scale(nn.Module):
  def __init__(self, channels: int):
    super().__init__()
    self.scale = nn.Parameter(torch.ones(channels))

  def forward(self, x):
    return x * self.scale


class StarReLU(nn.Module):
  def __init__(self):
    super().__init__()
    self.scale = nn.Parameter(torch.ones(1))
    self.bias = nn.Parameter(torch.zeros(1))

  def forward(self, x):
    return self.scale * torch.relu(x) ** 2 + self.bias


class Downsampling(nn.Module):
  """NCHW image -> NHWC features (stem), or NHWC -> NHWC at half the size."""

  def __init__(self, in_channels: int, out_channels: int, stem: bool):
    super().__init__()
    self.stem = stem
    if stem:
      self.conv = nn.Conv2d(in_channels, out_channels, 7, stride=4, padding=2)
      self.post_norm = ChannelsLastLayerNorm(out_channels, 1e-6, bias=False)
    else:
      self.pre_norm = ChannelsLastLayerNorm(in_channels, 1e-6, bias=False)
      self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)

  def forward(self, x):
    if self.stem:
      return self.post_norm(self.conv(x).permute(0, 2, 3, 1))
    x = self.pre_norm(x).permute(0, 3, 1, 2)
    return self.conv(x).permute(0, 2, 3, 1)


class ExSPAM(nn.Module):
  def __init__(self, dim: int, size: int, groups: int = 4, expand_ratio: int = 2):
    super().__init__()
    self.groups = groups
    width = dim // groups
    self.query = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.GELU())
    self.ctx = nn.Linear(dim, dim, bias=False)
    for i in range(groups):
      kernel = 3 + 2 * i
      self.add_module(f"local_conv_{i + 1}",
                      nn.Conv2d(width, width, kernel, padding=kernel // 2, groups=width))
      self.register_parameter(f"filter_{i + 1}",
                              nn.Parameter(0.02 * torch.randn(width, size, size // 2 + 1)))
    self.proj = nn.Sequential(
        nn.Conv2d(dim, dim * expand_ratio, 1, groups=width, bias=False),
        nn.GroupNorm(1, dim * expand_ratio),
        nn.GELU(),
        nn.Conv2d(dim * expand_ratio, dim, 1, bias=False))
    self.proj_out = nn.Linear(dim, dim, bias=False)

  def forward(self, x):
    batch, height, width, channels = x.shape
    q = self.query(x)
    ctx = self.ctx(x).permute(0, 3, 1, 2)  # NCHW
    groups = torch.chunk(ctx, self.groups, dim=1)
    filtered = []
    for i, group in enumerate(groups):
      weight = getattr(self, f"filter_{i + 1}")
      if weight.shape[1:] != (height, width // 2 + 1):
        weight = F.interpolate(weight[None], size=(height, width // 2 + 1), mode="bicubic",
                               align_corners=True)[0]
      local = getattr(self, f"local_conv_{i + 1}")(group).float()
      spectrum = torch.fft.rfft2(local, dim=(2, 3), norm="ortho") * torch.sigmoid(weight)
      filtered.append(torch.fft.irfft2(spectrum, s=(height, width), dim=(2, 3), norm="ortho"))
    # Interleave: output channel c * groups + i is channel c of group i.
    mixed = torch.stack(filtered, dim=2).reshape(batch, channels, height, width)
    mixed = self.proj(mixed).permute(0, 2, 3, 1)
    return self.proj_out(q * mixed)


class Attention(nn.Module):
  def __init__(self, dim: int, mix: bool, head_dim: int = 32):
    super().__init__()
    self.head_dim = head_dim
    self.heads = max(dim // head_dim, 1)
    inner = self.heads * head_dim
    self.mix = mix
    self.qkv = nn.Linear(dim, 3 * inner, bias=False)
    if mix:
      self.local_conv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=False)
    self.proj = nn.Linear(inner, dim, bias=False)

  def forward(self, x):
    batch, height, width, _ = x.shape
    tokens = height * width
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim)
    q, k, v = (qkv[:, :, n].transpose(1, 2) for n in range(3))  # (B, heads, N, d)
    weights = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim ** -0.5, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, height, width, -1)
    if self.mix:
      image = v.transpose(1, 2).reshape(batch, height, width, -1).permute(0, 3, 1, 2)
      out = out + self.local_conv(image).permute(0, 2, 3, 1)
    return self.proj(out)


class Mlp(nn.Module):
  def __init__(self, dim: int, hidden: int, drop: float):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden, bias=False)
    self.act = StarReLU()
    self.fc2 = nn.Linear(hidden, dim, bias=False)
    self.drop = nn.Dropout(drop)

  def forward(self, x):
    return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class MlpHead(nn.Module):
  def __init__(self, dim: int, num_classes: int, mlp_ratio: float, dropout: float):
    super().__init__()
    hidden = int(mlp_ratio * dim)
    self.fc1 = nn.Linear(dim, hidden)
    self.norm = nn.LayerNorm(hidden)
    self.dropout = nn.Dropout(dropout)
    self.fc2 = nn.Linear(hidden, num_classes)

  def forward(self, x):
    return self.fc2(self.dropout(self.norm(torch.relu(self.fc1(x)) ** 2)))


TOKEN_MIXERS = ("exspam", "mixattention", "attention")


class Block(nn.Module):
  def __init__(self, dim: int, mixer: str, size: int, mlp_ratio: float, drop: float,
               drop_path: float, res_scale: bool):
    super().__init__()
    # Attribute order fixes the state_dict order: the official one.
    self.norm1 = ChannelsLastLayerNorm(dim, 1e-6, bias=False)
    if mixer not in TOKEN_MIXERS:
      raise ValueError(f"unknown token mixer {mixer!r}: use one of {', '.join(TOKEN_MIXERS)}")
    if mixer == "exspam":
      self.token_mixer = ExSPAM(dim, size)
    else:
      self.token_mixer = Attention(dim, mix=mixer == "mixattention")
    self.res_scale1 = Scale(dim) if res_scale else nn.Identity()
    self.norm2 = ChannelsLastLayerNorm(dim, 1e-6, bias=False)
    self.mlp = Mlp(dim, int(mlp_ratio * dim), drop)
    self.res_scale2 = Scale(dim) if res_scale else nn.Identity()
    self.drop_path = DropPath(drop_path)

  def forward(self, x):
    x = self.res_scale1(x) + self.drop_path(self.token_mixer(self.norm1(x)))
    return self.res_scale2(x) + self.drop_path(self.mlp(self.norm2(x)))


class SPANetV2(nn.Module):
  """NCHW images -> logits; `stage_features` gives the NHWC stage outputs.
  `fork_feat=True` is the official mmdet/mmseg backbone: per-stage LayerNorms (no bias)
  `norm{i}` on the stage outputs, which `forward` returns (NCHW); it keeps the
  classifier's norm and head, unused, as the official module does."""

  def __init__(self, layers: Sequence[int] = (3, 3, 9, 3),
               dims: Sequence[int] = (64, 128, 320, 512),
               token_mixers: Sequence[str] = ("exspam",) * 4,
               filter_sizes: Sequence[int] = (56, 28, 14, 7),
               res_scale_stages: Sequence[bool] = (False, False, True, True),
               mlp_ratio: float = 4.0, num_classes: int = 1000, drop_rate: float = 0.0,
               drop_path_rate: float = 0.0, head_dropout: float = 0.0,
               fork_feat: bool = False):
    super().__init__()
    self.fork_feat = fork_feat
    in_dims = (3,) + tuple(dims)
    self.downsample_layers = nn.ModuleList(
        Downsampling(in_dims[i], dims[i], stem=i == 0) for i in range(len(dims)))
    total, index = sum(layers), 0
    stages = []
    for i, depth in enumerate(layers):
      blocks = []
      for _ in range(depth):
        blocks.append(Block(dims[i], token_mixers[i], filter_sizes[i], mlp_ratio, drop_rate,
                            drop_path_rate * index / max(total - 1, 1), res_scale_stages[i]))
        index += 1
      stages.append(nn.Sequential(*blocks))
    self.stages = nn.ModuleList(stages)
    if fork_feat:  # after the stages: the official state_dict order
      for i, dim in enumerate(dims):
        self.add_module(f"norm{i}", ChannelsLastLayerNorm(dim, 1e-6, bias=False))
    self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
    self.head = (MlpHead(dims[-1], num_classes, mlp_ratio, head_dropout) if num_classes > 0
                 else nn.Identity())

  def stage_features(self, x):
    outputs = []
    for i, (downsample, stage) in enumerate(zip(self.downsample_layers, self.stages)):
      x = stage(downsample(x))
      outputs.append(getattr(self, f"norm{i}")(x) if self.fork_feat else x)
    return outputs

  def forward(self, x):
    if self.fork_feat:
      return [f.permute(0, 3, 1, 2).contiguous() for f in self.stage_features(x)]
    return self.head(self.norm(self.stage_features(x)[-1].mean((1, 2))))
