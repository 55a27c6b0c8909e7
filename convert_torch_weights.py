"""Convert official PyTorch SPANet and SPANetV2 checkpoints to spanet-jax, and back.

  python convert_torch_weights.py --model spanet_s --input spanet-small.pth --output DIR
  python convert_torch_weights.py --input spanet-small.pth --output DIR --verify
  python convert_torch_weights.py --to-torch --input DIR --output spanet-small-from-jax.pth

--model may be omitted: the variant is read off the tensors' shapes. --verify runs the
converted model and the PyTorch reference on the same weights (random inputs and real
photographs, at each --verify-sizes resolution) and refuses to write past tolerance.
Exit status: 0 done, 1 verification failed, 2 bad input. Nothing is written on failure.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  parser.add_argument("--input", required=True,
                      help="official .pth (or, with --to-torch, a spanet-jax checkpoint dir)")
  parser.add_argument("--output", required=True,
                      help="checkpoint directory to write (or, with --to-torch, a .pth file)")
  parser.add_argument("--model", default=None,
                      help="spanet_s ... spanet_bx or spanetv2_s18_pure ... "
                           "spanetv2_b36_hybrid (default: inferred from the file)")
  parser.add_argument("--to-torch", action="store_true",
                      help="convert a spanet-jax checkpoint to an official-layout state_dict")
  parser.add_argument("--learnable-masks", action="store_true",
                      help="SPANet: keep the file's spectral masks as trainable parameters "
                           "instead of checking them against the formula (SPANetV2's are "
                           "always parameters)")
  parser.add_argument("--verify", action="store_true",
                      help="compare with the PyTorch reference before writing")
  parser.add_argument("--verify-sizes", type=int, nargs="+", default=[224, 256],
                      help="input resolutions for --verify (default: 224 256)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing --output")
  return parser.parse_args(argv)


def _check_output(path: str, overwrite: bool, is_directory: bool) -> None:
  """Refuse, before any work, an output that exists (unless --overwrite), that is of the
  wrong kind, or whose folder cannot be created or written (its parents are created when
  writing)."""
  from spanet_jax.tools import cli  # pylint: disable=g-import-not-at-top

  if os.path.exists(path):
    if not overwrite:
      raise cli.UsageError(f"{path} already exists; pass --overwrite to replace it")
    if is_directory != os.path.isdir(path):
      raise cli.UsageError(f"--output {path} is a {'file' if is_directory else 'directory'}; "
                       f"the output is a {'directory' if is_directory else 'file'}")
  ancestor = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise cli.UsageError(f"cannot create --output {path}: {ancestor} is a file")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise cli.UsageError(f"cannot create --output {path}: {ancestor} is not writable")


def _report(results) -> bool:
  from spanet_jax.reference import verify  # pylint: disable=g-import-not-at-top

  for result in results:
    print(f"  {result}")
  passed = all(r.passed for r in results)
  print(f"verification {'passed' if passed else 'FAILED'} "
        f"(tolerance: rel L2 <= {verify.REL_L2_TOLERANCE:g}, identical top-1)")
  return passed


def to_flax(args) -> int:
  from spanet_jax import convert  # pylint: disable=g-import-not-at-top
  from spanet_jax.data import labels  # pylint: disable=g-import-not-at-top
  from spanet_jax.models import pretrained, registry  # pylint: disable=g-import-not-at-top
  from spanet_jax.reference import verify  # pylint: disable=g-import-not-at-top

  state_dict = convert.load_state_dict_file(args.input)
  name, overrides, params = convert.torch_to_flax(state_dict, args.model, args.learnable_masks)
  entry = f" (its {state_dict.entry!r} entry)" if getattr(state_dict, "entry", None) else ""
  print(f"read {args.input}{entry}: {name}, {len(state_dict)} tensors")
  if args.verify:
    model = registry.build_model(name, **overrides)
    if not _report(verify.verify(model, {"params": params}, state_dict, args.verify_sizes, name)):
      print(f"error: not written: the converted model disagrees with the reference",
            file=sys.stderr)
      return 1
  extra = {"source": os.path.basename(args.input)}
  if not overrides.get("features_only") and overrides.get(
      "num_classes", registry.model_info(name).num_classes) == labels.NUM_IMAGENET_CLASSES:
    try:
      extra["class_names"] = list(labels.imagenet_class_names())
    except labels.LabelsError:
      pass  # the tools fall back to the same names when they can read them
  pretrained.save_pretrained(args.output, name, params, overrides, extra=extra,
                             overwrite=args.overwrite)
  print(f"wrote {args.output} (load with spanet_jax.load_pretrained)")
  return 0


def to_torch(args) -> int:
  from spanet_jax import convert  # pylint: disable=g-import-not-at-top
  from spanet_jax.models import pretrained  # pylint: disable=g-import-not-at-top
  from spanet_jax.reference import verify  # pylint: disable=g-import-not-at-top

  metadata = pretrained.read_metadata(args.input)
  model, variables = pretrained.load_pretrained(args.input)
  state_dict = convert.flax_to_torch(variables["params"], metadata["model"],
                                     metadata["overrides"])
  print(f"read {args.input}: {metadata['model']}, {len(state_dict)} tensors")
  if args.verify:
    if not _report(verify.verify(model, variables, state_dict, args.verify_sizes,
                                 metadata["model"])):
      print("error: not written: the exported state_dict disagrees with the Flax model",
            file=sys.stderr)
      return 1
  convert.save_state_dict_file(state_dict, args.output)
  print(f"wrote {args.output} (official key layout; loads with strict=True)")
  return 0


def main(argv=None) -> int:
  args = parse_args(argv)
  from spanet_jax.tools import cli  # pylint: disable=g-import-not-at-top

  return cli.run(lambda: _convert(args))


def _convert(args) -> int:
  from spanet_jax.models import registry  # pylint: disable=g-import-not-at-top
  from spanet_jax.tools import cli  # pylint: disable=g-import-not-at-top

  if args.model is not None:
    try:
      registry.model_info(args.model)
    except ValueError as err:
      raise cli.UsageError(str(err)) from None
  cli.refuse_output_over_input(args.output, "--output", [args.input])
  _check_output(args.output, args.overwrite, is_directory=not args.to_torch)
  return to_torch(args) if args.to_torch else to_flax(args)

if __name__ == "__main__":
  sys.exit(main())
