"""Train SPANet: data-parallel over every device (and host), resumable.

  python train.py --config configs/spanet_s.py --workdir /ckpt/spanet_s
  python train.py --config configs/demo.py --workdir /tmp/demo           # 2-minute demo
  python train.py --config configs/spanet_s.py --workdir DIR --config.batch_size=256

Restarting with the same --workdir resumes from the latest checkpoint. SIGTERM
(preemption) saves a checkpoint and exits cleanly. Writes to the workdir:
config.json, metrics.jsonl (one JSON object per logged step), train.log (every
library log line; the console shows them with --verbose), tensorboard/,
checkpoints/ (the last N), best/ (the best by eval/top1), and final/ (the trained
weights, for spanet_jax.load_pretrained and --config.init_from).
"""

from __future__ import annotations

import logging
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from spanet_jax import errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configuration file (configs/*.py)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, logs and metrics go")
flags.DEFINE_bool("distributed", False,
                  "call jax.distributed.initialize() (multi-host: TPU pods, GPU clusters); "
                  "on a pod the cluster is detected, elsewhere give the three flags below")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed)")
flags.DEFINE_integer("num_processes", None, "number of processes (with --distributed)")
flags.DEFINE_integer("process_id", None, "this process's index (with --distributed)")
flags.DEFINE_enum("host_malloc", "auto", ["auto", "keep", "default"],
                  "keep: glibc keeps freed memory for reuse, so XLA:CPU does not fault its "
                  "scratch in again every step (spanet_jax/train/host_memory.py); auto: keep when "
                  "JAX runs on the CPU")
flags.DEFINE_bool("verbose", False,
                  "also show library log lines (Orbax, TFDS, absl) and progress bars on the "
                  "console; they always go to WORKDIR/train.log")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  """absl flag parsing with one clear line for a bad --config override, not a traceback."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as err:
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    detail = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
    while len(detail) > 1 and detail[0] == detail[-1] and detail[0] in "'\"":
      detail = detail[1:-1]  # KeyError's messages arrive quoted, sometimes twice
    missing = re.search(r"No such file or directory: '([^']+)'", str(err.__cause__ or err))
    if missing:
      print(f"error: --config: no such file: {missing.group(1)}", file=sys.stderr)
      sys.exit(2)
    if "Traceback" in detail:  # a config file that raised: keep only its message
      raised = [line.strip() for line in detail.splitlines()
                if re.match(r"\s*\w+(Error|Exception): ", line)]
      detail = "--config: " + (raised[-1] if raised else detail.splitlines()[0])
    print(f"error: bad flag or config override ({detail}); overrides given: "
          f"{' '.join(overrides) or 'none'}. Every key is listed in configs/default.py.",
          file=sys.stderr)
    sys.exit(2)


def main(argv) -> None:
  del argv
  from spanet_jax.train import host_memory  # pylint: disable=g-import-not-at-top

  # Before NumPy and JAX start their threads: the setting reaches only threads created
  # later, so the loop (and JAX) is imported after it.
  if FLAGS.host_malloc == "keep" or (FLAGS.host_malloc == "auto" and host_memory.cpu_only()):
    host_memory.keep_freed_memory()
  from spanet_jax.train import loop  # pylint: disable=g-import-not-at-top
  from spanet_jax.tools import cli  # pylint: disable=g-import-not-at-top

  cluster = (loop.Cluster(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
             if FLAGS.distributed else None)
  cli.ignore_failed_read_reports()
  try:
    loop.run(FLAGS.config, FLAGS.workdir, cluster=cluster, verbose=FLAGS.verbose)
  except errors.UserError as err:  # the config, the data or the workdir
    print(f"error: {err}", file=sys.stderr)
    exit_now(2)
  except loop.LossNotFinite as err:
    print(f"error: {err}", file=sys.stderr)
    exit_now(1)
  except KeyboardInterrupt:  # before training began (once it runs, Ctrl-C saves and exits)
    print("error: interrupted before training began; nothing was saved", file=sys.stderr)
    exit_now(130)
  exit_now(0)


def exit_now(code: int) -> None:
  """Exit without the interpreter's shutdown, once everything is written.

  At shutdown, threads of TensorFlow's input pipeline and of the libraries' pools are
  torn down in no set order: now and then one waits forever for Python, which is gone,
  or aborts the process, and a run that ended well would hang or exit with SIGABRT.
  Everything the run writes is complete when loop.run returns (checkpoints waited for,
  metrics flushed), so only the logs and the multi-process handshake remain.
  """
  if FLAGS.distributed:
    import jax  # pylint: disable=g-import-not-at-top  (imported already by the loop)
    jax.distributed.shutdown()  # the barrier every process leaves together
  logging.shutdown()  # train.log's handler
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


# The other tools' spellings, accepted here too.
ALIASES = {"--batch-size": "--config.batch_size", "--output": "--workdir",
           "--checkpoint": "--config.init_from"}


def with_aliases(argv: list[str]) -> list[str]:
  """argv with --batch-size N, --output DIR and --checkpoint DIR (and their =forms)
  spelled as train.py's own flags."""
  out, args = [], iter(argv)
  for arg in args:
    name, equals, value = arg.partition("=")
    if name in ALIASES:
      out.append(f"{ALIASES[name]}={value if equals else next(args, '')}")
    else:
      out.append(arg)
  return out


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up lines
  # oneDNN's start-up notice comes before that setting is read; the input pipeline runs
  # no oneDNN kernels.
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  app.run(main, argv=with_aliases(sys.argv), flags_parser=parse_flags)
