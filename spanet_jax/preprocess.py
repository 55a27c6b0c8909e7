"""Evaluation preprocessing (SPEC): resize the shorter side to floor(size / crop_pct)
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

_RESAMPLE = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST"}

# Colour photographs that ship inside scikit-image (no download needed).
SAMPLE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
                 "motorcycle_left.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png")


class ImageError(Exception):
  """An image file that cannot be opened or decoded."""


def load_image(path: str):
  """Open an image file as an RGB PIL image."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(path):
    raise ImageError(f"no such image: {path}")
  try:
    with Image.open(path) as image:
      return image.convert("RGB")
  except (UnidentifiedImageError, OSError, ValueError) as err:
    raise ImageError(f"cannot decode {path} as an image: {err}") from None


def eval_pixels(image, input_size: int = 224, crop_pct: float = 0.9,
                interpolation: str = "bicubic") -> np.ndarray:
  """A PIL RGB image -> its resized, centre-cropped (input_size, input_size, 3) uint8
  pixels, as timm's eval transform computes them before ToTensor."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  scale_size = math.floor(input_size / crop_pct)
  width, height = image.size
  if width <= height:
    new_size = (scale_size, int(scale_size * height / width))
  else:
    new_size = (int(scale_size * width / height), scale_size)
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
