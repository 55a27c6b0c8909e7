"""Batch-level augmentation on device: mixup and cutmix with label smoothing (timm's
Mixup semantics: one lambda per batch, the batch mixed with its reverse)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
