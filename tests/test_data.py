"""The input pipeline: the training transform's pieces against PIL and torchvision's
algorithms, random erasing on the device, random access, resume and multi-process
batches, and evaluation counting."""

import io
import math
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from configs import default
from spanet_jax.data import augment, pipeline, preprocess, transforms
from spanet_jax.data import settings as data_settings


def _builder(config):
  return pipeline.make_builder(data_settings.DatasetSource.from_config(config))


def erase(images, seed, probability):
  return np.asarray(augment.random_erasing(jax.random.PRNGKey(seed), images, probability))


def test_random_erasing_fills_one_box_with_noise_per_image():
  images = np.full((20, 32, 48, 3), 7.0, np.float32)
  out = erase(images, 0, 1.0)
  for image in out:
    changed = (image != 7.0).any(-1)
    rows, cols = np.nonzero(changed)
    assert changed.any()
    box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.all()  # one filled rectangle
    area = box.size / changed.size
    assert 0.02 * 0.8 <= area <= 1 / 3 * 1.25
    assert abs(float(np.std(image[changed]))) > 0.5  # noise, not a constant
  assert len({tuple(np.nonzero((image != 7.0).any(-1))[0][[0, -1]]) for image in out}) > 5


def test_random_erasing_probability_and_determinism():
  images = np.zeros((200, 16, 16, 3), np.float32)
  np.testing.assert_array_equal(erase(images, 0, 0.0), images)
  np.testing.assert_array_equal(erase(images, 3, 1.0), erase(images, 3, 1.0))
  hits = int((erase(images, 9, 0.25) != 0).any((1, 2, 3)).sum())
  assert 30 <= hits <= 70  # about a quarter of 200


def test_normalize_on_device_matches_the_host_formula():
  images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3)).astype(np.uint8)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  want = (images / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(augment.normalize(images, mean, std), want, rtol=1e-5, atol=1e-5)


def torchvision_crop_params(height, width, draws, scale, ratio):
  """torchvision's RandomResizedCrop.get_params with its uniform draws given (the
  algorithm timm's RandomResizedCropAndInterpolation uses), in plain Python."""
  area = height * width
  for u_area, u_ratio, u_top, u_left in draws:
    target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u_ratio)
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height,width,scale", [(375, 500, (0.08, 1.0)), (60, 500, (0.5, 1.0)),
                                                (500, 40, (0.9, 1.0)), (32, 32, (0.6, 1.0))])
def test_crop_sampler_is_torchvisions(height, width, scale):
  ratio = (3 / 4, 4 / 3)
  for s in range(40):
    seed = tf.constant([s, 7], tf.int64)
    draws = tf.random.stateless_uniform((10, 4), seed).numpy().astype(np.float64)
    got = tuple(int(v) for v in transforms.sample_crop(height, width, seed, scale, ratio))
    assert got == torchvision_crop_params(height, width, draws, scale, ratio), s


@pytest.mark.parametrize("height,width,size", [(300, 280, 224), (120, 90, 224), (300, 200, 224),
                                               (200, 300, 224), (224, 224, 224), (451, 300, 64)])
def test_antialiased_resize_is_pils(height, width, size):
  photo = np.asarray(preprocess.load_image(preprocess.sample_photo_paths()[1]))
  crop = np.asarray(Image.fromarray(photo).resize((width, height), Image.BICUBIC))
  want = np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC), np.float32)
  got = transforms.resize_like_pil(tf.constant(crop), size).numpy()
  diff = np.abs(got - want)
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # PIL's fixed-point rounding


def test_crop_is_decoded_as_the_whole_image_cropped():
  """JPEGs are decoded only inside the crop window: the pixels of a full decode, cropped
  (chroma upsampling may differ at the window's edges), and near PIL's decode; PNGs
  take the other path."""
  photo = preprocess.load_image(preprocess.sample_photo_paths()[1])
  for fmt in ("JPEG", "PNG"):
    buffer = io.BytesIO()
    photo.save(buffer, format=fmt, quality=90)
    encoded = tf.constant(buffer.getvalue())
    whole = tf.io.decode_image(encoded, channels=3).numpy().astype(np.int32)
    pil = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), np.int32)
    # TensorFlow's and Pillow's libjpeg builds upsample chroma differently: about one
    # level apart on average.
    assert np.abs(whole - pil).mean() < 1.5
    for s in range(5):
      seed = tf.constant([s, 1], tf.int64)
      top, left, h, w = (int(v) for v in transforms.sample_crop(*whole.shape[:2], seed))
      got = transforms.decode_random_crop(encoded, seed, (0.08, 1.0), (3 / 4, 4 / 3)).numpy()
      want = whole[top:top + h, left:left + w]
      assert got.shape == want.shape
      np.testing.assert_array_equal(got.astype(np.int32)[2:-2, 2:-2], want[2:-2, 2:-2])


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  config = default.get_config()
  config.dataset, config.data_dir = "sklearn_digits", str(tmp_path_factory.mktemp("tfds"))
  config.image_size = 32
  return config, pipeline.make_source(_builder(config), "train")  # 1,437 examples


def take(config, source, global_batch, start, count, process=0, processes=1):
  stream = pipeline.train_batches(source, data_settings.TrainInput.from_config(config),
                                  global_batch, start, process, processes)
  return [next(stream) for _ in range(count)]


def test_training_batches_with_the_full_recipe_are_deterministic(digits):
  config, source = digits  # default recipe: crop, flip and RandAugment on
  first = take(config, source, 16, 0, 1)[0]
  again = take(config, source, 16, 0, 1)[0]
  assert first["image"].shape == (16, 32, 32, 3) and first["image"].dtype == np.uint8
  assert first["label"].shape == (16,)
  np.testing.assert_array_equal(first["image"], again["image"])
  assert len({image.tobytes() for image in first["image"]}) == 16


@pytest.mark.slow
def test_resume_at_any_step_gives_the_uninterrupted_batches(digits):
  """Including across the epoch's end (89 steps of 16); a new epoch has a new order."""
  config, source = digits
  assert pipeline.steps_per_epoch(source, 16) == 89
  straight = take(config, source, 16, 85, 6)
  for offset in (1, 3, 4, 5):
    resumed = take(config, source, 16, 85 + offset, 1)[0]
    np.testing.assert_array_equal(resumed["image"], straight[offset]["image"])
    np.testing.assert_array_equal(resumed["label"], straight[offset]["label"])
  epoch0 = take(config, source, 16, 0, 1)[0]
  epoch1 = take(config, source, 16, 89, 1)[0]
  assert not np.array_equal(epoch0["label"], epoch1["label"])


def test_every_example_once_per_epoch_over_processes_and_process_count_free(digits):
  """Two processes' shares of a global batch are one process's batch split in two; one
  epoch visits each example at most once (the remainder of 1,437 / 64 is left out)."""
  config, source = digits
  config = config.copy_and_resolve_references()
  config.randaugment, config.hflip = "", 0.0
  config.crop_scale = (1.0, 1.0)  # whole images: an example is recognisable by its pixels
  whole = take(config, source, 64, 0, 22)
  halves = [take(config, source, 64, 0, 22, process, 2) for process in (0, 1)]
  for step in range(22):
    joined = np.concatenate([halves[0][step]["image"], halves[1][step]["image"]])
    np.testing.assert_array_equal(joined, whole[step]["image"])
  images = np.concatenate([b["image"] for b in whole])
  # Digits repeat now and then; positions, not pixels, are what must be unique.
  indices = [int(tf.random.experimental.index_shuffle(
      tf.constant(p, tf.int64), tf.constant([config.seed, 0], tf.int64), 1436))
             for p in range(22 * 64)]
  assert len(set(indices)) == len(indices) == len(images)
  with pytest.raises(pipeline.DataError, match="does not divide over 3 processes"):
    take(config, source, 64, 0, 1, 0, 3)


def test_eval_batches_count_every_example_once_over_processes(tmp_path):
  config = default.get_config()
  config.dataset, config.data_dir = "sklearn_digits", str(tmp_path)
  source = pipeline.make_source(_builder(config), "test")  # 360 examples
  data_config = preprocess.DataConfig(32, 1.0, (0.5,) * 3, (0.5,) * 3)
  seen = []
  counts = []
  for process in range(3):
    batches = list(pipeline.eval_batches(source, data_config, 50, process, 3, prefetch=1))
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
  root = tmp_path / "val"
  photos = preprocess.sample_photo_paths()[:3]
  for index, path in enumerate(photos):
    (root / f"class{index}").mkdir(parents=True)
    Image.open(path).save(root / f"class{index}" / "photo.png")
  source = pipeline.folder_source(str(root), {"class0": 0, "class1": 1, "class2": 2})
  data_config = preprocess.DataConfig(64, 0.875, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  (batch, names), = list(pipeline.eval_batches(source, data_config, 4, 0, 1, prefetch=1))
  assert [int(label) for label in batch["label"][:3]] == [0, 1, 2]
  for row, name in enumerate(names):
    expected = data_config.transform(preprocess.load_image(name))
    np.testing.assert_array_equal(batch["image"][row], expected)
  assert batch["mask"].tolist() == [1, 1, 1, 0]


def test_missing_dataset_says_what_to_do(tmp_path):
  config = default.get_config()
  config.data_dir, config.manual_dir = str(tmp_path), str(tmp_path / "manual")
  with pytest.raises(pipeline.DataError, match="ILSVRC2012_img_train.tar.*manual"):
    _builder(config)


def test_a_tfrecord_dataset_gets_an_array_record_copy_with_the_same_examples(tmp_path):
  builder = pipeline.SklearnDigits(data_dir=str(tmp_path), file_format="tfrecord")
  builder.download_and_prepare()
  with pytest.raises(pipeline.DataError, match="stored as tfrecord only; examples are read "
                                               "by index, which needs ArrayRecord"):
    pipeline.make_source(builder, "test")
  config = default.get_config()
  config.dataset, config.data_dir = "sklearn_digits", str(tmp_path)
  source = pipeline.make_source(_builder(config), "test")
  expected = list(builder.as_dataset("test", shuffle_files=False,
                                     decoders={"image": tfds.decode.SkipDecoding()}))
  assert source.num_examples == len(expected) == 360
  for index in (0, 17, 359):
    encoded, label = source.read(tf.constant(index, tf.int64))
    assert encoded.numpy() == expected[index]["image"].numpy()
    assert int(label) == int(expected[index]["label"])


def test_input_pipeline_benchmark_reports_its_json_line(tmp_path):
  import json
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  photo = preprocess.load_image(preprocess.sample_photo_paths()[1])
  for index in range(24):
    folder = tmp_path / "photos" / "train" / f"class{index % 3}"
    folder.mkdir(parents=True, exist_ok=True)
    photo.rotate(index * 15).save(folder / f"{index}.jpg", quality=90)
  out = subprocess.run(
      [sys.executable, "benchmarks/input_pipeline.py", "--folder", str(tmp_path / "photos"),
       "--config", "configs/spanet_s.py", "--batch", "8", "--batches", "5", "--warmup", "2",
       "--start-step", "2", "--json"], cwd=repo, capture_output=True, text=True, timeout=300,
      env={**os.environ, "PYTHONPATH": repo})
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["image_shape"] == [8, 224, 224, 3] and result["steps_per_epoch"] == 3
  assert result["images_per_s"] > 0 and result["first_batch_s"] > 0
  assert result["peak_rss_mib"] > 100


def test_missing_imagenet_names_one_folder_and_leaves_no_empty_folders(tmp_path):
  config = default.get_config()
  config.dataset, config.data_dir = "imagenet2012", str(tmp_path / "tfds")
  with pytest.raises(pipeline.DataError) as raised:
    _builder(config)
  text = str(raised.value)
  manual = os.path.join(str(tmp_path / "tfds"), "downloads", "manual")
  assert f"its source files are not in {manual}" in text and "--config.manual_dir" in text
  assert "\n" not in text and "instructions" not in text
  left = [p for p in (tmp_path / "tfds").rglob("*")] if (tmp_path / "tfds").exists() else []
  assert not [p for p in left if p.is_dir() and not any(p.iterdir())], left
