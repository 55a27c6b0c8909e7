"""A PyTorch reference of SPANet, written from docs/architecture.md.

Its state_dict keys and shapes are those of the official checkpoints, so an official
`.pth` loads into it with strict=True. It computes the spectral filter the official
way (full FFT, fftshift, stored centred mask, padded or cropped to other feature
sizes around the centre with the high-pass value) and is what the converter's
--verify and the parity tests compare the Flax models against. NCHW, CPU, float32.

torch is imported here only; `import spanet_jax` does not need it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from spanet_jax.models import spectral


class GroupNorm1(nn.GroupNorm):
  def __init__(self, channels: int):
    super().__init__(1, channels, eps=1e-5)


class Scale(nn.Module):
  def __init__(self, channels: int):
    super().__init__()
    self.scale = nn.Parameter(torch.ones(channels))

  def forward(self, x):
    return x * self.scale[:, None, None]


class DropPath(nn.Module):
  def __init__(self, rate: float):
    super().__init__()
    self.rate = rate

  def forward(self, x):
    if not self.training or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class PatchEmbed(nn.Module):
  def __init__(self, in_channels, out_channels, kernel, stride, padding):
    super().__init__()
    self.proj = nn.Conv2d(in_channels, out_channels, kernel, stride, padding)

  def forward(self, x):
    return self.proj(x)


class SPF(nn.Module):
  """Spectral pooling filter with a stored centred mask (a frozen parameter)."""

  def __init__(self, size: int, radius: float, lamb: float):
    super().__init__()
    mask = torch.tensor(spectral.centred_mask(size, size, radius, lamb))
    self.filter = nn.Parameter(mask[None], requires_grad=False)

  def mask_for(self, height: int, width: int) -> torch.Tensor:
    mask = self.filter
    pad_h, pad_w = height - mask.shape[1], width - mask.shape[2]
    if pad_h or pad_w:
      # Official behaviour: pad (or crop) around the centre with the corner value,
      # the odd pixel going to the left/top. (The official module also writes the
      # result back into itself; this reference does not.)
      padding = (pad_w // 2 + pad_w % 2, pad_w // 2, pad_h // 2 + pad_h % 2, pad_h // 2)
      mask = F.pad(mask, padding, mode="constant", value=float(mask[0, 0, 0]))
    return mask

  def forward(self, x):
    height, width = x.shape[-2:]
    spectrum = torch.fft.fftshift(torch.fft.fft2(x, dim=(-2, -1), norm="ortho"), dim=(-2, -1))
    spectrum = spectrum * self.mask_for(height, width)
    y = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1)), dim=(-2, -1), norm="ortho")
    return y.real.to(x.dtype)


class SPAM(nn.Module):
  def __init__(self, dim: int, kernel_size: int, mask_size: int, radius: float):
    super().__init__()
    k = kernel_size
    self.proj_in = nn.Conv2d(dim, dim, 1)
    self.conv = nn.Sequential(
        nn.Conv2d(dim, dim, (1, k), padding=(0, k // 2), groups=dim),
        nn.Conv2d(dim, dim, (k, 1), padding=(k // 2, 0), groups=dim))
    self.proj_out = nn.Conv2d(dim, dim, 1)
    self.sps = nn.ModuleList(SPF(mask_size, radius, lamb) for lamb in spectral.SPAM_LAMBDAS)
    sizes = spectral.chunk_sizes(dim, len(spectral.SPAM_LAMBDAS))
    self.pws = nn.ModuleList(nn.Conv2d(size, dim, 1) for size in sizes)

  def forward(self, x):
    x = self.conv(self.proj_in(x))
    chunks = torch.chunk(x, len(self.sps), dim=1)
    ctx = sum(pw(sp(chunk)) for sp, pw, chunk in zip(self.sps, self.pws, chunks))
    return self.proj_out(x * ctx)


class Mlp(nn.Module):
  def __init__(self, dim: int, hidden: int, drop: float):
    super().__init__()
    self.fc1 = nn.Conv2d(dim, hidden, 1)
    self.act = nn.GELU()
    self.fc2 = nn.Conv2d(hidden, dim, 1)
    self.drop = nn.Dropout(drop)
    for conv in (self.fc1, self.fc2):
      nn.init.trunc_normal_(conv.weight, std=0.02)
      nn.init.zeros_(conv.bias)

  def forward(self, x):
    return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SPANetBlock(nn.Module):
  def __init__(self, dim, kernel_size, mask_size, radius, mlp_ratio, drop, drop_path,
               res_scale):
    super().__init__()
    self.norm1 = GroupNorm1(dim)
    self.token_mixer = SPAM(dim, kernel_size, mask_size, radius)
    self.norm2 = GroupNorm1(dim)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
    self.drop_path = DropPath(drop_path)
    self.res_scale1 = Scale(dim) if res_scale else nn.Identity()
    self.res_scale2 = Scale(dim) if res_scale else nn.Identity()

  def forward(self, x):
    x = self.res_scale1(x) + self.drop_path(self.token_mixer(self.norm1(x)))
    return self.res_scale2(x) + self.drop_path(self.mlp(self.norm2(x)))


class SPANet(nn.Module):
  """The official module's structure; `fork_feat=True` is the dense-prediction backbone."""

  def __init__(self, layers: Sequence[int] = (4, 4, 12, 4),
               dims: Sequence[int] = (64, 128, 320, 512),
               radii: Sequence[float] = (2, 2, 1, 1),
               mask_sizes: Sequence[int] = (56, 28, 14, 7),
               res_scale_stages: Sequence[bool] = (False, False, True, True),
               mlp_ratio: float = 4.0, kernel_size: int = 7, num_classes: int = 1000,
               fork_feat: bool = False, drop_rate: float = 0.0,
               drop_path_rate: float = 0.0):
    super().__init__()
    self.fork_feat = fork_feat
    self.patch_embed = PatchEmbed(3, dims[0], 7, 4, 2)
    network = []
    total, index = sum(layers), 0
    for i, depth in enumerate(layers):
      blocks = []
      for _ in range(depth):
        rate = drop_path_rate * index / max(total - 1, 1)
        blocks.append(SPANetBlock(dims[i], kernel_size, mask_sizes[i], radii[i], mlp_ratio,
                                  drop_rate, rate, res_scale_stages[i]))
        index += 1
      network.append(nn.Sequential(*blocks))
      if i < len(layers) - 1:
        network.append(PatchEmbed(dims[i], dims[i + 1], 3, 2, 1))
    self.network = nn.ModuleList(network)
    if fork_feat:
      for i, dim in enumerate(dims):
        self.add_module(f"norm{2 * i}", GroupNorm1(dim))
    else:
      self.norm = GroupNorm1(dims[-1])
      self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
      if num_classes > 0:
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

  def stage_features(self, x):
    outputs = []
    x = self.patch_embed(x)
    for index, module in enumerate(self.network):
      x = module(x)
      if index % 2 == 0:
        outputs.append(getattr(self, f"norm{index}")(x) if self.fork_feat else x)
    return outputs

  def forward(self, x):
    features = self.stage_features(x)
    if self.fork_feat:
      return features
    return self.head(self.norm(features[-1]).mean((-2, -1)))


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
  """Give every parameter random, non-trivial values (norm weights far from 1, biases and
  res scales away from their init, learned masks far from 0) so that a layout mistake
  changes the output. Works on SPANet and SPANetV2 references alike."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if not param.requires_grad:
        continue  # the spectral masks stay the formula's
      if ".filter_" in name:  # SPANetV2's learned masks: spread them across the sigmoid
        param.copy_(torch.randn(param.shape, generator=generator))
      elif name.endswith("scale") or (param.ndim == 1 and "norm" in name
                                      and name.endswith("weight")):
        param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
      elif param.ndim == 1:
        param.copy_(0.1 * torch.randn(param.shape, generator=generator))
      else:
        fan_in = math.prod(param.shape[1:])
        param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(fan_in))
  return model
