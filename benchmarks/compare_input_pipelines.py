"""Our training input pipeline against the official recipe's timm loader, alternating.

Each round runs benchmarks/input_pipeline.py (this environment) and then
benchmarks/timm_loader.py (the timm environment's Python, `--timm-python`) as separate
processes on the same folder, so both see the same machine state in turn:

  python benchmarks/compare_input_pipelines.py --folder /tmp/photos \\
      --timm-python /path/to/timm-venv/bin/python --rounds 5

`--eval` compares the evaluation pipelines (ours: PIL decode and resize, exactly
timm's arrays) in the same way. Prints one line per round and, last, one JSON object with the per-round ratios and their
median, plus the first-batch time at step 0 and at `--late-step` (just before the end
of the first epoch) from our pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run(command: list[str]) -> dict:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
  if out.returncode != 0:
    raise SystemExit(f"error: {' '.join(command)} failed:\n{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--folder", required=True)
  parser.add_argument("--timm-python", required=True)
  parser.add_argument("--config", default="configs/spanet_s.py")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--batches", type=int, default=15)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--late-step", type=int, default=-1,
                      help="resume step to time; -1: the last step of the first epoch")
  parser.add_argument("--eval", action="store_true",
                      help="compare the evaluation pipelines (timm's eval transform) instead")
  args = parser.parse_args(argv)
  mode = ["--eval"] if args.eval else []
  ours_cmd = [sys.executable, os.path.join(HERE, "input_pipeline.py"), "--folder", args.folder,
              "--config", args.config, "--batch", str(args.batch),
              "--batches", str(args.batches), "--json"] + mode
  timm_cmd = [args.timm_python, os.path.join(HERE, "timm_loader.py"), "--folder", args.folder,
              "--batch", str(args.batch), "--batches", str(args.batches), "--json"] + mode
  rounds = []
  for index in range(args.rounds):
    late = args.late_step
    ours = run(ours_cmd + ["--start-step", "0"])
    if late < 0:
      late = ours["steps_per_epoch"] - 1
    timm = run(timm_cmd)
    resumed = run(ours_cmd + ["--start-step", str(late)])
    rounds.append({"ours": ours["images_per_s"], "ours_late": resumed["images_per_s"],
                   "timm": timm["images_per_s"],
                   "ratio": ours["images_per_s"] / timm["images_per_s"],
                   "first_batch_s": ours["first_batch_s"],
                   "first_batch_late_s": resumed["first_batch_s"], "late_step": late,
                   "peak_rss_mib": max(ours["peak_rss_mib"], resumed["peak_rss_mib"]),
                   "timm_peak_rss_mib": timm["peak_rss_mib"]})
    r = rounds[-1]
    print(f"round {index + 1}: ours {r['ours']:.0f} img/s, timm {r['timm']:.0f} img/s, "
          f"ratio {r['ratio']:.2f}; first batch {r['first_batch_s']:.2f} s at step 0, "
          f"{r['first_batch_late_s']:.2f} s at step {late}; peak RSS {r['peak_rss_mib']:.0f} "
          f"MiB (timm loader, all processes: {r['timm_peak_rss_mib']:.0f})", flush=True)
  summary = {
      "median_ratio": statistics.median(r["ratio"] for r in rounds),
      "min_ratio": min(r["ratio"] for r in rounds),
      "median_ours": statistics.median(r["ours"] for r in rounds),
      "median_timm": statistics.median(r["timm"] for r in rounds),
      "median_first_batch_s": statistics.median(r["first_batch_s"] for r in rounds),
      "median_first_batch_late_s": statistics.median(r["first_batch_late_s"] for r in rounds),
      "max_peak_rss_mib": max(r["peak_rss_mib"] for r in rounds), "rounds": rounds}
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
