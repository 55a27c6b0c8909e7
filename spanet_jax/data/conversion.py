"""An ArrayRecord copy of a TFDS dataset prepared as TFRecord, written beside it.

Training reads examples by index (a stateless shuffle per epoch, O(1) resume, each host
its own share), which TFRecord files cannot serve: they are read front to back. TFDS's
default format is TFRecord, so most prepared ImageNets are. The copy holds the same
serialized examples in the same order, shard for shard, and the dataset's
dataset_info.json then lists ArrayRecord as an alternative format; TFDS and tf.data
readers of the TFRecord files are unaffected. It costs one sequential read of the
dataset and about its size again on disk; a conversion that was interrupted resumes
at the first shard not yet written.
"""

from __future__ import annotations

import time
from typing import Callable

from etils import epath
from tensorflow_datasets.core import dataset_info as dataset_info_lib
from tensorflow_datasets.core import file_adapters

ARRAY_RECORD = file_adapters.FileFormat.ARRAY_RECORD


def has_array_record(info) -> bool:
  """Whether the dataset is stored as ArrayRecord (as its format or an alternative)."""
  # A builder defined in code restores alternative formats into its proto only: the
  # list that TFDS's readers consult stays empty unless it is told again.
  listed = {f.value for f in info.alternative_file_formats}
  for value in list(info.as_proto.alternative_file_formats):
    if value not in listed:
      info.add_alternative_file_format(value)
      listed.add(value)
  return ARRAY_RECORD in info.available_file_formats()


def _split_files(info, data_dir: epath.Path, file_format) -> dict[str, list[epath.Path]]:
  splits = dataset_info_lib.get_split_dict_from_proto(
      dataset_info_proto=info.as_proto, data_dir=data_dir, file_format=file_format)
  return {name: list(split.filepaths) for name, split in splits.items()}


def add_array_record_copy(builder, report: Callable[[str], None] = print) -> None:
  """Write every split of `builder`'s TFRecord dataset as ArrayRecord shards beside it
  and record the format in its dataset_info.json.

  Raises:
    OSError: the dataset's directory cannot be written (a read-only bucket, a full disk).
  """
  info = builder.info
  data_dir = epath.Path(builder.data_dir)
  source_format = file_adapters.FileFormat(info.file_format)
  reader = file_adapters.ADAPTER_FOR_FORMAT[source_format]
  writer = file_adapters.ADAPTER_FOR_FORMAT[ARRAY_RECORD]
  sources = _split_files(info, data_dir, source_format)
  targets = _split_files(info, data_dir, ARRAY_RECORD)
  total = sum(split.num_examples for split in info.splits.values())
  report(f"{info.name} in {data_dir} is stored as {source_format.value}; writing an "
         f"ArrayRecord copy beside it for random access ({total} examples, once)")
  start, done = time.perf_counter(), 0
  for name, shards in sources.items():
    for source, target in zip(shards, targets[name]):
      if target.exists():  # written by an earlier, interrupted conversion
        continue
      partial = target.parent / f".{target.name}.incomplete"
      records = ((index, record.numpy())
                 for index, record in enumerate(reader.make_tf_data(source)))
      writer.write_examples(partial, records)
      partial.rename(target)
    done += info.splits[name].num_examples
    report(f"  {name}: {info.splits[name].num_examples} examples "
           f"({done}/{total}, {time.perf_counter() - start:.0f} s)")
  info.add_alternative_file_format(ARRAY_RECORD)
  info.write_to_directory(data_dir)
