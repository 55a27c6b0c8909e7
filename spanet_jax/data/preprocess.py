"""Evaluation preprocessing (docs/architecture.md): resize the shorter side to floor(size / crop_pct)
with bicubic interpolation, centre crop, scale to [0, 1], normalise. NHWC float32.

It reproduces timm's eval transform (PIL resize, torchvision's crop arithmetic), so
the same photograph gives the same tensor here and in the official pipeline.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from spanet_jax import errors

_RESAMPLE = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST"}

# Colour photographs that ship inside scikit-image (no download needed).
SAMPLE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
                 "motorcycle_left.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png")


class ImageError(errors.UserError):
  """An image file that cannot be opened or decoded."""


def load_image(path: str):
  """Open an image file as an RGB PIL image."""

  if not os.path.isfile(path):
    raise ImageError(f"no such image: {path}")
  try:
    with Image.open(path) as image:
      return to_rgb(image)
  except Image.DecompressionBombError as err:  # a few KB claiming gigapixels
    raise ImageError(f"refusing {path}: {err}") from None
  except (UnidentifiedImageError, OSError, ValueError) as err:
    raise ImageError(f"cannot decode {path} as an image: {err}") from None


def to_rgb(image):
  """A PIL image of any mode -> an RGB PIL image of its content.

  PIL's own conversion clips the wide single-channel modes to 0..255, which turns a
  16-bit grey photograph white. Here they are scaled instead: 16-bit integers keep
  their high byte (what PIL does with a 16-bit RGB PNG); 32-bit integers with values
  in 0..65535 (PIL's mode for 16-bit data from some formats) likewise, wider ones
  from 0..2**32-1; floats in [0, 1] are multiplied by 255, other float ranges map
  linearly from their minimum and maximum.

  Raises:
    ValueError: a float image holding NaN or infinity.
  """

  if image.mode == "RGB":
    return image.copy()
  if not (image.mode.startswith("I") or image.mode == "F"):
    return image.convert("RGB")
  values = np.asarray(image)
  if image.mode == "F":
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
      raise ValueError("the image holds NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0:
      grey = np.rint(values * 255.0)
    else:
      grey = np.rint((values - low) * (255.0 / max(high - low, 1e-30)))
  else:
    values = values.astype(np.int64)
    if values.size and values.min() >= 0 and values.max() <= 0xFFFF:
      grey = values >> 8
    else:
      grey = np.clip(values, 0, 0xFFFFFFFF) >> 24
  grey = np.clip(grey, 0, 255).astype(np.uint8)
  return Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")


# The shorter side is resized first, so an extreme aspect ratio makes a huge image
# (a 1x20000 strip: 248 x 4,960,000 pixels, GBs). Refused above this many pixels,
# an aspect ratio of about 270:1 at 224 px; photographs are far below.
MAX_RESIZED_PIXELS = 1 << 24


def eval_pixels(image, input_size: int = 224, crop_pct: float = 0.9,
                interpolation: str = "bicubic") -> np.ndarray:
  """A PIL RGB image -> its resized, centre-cropped uint8 pixels, as timm's eval
  transform computes them before ToTensor.

  Args:
    image: an RGB PIL image.
    input_size: side of the square crop.
    crop_pct: the shorter side is first resized to floor(input_size / crop_pct).
    interpolation: "bicubic", "bilinear" or "nearest".

  Returns:
    (input_size, input_size, 3) uint8 array.

  Raises:
    ImageError: the resized image would exceed MAX_RESIZED_PIXELS (an aspect ratio no
      photograph has). Cropping first would bound the memory but not give PIL's
      pixels, so such images are refused rather than prepared differently.
  """

  scale_size = math.floor(input_size / crop_pct)
  width, height = image.size
  if width <= height:
    new_size = (scale_size, int(scale_size * height / width))
  else:
    new_size = (int(scale_size * width / height), scale_size)
  if new_size[0] * new_size[1] > MAX_RESIZED_PIXELS:
    raise ImageError(
        f"a {width}x{height} image has an aspect ratio of "
        f"{max(width, height) / min(width, height):.0f}:1; resizing its shorter side to "
        f"{scale_size} px would make a {new_size[0]}x{new_size[1]} image, above the "
        f"{MAX_RESIZED_PIXELS:,}-pixel limit (about "
        f"{MAX_RESIZED_PIXELS / scale_size ** 2:.0f}:1 at this size)")
  image = image.resize(new_size, getattr(Image.Resampling, _RESAMPLE[interpolation]))
  width, height = image.size
  top = int(round((height - input_size) / 2.0))
  left = int(round((width - input_size) / 2.0))
  return np.asarray(image.crop((left, top, left + input_size, top + input_size)), np.uint8)


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 pixels -> (pixels / 255 - mean) / std in float32, in that order of operations
  (data.eval_batches repeats it in TensorFlow and gets the same bits)."""
  pixels = np.asarray(pixels, dtype=np.float32) / np.float32(255.0)
  return ((pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def eval_transform(image, input_size: int = 224, crop_pct: float = 0.9,
                   mean: Sequence[float] = (0.485, 0.456, 0.406),
                   std: Sequence[float] = (0.229, 0.224, 0.225),
                   interpolation: str = "bicubic") -> np.ndarray:
  """A PIL image -> normalised (input_size, input_size, 3) float32 array."""
  return normalize(eval_pixels(image, input_size, crop_pct, interpolation), mean, std)

@dataclasses.dataclass(frozen=True)
class DataConfig:
  """How images must be prepared for a model (timm's eval transform settings)."""
  input_size: int
  crop_pct: float
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  interpolation: str = "bicubic"

  def transform(self, image) -> np.ndarray:
    """A PIL image -> the normalised (size, size, 3) float32 array the model expects."""
    return eval_transform(image, self.input_size, self.crop_pct, self.mean, self.std,
                          self.interpolation)


def sample_photo_paths() -> list[str]:
  """Paths of real photographs shipped with scikit-image."""
  import skimage  # pylint: disable=g-import-not-at-top

  data_dir = os.path.join(os.path.dirname(skimage.__file__), "data")
  return [os.path.join(data_dir, name) for name in SAMPLE_PHOTOS]
