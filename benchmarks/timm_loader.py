"""The official recipe's training loader, for comparison with benchmarks/input_pipeline.py.

timm's training transform for SPANet (RandomResizedCrop 224 bicubic, flip, RandAugment
rand-m9-mstd0.5-inc1, normalise, random erasing p=0.25 "pixel") over torchvision's
ImageFolder, through a torch DataLoader with worker processes. Run it from its own
environment (not this project's; see BENCHMARKS.md):

  /path/to/timm-venv/bin/python benchmarks/timm_loader.py --folder /tmp/photos --json

The last stdout line is one JSON object with the same fields as input_pipeline.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import psutil
import torch
from timm.data import auto_augment, create_transform
from torchvision.datasets import ImageFolder


def _posterize_at_least_one_bit(img, bits_to_keep, **kwargs):
  # timm 1.0.31 can draw 0 bits at magnitude 10; Pillow 13 rejects 0. One bit is what
  # older Pillow produced for 0.
  return _posterize(img, max(int(bits_to_keep), 1), **kwargs)


_posterize = auto_augment.posterize
for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
  auto_augment.NAME_TO_OP[_name] = _posterize_at_least_one_bit


def tree_rss_mib(process: psutil.Process) -> float:
  total = 0
  for p in [process] + process.children(recursive=True):
    try:
      total += p.memory_info().rss
    except psutil.Error:
      pass
  return total / 2**20


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--folder", required=True, help="root with a train/<class>/ tree")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--batches", type=int, default=15)
  parser.add_argument("--warmup", type=int, default=3, help="batches before timing starts")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--eval", action="store_true",
                      help="timm's eval transform (SPANet-S: crop_pct 0.9, bicubic) instead")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  torch.set_num_threads(1)
  if args.eval:
    transform = create_transform(224, is_training=False, crop_pct=0.9,
                                 interpolation="bicubic")
  else:
    transform = create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                 re_prob=0.25, re_mode="pixel", interpolation="bicubic")
  start = time.perf_counter()
  dataset = ImageFolder(os.path.join(args.folder, "train"), transform=transform)
  loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=not args.eval,
                                       num_workers=args.workers, drop_last=True,
                                       persistent_workers=True)
  me = psutil.Process()
  peak = 0.0
  times = []
  batches = iter(loader)
  while len(times) < args.batches:
    try:
      images, _ = next(batches)
    except StopIteration:
      batches = iter(loader)
      continue
    times.append(time.perf_counter())
    peak = max(peak, tree_rss_mib(me))
    del images
  timed = args.batches - args.warmup
  result = {
      "loader": "timm", "pipeline": "eval" if args.eval else "train", "images_per_s": timed * args.batch / (times[-1] - times[args.warmup - 1]),
      "first_batch_s": times[0] - start, "peak_rss_mib": peak,
      "peak_rss_main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "batch": args.batch, "batches": args.batches, "workers": args.workers}
  print(json.dumps(result) if args.json else result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
