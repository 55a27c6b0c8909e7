"""The device half of the training transform: normalisation and timm's random erasing
per image, then mixup and cutmix with label smoothing (timm's Mixup semantics: one
lambda per batch, the batch mixed with its reverse)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def normalize(images: jax.Array, mean, std) -> jax.Array:
  """uint8 (or 0-255 float) NHWC images -> (x / 255 - mean) / std, float32."""
  scale = jnp.asarray([1.0 / (255.0 * s) for s in std], jnp.float32)
  offset = jnp.asarray([-m / s for m, s in zip(mean, std)], jnp.float32)
  return images.astype(jnp.float32) * scale + offset


def random_erasing(key: jax.Array, images: jax.Array, probability: float,
                   area=(0.02, 1 / 3), log_ratio=(math.log(0.3), math.log(1 / 0.3)),
                   attempts: int = 10) -> jax.Array:
  """timm's RandomErasing (mode "pixel", one box) on normalised NHWC images: each image,
  with `probability`, gets one box whose area fraction and aspect ratio are drawn from
  the ranges (the first of `attempts` draws that fits) filled with N(0, 1) noise per
  pixel and channel."""
  if probability <= 0:
    return images
  batch, height, width, _ = images.shape
  k_apply, k_box, k_noise = jax.random.split(key, 3)
  apply = jax.random.uniform(k_apply, (batch,)) < probability
  draws = jax.random.uniform(k_box, (batch, attempts, 4))
  target = height * width * (area[0] + (area[1] - area[0]) * draws[..., 0])
  ratio = jnp.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[..., 1])
  h = jnp.round(jnp.sqrt(target * ratio)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(target / ratio)).astype(jnp.int32)
  fits = (h < height) & (w < width) & (h > 0) & (w > 0)
  first = jnp.argmax(fits, axis=1)  # the first box that fits, as in timm
  pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]
  h, w = pick(h), pick(w)
  top = (pick(draws[..., 2]) * jnp.maximum(height - h + 1, 1)).astype(jnp.int32)
  left = (pick(draws[..., 3]) * jnp.maximum(width - w + 1, 1)).astype(jnp.int32)
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  inside = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
            & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None]))
  erase = inside & (apply & jnp.any(fits, axis=1))[:, None, None]
  noise = jax.random.normal(k_noise, images.shape, images.dtype)
  return jnp.where(erase[..., None], noise, images)


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box(key: jax.Array, height: int, width: int, lam: jax.Array):
  """A box covering about 1 - lam of the image, centred uniformly (may be clipped);
  returns the (H, W) 0/1 mask of the box and the exact kept fraction."""
  cut = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = jnp.round(height * cut), jnp.round(width * cut)
  ky, kx = jax.random.split(key)
  cy = jax.random.randint(ky, (), 0, height).astype(jnp.float32)
  cx = jax.random.randint(kx, (), 0, width).astype(jnp.float32)
  top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  kept = 1.0 - (bottom - top) * (right - left) / (height * width)
  return box, kept


def mix_batch(key: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int,
              mixup_alpha: float, cutmix_alpha: float, switch_prob: float,
              smoothing: float) -> tuple[jax.Array, jax.Array]:
  """Mixup or cutmix (chosen per batch) of NHWC images; returns images and soft targets."""
  targets = smooth_one_hot(labels, num_classes, smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  k_switch, k_mixup, k_cutmix, k_box = jax.random.split(key, 4)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mixup = jax.random.beta(k_mixup, max(mixup_alpha, 1e-3), max(mixup_alpha, 1e-3))
  lam_cutmix = jax.random.beta(k_cutmix, max(cutmix_alpha, 1e-3), max(cutmix_alpha, 1e-3))
  flipped = images[::-1]
  box, kept = cutmix_box(k_box, images.shape[1], images.shape[2], lam_cutmix)
  cut_images = jnp.where(box[None, :, :, None], flipped, images)
  mixed_images = lam_mixup * images + (1.0 - lam_mixup) * flipped
  images = jnp.where(use_cutmix, cut_images, mixed_images.astype(images.dtype))
  lam = jnp.where(use_cutmix, kept, lam_mixup)
  return images, lam * targets + (1.0 - lam) * targets[::-1]
