"""The paper's spectral analysis: how much high-frequency content each block keeps.

  python spectral_analysis.py --checkpoint converted/spanet_s --images photos/ --out spectra.png
  python spectral_analysis.py --checkpoint converted/spanet_s --checkpoint init:spanet_s \\
      --label "SPANet-S" --label "untrained" --sample-images --out spectra.png

For every block: the relative log amplitude of its output's 2-D Fourier transform
along the centred half-diagonal (docs/architecture.md, The paper's spectral analysis), averaged over the images and
channels. The figure has one panel of curves per model (colour = depth) and one of the
highest-frequency value against normalised depth for all models; the numbers go to a
CSV beside the figure (one row per block). --checkpoint takes converted checkpoints,
train.py workdirs, or init:MODEL for untrained weights; repeat it to compare models.
Exit status: 0 done, 2 bad input (nothing is written).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import os
import sys

from spanet_jax import outputs


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  parser.add_argument("--checkpoint", action="append", required=True,
                      help="a checkpoint to analyse; repeat to compare several")
  parser.add_argument("--label", action="append", default=None,
                      help="legend name of each --checkpoint, in the same order")
  parser.add_argument("--images", nargs="+", default=[],
                      help="image files, or directories searched for images")
  parser.add_argument("--sample-images", action="store_true",
                      help="also use the colour photographs that ship with scikit-image")
  parser.add_argument("--max-images", type=int, default=256)
  parser.add_argument("--image-size", type=int, default=None,
                      help="input size to analyse at (default: each model's own)")
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--output", "--out", dest="out", required=True,
                      help="the figure (.png, .pdf or .svg)")
  parser.add_argument("--csv", default=None, help="the numbers (default: --out with .csv)")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  from spanet_jax.tools import cli  # pylint: disable=g-import-not-at-top
  return cli.run(lambda: analyse(args))


def image_paths(args) -> list[str]:
  from spanet_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from spanet_jax.tools import cli  # pylint: disable=g-import-not-at-top
  from spanet_jax.data.pipeline import IMAGE_EXTENSIONS  # pylint: disable=g-import-not-at-top

  paths = []
  for item in args.images:
    if os.path.isdir(item):
      for dirpath, dirnames, filenames in os.walk(item):
        dirnames.sort()
        paths += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    elif os.path.isfile(item):
      paths.append(item)
    else:
      raise cli.UsageError(f"--images {item}: no such file or directory")
  if args.sample_images:
    paths += preprocess.sample_photo_paths()
  if not paths:
    raise cli.UsageError("no images: give --images files or directories, or --sample-images")
  return paths[:args.max_images]


def default_label(loaded) -> str:
  """'spanet_s (run7)' for DIR/run7/final, 'spanet_s (untrained)' for init:spanet_s."""
  if loaded.path.startswith("init:"):
    return f"{loaded.name} (untrained)"
  path = loaded.path.rstrip(os.sep)
  if os.path.basename(path) in ("final", "best"):  # inside a train.py workdir
    path = os.path.dirname(path)
  return f"{loaded.name} ({os.path.basename(path)})"


def analyse(args) -> int:
  import numpy as np  # pylint: disable=g-import-not-at-top

  from spanet_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from spanet_jax.tools import cli, frequency_analysis, inference  # pylint: disable=g-import-not-at-top

  labels = args.label or []
  if labels and len(labels) != len(args.checkpoint):
    raise cli.UsageError(f"{len(labels)} --label for {len(args.checkpoint)} --checkpoint")
  if args.max_images < 1 or args.batch_size < 1:
    raise cli.UsageError("--max-images and --batch-size must be positive")
  if args.image_size is not None and (args.image_size < 32 or args.image_size % 32):
    raise cli.UsageError(f"--image-size {args.image_size}: use a multiple of 32 (the "
                         "backbone's stride), at least 32")
  if os.path.splitext(args.out)[1].lower() not in (".png", ".pdf", ".svg"):
    raise cli.UsageError(f"--out {args.out}: use a .png, .pdf or .svg file name")
  csv_path = args.csv or os.path.splitext(args.out)[0] + ".csv"
  for flag, path in (("--out", args.out), ("--csv", csv_path)):
    cli.refuse_output_over_input(path, flag, [*args.images, *args.checkpoint])
    cli.check_writable(path)
  paths = image_paths(args)
  pictures = [preprocess.load_image(p) for p in paths]  # a bad file fails before any work
  results, rows, sizes = {}, [], set()
  for number, checkpoint in enumerate(args.checkpoint):
    loaded = inference.load(checkpoint)
    label = labels[number] if labels else default_label(loaded)
    if label in results:
      label = f"{label} #{number + 1}"
    data = dataclasses.replace(loaded.data, input_size=args.image_size or loaded.data.input_size)
    sizes.add(data.input_size)
    images = [data.transform(p) for p in pictures]
    last = data.input_size // 32
    if last < 4:
      print(f"warning: at {data.input_size}px the last stage's maps are {last}x{last}: too "
            "few frequencies for a profile; use --image-size 128 or more", file=sys.stderr)
    print(f"{label}: {len(images)} images at {data.input_size}px (compiling the model first)",
          file=sys.stderr, flush=True)
    spectra = frequency_analysis.analyse(
        loaded.model, loaded.variables, np.stack(images), args.batch_size,
        progress=lambda done, total: print(f"  {done}/{total} images", file=sys.stderr,
                                           flush=True))
    results[label] = spectra
    rows += frequency_analysis.csv_rows(label, loaded.path, spectra)
    print(f"  {len(spectra)} blocks; highest-frequency relative log amplitude from "
          f"{spectra[0].high_frequency:.3f} (first block) to {spectra[-1].high_frequency:.3f} "
          f"(last)", file=sys.stderr)
  if len(sizes) > 1:
    listed = ", ".join(str(size) for size in sorted(sizes))
    print(f"warning: the models were analysed at different sizes ({listed}px): their "
          "profiles do not compare frequency for frequency; pass --image-size", file=sys.stderr)
  text = io.StringIO()
  writer = csv.writer(text)
  writer.writerow(frequency_analysis.CSV_HEADER)
  writer.writerows(rows)
  def draw(temporary: str) -> None:  # the table is written once the figure is drawn
    frequency_analysis.plot(results, temporary)
    cli.write_atomically(csv_path, text.getvalue())

  outputs.write_file(args.out, draw)
  print(f"wrote {args.out} and {csv_path}")
  return 0


if __name__ == "__main__":
  # TensorFlow's start-up notices (C++ INFO lines, oneDNN's) off the console.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  sys.exit(main())
