"""RandAugment as timm's `rand-mM-mstdS-inc1` policy, in TensorFlow for the tf.data
pipeline, stateless (every random draw comes from an explicit seed).

Images are float32 (H, W, 3) in [0, 255]. Each of `num_layers` rounds picks one of
the 15 "increasing" ops uniformly, applies it with probability 0.5, at a magnitude
drawn from N(M, S) clipped to [0, 10]; geometric ops fill with timm's grey
(128, 128, 128) and signed ops flip their sign with probability 0.5.
"""

from __future__ import annotations

import math
import re

import tensorflow as tf

MAX_LEVEL = 10.0
FILL = 128.0  # timm's fill, (128, 128, 128)


class RandAugmentSpec:
  """Parsed `rand-m9-mstd0.5-inc1`-style string (n: layers, m: magnitude, mstd)."""

  def __init__(self, spec: str):
    parts = spec.split("-")
    if parts[0] != "rand":
      raise ValueError(f"randaugment spec {spec!r} must start with 'rand'")
    self.num_layers, self.magnitude, self.magnitude_std, self.increasing = 2, 9.0, 0.0, False
    for part in parts[1:]:
      match = re.fullmatch(r"(mstd|m|n|inc)([\d.]+)", part)
      if not match:
        raise ValueError(f"randaugment spec {spec!r}: cannot read {part!r}")
      key, value = match.groups()
      if key == "m":
        self.magnitude = float(value)
      elif key == "mstd":
        self.magnitude_std = float(value)
      elif key == "n":
        self.num_layers = int(value)
      else:
        self.increasing = bool(int(value))
    if not self.increasing:
      raise ValueError(f"randaugment spec {spec!r}: only the inc1 op set is implemented")


def _blend(degenerate, image, factor):
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _grey(image):
  # ITU-R 601-2 luma, as PIL's convert("L") (rounded like PIL's integer result). A
  # product with the weights: tf.data's reductions over a last axis of 3 are slow.
  pixels = tf.reshape(image, (-1, 3))
  luma = tf.matmul(pixels, tf.constant([[0.299], [0.587], [0.114]]))
  return tf.round(tf.reshape(luma, tf.concat([tf.shape(image)[:-1], [1]], 0)))


def _select(condition, yes, no):
  # tf.where on image-sized operands is several times slower than this in tf.data's
  # CPU kernels (SelectV2's broadcasting path).
  return no + tf.cast(condition, no.dtype) * (yes - no)


def auto_contrast(image):
  low = tf.reduce_min(image, axis=(0, 1), keepdims=True)
  high = tf.reduce_max(image, axis=(0, 1), keepdims=True)
  scale = 255.0 / tf.maximum(high - low, 1e-6)
  stretched = tf.clip_by_value(tf.floor((image - low) * scale), 0.0, 255.0)
  return _select(high > low, stretched, image)


def equalize(image):
  """PIL ImageOps.equalize, per channel."""
  def channel(values):
    values = tf.cast(values, tf.int32)
    histogram = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(histogram, histogram > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    lut = (tf.cumsum(histogram, exclusive=True) + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(lut, 0, 255)
    return tf.cast(tf.where(step > 0, tf.gather(lut, values), values), tf.float32)
  return tf.stack([channel(image[..., c]) for c in range(3)], -1)


def invert(image):
  return 255.0 - image


def posterize(image, bits):
  shift = tf.cast(8 - bits, tf.int32)
  values = tf.cast(image, tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(values, shift), shift), tf.float32)


def solarize(image, threshold):
  return _select(image < threshold, image, 255.0 - image)


def solarize_add(image, addition, threshold=128.0):
  return _select(image < threshold, tf.minimum(image + addition, 255.0), image)


def color(image, factor):
  return _blend(_grey(image), image, factor)


def contrast(image, factor):
  # PIL: blend with the mean of the grey image (its histogram mean, rounded).
  mean = tf.floor(tf.reduce_mean(_grey(image)) + 0.5)
  return _blend(mean, image, factor)


def brightness(image, factor):
  return tf.clip_by_value(factor * image, 0.0, 255.0)


def sharpness(image, factor):
  """PIL ImageEnhance.Sharpness: blend with a 3x3 smoothed copy (border pixels kept)."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = tf.round(smooth)
  degenerate = image + tf.pad(smooth - image[1:-1, 1:-1], [[1, 1], [1, 1], [0, 0]])
  return _blend(degenerate, image, factor)


def _transform(image, matrix):
  """PIL's Image.transform(AFFINE, (a, b, c, d, e, f), NEAREST) with the grey fill:
  output pixel (x, y) reads input (a x + b y + c, d x + e y + f). Matches PIL but for
  the occasional edge row or column (tested)."""
  transform = tf.reshape(tf.concat([matrix, [0.0, 0.0]], 0), [1, 8])
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform, output_shape=tf.shape(image)[:2],
      fill_value=FILL, interpolation="NEAREST", fill_mode="CONSTANT")[0]


def rotate(image, degrees):
  """Counter-clockwise about the centre, as PIL's Image.rotate."""
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  angle = degrees * math.pi / 180.0
  cx, cy = (width - 1) / 2.0, (height - 1) / 2.0  # the centre, in pixel indices
  cos, sin = tf.cos(angle), tf.sin(angle)
  matrix = tf.stack([cos, -sin, cx - cos * cx + sin * cy,
                     sin, cos, cy - sin * cx - cos * cy])
  return _transform(image, matrix)


def shear_x(image, amount):
  return _transform(image, tf.stack([1.0, amount, 0.0, 0.0, 1.0, 0.0]))


def shear_y(image, amount):
  return _transform(image, tf.stack([1.0, 0.0, 0.0, amount, 1.0, 0.0]))


def translate_x(image, pixels):
  return _transform(image, tf.stack([1.0, 0.0, pixels, 0.0, 1.0, 0.0]))


def translate_y(image, pixels):
  return _transform(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, pixels]))


def _signed(value, seed):
  return tf.where(tf.random.stateless_uniform((), seed) < 0.5, -value, value)


def _ops(image, level, sign_seed):
  """The 15 ops of timm's _RAND_INCREASING_TRANSFORMS at a level in [0, 10]."""
  fraction = level / MAX_LEVEL
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  enhance = lambda: 1.0 + _signed(fraction * 0.9, sign_seed)
  return [
      lambda: auto_contrast(image),
      lambda: equalize(image),
      lambda: invert(image),
      lambda: rotate(image, _signed(fraction * 30.0, sign_seed)),
      lambda: posterize(image, 4 - tf.cast(fraction * 4, tf.int32)),
      lambda: solarize(image, 256.0 - tf.floor(fraction * 256.0)),
      lambda: solarize_add(image, tf.floor(fraction * 110.0)),
      lambda: color(image, enhance()),
      lambda: contrast(image, enhance()),
      lambda: brightness(image, enhance()),
      lambda: sharpness(image, enhance()),
      lambda: shear_x(image, _signed(fraction * 0.3, sign_seed)),
      lambda: shear_y(image, _signed(fraction * 0.3, sign_seed)),
      lambda: translate_x(image, _signed(fraction * 0.45 * width, sign_seed)),
      lambda: translate_y(image, _signed(fraction * 0.45 * height, sign_seed)),
  ]


NUM_OPS = 15


def rand_augment(image, seed, spec: RandAugmentSpec):
  """Apply the policy to a float (H, W, 3) image in [0, 255]; stateless in `seed`."""
  seeds = tf.random.experimental.stateless_split(seed, 4 * spec.num_layers)
  shape = image.shape
  for layer in range(spec.num_layers):
    op_seed, prob_seed, level_seed, sign_seed = (seeds[4 * layer + i] for i in range(4))
    op = tf.random.stateless_uniform((), op_seed, 0, NUM_OPS, dtype=tf.int32)
    level = spec.magnitude
    if spec.magnitude_std > 0:
      level = level + spec.magnitude_std * tf.random.stateless_normal((), level_seed)
    level = tf.clip_by_value(tf.cast(level, tf.float32), 0.0, MAX_LEVEL)
    apply = tf.random.stateless_uniform((), prob_seed) < 0.5
    # Only the drawn op runs, and only when its coin says so.
    image = tf.cond(apply,
                    lambda image=image, level=level, sign_seed=sign_seed, op=op:
                    tf.switch_case(op, _ops(image, level, sign_seed)),
                    lambda image=image: image)
    image = tf.ensure_shape(image, shape)
  return image
