"""Export a SPANet checkpoint for serving, weights embedded.

  python export.py --checkpoint weights/spanet_s --format stablehlo --output spanet_s.stablehlo
  python export.py --checkpoint weights/spanet_s --format savedmodel --output spanet_s_savedmodel
  python export.py --checkpoint DIR --format savedmodel --output OUT --batch 8 --size 256 256

stablehlo: a jax.export artifact, `jax.export.deserialize(open(path, "rb").read())
.call(images)` -> logits, for every platform in --platforms. savedmodel: a TensorFlow
SavedModel whose `serving_default` signature takes `images` (float32 NHWC) and returns
`logits`, runnable from TensorFlow alone (TF Serving). tflite: converted from such a
SavedModel (fixed batch, default 1). Images are prepared as for predict.py (the model's
metadata: resize, centre crop, normalise). Every artifact is run on random images and
compared with the JAX model before it is kept. Beside the artifact, OUTPUT.json
describes its input: size, how images are resized and cropped, mean and std (the
artifact takes normalised images), class names, and the platforms it was checked on.
Exit status: 0 done, 1 the artifact
disagrees with the model (nothing kept), 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

FORMATS = ("stablehlo", "savedmodel", "tflite")
TOLERANCE = 1e-4  # relative L2 of the logits


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  parser.add_argument("--checkpoint", required=True,
                      help="a converted checkpoint, a train.py workdir, or init:MODEL")
  parser.add_argument("--format", required=True, choices=FORMATS)
  parser.add_argument("--output", required=True, help="file (stablehlo, tflite) or directory")
  parser.add_argument("--batch-size", "--batch", dest="batch", default="dynamic",
                      help="a batch size, or dynamic (default)")
  parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                      help="input height and width (default: the model's input size)")
  parser.add_argument("--platforms", default=None,
                      help="comma-separated: cpu, cuda, rocm, tpu (default: cpu,cuda,tpu for "
                           "stablehlo, cpu for savedmodel and tflite)")
  parser.add_argument("--overwrite", action="store_true")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  from spanet_jax.tools import cli  # pylint: disable=g-import-not-at-top
  return cli.run(lambda: export(args))


def export(args) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from spanet_jax import outputs  # pylint: disable=g-import-not-at-top
  from spanet_jax.models import pretrained  # pylint: disable=g-import-not-at-top
  from spanet_jax.tools import cli, export as exporting, inference  # pylint: disable=g-import-not-at-top

  if args.batch == "dynamic":
    batch = None
  elif args.batch.isdigit() and int(args.batch) > 0:
    batch = int(args.batch)
  else:
    raise cli.UsageError(f"--batch {args.batch}: give a positive number or dynamic")
  if args.format == "tflite" and batch is None:
    batch = 1  # TFLite's converter takes fixed shapes only
  default_platforms = "cpu,cuda,tpu" if args.format == "stablehlo" else "cpu"
  platforms = tuple(p.strip() for p in (args.platforms or default_platforms).split(",") if p)
  try:
    exporting.platform.backend_for_platforms(platforms)
  except ValueError as err:
    raise cli.UsageError(f"--platforms: {err}") from None
  cli.refuse_output_over_input(args.output, "--output", [args.checkpoint])
  exporting.check_output(args.output, args.overwrite)
  loaded = inference.load(args.checkpoint)
  size = tuple(args.size) if args.size else (loaded.data.input_size,) * 2
  if min(size) < 32 or size[0] % 32 or size[1] % 32:
    raise cli.UsageError(f"--size {size[0]} {size[1]}: height and width must be multiples of "
                         f"32 (the backbone's stride), at least 32")
  model, variables = loaded.model, loaded.variables
  images = np.random.default_rng(0).standard_normal(
      (batch or 2, size[0], size[1], 3)).astype(np.float32)
  want = np.asarray(jax.jit(lambda x: model.apply(variables, x, train=False))(images))
  print(f"exporting {loaded.name} from {loaded.path} as {args.format} for "
        f"{','.join(platforms)}: images ({batch or 'any'}, {size[0]}, {size[1]}, 3)",
        file=sys.stderr, flush=True)

  staging = tempfile.mkdtemp(prefix=".export.", dir=os.path.dirname(os.path.abspath(args.output)))
  try:
    if args.format == "stablehlo":
      artifact = os.path.join(staging, "artifact")
      with open(artifact, "wb") as f:
        f.write(exporting.stablehlo(model, variables, size, batch, platforms))
      if "cpu" in platforms:
        with open(artifact, "rb") as f:
          got = np.asarray(jax.export.deserialize(bytearray(f.read())).call(images))
    else:
      saved = os.path.join(staging, "savedmodel")
      # TFLite reads the StableHLO inside the SavedModel: the convolution formulations
      # (those of accelerators) and a fixed batch are what its converter knows.
      tflite = args.format == "tflite"
      exporting.savedmodel(model, variables, size, saved, batch, platforms,
                           formulations="gpu" if tflite else None)
      artifact = saved
      if args.format == "tflite":
        artifact = os.path.join(staging, "model.tflite")
        exporting.tflite(saved, artifact)
        got = exporting.run_tflite(artifact, images)
      if "cpu" in platforms and args.format == "savedmodel":
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        serve = tf.saved_model.load(saved).signatures["serving_default"]
        got = serve(images=tf.constant(images))["logits"].numpy()
    # What this machine can run is checked; the rest is written as traced, and said so.
    verified = [p for p in platforms if p == "cpu"]
    if verified:
      error = exporting.compare(want, got)
      print(f"checked on random images: relative L2 difference {error:.2e} "
            f"(tolerance {TOLERANCE:g})", file=sys.stderr)
      if not error <= TOLERANCE:
        print("error: not written: the artifact disagrees with the model", file=sys.stderr)
        return 1
    unverified = [p for p in platforms if p not in verified]
    contract = exporting.preprocessing_contract(
        loaded, args.format, size, batch, verified, unverified)
    contract_path = exporting.contract_path(args.output)
    cli.write_atomically(os.path.join(staging, "contract.json"), json.dumps(contract, indent=2))
    outputs.replace(artifact, args.output)
    os.replace(os.path.join(staging, "contract.json"), contract_path)
  except OSError as err:  # a full disk, a lost permission
    raise cli.UsageError(pretrained.write_error(args.output, err)) from None
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  print(f"preprocessing described in {contract_path}", file=sys.stderr)
  print(f"verified on: {', '.join(verified) or 'none'}"
        + (f"; written unverified for {', '.join(unverified)} (not run on this machine)"
           if unverified else ""), file=sys.stderr)
  print(f"wrote {args.output}")
  return 0


if __name__ == "__main__":
  # TensorFlow's start-up notices (C++ INFO lines, oneDNN's) off the console.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  sys.exit(main())
