"""Classify images with a SPANet checkpoint: the top classes and their probabilities.

  python predict.py photo.jpg more/*.png --checkpoint converted/spanet_s
  python predict.py photo.jpg --checkpoint /tmp/spanet_demo       # a train.py workdir
  python predict.py photo.jpg --checkpoint DIR --top-k 3 --json predictions.json

Images are prepared from the model's metadata (resize to input_size / crop_pct with
bicubic interpolation, centre crop, normalise), as timm's evaluation does. Class names:
ImageNet's from TFDS for 1000-class models, the dataset's for train.py checkpoints.
Exit status: 0 done, 2 bad input (nothing is written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
  parser.add_argument("--checkpoint", required=True,
                      help="a converted checkpoint, a train.py workdir, or init:MODEL")
  parser.add_argument("--top-k", type=int, default=5, help="classes shown per image")
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--output", "--json", dest="json", default=None,
                      help="also write the predictions to this JSON file")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  from spanet_jax.tools import cli  # pylint: disable=g-import-not-at-top
  return cli.run(lambda: predict(args))


def predict(args) -> int:
  from spanet_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from spanet_jax.tools import cli, inference  # pylint: disable=g-import-not-at-top

  if args.top_k < 1 or args.batch_size < 1:
    raise cli.UsageError("--top-k and --batch-size must be positive")
  if args.json:
    cli.refuse_output_over_input(args.json, "--json", [*args.images, args.checkpoint])
    cli.refuse_replacing_non_json(args.json, "--json")
    cli.check_writable(args.json)
  for path in args.images:  # fail on a bad file before loading the model
    preprocess.load_image(path)
  loaded = inference.load(args.checkpoint)
  inference.require_classifier(loaded)
  logits_fn = inference.predict_fn(loaded)
  print(f"{loaded.name} from {loaded.path}: {loaded.num_classes} classes, "
        f"{loaded.data.input_size}px, crop_pct {loaded.data.crop_pct}", file=sys.stderr)
  results = []
  for start in range(0, len(args.images), args.batch_size):
    paths = args.images[start:start + args.batch_size]
    classes, probs = inference.top_k(logits_fn(inference.load_images(paths, loaded.data)),
                                     args.top_k)
    for path, row_classes, row_probs in zip(paths, classes, probs):
      top = [{"class": int(c), "name": loaded.class_names[c], "probability": float(p)}
             for c, p in zip(row_classes, row_probs)]
      results.append({"image": path, "top": top})
      print(path)
      for entry in top:
        print(f"  {100 * entry['probability']:6.2f}%  {entry['name']} ({entry['class']})")
  if args.json:
    cli.write_atomically(args.json, json.dumps(
        {"checkpoint": loaded.path, "model": loaded.name, "predictions": results}, indent=2))
  return 0


if __name__ == "__main__":
  # TensorFlow's start-up notices (C++ INFO lines, oneDNN's) off the console.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  sys.exit(main())
