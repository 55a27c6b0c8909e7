"""Throughput, start-up time and memory of the training input pipeline.

Builds the training batches exactly as train.py does (same config, same source, same
function) and reads them as fast as it can, with no model:

  python benchmarks/input_pipeline.py --folder /tmp/photos --config configs/spanet_s.py \\
      --batch 64 --batches 15 --start-step 0 --json

`--folder` is a class-per-folder tree (DIR/train/<class>/...; make one with
benchmarks/make_photo_folder.py); without it the config's TFDS dataset is read. The
last stdout line is one JSON object (`--eval`: the evaluation pipeline over the same
images): images_per_s (after the warm-up batches),
first_batch_s (from building the pipeline to the first batch), peak_rss_mib (of this
process, TensorFlow and JAX imported).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402,F401  pylint: disable=unused-import  (train.py's process has it)

import spanet_jax  # noqa: E402
from spanet_jax.data import pipeline, preprocess  # noqa: E402
from spanet_jax.data import settings as data_settings


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("benchmark_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--folder", default="", help="class-per-folder root (DIR/train/...)")
  parser.add_argument("--config", default="configs/spanet_s.py")
  parser.add_argument("--batch", type=int, default=64, help="global batch")
  parser.add_argument("--batches", type=int, default=15, help="batches to read")
  parser.add_argument("--warmup", type=int, default=3, help="batches before timing starts")
  parser.add_argument("--start-step", type=int, default=0, help="resume at this step")
  parser.add_argument("--eval", action="store_true",
                      help="the evaluation pipeline instead, over the same training images")
  parser.add_argument("--json", action="store_true", help="last line as JSON only")
  args = parser.parse_args(argv)
  if args.batches <= args.warmup:
    parser.error("--batches must exceed --warmup")

  config = load_config(args.config)
  if args.folder:
    config.folder = args.folder
  config.batch_size = args.batch
  try:
    start = time.perf_counter()
    builder = pipeline.make_builder(data_settings.DatasetSource.from_config(config))
    source = pipeline.make_source(builder, config.train_split)
    if args.eval:  # the model's own evaluation preprocessing, as train.py evaluates
      info = spanet_jax.model_info(config.model)
      eval_data = preprocess.DataConfig(config.image_size, info.crop_pct, info.mean, info.std,
                                        info.interpolation)
      batches = (batch for batch, _ in pipeline.eval_batches(source, eval_data, config.batch_size,
                                                         0, 1, config.prefetch))
    else:
      batches = pipeline.train_batches(source, data_settings.TrainInput.from_config(config),
                                      config.batch_size, args.start_step, 0, 1)
    times = []
    for _ in range(args.batches):
      batch = next(batches)
      times.append(time.perf_counter())
  except pipeline.DataError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  timed = args.batches - args.warmup
  result = {
      "loader": "spanet_jax", "pipeline": "eval" if args.eval else "train",
      "images_per_s": timed * args.batch / (times[-1] - times[args.warmup - 1]),
      "first_batch_s": times[0] - start,
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "batch": args.batch, "batches": args.batches, "start_step": args.start_step,
      "steps_per_epoch": pipeline.steps_per_epoch(source, args.batch),
      "image_shape": list(batch["image"].shape), "cpus": os.cpu_count()}
  print(json.dumps(result) if args.json else result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
