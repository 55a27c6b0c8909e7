"""The input pipeline's hand-written ops and evaluation counting."""

import numpy as np
import pytest
import tensorflow as tf

from configs import default
from spanet_jax import data, preprocess


def erase(image, seed, probability):
  return data.random_erasing(tf.constant(image), tf.constant(seed, tf.int64), probability).numpy()


def test_random_erasing_fills_one_box_with_noise():
  image = np.full((32, 48, 3), 7.0, np.float32)
  for seed in range(20):
    out = erase(image, [seed, 1], 1.0)
    changed = (out != 7.0).any(-1)
    rows, cols = np.nonzero(changed)
    assert changed.any(), seed
    box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.all()  # one filled rectangle
    area = box.size / changed.size
    assert 0.02 * 0.8 <= area <= 1 / 3 * 1.25
    assert abs(float(np.std(out[changed]))) > 0.5  # noise, not a constant


def test_random_erasing_probability_and_determinism():
  image = np.zeros((16, 16, 3), np.float32)
  np.testing.assert_array_equal(erase(image, [0, 0], 0.0), image)
  np.testing.assert_array_equal(erase(image, [3, 4], 1.0), erase(image, [3, 4], 1.0))
  hits = sum(bool((erase(image, [s, 9], 0.25) != 0).any()) for s in range(200))
  assert 30 <= hits <= 70  # about a quarter of 200


def test_eval_batches_count_every_example_once_over_processes(tmp_path):
  config = default.get_config()
  config.dataset, config.data_dir = "sklearn_digits", str(tmp_path)
  builder = data.make_builder(config)
  source = data.make_source(builder, "test")  # 360 examples
  data_config = preprocess.DataConfig(32, 1.0, (0.5,) * 3, (0.5,) * 3)
  seen = []
  counts = []
  for process in range(3):
    batches = list(data.eval_batches(source, data_config, 50, process, 3, prefetch=1))
    counts.append(len(batches))
    for batch, names in batches:
      assert batch["image"].shape == (50, 32, 32, 3)
      assert int(batch["mask"].sum()) == len(names)
      assert (batch["mask"][:len(names)] == 1).all()  # real rows first, padding after
      seen += names
  assert len(set(counts)) == 1  # every process runs the same number of eval steps
  assert len(seen) == len(set(seen)) == 360


def test_eval_images_are_prepared_as_timm_prepares_them(tmp_path):
  """Decoded and resized by PIL: the same array as the eval transform of the same file."""
  from PIL import Image
  root = tmp_path / "val"
  photos = preprocess.sample_photo_paths()[:3]
  for index, path in enumerate(photos):
    (root / f"class{index}").mkdir(parents=True)
    Image.open(path).save(root / f"class{index}" / "photo.png")
  source = data.folder_source(str(root), {"class0": 0, "class1": 1, "class2": 2})
  data_config = preprocess.DataConfig(64, 0.875, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  (batch, names), = list(data.eval_batches(source, data_config, 4, 0, 1, prefetch=1))
  assert [int(label) for label in batch["label"][:3]] == [0, 1, 2]
  for row, name in enumerate(names):
    expected = data_config.transform(preprocess.load_image(name))
    np.testing.assert_array_equal(batch["image"][row], expected)
  assert batch["mask"].tolist() == [1, 1, 1, 0]


def test_missing_dataset_says_what_to_do(tmp_path):
  config = default.get_config()
  config.data_dir, config.manual_dir = str(tmp_path), str(tmp_path / "manual")
  with pytest.raises(data.DataError, match="ILSVRC2012_img_train.tar.*manual"):
    data.make_builder(config)


def test_training_batches_with_the_full_recipe_are_deterministic(tmp_path):
  config = default.get_config()  # RandAugment, random erasing, crop and flip all on
  config.dataset, config.data_dir = "sklearn_digits", str(tmp_path)
  config.image_size, config.prefetch, config.shuffle_buffer = 32, 1, 64
  source = data.make_source(data.make_builder(config), "train")
  first = next(data.train_batches(source, config, 16, (0.5,) * 3, (0.5,) * 3, 0, 0, 1))
  again = next(data.train_batches(source, config, 16, (0.5,) * 3, (0.5,) * 3, 0, 0, 1))
  assert first["image"].shape == (16, 32, 32, 3) and first["label"].shape == (16,)
  np.testing.assert_array_equal(first["image"], again["image"])
  # Resuming at step 3 gives the batch an uninterrupted run sees at step 3.
  stream = data.train_batches(source, config, 16, (0.5,) * 3, (0.5,) * 3, 0, 0, 1)
  fourth = [next(stream) for _ in range(4)][-1]
  resumed = next(data.train_batches(source, config, 16, (0.5,) * 3, (0.5,) * 3, 3, 0, 1))
  np.testing.assert_array_equal(fourth["image"], resumed["image"])
