"""Write a class-per-folder set of real JPEG photographs for the input-pipeline benchmark.

ImageNet is not needed: the colour photographs that scikit-image and scikit-learn ship
are cut into many different 4:3 views (random region, flip, exposure), resized to
500x375 (the size of a typical ImageNet training image) and saved as JPEG at quality
90, one class per source photograph:

  python benchmarks/make_photo_folder.py --out /tmp/photos --train 2000 --val 200

gives /tmp/photos/train/<class>/*.jpg and /tmp/photos/val/<class>/*.jpg, the layout
`--config.folder` and `benchmarks/input_pipeline.py --folder` read.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image

from spanet_jax.data import preprocess

# Colour photographs (scikit-image's data folder, then scikit-learn's two).
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
          "motorcycle_left.png", "retina.jpg", "rocket.jpg")
SIZE = (500, 375)


def photo_paths() -> list[str]:
  import skimage  # pylint: disable=g-import-not-at-top
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  skimage_dir = os.path.join(os.path.dirname(skimage.__file__), "data")
  sklearn_dir = os.path.join(os.path.dirname(datasets.__file__), "images")
  return ([os.path.join(skimage_dir, name) for name in PHOTOS]
          + [os.path.join(sklearn_dir, name) for name in ("china.jpg", "flower.jpg")])


def random_view(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
  """A random 4:3 region covering 30-100% of the largest one, flipped half the time,
  with its exposure scaled by 0.8-1.2."""
  width, height = photo.size
  full_w = min(width, height * 4 / 3)
  scale = np.sqrt(rng.uniform(0.3, 1.0))
  w, h = full_w * scale, full_w * scale * 3 / 4
  left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
  view = photo.resize(SIZE, Image.BICUBIC, box=(left, top, left + w, top + h))
  if rng.random() < 0.5:
    view = view.transpose(Image.FLIP_LEFT_RIGHT)
  gain = rng.uniform(0.8, 1.2)
  return view.point(lambda v: min(255, int(v * gain + 0.5)))


def write_split(root: str, count: int, photos: list[Image.Image], seed: int) -> None:
  rng = np.random.default_rng(seed)
  for index in range(count):
    label = index % len(photos)
    folder = os.path.join(root, f"class{label:02d}")
    os.makedirs(folder, exist_ok=True)
    random_view(photos[label], rng).save(os.path.join(folder, f"{index:06d}.jpg"), quality=90)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="folder to create (must not exist)")
  parser.add_argument("--train", type=int, default=2000, help="training images")
  parser.add_argument("--val", type=int, default=200, help="validation images")
  args = parser.parse_args(argv)
  if os.path.exists(args.out):
    print(f"error: {args.out} exists; name a new folder", file=sys.stderr)
    return 2
  photos = [preprocess.load_image(path) for path in photo_paths()]
  write_split(os.path.join(args.out, "train"), args.train, photos, seed=0)
  write_split(os.path.join(args.out, "val"), args.val, photos, seed=1)
  print(f"wrote {args.train} training and {args.val} validation images of {SIZE[0]}x{SIZE[1]} "
        f"in {len(photos)} classes under {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
