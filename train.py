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

import dataclasses
import json
import logging as std_logging
import math
import os
import re
import signal
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

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
                  "scratch in again every step (spanet_jax/host_memory.py); auto: keep when "
                  "JAX runs on the CPU")
flags.DEFINE_bool("verbose", False,
                  "also show library log lines (Orbax, TFDS, absl) and progress bars on the "
                  "console; they always go to WORKDIR/train.log")
flags.mark_flags_as_required(["config", "workdir"])


def quiet_console(verbose: bool) -> None:
  """The console keeps train.py's own lines, warnings and errors; library INFO lines
  (Orbax logs every checkpoint step, TFDS every shard) go to WORKDIR/train.log only."""
  if not verbose:
    logging.get_absl_handler().setLevel(std_logging.WARNING)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()


def log_to_file(workdir: str) -> None:
  log_file = std_logging.FileHandler(os.path.join(workdir, "train.log"))
  log_file.setFormatter(std_logging.Formatter(
      "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"))
  log_file.setLevel(std_logging.INFO)
  std_logging.getLogger().addHandler(log_file)


# The options that shape the learning-rate schedule over the steps.
SCHEDULE_KEYS = ("num_epochs", "warmup_epochs", "lr", "lr_base_batch", "warmup_lr", "min_lr",
                 "grad_accum_steps")


def read_previous_config(workdir: str) -> dict:
  """The config.json a previous run left in `workdir` ({} if none or unreadable)."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def check_data_order(workdir: str, config, num_examples: int, resuming: bool,
                     write: bool) -> None:
  """A step's batch is fixed by (seed, global batch, training examples): a run resumed
  with another of these would continue on other batches, so it stops instead. Any number
  of processes may resume a run: the batches do not depend on it."""
  path = os.path.join(workdir, "data_order.json")
  order = {"seed": config.seed, "batch_size": config.batch_size,
           "train_examples": num_examples}
  if resuming and os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    changed = [f"{key} {saved.get(key)} -> {value}" for key, value in order.items()
               if saved.get(key) != value]
    if changed:
      raise ConfigError(
          f"{workdir} was trained with another data order ({'; '.join(changed)}): resuming "
          f"would not continue its batches. Use the run's config.seed and config.batch_size "
          f"and the same training data, or a new --workdir")
  elif write:
    with open(path, "w") as f:
      json.dump(order, f)


class ConfigError(Exception):
  pass


def check_workdir(workdir: str) -> None:
  """Fail before any work if the workdir cannot be a writable directory."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} is a file, not a directory")
  existing = workdir
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir {workdir}: {existing} is not a writable directory")


def validate(config, num_devices: int) -> None:
  import spanet_jax  # pylint: disable=g-import-not-at-top

  if config.model not in spanet_jax.list_models():
    raise ConfigError(f"config.model={config.model!r} is not one of "
                      f"{', '.join(spanet_jax.list_models())}")
  if config.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.dtype={config.dtype!r}: use float32 or bfloat16")
  for key in ("batch_size", "num_epochs", "grad_accum_steps", "log_every_steps",
              "checkpoint_every_steps", "keep_checkpoints", "image_size", "num_classes"):
    if config[key] <= 0:
      raise ConfigError(f"config.{key}={config[key]} must be positive")
  if config.batch_size % num_devices:
    raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by the "
                      f"{num_devices} devices")
  for key in ("lr", "min_lr", "warmup_lr", "weight_decay", "grad_clip", "ema_decay",
              "mixup", "cutmix", "label_smoothing", "warmup_epochs", "drop_path_rate"):
    if not math.isfinite(config[key]):
      raise ConfigError(f"config.{key}={config[key]} must be a finite number")
    if config[key] < 0:
      raise ConfigError(f"config.{key}={config[key]} must not be negative")
  for key in ("hflip", "mixup_switch_prob", "random_erasing"):
    if not 0 <= config[key] <= 1:
      raise ConfigError(f"config.{key}={config[key]} is a probability: use a value in [0, 1]")
  if config.randaugment:
    from spanet_jax import randaugment  # pylint: disable=g-import-not-at-top
    try:
      randaugment.RandAugmentSpec(config.randaugment)
    except ValueError as err:
      raise ConfigError(f"config.randaugment: {err}") from None
  if config.ema_decay >= 1:
    raise ConfigError(f"config.ema_decay={config.ema_decay} must be below 1")
  if config.optimizer not in ("adamw", "lamb"):
    raise ConfigError(f"config.optimizer={config.optimizer!r}: use adamw or lamb")
  if not 0 <= config.head_dropout < 1:
    raise ConfigError(f"config.head_dropout={config.head_dropout} must be in [0, 1)")
  import jax  # pylint: disable=g-import-not-at-top

  from spanet_jax import trainer  # pylint: disable=g-import-not-at-top
  try:
    model = spanet_jax.create_model(config.model, **trainer.model_options(config))
  except ValueError as err:
    raise ConfigError(str(err)) from None
  try:  # shapes only: nothing is computed
    jax.eval_shape(model.init, jax.random.PRNGKey(0),
                   jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), "float32"))
  except ValueError as err:
    raise ConfigError(f"config.model={config.model} with config.model_overrides="
                      f"{config.model_overrides.to_dict()} cannot be built: "
                      f"{str(err).splitlines()[0]}") from None


class MetricWriter:
  """Console, TensorBoard and metrics.jsonl, from process 0 only."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if enabled:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self.tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with self.tb.as_default():
      for key, value in metrics.items():
        tf.summary.scalar(key, float(value), step=int(step))
    self.tb.flush()


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
  try:
    run(FLAGS.config, FLAGS.workdir)
  except ConfigError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


def run(config, workdir: str) -> None:  # pylint: disable=too-many-locals,too-many-statements
  from spanet_jax import host_memory  # pylint: disable=g-import-not-at-top

  quiet_console(FLAGS.verbose)

  # Before JAX starts its threads: the setting reaches only threads created later.
  if FLAGS.host_malloc == "keep" or (FLAGS.host_malloc == "auto" and host_memory.cpu_only()):
    host_memory.keep_freed_memory()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  import spanet_jax  # pylint: disable=g-import-not-at-top
  from spanet_jax import checkpoint, cli, data, preprocess, train_checkpoints, trainer  # pylint: disable=g-import-not-at-top

  cli.ignore_failed_read_reports()

  if FLAGS.distributed:
    # CPU-only clusters (and the tests) need a collectives implementation; it is
    # ignored on TPU and GPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  validate(config, jax.device_count())
  process, processes = jax.process_index(), jax.process_count()
  workdir = os.path.abspath(workdir)
  check_workdir(workdir)

  # Data. Process 0 prepares the dataset (if it must be) while the others wait.
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  try:
    if process != 0:
      multihost_utils.sync_global_devices("dataset prepared")
    builder = data.make_builder(config)
    if process == 0 and processes > 1:
      multihost_utils.sync_global_devices("dataset prepared")
    train_source = data.make_source(builder, config.train_split)
    names = data.class_names(builder)
    names = names if names and len(names) == config.num_classes else None
    eval_source = data.make_source(builder, config.eval_split)
  except data.DataError as err:
    raise ConfigError(str(err)) from None
  # The workdir is made only once the data is known to be there: a mistake leaves nothing.
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as err:
    raise ConfigError(f"--workdir {workdir}: {err.strerror}") from None
  log_to_file(workdir)
  writer = MetricWriter(workdir, process == 0)
  previous_config = read_previous_config(workdir)
  info = spanet_jax.model_info(config.model)
  crop_pct = config.crop_pct if config.crop_pct > 0 else info.crop_pct
  eval_data = preprocess.DataConfig(config.image_size, crop_pct, info.mean, info.std,
                                    info.interpolation)
  eval_local_batch = (config.eval_batch_size or config.batch_size) // processes
  steps_per_epoch = data.steps_per_epoch(train_source, config.batch_size)
  if steps_per_epoch == 0:
    raise ConfigError(f"config.batch_size={config.batch_size} exceeds the "
                      f"{train_source.num_examples} training examples")
  total_steps = config.num_epochs * steps_per_epoch
  updates_per_epoch = max(steps_per_epoch // config.grad_accum_steps, 1)

  # Model, optimizer, state: every sharding comes from `partitioning`.
  partitioning = trainer.Partitioning.create(config.mesh_model)
  options = trainer.model_options(config)
  model = spanet_jax.create_model(config.model, dtype=jnp.dtype(config.dtype), **options)
  schedule = trainer.learning_rate_schedule(config, updates_per_epoch)
  optimizer = trainer.make_optimizer(config, schedule)
  size = config.image_size

  def fresh_state(rng):
    params_rng, state_rng = jax.random.split(rng)
    params = model.init(params_rng, jnp.zeros((1, size, size, 3)))["params"]
    return trainer.init_state(model, optimizer, params, config, state_rng)

  abstract = jax.eval_shape(fresh_state, jax.random.PRNGKey(config.seed))
  state_sharding = partitioning.state(abstract)
  manager = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                           enable_async_checkpointing=True))
  best_manager = ocp.CheckpointManager(
      os.path.join(workdir, "best"),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["eval/top1"],
                                           best_mode="max"))
  latest = manager.latest_step()
  check_data_order(workdir, config, train_source.num_examples, latest is not None,
                   process == 0)
  if process == 0:  # after the checks: a refused resume keeps the run's own config
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  if latest is not None:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_sharding)
    try:
      state, latest = train_checkpoints.restore_newest_good(
          manager, lambda step: manager.restore(step, args=ocp.args.StandardRestore(target)),
          process == 0, lambda line: process == 0 and print(line, flush=True))
    except train_checkpoints.NoGoodCheckpoint as err:
      raise ConfigError(str(err)) from None
    logging.info("resumed from step %d", latest)
    print(f"resumed from {manager.directory} at step {latest}", flush=True)
    changed = [f"{key} {previous_config[key]} -> {config[key]}" for key in SCHEDULE_KEYS
               if key in previous_config and previous_config[key] != config[key]]
    if changed and process == 0:
      print(f"note: the learning-rate schedule differs from the run's before: "
            f"{'; '.join(changed)}; it continues from step {latest} on the new schedule",
            flush=True)
  else:
    state = jax.jit(fresh_state, out_shardings=state_sharding)(jax.random.PRNGKey(config.seed))
    if config.init_from:
      try:
        _, pretrained = checkpoint.load_pretrained(config.init_from)
      except checkpoint.CheckpointError as err:
        raise ConfigError(f"config.init_from: {err}") from None
      params, report = checkpoint.merge_pretrained(jax.device_get(state.params),
                                                   pretrained["params"])
      print(f"initialised from {config.init_from}; {report}", flush=True)
      params = jax.device_put(params, state_sharding.params)
      state = state.replace(params=params, opt_state=jax.jit(
          optimizer.init, out_shardings=state_sharding.opt_state)(params),
                            ema_params=(jax.tree.map(jnp.copy, params)  # its own buffers
                                        if config.ema_decay > 0 else None))

  train_fn = jax.jit(
      lambda s, b: trainer.train_step(s, b, model=model, optimizer=optimizer, config=config,
                                      mean=info.mean, std=info.std),
      in_shardings=(state_sharding, partitioning.batch),
      out_shardings=(state_sharding, partitioning.replicated), donate_argnums=(0,))
  eval_fn = jax.jit(lambda p, b: trainer.eval_step(p, b, model=model),
                    out_shardings=partitioning.replicated)

  def evaluate(state) -> dict:
    params = state.ema_params if state.ema_params is not None else state.params
    totals = {"top1": 0.0, "top5": 0.0, "count": 0.0}
    for local, _ in data.eval_batches(eval_source, eval_data, eval_local_batch, process,
                                      processes, config.prefetch):
      result = jax.device_get(eval_fn(params, trainer.global_batch(partitioning, local)))
      for key in totals:
        totals[key] += float(result[key])
    if int(totals["count"]) != eval_source.num_examples:
      raise RuntimeError(f"evaluated {totals['count']} of {eval_source.num_examples} examples")
    return {"eval/top1": totals["top1"] / totals["count"],
            "eval/top5": totals["top5"] / totals["count"]}

  def save(step: int, state) -> None:
    train_checkpoints.record_checksums(manager, step, state, process == 0)
    manager.save(step, args=ocp.args.StandardSave(state), force=True)

  stop = {"signal": None}

  def on_sigterm(signum, frame):
    del frame
    stop["signal"] = signum

  signal.signal(signal.SIGTERM, on_sigterm)

  step = int(jax.device_get(state.step))
  batches = data.train_batches(train_source, config, config.batch_size, step, process,
                               processes)
  print(f"training {config.model} on {config.dataset if not config.folder else config.folder}: "
        f"{train_source.num_examples} images, {steps_per_epoch} steps/epoch, {total_steps} steps, "
        f"global batch {config.batch_size} on {jax.device_count()} devices", flush=True)
  window_start, window_steps = time.perf_counter(), 0
  run_start, run_start_step = time.perf_counter(), step
  while step < total_steps:
    state, metrics = train_fn(state, trainer.global_batch(partitioning, next(batches)))
    step += 1
    window_steps += 1
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
      manager.wait_until_finished()
      print(f"error: the loss became {loss} at step {step}; stopping without saving. The last "
            f"good checkpoint ({manager.latest_step()}) is in {manager.directory}: lower "
            f"config.lr or set config.grad_clip, then restart.", file=sys.stderr, flush=True)
      sys.exit(1)
    if step % config.log_every_steps == 0 or step == total_steps:
      elapsed = time.perf_counter() - window_start
      rate = window_steps * config.batch_size / elapsed
      remaining = (total_steps - step) * (time.perf_counter() - run_start) / (step - run_start_step)
      lr = float(schedule(max(step // config.grad_accum_steps - 1, 0)))
      print(f"step {step}/{total_steps}  loss {loss:.4f}  lr {lr:.3g}  {rate:.1f} img/s  "
            f"ETA {remaining / 60:.1f} min", flush=True)
      writer.write(step, {"train/loss": loss, "train/lr": lr, "train/images_per_s": rate,
                          "train/grad_norm": float(metrics["grad_norm"])})
      window_start, window_steps = time.perf_counter(), 0
    epoch_end = step % steps_per_epoch == 0
    epoch = step // steps_per_epoch
    if (epoch_end and epoch % config.eval_every_epochs == 0) or step == total_steps:
      results = evaluate(state)
      print(f"step {step} (epoch {epoch}): eval top-1 {results['eval/top1']:.4f}  "
            f"top-5 {results['eval/top5']:.4f}", flush=True)
      writer.write(step, results)
      best_manager.save(step, args=ocp.args.StandardSave(state.params), metrics=results)
    scheduled = step % config.checkpoint_every_steps == 0 or step == total_steps
    if scheduled:
      save(step, state)
    if stop["signal"] is not None:
      if not scheduled:  # a signal right after a scheduled save: that save is the one
        save(step, state)
      manager.wait_until_finished()
      print(f"received signal {stop['signal']}: saved step {step}, exiting", flush=True)
      manager.close()
      best_manager.close()
      return
  manager.wait_until_finished()
  best_manager.wait_until_finished()
  final = os.path.join(workdir, "final")
  params = state.ema_params if state.ema_params is not None else state.params
  params = jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))
  checkpoint.save_pretrained(final, config.model, params, trainer.described_options(options),
                             extra={"source": "train.py", "step": step,
                                    "data": dataclasses.asdict(eval_data),
                                    "class_names": names}, overwrite=True)
  print(f"done: weights in {final}", flush=True)
  manager.close()
  best_manager.close()


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
