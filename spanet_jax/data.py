"""Input pipelines through TFDS: ImageNet, any TFDS image-classification dataset, a
class-per-folder tree, and `sklearn_digits`, a small real dataset prepared from
scikit-learn on first use (the demo's).

Each process reads only its own share (tfds.split_for_jax_process). Training batches
are deterministic functions of (seed, epoch, position), so a resumed run continues
with exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Iterator

import numpy as np

# TensorFlow is only a data reader here: keep it off any accelerator and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402  pylint: disable=g-import-not-at-top
import tensorflow_datasets as tfds  # noqa: E402  pylint: disable=g-import-not-at-top

tf.config.set_visible_devices([], "GPU")

from spanet_jax import preprocess, randaugment  # noqa: E402  pylint: disable=g-import-not-at-top


class DataError(Exception):
  """A dataset that cannot be found or read; the message says what to do."""


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 1,797 handwritten digits (8x8 grey), split 1,437 train / 360 test."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        description="scikit-learn load_digits(), fixed 80/20 split (seed 0).")

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the data ships inside scikit-learn
    return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

  def _generate_examples(self, split):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    order = order[:1437] if split == "train" else order[1437:]
    for index in order:
      image = np.rint(digits.images[index] * (255.0 / 16.0)).astype(np.uint8)[..., None]
      yield int(index), {"image": image, "label": int(digits.target[index])}


@dataclasses.dataclass(frozen=True)
class Source:
  """A dataset split: a TFDS builder's, or a list of (image path, label)."""
  builder: tfds.core.DatasetBuilder | None
  split: str
  num_examples: int  # in the whole split, over all processes
  files: tuple[tuple[str, int], ...] | None = None


def make_builder(config) -> tfds.core.DatasetBuilder:
  data_dir = config.data_dir or None
  if config.folder:
    if not os.path.isdir(config.folder):
      raise DataError(f"no such folder: {config.folder} (expected {config.folder}/train/<class>/"
                      f"*.JPEG and {config.folder}/val/<class>/*)")
    return tfds.ImageFolder(config.folder)
  if config.dataset == "sklearn_digits":
    builder = SklearnDigits(data_dir=data_dir)
    builder.download_and_prepare()
    return builder
  try:
    builder = tfds.builder(config.dataset, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as err:
    raise DataError(f"TFDS has no dataset {config.dataset!r}: {str(err).splitlines()[0]}") from None
  if not builder.is_prepared():
    manual_dir = config.manual_dir or None
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except (AssertionError, FileNotFoundError, OSError, ValueError) as err:
      where = manual_dir or os.path.join(builder.data_dir, "..", "downloads", "manual")
      raise DataError(
          f"dataset {config.dataset!r} is not prepared and could not be prepared: "
          f"{str(err).strip().splitlines()[0]}. For imagenet2012, download "
          f"ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org and put "
          f"them in {os.path.normpath(where)} (or pass --config.manual_dir), or point "
          f"--config.folder at a train/<class>/ val/<class>/ tree.") from None
  return builder


def class_names(builder) -> list[str] | None:
  """The dataset's class names in label order, when it declares them."""
  try:
    return list(builder.info.features["label"].names)
  except (KeyError, AttributeError, TypeError):
    return None


def make_source(builder, split: str) -> Source:
  if split not in builder.info.splits:
    raise DataError(f"split {split!r} not in {builder.info.name}: "
                    f"{', '.join(sorted(builder.info.splits))}")
  return Source(builder, split, builder.info.splits[split].num_examples)


def _image_and_label(*example):
  """(image, label) from a supervised tuple or a features dict."""
  if len(example) == 2:
    return example
  return example[0]["image"], example[0]["label"]


def _to_rgb_float(image):
  image = tf.convert_to_tensor(image)
  # Grey images become RGB; RGBA loses alpha (channel count may be known only at run time).
  image = tf.cond(tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]),
                  lambda: image[..., :3])
  image = tf.ensure_shape(image, [None, None, 3])
  return tf.cast(image, tf.float32) / 255.0


def _normalize(image, mean, std):
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def train_preprocess(image, seed, config, mean, std):
  """Random resized crop (scale, ratio), horizontal flip, RandAugment, normalise, random
  erasing. Stateless: `seed`."""
  image = _to_rgb_float(image)
  crop_seed, flip_seed, erase_seed, augment_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=(1, 1, 4)),
      seed=crop_seed, min_object_covered=0.0, aspect_ratio_range=list(config.crop_ratio),
      area_range=list(config.crop_scale), max_attempts=10, use_image_if_no_bounding_boxes=True)
  image = tf.slice(image, begin, size)
  image = tf.image.resize(image, (config.image_size, config.image_size), method="bicubic")
  flip = tf.random.stateless_uniform((), flip_seed) < config.hflip
  image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
  if config.randaugment:
    # On 8-bit values, as timm applies it to the PIL image.
    pixels = tf.round(tf.clip_by_value(image * 255.0, 0.0, 255.0))
    spec = randaugment.RandAugmentSpec(config.randaugment)
    image = randaugment.rand_augment(pixels, augment_seed, spec) / 255.0
  image = _normalize(image, mean, std)
  return random_erasing(image, erase_seed, config.random_erasing)


def random_erasing(image, seed, probability: float, area=(0.02, 1 / 3),
                   log_ratio=(math.log(0.3), math.log(1 / 0.3)), max_attempts: int = 10):
  """timm's RandomErasing (mode "pixel") on a normalised image: with `probability`, one
  box of area and aspect ratio drawn from the ranges is filled with N(0, 1) noise per
  pixel and channel. Stateless: `seed`."""
  if probability <= 0:
    return image
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  seeds = tf.random.experimental.stateless_split(seed, 3 + max_attempts)
  apply = tf.random.stateless_uniform((), seeds[0]) < probability
  total = tf.cast(height * width, tf.float32)
  box = tf.constant([0, 0, 0, 0], tf.int32)
  found = tf.constant(False)
  for attempt in range(max_attempts):  # first box that fits wins, as in timm
    draws = tf.random.stateless_uniform((4,), seeds[3 + attempt])
    target = total * (area[0] + (area[1] - area[0]) * draws[0])
    ratio = tf.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[1])
    h = tf.cast(tf.round(tf.sqrt(target * ratio)), tf.int32)
    w = tf.cast(tf.round(tf.sqrt(target / ratio)), tf.int32)
    fits = (h < height) & (w < width) & (h > 0) & (w > 0)
    top = tf.cast(draws[2] * tf.cast(tf.maximum(height - h + 1, 1), tf.float32), tf.int32)
    left = tf.cast(draws[3] * tf.cast(tf.maximum(width - w + 1, 1), tf.float32), tf.int32)
    take = fits & ~found
    box = tf.where(take, tf.stack([top, left, h, w]), box)
    found = found | fits
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  inside = ((rows >= box[0]) & (rows < box[0] + box[2]) &
            (cols >= box[1]) & (cols < box[1] + box[3]))
  erase = inside & apply & found
  noise = tf.random.stateless_normal(tf.shape(image), seeds[1])
  return tf.where(erase[..., None], noise, image)


def _process_split(source: Source, process_index: int, process_count: int,
                   decode: bool = True):
  """This process's share of the split; with decode=False images stay encoded bytes."""
  supervised = source.builder.info.supervised_keys is not None
  decoders = None if decode else {"image": tfds.decode.SkipDecoding()}
  if isinstance(source.builder, tfds.ImageFolder):  # it has no sub-split API
    ds = source.builder.as_dataset(split=source.split, shuffle_files=False,
                                   as_supervised=supervised, decoders=decoders)
    return ds.shard(process_count, process_index) if process_count > 1 else ds
  split = tfds.even_splits(source.split, n=process_count, drop_remainder=False)[process_index]
  return source.builder.as_dataset(split=split, shuffle_files=False, as_supervised=supervised,
                                   decoders=decoders)


def train_batches(source: Source, config, local_batch: int, mean, std, start_step: int,
                  process_index: int, process_count: int) -> Iterator[dict]:
  """Endless training batches for this process, starting at global step `start_step`."""
  base = _process_split(source, process_index, process_count).map(_image_and_label)
  per_process = source.num_examples // process_count
  steps_per_epoch = per_process // local_batch
  if steps_per_epoch == 0:
    raise DataError(f"the batch ({local_batch} per process) is larger than the training split "
                    f"({per_process} examples per process)")
  epoch, skip = divmod(start_step, steps_per_epoch)
  while True:
    ds = base.take(per_process).cache() if source.num_examples < 100_000 else base
    ds = ds.shuffle(min(config.shuffle_buffer, per_process), seed=config.seed + epoch,
                    reshuffle_each_iteration=False)
    ds = ds.enumerate()
    seed_base = tf.constant([config.seed, epoch], tf.int64)

    def prepare(index, example, seed_base=seed_base):
      image, label = example
      seed = tf.cast(tf.stack([seed_base[0] * 1_000_003 + seed_base[1], index]), tf.int64)
      return {"image": train_preprocess(image, seed, config, mean, std),
              "label": tf.cast(label, tf.int32)}

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True).skip(skip).prefetch(config.prefetch)
    yield from tfds.as_numpy(ds)
    epoch, skip = epoch + 1, 0


def eval_batches(source: Source, data_config: preprocess.DataConfig, local_batch: int,
                 process_index: int, process_count: int,
                 prefetch: int = 2) -> Iterator[tuple[dict, list[str]]]:
  """Every example of the split exactly once, as (batch, names): the last batches padded,
  with a 0/1 `mask`; `names` says which image each real row is (a path, or the split
  and position).

  Images are decoded and prepared with PIL exactly as timm's eval transform does, so a
  model scores here what it scores in the official pipeline. All processes yield the same
  number of batches (collectives need it).
  """
  if source.files is not None:
    mine = source.files[process_index::process_count]
    ds = tf.data.Dataset.from_tensor_slices((
        [path for path, _ in mine] or tf.zeros((0,), tf.string),
        tf.constant([label for _, label in mine], tf.int32)))
    ds = ds.map(lambda path, label: (tf.io.read_file(path), label, path))
  else:
    prefix = f"{source.builder.info.name}:{source.split} #"
    if process_count > 1:  # positions count within this process's share
      prefix = f"{source.builder.info.name}:{source.split} (process {process_index}) #"
    ds = _process_split(source, process_index, process_count, decode=False)
    ds = ds.map(_image_and_label).enumerate().map(
        lambda i, example: (example[0], example[1], prefix + tf.strings.as_string(i)))
  size = data_config.input_size

  def prepare(encoded, label, name):
    image, ok = tf.numpy_function(lambda b: _eval_transform(b, data_config), [encoded],
                                  [tf.float32, tf.bool], stateful=False)
    return {"image": tf.ensure_shape(image, (size, size, 3)), "ok": ok,
            "label": tf.cast(label, tf.int32), "name": name}

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch).prefetch(prefetch)
  per_process_max = -(-source.num_examples // process_count)
  num_batches = -(-per_process_max // local_batch)
  produced = 0
  for batch in tfds.as_numpy(ds):
    names = [n.decode() for n in batch.pop("name")]
    failed = [n for n, ok in zip(names, batch.pop("ok")) if not ok]
    if failed:
      raise DataError(f"cannot decode {failed[0]} as an image"
                      + (f" (and {len(failed) - 1} more in its batch)" if len(failed) > 1
                         else ""))
    yield _pad(batch, local_batch), names
    produced += 1
  empty = {"image": np.zeros((0, size, size, 3), np.float32), "label": np.zeros((0,), np.int32)}
  for _ in range(num_batches - produced):
    yield _pad(empty, local_batch), []


def _eval_transform(encoded: bytes, data_config: preprocess.DataConfig):
  """Encoded image -> (prepared float32 image, True), or (zeros, False) if undecodable."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(io.BytesIO(encoded)) as image:
      return data_config.transform(image.convert("RGB")), np.bool_(True)
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
    size = data_config.input_size
    return np.zeros((size, size, 3), np.float32), np.bool_(False)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def folder_classes(root: str) -> list[str]:
  """The class sub-directories of a class-per-folder tree, sorted."""
  if not os.path.isdir(root):
    raise DataError(f"no such folder: {root}")
  classes = sorted(d for d in os.listdir(root)
                   if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
  if not classes:
    raise DataError(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
  return classes


def folder_source(root: str, class_index: dict[str, int]) -> Source:
  """The images of a class-per-folder tree, labelled by `class_index` (folder -> class)."""
  files = []
  for name in folder_classes(root):
    if name not in class_index:
      continue
    folder = os.path.join(root, name)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
      dirnames.sort()
      files += [(os.path.join(dirpath, f), class_index[name]) for f in sorted(filenames)
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
  if not files:
    raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}/<class>/")
  return Source(builder=None, split=root, num_examples=len(files), files=tuple(files))


def _pad(batch: dict, size: int) -> dict:
  n = len(batch["label"])
  pad = size - n
  return {"image": np.concatenate([batch["image"],
                                   np.zeros((pad,) + batch["image"].shape[1:], np.float32)]),
          "label": np.concatenate([batch["label"], np.zeros((pad,), np.int32)]),
          "mask": np.concatenate([np.ones((n,), np.float32), np.zeros((pad,), np.float32)])}
