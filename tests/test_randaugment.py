"""RandAugment ops against PIL (the library timm's policy runs on) and the policy itself."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from spanet_jax.data import preprocess, randaugment


@pytest.fixture(scope="module")
def photo():
  """A real photograph, 48 x 64, as uint8."""
  image = preprocess.load_image(preprocess.sample_photo_paths()[1]).resize((64, 48))
  return np.asarray(image)


def ours(fn, photo, *args):
  return fn(tf.constant(photo, tf.float32), *args).numpy()


def assert_close_to_pil(got, want, tolerance=1):
  diff = np.abs(got.astype(np.float64) - np.asarray(want, np.float64))
  assert diff.max() <= tolerance, diff.max()


def test_photometric_ops_match_pil(photo):
  pil = Image.fromarray(photo)
  assert_close_to_pil(ours(randaugment.auto_contrast, photo), ImageOps.autocontrast(pil))
  assert_close_to_pil(ours(randaugment.equalize, photo), ImageOps.equalize(pil))
  assert_close_to_pil(ours(randaugment.invert, photo), ImageOps.invert(pil), 0)
  assert_close_to_pil(ours(randaugment.posterize, photo, 3), ImageOps.posterize(pil, 3), 0)
  assert_close_to_pil(ours(randaugment.solarize, photo, 100.0), ImageOps.solarize(pil, 100), 0)
  added = np.where(photo < 128, np.minimum(photo.astype(int) + 50, 255), photo)
  assert_close_to_pil(ours(randaugment.solarize_add, photo, 50.0), added, 0)


@pytest.mark.parametrize("factor", [0.3, 1.0, 1.8])
@pytest.mark.parametrize("op,enhancer", [
    (randaugment.color, ImageEnhance.Color), (randaugment.contrast, ImageEnhance.Contrast),
    (randaugment.brightness, ImageEnhance.Brightness),
    (randaugment.sharpness, ImageEnhance.Sharpness)])
def test_enhance_ops_match_pil(op, enhancer, factor, photo):
  want = enhancer(Image.fromarray(photo)).enhance(factor)
  assert_close_to_pil(ours(op, photo, factor), want, tolerance=2)


def test_geometric_ops_move_pixels_as_pil(photo):
  pil = Image.fromarray(photo)
  fill = (128, 128, 128)
  assert_close_to_pil(ours(randaugment.translate_x, photo, 10.0),
                      pil.transform(pil.size, Image.AFFINE, (1, 0, 10, 0, 1, 0), fillcolor=fill), 0)
  assert_close_to_pil(ours(randaugment.translate_y, photo, -7.0),
                      pil.transform(pil.size, Image.AFFINE, (1, 0, 0, 0, 1, -7), fillcolor=fill), 0)
  square = photo[:, 8:56]  # 48 x 48: a quarter turn keeps the frame
  rotated = ours(randaugment.rotate, square, 90.0)
  np.testing.assert_array_equal(rotated, np.asarray(Image.fromarray(square).rotate(90)))
  sheared = ours(randaugment.shear_x, photo, 0.2)
  want = pil.transform(pil.size, Image.AFFINE, (1, 0.2, 0, 0, 1, 0), fillcolor=fill)
  # PIL and TF disagree on at most one edge row of the 48 (fill vs last pixel).
  assert np.mean(np.abs(sheared - np.asarray(want, np.float32)).max(-1) > 0) <= 1 / 48
  np.testing.assert_array_equal(ours(randaugment.shear_y, photo, 0.0), photo)


def test_spec_parsing():
  spec = randaugment.RandAugmentSpec("rand-m9-mstd0.5-inc1")
  assert (spec.num_layers, spec.magnitude, spec.magnitude_std) == (2, 9.0, 0.5)
  with pytest.raises(ValueError, match="cannot read 'x7'"):
    randaugment.RandAugmentSpec("rand-m9-x7-inc1")
  with pytest.raises(ValueError, match="only the inc1"):
    randaugment.RandAugmentSpec("rand-m9")


def test_policy_is_stateless_and_changes_images(photo):
  spec = randaugment.RandAugmentSpec("rand-m9-mstd0.5-inc1")
  image = tf.constant(photo, tf.float32)
  a = randaugment.rand_augment(image, tf.constant([1, 2], tf.int64), spec).numpy()
  b = randaugment.rand_augment(image, tf.constant([1, 2], tf.int64), spec).numpy()
  np.testing.assert_array_equal(a, b)
  outputs = [randaugment.rand_augment(image, tf.constant([s, 0], tf.int64), spec).numpy()
             for s in range(40)]
  changed = sum(not np.array_equal(o, photo) for o in outputs)
  assert 20 <= changed <= 40  # two rounds at p = 0.5: about 3 in 4 images change
  assert all(o.shape == photo.shape and o.min() >= 0 and o.max() <= 255 for o in outputs)
