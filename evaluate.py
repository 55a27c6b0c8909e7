"""Top-1 and top-5 accuracy of a SPANet checkpoint on a TFDS split or a folder of images.

  python evaluate.py --checkpoint converted/spanet_s --data imagenet2012:validation
  python evaluate.py --checkpoint converted/spanet_s --data /data/imagenet/val
  python evaluate.py --checkpoint /tmp/spanet_demo --data sklearn_digits:test \\
      --output results.json --predictions predictions.csv

--data is DATASET:SPLIT for TFDS (--data-dir, --manual-dir as for train.py) or a
class-per-folder directory (<dir>/<class>/<image>). Folder names are matched to the
model's classes by ImageNet synset id (n01440764), by the checkpoint's class names, by
class index, or, when there are exactly as many folders as classes, in sorted order.
Images are prepared exactly as train.py's evaluation prepares them (timm's eval
transform, through PIL), every image is counted once, and batches are split over all
devices. Exit status: 0 done, 2 bad input (nothing is written).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  parser.add_argument("--checkpoint", required=True,
                      help="a converted checkpoint, a train.py workdir, or init:MODEL")
  parser.add_argument("--data", required=True,
                      help="DATASET:SPLIT (TFDS) or a class-per-folder directory")
  # The underscore spellings are train.py's (--config.data_dir, --config.manual_dir).
  parser.add_argument("--data-dir", "--data_dir", dest="data_dir", default="",
                      help="TFDS data directory")
  parser.add_argument("--manual-dir", "--manual_dir", dest="manual_dir", default="",
                      help="TFDS manual download directory")
  parser.add_argument("--batch-size", type=int, default=64,
                      help="global batch, a multiple of the device count")
  parser.add_argument("--output", default=None, help="write the result as JSON here")
  parser.add_argument("--predictions", default=None,
                      help="write each image's label and top-5 classes as CSV here")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  from spanet_jax.tools import cli  # pylint: disable=g-import-not-at-top
  return cli.run(lambda: evaluate(args))


def folder_class_index(folders, loaded) -> tuple[dict[str, int], str]:
  """Which model class each folder holds, and by which rule (see the module docstring)."""
  from spanet_jax.data import labels  # pylint: disable=g-import-not-at-top
  from spanet_jax.tools import cli  # pylint: disable=g-import-not-at-top

  if loaded.num_classes == labels.NUM_IMAGENET_CLASSES:
    synsets = {s: i for i, s in enumerate(labels.imagenet_synsets())}
    if all(f in synsets for f in folders):
      return {f: synsets[f] for f in folders}, "ImageNet synset id"
  names = {n: i for i, n in enumerate(loaded.class_names)}
  if all(f in names for f in folders):
    return {f: names[f] for f in folders}, "class name"
  if all(f.isdigit() and int(f) < loaded.num_classes for f in folders):
    return {f: int(f) for f in folders}, "class index"
  if len(folders) == loaded.num_classes:
    return {f: i for i, f in enumerate(folders)}, "sorted order (the i-th folder is class i)"
  raise cli.UsageError(
      f"cannot tell which of the model's {loaded.num_classes} classes each of the "
      f"{len(folders)} folders holds: name them by ImageNet synset id (n01440764), by class "
      f"name or by class index, or give one folder per class")


def make_source(args, loaded):
  from spanet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from spanet_jax.tools import cli  # pylint: disable=g-import-not-at-top

  if os.path.isdir(args.data):
    for split in ("val", "validation"):  # train.py's root: score its validation split
      if (os.path.isdir(os.path.join(args.data, split))
          and os.path.isdir(os.path.join(args.data, "train"))):
        args.data = os.path.join(args.data, split)
        print(f"--data is a train/ and {split}/ tree: evaluating {args.data}",
              file=sys.stderr)
        break
    class_index, rule = folder_class_index(pipeline.folder_classes(args.data), loaded)
    return pipeline.folder_source(args.data, class_index), {"by": rule, "folders": class_index}
  if ":" not in args.data:
    raise cli.UsageError(f"--data {args.data}: no such directory, and not DATASET:SPLIT")
  from spanet_jax.data import settings  # pylint: disable=g-import-not-at-top

  dataset, split = args.data.split(":", 1)
  source = settings.DatasetSource(dataset=dataset, data_dir=args.data_dir,
                                  manual_dir=args.manual_dir, folder="", train_split=split)
  builder = pipeline.make_builder(source, {"data_dir": "--data-dir", "manual_dir": "--manual-dir",
                                           "folder": "--data DIR"})
  names = pipeline.class_names(builder)
  if names is not None and len(names) != loaded.num_classes:
    raise cli.UsageError(f"{args.data} has {len(names)} classes but the checkpoint's model "
                         f"has {loaded.num_classes}")
  return pipeline.make_source(builder, split), None


def evaluate(args) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from spanet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from spanet_jax.tools import cli, inference  # pylint: disable=g-import-not-at-top
  from spanet_jax.train import mesh  # pylint: disable=g-import-not-at-top

  devices = jax.local_device_count()
  if args.batch_size < 1 or args.batch_size % devices:
    raise cli.UsageError(f"--batch-size {args.batch_size} must be a positive multiple of the "
                         f"{devices} devices")
  for flag, path in (("--output", args.output), ("--predictions", args.predictions)):
    if path:
      cli.refuse_output_over_input(path, flag, [args.data, args.checkpoint])
      cli.check_writable(path)
  loaded = inference.load(args.checkpoint)
  inference.require_classifier(loaded)
  source, class_mapping = make_source(args, loaded)
  partitioning = mesh.Partitioning.create(devices=jax.local_devices())
  params = jax.device_put(loaded.variables["params"], partitioning.replicated)
  predict = jax.jit(lambda p, images: inference.predict_step(p, images, model=loaded.model),
                    out_shardings=partitioning.replicated)
  print(f"evaluating {loaded.name} from {loaded.path} on {args.data}: {source.num_examples} "
        f"images, batch {args.batch_size} over {devices} devices", file=sys.stderr, flush=True)
  if class_mapping:
    print(f"folders matched to the model's classes by {class_mapping['by']}",
          file=sys.stderr, flush=True)

  hits = {"top1": 0, "top5": 0}
  rows = []
  count, start, last_report = 0, time.perf_counter(), time.perf_counter()
  for batch, names in pipeline.eval_batches(source, loaded.data, args.batch_size, 0, 1):
    images = jax.make_array_from_process_local_data(partitioning.batch, batch["image"])
    classes, probs = (np.asarray(a) for a in predict(params, images))
    n = len(names)  # the real rows; the rest is padding
    labels, classes, probs = batch["label"][:n], classes[:n], probs[:n]
    hits["top1"] += int(np.sum(classes[:, 0] == labels))
    hits["top5"] += int(np.sum(np.any(classes == labels[:, None], axis=1)))
    count += n
    rows += [[name, int(label), *map(int, c), f"{float(p[0]):.6f}"]
             for name, label, c, p in zip(names, labels, classes, probs)]
    if time.perf_counter() - last_report > 10 or count == source.num_examples:
      rate = count / (time.perf_counter() - start)
      print(f"  {count}/{source.num_examples} images  top-1 {hits['top1'] / count:.4f}  "
            f"{rate:.1f} img/s", file=sys.stderr, flush=True)
      last_report = time.perf_counter()
  if count != source.num_examples:
    raise RuntimeError(f"evaluated {count} of {source.num_examples} images")
  result = {"checkpoint": loaded.path, "model": loaded.name, "data": args.data,
            "num_images": count, "top1": hits["top1"] / count, "top5": hits["top5"] / count,
            "input_size": loaded.data.input_size, "crop_pct": loaded.data.crop_pct}
  if class_mapping:
    result["class_mapping"] = class_mapping
  print(f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
        f"({count} images)")
  if args.output:
    cli.write_atomically(args.output, json.dumps(result, indent=2) + "\n")
  if args.predictions:
    k = min(5, loaded.num_classes)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["image", "label", *[f"top{i + 1}" for i in range(k)], "top1_probability"])
    writer.writerows(rows)
    cli.write_atomically(args.predictions, text.getvalue())
  return 0


if __name__ == "__main__":
  # TensorFlow's start-up notices (C++ INFO lines, oneDNN's) off the console.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  sys.exit(main())
