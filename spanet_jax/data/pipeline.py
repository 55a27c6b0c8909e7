"""Input pipelines through TFDS: ImageNet, any TFDS image-classification dataset, a
class-per-folder tree, and `sklearn_digits`, a small real dataset prepared from
scikit-learn on first use (the demo's).

Every source is read by example index with the images still encoded: a folder's
files, or a TFDS dataset stored as ArrayRecord. Each process reads only its own share.
Training batches are deterministic functions of (seed, epoch, position), so a resumed
run continues with exactly the batches it would have seen, at once.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError
import tensorflow as tf
import tensorflow_datasets as tfds

from spanet_jax import errors
from spanet_jax.data import conversion, preprocess, settings, transforms


def keep_tensorflow_off_accelerators() -> None:
  """TensorFlow is only a data reader here: it must leave every GPU to JAX. Called by
  each pipeline builder; it must come before TensorFlow first touches a device."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # devices already initialised: the setting was made before
    pass


class DataError(errors.UserError):
  """A dataset that cannot be found or read; the message says what to do."""


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 1,797 handwritten digits (8x8 grey), split 1,437 train / 360 test."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "Stored as ArrayRecord (random access by index)."}

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
class FolderTree:
  """A class-per-folder tree: root/<split>/<class>/<image>, classes in sorted order."""
  root: str
  classes: tuple[str, ...]  # the training split's class folders
  train_split: str = "train"


@dataclasses.dataclass(frozen=True)
class Source:
  """A dataset split with random access by example index: image files (a folder tree)
  or the records of a TFDS dataset stored as ArrayRecord. Images stay encoded."""
  name: str  # for messages: "imagenet2012:train", or the split's folder
  num_examples: int  # in the whole split, over all processes
  files: tuple[tuple[str, int], ...] | None = None  # (path, label), for folders
  records: Any = None  # a TFDS data source (image bytes undecoded), for TFDS datasets
  image_key: str = "image"
  label_key: str = "label"

  def read(self, index):
    """(encoded image bytes, int32 label) of example `index` (a scalar int64 tensor)."""
    if self.files is not None:
      # As bytes: a file name need not be valid UTF-8 (os.fsencode's encoding, written out
      # because tf.data's AutoGraph would try to convert os.fsencode).
      paths = tf.constant([path.encode("utf-8", "surrogateescape") for path, _ in self.files]
                          or [b""], tf.string)
      labels = tf.constant([label for _, label in self.files] or [0], tf.int32)
      return tf.io.read_file(tf.gather(paths, index)), tf.gather(labels, index)

    def read_record(i):
      record = self.records[int(i)]
      return record[self.image_key], np.int32(record[self.label_key])

    encoded, label = tf.numpy_function(read_record, [index], [tf.string, tf.int32],
                                       stateful=False)
    return tf.ensure_shape(encoded, ()), tf.ensure_shape(label, ())


TRAIN_FLAGS = {"data_dir": "--config.data_dir", "manual_dir": "--config.manual_dir",
               "folder": "--config.folder"}


def make_builder(config: settings.DatasetSource, flags: dict[str, str] = TRAIN_FLAGS):
  """The dataset `config` names: a FolderTree for `config.folder`, else a TFDS builder
  (prepared as ArrayRecord on first use). `flags` name the options in messages."""
  keep_tensorflow_off_accelerators()
  data_dir = config.data_dir or None
  if config.folder:
    if not os.path.isdir(config.folder):
      raise DataError(f"no such folder: {config.folder} (expected {config.folder}/train/<class>/"
                      f"*.JPEG and {config.folder}/val/<class>/*)")
    train = os.path.join(config.folder, config.train_split)
    return FolderTree(config.folder, tuple(folder_classes(train)), config.train_split)
  if config.dataset == "sklearn_digits":
    make = lambda **kw: SklearnDigits(data_dir=data_dir, **kw)
  else:
    make = lambda **kw: tfds.builder(config.dataset, data_dir=data_dir, **kw)
  try:
    try:
      builder = make(file_format="array_record")
    except ValueError as err:  # prepared earlier in another format (TFDS's default: TFRecord)
      if "file format is already set" not in str(err).lower():
        raise
      builder = make()
  except tfds.core.registered.DatasetNotFoundError as err:
    raise DataError(f"TFDS has no dataset {config.dataset!r}: {str(err).splitlines()[0]}") from None
  if not builder.is_prepared():
    prepare(builder, config, flags)
  if not conversion.has_array_record(builder.info):
    try:
      conversion.add_array_record_copy(builder)
    except OSError as err:
      raise DataError(
          f"{builder.info.name} in {builder.data_dir} is stored as TFRecord and an "
          f"ArrayRecord copy cannot be written beside it ({err}): copy the dataset to a "
          f"writable directory and pass it as {flags['data_dir']}") from None
  return builder


def prepare(builder, config: settings.DatasetSource, flags: dict[str, str]) -> None:
  """Download and prepare `builder`'s dataset; a dataset that needs files the user must
  download (ImageNet) is one message naming the folder, leaving no empty folders."""
  if isinstance(builder, SklearnDigits):
    builder.download_and_prepare()
    return
  root = builder._data_dir_root  # pylint: disable=protected-access
  manual_dir = config.manual_dir or os.path.join(root, "downloads", "manual")
  existed = set(_directories(root))
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except (AssertionError, FileNotFoundError, OSError, ValueError):
    for directory in sorted(set(_directories(root)) - existed, key=len, reverse=True):
      if not os.listdir(directory):  # created by this attempt, still empty
        os.rmdir(directory)
    raise DataError(
        f"dataset {config.dataset!r} is not prepared and its source files are not in "
        f"{manual_dir}. For imagenet2012, download ILSVRC2012_img_train.tar and "
        f"ILSVRC2012_img_val.tar from image-net.org into that folder (or pass another "
        f"with {flags['manual_dir']}), or give a class-per-folder tree "
        f"(<dir>/train/<class>/, <dir>/val/<class>/) with {flags['folder']}") from None


def _directories(root: str) -> list[str]:
  return [path for path, _, _ in os.walk(root)] if os.path.isdir(root) else []


def class_names(builder) -> list[str] | None:
  """The dataset's class names in label order, when it declares them."""
  if isinstance(builder, FolderTree):
    return list(builder.classes)
  try:
    return list(builder.info.features["label"].names)
  except (KeyError, AttributeError, TypeError):
    return None


def make_source(builder, split: str) -> Source:
  """A split of a FolderTree or a TFDS builder, with random access."""
  if isinstance(builder, FolderTree):
    folder = os.path.join(builder.root, split)
    if not os.path.isdir(folder) and split == "validation":
      folder = os.path.join(builder.root, "val")
    extra = sorted(set(folder_classes(folder)) - set(builder.classes))
    if extra:
      train = os.path.join(builder.root, builder.train_split)
      raise DataError(f"{folder} has class folders that {train} lacks: "
                      f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}; classes are "
                      "matched by folder name, and these images could not be scored")
    return folder_source(folder, {name: i for i, name in enumerate(builder.classes)})
  if split not in builder.info.splits:
    raise DataError(f"split {split!r} not in {builder.info.name}: "
                    f"{', '.join(sorted(builder.info.splits))}")
  formats = [builder.info.file_format] + list(
      getattr(builder.info, "alternative_file_formats", None) or [])
  if not any(str(getattr(f, "value", f)) == "array_record" for f in formats):
    raise DataError(
        f"{builder.info.name} in {builder.data_dir} is stored as "
        f"{getattr(builder.info.file_format, 'value', builder.info.file_format)} only; "
        "examples are read by index, which needs ArrayRecord (make_builder writes a copy)")
  supervised = builder.info.supervised_keys
  image_key, label_key = supervised if supervised else ("image", "label")
  records = builder.as_data_source(split, decoders={image_key: tfds.decode.SkipDecoding()},
                                   file_format="array_record")
  return Source(f"{builder.info.name}:{split}", len(records), records=records,
                image_key=image_key, label_key=label_key)


def steps_per_epoch(source: Source, global_batch: int) -> int:
  """Full global batches per epoch; the remainder of each epoch's order is left out."""
  return source.num_examples // global_batch


def train_positions(step: int, global_batch: int, local_batch: int, process_index: int):
  """The epoch positions this process's rows of global batch `step` (within its epoch)
  take: the global batch is positions [step * global_batch, (step + 1) * global_batch),
  in process order. They depend on the global batch only, so the data a step sees is
  the same for any number of processes."""
  first = step * global_batch + process_index * local_batch
  return range(first, first + local_batch)


def train_batches(source: Source, config: settings.TrainInput, global_batch: int,
                  start_step: int, process_index: int, process_count: int) -> Iterator[dict]:
  """Endless training batches for this process, from global step `start_step` on:
  uint8 images (normalised and erased on the device, in the training step) and labels.

  Each epoch visits the examples in a fresh pseudo-random order (a stateless index
  shuffle of (seed, epoch)): example `order(p)` fills position p, and global step s of
  an epoch takes positions [s * B, (s + 1) * B) of the global batch B, each process its
  consecutive share. Every draw of the augmentation comes from (seed, epoch, position).
  So a restart at any step builds the same batches at the cost of a fresh start (no
  replay), and the batches do not depend on the number of processes. Host memory holds
  encoded images and a few prepared batches, never a shuffle buffer of decoded images.
  """
  keep_tensorflow_off_accelerators()
  if global_batch % process_count:
    raise DataError(f"the global batch {global_batch} does not divide over "
                    f"{process_count} processes")
  local_batch = global_batch // process_count
  steps = steps_per_epoch(source, global_batch)
  if steps == 0:
    raise DataError(f"the global batch ({global_batch}) is larger than the training split "
                    f"({source.num_examples} examples)")
  num_examples = source.num_examples

  def example(counter):
    # counter enumerates this process's rows: row j of global step s is s * L + j.
    step, row = counter // local_batch, counter % local_batch
    epoch, step_in_epoch = step // steps, step % steps
    position = step_in_epoch * global_batch + process_index * local_batch + row
    order_seed = tf.stack([tf.constant(config.seed, tf.int64), epoch])
    index = tf.random.experimental.index_shuffle(position, order_seed, num_examples - 1)
    encoded, label = source.read(index)
    seed = tf.stack([tf.constant(config.seed, tf.int64) * 1_000_003 + epoch, position])
    return {"image": transforms.train_transform(encoded, seed, config), "label": label}

  ds = tf.data.Dataset.range(start_step * local_batch, np.iinfo(np.int64).max)
  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(config.prefetch)
  options = tf.data.Options()
  options.threading.max_intra_op_parallelism = 1  # parallel over images, not inside ops
  options.experimental_optimization.map_parallelization = True
  batches = iter(tfds.as_numpy(ds.with_options(options)))
  step = start_step
  while True:
    try:
      batch = next(batches)
    except tf.errors.OpError as err:  # name the file: on ImageNet no one could find it
      culprit = unreadable_example(source, config, global_batch, step, process_index,
                                   process_count)
      raise DataError(
          f"cannot decode the training image {culprit}; replace it with a readable image "
          "(removing it would change the data order)" if culprit else
          f"reading the training batch of step {step + 1} failed: "
          f"{err.message.strip().splitlines()[0]}") from None
    yield batch
    step += 1


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
  keep_tensorflow_off_accelerators()
  indices = np.arange(process_index, source.num_examples, process_count, dtype=np.int64)
  if source.files is not None:
    names = [source.files[i][0] for i in indices]
  else:  # positions count within the whole split
    names = [f"{source.name} #{i}" for i in indices]
  ds = tf.data.Dataset.from_tensor_slices(
      (indices, tf.constant([os.fsencode(n) for n in names], tf.string) if names
       else tf.zeros((0,), tf.string)))
  ds = ds.map(lambda index, name: (*source.read(index), name))
  size = data_config.input_size

  mean = tf.constant(data_config.mean, tf.float32)
  std = tf.constant(data_config.std, tf.float32)

  def prepare(encoded, label, name):
    # PIL decodes and resizes (it releases the GIL while it does); the normalisation
    # runs in TensorFlow, outside the GIL, in preprocess.normalize's order of operations.
    pixels, ok = tf.numpy_function(lambda b: _eval_pixels(b, data_config), [encoded],
                                   [tf.uint8, tf.bool], stateful=False)
    image = (tf.cast(pixels, tf.float32) / 255.0 - mean) / std
    return {"image": tf.ensure_shape(image, (size, size, 3)), "ok": ok,
            "label": tf.cast(label, tf.int32), "name": name}

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch).prefetch(prefetch)
  per_process_max = -(-source.num_examples // process_count)
  num_batches = -(-per_process_max // local_batch)
  produced = 0
  for batch in tfds.as_numpy(ds):
    names = [os.fsdecode(n) for n in batch.pop("name")]
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


def _eval_pixels(encoded: bytes, data_config: preprocess.DataConfig):
  """Encoded image -> (resized, cropped uint8 pixels, True), or (zeros, False) if it
  cannot be decoded."""

  try:
    with Image.open(io.BytesIO(encoded)) as image:
      image.load()
      rgb = image if image.mode == "RGB" else preprocess.to_rgb(image)  # no copy when RGB
      pixels = preprocess.eval_pixels(rgb, data_config.input_size, data_config.crop_pct,
                                      data_config.interpolation)
      return pixels, np.bool_(True)
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError, preprocess.ImageError,
          Image.DecompressionBombError):
    size = data_config.input_size
    return np.zeros((size, size, 3), np.uint8), np.bool_(False)


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
  """The images of a class-per-folder tree, labelled by `class_index` (folder -> class).

  Symbolic links are followed, but every directory is visited and every file counted
  once (a link loop or a linked copy adds nothing); broken links are left out."""
  keep_tensorflow_off_accelerators()
  files, seen_dirs, seen_files = [], set(), set()
  for name in folder_classes(root):
    if name not in class_index:
      continue
    folder = os.path.join(root, name)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
      real = os.path.realpath(dirpath)
      if real in seen_dirs:
        dirnames[:] = []
        continue
      seen_dirs.add(real)
      dirnames.sort()
      for f in sorted(filenames):
        path = os.path.join(dirpath, f)
        if f.startswith(".") or not f.lower().endswith(IMAGE_EXTENSIONS):
          continue
        real_file = os.path.realpath(path)
        if real_file in seen_files or not os.path.isfile(real_file):
          continue
        seen_files.add(real_file)
        files.append((path, class_index[name]))
  if not files:
    raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}/<class>/")
  return Source(root, len(files), files=tuple(files))


def dataset_num_classes(builder) -> int | None:
  """How many classes the dataset's labels span, when it says."""
  if isinstance(builder, FolderTree):
    return len(builder.classes)
  try:
    return int(builder.info.features["label"].num_classes)
  except (KeyError, AttributeError, TypeError, ValueError):
    return None


def unreadable_example(source: Source, config: settings.TrainInput, global_batch: int,
                       step: int, process_index: int, process_count: int) -> str | None:
  """The first example of this process's share of global step `step` that the training
  transform cannot decode, with the reason: "path: reason" (None if all decode)."""
  local_batch = global_batch // process_count
  steps = steps_per_epoch(source, global_batch)
  epoch, step_in_epoch = divmod(step, steps)
  order_seed = tf.constant([config.seed, epoch], tf.int64)
  for row in range(local_batch):
    position = step_in_epoch * global_batch + process_index * local_batch + row
    index = tf.random.experimental.index_shuffle(tf.constant(position, tf.int64), order_seed,
                                                 source.num_examples - 1)
    try:
      encoded, _ = source.read(index)
      transforms.train_transform(encoded, tf.constant([0, 0], tf.int64), config)
    except tf.errors.OpError as err:
      where = (source.files[int(index)][0] if source.files is not None
               else f"{source.name} example #{int(index)}")
      return f"{where}: {err.message.strip().splitlines()[0]}"
  return None


def _pad(batch: dict, size: int) -> dict:
  n = len(batch["label"])
  pad = size - n
  return {"image": np.concatenate([batch["image"],
                                   np.zeros((pad,) + batch["image"].shape[1:], np.float32)]),
          "label": np.concatenate([batch["label"], np.zeros((pad,), np.int32)]),
          "mask": np.concatenate([np.ones((n,), np.float32), np.zeros((pad,), np.float32)])}
