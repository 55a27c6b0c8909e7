"""The host half of the official recipe's training transform, in TensorFlow for
tf.data: timm's RandomResizedCrop (bicubic), horizontal flip and RandAugment, each a
stateless function of an explicit seed. Normalisation and random erasing run on the
device, in the training step.

Written for throughput on the host's cores: a JPEG is decoded only inside its crop
window (libjpeg skips the rest), RandAugment works on the 224 x 224 result with 8-bit
values, as timm applies it to the PIL image, and runs only the op it draws, when its
coin says so.

The resize is bicubic (PIL's kernel, a = -0.5). timm resizes with PIL, which widens the
kernel by the scale when it shrinks an image (antialiasing); `resize_antialias=True`
does exactly that (`resize_like_pil`, within 1 of PIL), at about a third of the
throughput on CPU. The default, as in the Flax ImageNet example and big_vision, is
TensorFlow's bicubic without the widening: the same as PIL's where the crop is enlarged,
sharper where it is shrunk.
"""

from __future__ import annotations

import math

import tensorflow as tf

from spanet_jax.data import randaugment, settings


def sample_crop(height, width, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                attempts: int = 10):
  """torchvision's RandomResizedCrop.get_params (timm's too): (top, left, h, w).

  Up to `attempts` draws of an area fraction uniform in `scale` and an aspect ratio
  log-uniform in `ratio`; the first box that fits wins, else the centre crop with the
  ratio clamped into range."""
  area = tf.cast(height * width, tf.float32)
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  draws = tf.random.stateless_uniform((attempts, 4), seed)
  target = area * (scale[0] + (scale[1] - scale[0]) * draws[:, 0])
  aspect = tf.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[:, 1])
  # Python's round() (half to even), as torchvision's int(round(...)).
  w = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
  h = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  top = tf.cast(draws[first, 2] * tf.cast(height - h[first] + 1, tf.float32), tf.int32)
  left = tf.cast(draws[first, 3] * tf.cast(width - w[first] + 1, tf.float32), tf.int32)
  drawn = tf.stack([top, left, h[first], w[first]])

  # Fallback: the whole image, its aspect ratio clamped into `ratio`.
  height_f, width_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  in_ratio = width_f / height_f
  fw = tf.where(in_ratio < ratio[0], width, tf.where(
      in_ratio > ratio[1], tf.cast(tf.round(height_f * ratio[1]), tf.int32), width))
  fh = tf.where(in_ratio < ratio[0], tf.cast(tf.round(width_f / ratio[0]), tf.int32),
                height)
  centre = tf.stack([(height - fh) // 2, (width - fw) // 2, fh, fw])
  return tf.where(tf.reduce_any(fits), drawn, centre)


def decode_random_crop(encoded, seed, scale, ratio):
  """Decode the RandomResizedCrop window of an encoded image as uint8 RGB.

  JPEGs are decoded only inside the window; other formats (PNG, BMP, GIF) whole, then
  cropped. Grey images become RGB, alpha is dropped."""
  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)
    window = sample_crop(shape[0], shape[1], seed, scale, ratio)
    return tf.io.decode_and_crop_jpeg(encoded, window, channels=3)

  def other():
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    shape = tf.shape(image)
    top, left, h, w = tf.unstack(sample_crop(shape[0], shape[1], seed, scale, ratio))
    return image[top:top + h, left:left + w]

  return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def _bicubic(x):
  """PIL's bicubic kernel (a = -0.5)."""
  x = tf.abs(x)
  a = -0.5
  inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  outer = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return tf.where(x < 1.0, inner, tf.where(x < 2.0, outer, tf.zeros_like(x)))


def _resample_taps(in_size, out_size: int):
  """PIL's resampling coefficients (Resample.c, precompute_coeffs) for an input axis of
  `in_size` onto `out_size`: the input positions each output reads, and their weights.
  Downscaling widens the kernel by the scale (antialiasing)."""
  scale = tf.cast(in_size, tf.float32) / out_size
  filter_scale = tf.maximum(scale, 1.0)
  support = 2.0 * filter_scale
  taps_per_output = 2 * tf.cast(tf.math.ceil(support), tf.int32) + 1
  centre = (tf.range(out_size, dtype=tf.float32) + 0.5) * scale
  first = tf.maximum(tf.cast(tf.floor(centre - support + 0.5), tf.int32), 0)
  end = tf.minimum(tf.cast(tf.floor(centre + support + 0.5), tf.int32), in_size)
  taps = first[:, None] + tf.range(taps_per_output)[None, :]
  weights = _bicubic((tf.cast(taps, tf.float32) - centre[:, None] + 0.5) / filter_scale)
  weights *= tf.cast(taps < end[:, None], tf.float32)
  weights /= tf.reduce_sum(weights, axis=1, keepdims=True)
  return tf.minimum(taps, in_size - 1), weights


def _resample_rows(rows, out_size: int):
  """Resample axis 0 of a 2-D array; rows are gathered whole (contiguous copies)."""
  taps, weights = _resample_taps(tf.shape(rows)[0], out_size)
  gathered = tf.gather(rows, taps)  # (out, taps, row)
  mixed = tf.matmul(weights[:, None, :], gathered)[:, 0]
  # PIL rounds each pass to 8 bits.
  return tf.clip_by_value(tf.floor(mixed + 0.5), 0.0, 255.0)


def _resize_columns_then_rows(image, size: int):
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  columns = tf.reshape(tf.transpose(image, (1, 0, 2)), (width, height * 3))
  columns = tf.reshape(_resample_rows(columns, size), (size, height, 3))
  rows = tf.reshape(tf.transpose(columns, (1, 0, 2)), (height, size * 3))
  return tf.reshape(_resample_rows(rows, size), (size, size, 3))


def _resize_rows_then_columns(image, size: int):
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  rows = tf.reshape(_resample_rows(tf.reshape(image, (height, width * 3)), size),
                    (size, width, 3))
  columns = tf.reshape(tf.transpose(rows, (1, 0, 2)), (width, size * 3))
  return tf.transpose(tf.reshape(_resample_rows(columns, size), (size, size, 3)), (1, 0, 2))


def resize_like_pil(image, size: int):
  """PIL's Image.resize((size, size), BICUBIC) of an (h, w, 3) image with 8-bit values,
  as two passes each rounded to 8 bits. Pillow resizes the width first, except when it
  widens the width and shrinks the height (found by comparing the two orders with
  Pillow); so do we. Float32 result with integer values, within 1 of PIL's (its
  coefficients are fixed-point)."""
  image = tf.cast(image, tf.float32)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  return tf.cond((width < size) & (height > size),
                 lambda: _resize_rows_then_columns(image, size),
                 lambda: _resize_columns_then_rows(image, size))


def train_transform(encoded, seed, config: settings.TrainInput):
  """Encoded image -> the recipe's (size, size, 3) uint8 training image: crop, resize,
  flip, RandAugment. Normalisation and random erasing follow on the device
  (`augment.normalize`, `augment.random_erasing`): a quarter of the bytes to move, and
  no per-pixel noise drawn on the host."""
  crop_seed, flip_seed, augment_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  size = config.image_size
  image = decode_random_crop(encoded, crop_seed, tuple(config.crop_scale),
                             tuple(config.crop_ratio))
  if config.resize_antialias:
    image = resize_like_pil(image, size)
  else:  # PIL's kernel without the widening when shrinking: 3-4x faster on CPU
    image = tf.image.resize(image, (size, size), method="bicubic")
    image = tf.clip_by_value(tf.round(image), 0.0, 255.0)  # 8-bit values, as PIL's
  if config.hflip > 0:
    flip = tf.random.stateless_uniform((), flip_seed) < config.hflip
    image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
  if config.randaugment:
    spec = randaugment.RandAugmentSpec(config.randaugment)
    image = randaugment.rand_augment(image, augment_seed, spec)
  return tf.ensure_shape(tf.cast(image, tf.uint8), (size, size, 3))
