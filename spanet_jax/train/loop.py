"""The training loop behind train.py: checks, data, state, resume, steps, evaluation,
checkpoints and the final weights. Every sharding comes from mesh.Partitioning; the step
itself is steps.train_step, a pure function of (state, batch)."""

from __future__ import annotations

import dataclasses
import json
import logging as std_logging
import math
import os
import shutil
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils

from spanet_jax import errors, outputs
from spanet_jax.data import pipeline, preprocess, randaugment
from spanet_jax.data import settings as data_settings
from spanet_jax.models import flops, pretrained, registry
from spanet_jax.train import (checkpoints, mesh, monitoring, run_lock, schedules, settings,
                              steps)
from spanet_jax.train import workdir as workdir_layout


def _not_orbax_errors(record: std_logging.LogRecord) -> bool:
  """Orbax logs a failed save from each of its threads; the run reports it once."""
  return not (record.levelno >= std_logging.ERROR and "orbax" in record.pathname)


def quiet_console(verbose: bool) -> None:
  """The console keeps train.py's own lines, warnings and errors; library INFO lines
  (Orbax logs every checkpoint step, TFDS every shard) go to WORKDIR/train.log only."""
  if not verbose:
    handler = logging.get_absl_handler()
    handler.setLevel(std_logging.WARNING)
    handler.addFilter(_not_orbax_errors)  # the same function: added once per process
    tfds.disable_progress_bar()


class _LogFile(std_logging.FileHandler):
  """train.log; a failed write (a full disk) is not reported on the console: the run
  reports that itself, once."""

  def handleError(self, record):
    del record


def log_to_file(workdir: str) -> None:
  log_file = _LogFile(os.path.join(workdir, workdir_layout.LOG_FILE))
  log_file.setFormatter(std_logging.Formatter(
      "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"))
  log_file.setLevel(std_logging.INFO)
  std_logging.getLogger().addHandler(log_file)


# The options that decide the parameters' shapes: a run resumed with other values could
# not restore its checkpoints.
ARCHITECTURE_KEYS = ("model", "model_overrides", "num_classes", "learnable_masks")
# Path options, expanded like the shell expands them (~).
PATH_KEYS = ("folder", "data_dir", "manual_dir", "init_from")

# The options that shape the learning-rate schedule over the steps.
SCHEDULE_KEYS = ("lr_schedule", "num_epochs", "warmup_epochs", "cooldown_epochs", "lr",
                 "lr_base_batch", "warmup_lr", "min_lr", "grad_accum_steps")


def read_previous_config(workdir: str) -> dict:
  """The config.json a previous run left in `workdir` ({} if none or unreadable)."""
  try:
    with open(os.path.join(workdir, workdir_layout.CONFIG_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def check_data_order(workdir: str, config, num_examples: int, resuming: bool,
                     write: bool) -> None:
  """A step's batch is fixed by (seed, global batch, training examples): a run resumed
  with another of these would continue on other batches, so it stops instead. Any number
  of processes may resume a run: the batches do not depend on it."""
  path = os.path.join(workdir, workdir_layout.DATA_ORDER_FILE)
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
    outputs.write_text(path, json.dumps(order))


def check_same_architecture(workdir: str, previous: dict, config) -> None:
  """Stop, touching nothing, when the workdir's checkpoints hold another architecture."""
  current = json.loads(config.to_json_best_effort())
  changed = [f"{key} {json.dumps(previous[key])} -> {json.dumps(current[key])}"
             for key in ARCHITECTURE_KEYS if key in previous and previous[key] != current[key]]
  if changed:
    raise ConfigError(
        f"{workdir} holds a run of another model ({'; '.join(changed)}): its checkpoints "
        "cannot be resumed with this config. Use the run's own values, or a new --workdir")


class ConfigError(errors.UserError):
  """A mistake in the config, the command line or the workdir: one line for the user."""


class LossNotFinite(Exception):
  """The loss became NaN or infinite; nothing was saved after the last good checkpoint."""


@dataclasses.dataclass(frozen=True)
class Cluster:
  """jax.distributed.initialize's arguments (None: detected, as on a TPU pod)."""
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


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
  """Every config value checked, and the model built abstractly: a mistake is one
  ConfigError naming the key, before any work."""
  if config.model not in registry.list_models():
    raise ConfigError(f"config.model={config.model!r} is not one of "
                      f"{', '.join(registry.list_models())}")
  if config.lr_schedule not in schedules.SCHEDULES:
    raise ConfigError(f"config.lr_schedule={config.lr_schedule!r}: use one of "
                      f"{', '.join(schedules.SCHEDULES)}")
  profile = tuple(config.profile_steps)
  if profile and (len(profile) != 2 or any(not isinstance(v, int) or v < 0 for v in profile)):
    raise ConfigError(f"config.profile_steps={profile}: give (first step, number of steps), "
                      "or () for no profile")
  if config.cooldown_epochs < 0:
    raise ConfigError(f"config.cooldown_epochs={config.cooldown_epochs} must not be negative")
  if config.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.dtype={config.dtype!r}: use float32 or bfloat16")
  for key in ("batch_size", "num_epochs", "grad_accum_steps", "log_every_steps",
              "checkpoint_every_steps", "keep_checkpoints", "image_size", "num_classes",
              "eval_every_epochs", "lr_base_batch", "mesh_model", "prefetch"):
    if config[key] <= 0:
      raise ConfigError(f"config.{key}={config[key]} must be positive")
  if num_devices % config.mesh_model:
    raise ConfigError(f"config.mesh_model={config.mesh_model} does not divide the "
                      f"{num_devices} devices")
  if config.eval_batch_size < 0:
    raise ConfigError(f"config.eval_batch_size={config.eval_batch_size} must be positive "
                      "(or 0: batch_size)")
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
    try:
      randaugment.RandAugmentSpec(config.randaugment)
    except ValueError as err:
      raise ConfigError(f"config.randaugment: {err}") from None
  if not (config.crop_pct == -1 or 0 < config.crop_pct <= 1):
    raise ConfigError(f"config.crop_pct={config.crop_pct}: use a fraction in (0, 1], or -1 "
                      "for the model's own")
  low, high = (tuple(config.crop_scale) + (None, None))[:2]
  if len(config.crop_scale) != 2 or not 0 < low <= high <= 1:
    raise ConfigError(f"config.crop_scale={tuple(config.crop_scale)}: give (min, max) area "
                      "fractions with 0 < min <= max <= 1")
  low, high = (tuple(config.crop_ratio) + (None, None))[:2]
  if len(config.crop_ratio) != 2 or not 0 < low <= high:
    raise ConfigError(f"config.crop_ratio={tuple(config.crop_ratio)}: give (min, max) aspect "
                      "ratios with 0 < min <= max")
  for key in ("b1", "b2"):
    if not 0 <= config[key] < 1:
      raise ConfigError(f"config.{key}={config[key]} must be in [0, 1)")
  if not config.eps > 0:
    raise ConfigError(f"config.eps={config.eps} must be positive")
  if config.label_smoothing >= 1:
    raise ConfigError(f"config.label_smoothing={config.label_smoothing} must be below 1")
  if config.ema_decay >= 1:
    raise ConfigError(f"config.ema_decay={config.ema_decay} must be below 1")
  if config.optimizer not in ("adamw", "lamb"):
    raise ConfigError(f"config.optimizer={config.optimizer!r}: use adamw or lamb")
  if not 0 <= config.head_dropout < 1:
    raise ConfigError(f"config.head_dropout={config.head_dropout} must be in [0, 1)")
  overrides = config.model_overrides.to_dict()
  for key in ("layers", "dims"):
    value = overrides.get(key)
    if value is not None and (not isinstance(value, (tuple, list)) or len(value) != 4 or not all(
        isinstance(v, int) and v > 0 for v in value)):
      raise ConfigError(f"config.model_overrides.{key}={value}: give four positive whole "
                        "numbers, one per stage")
  try:
    model = registry.build_model(
        config.model, **settings.ModelOptions.from_config(config).create_options())
  except ValueError as err:
    raise ConfigError(str(err)) from None
  try:  # shapes only: nothing is computed
    jax.eval_shape(model.init, jax.random.PRNGKey(0),
                   jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), "float32"))
  except ValueError as err:
    raise ConfigError(f"config.model={config.model} with config.model_overrides="
                      f"{config.model_overrides.to_dict()} cannot be built: "
                      f"{str(err).splitlines()[0]}") from None


def recipe_warnings(config, steps_per_epoch: int, num_classes: int | None) -> list[str]:
  """Settings that run but whose numbers make little sense for this data (a recipe meant
  for ImageNet on a small dataset, typically): one line each."""
  warnings = []
  peak = settings.Schedule.from_config(config).peak_lr
  if peak < 1e-5:
    warnings.append(
        f"the peak learning rate is {peak:.2g} (config.lr {config.lr:g} x "
        f"{config.batch_size * config.grad_accum_steps} images per update / lr_base_batch "
        f"{config.lr_base_batch}): too small to learn much; set --config.lr_base_batch to "
        "the batch size for an absolute lr, or use configs/finetune.py")
  if config.warmup_epochs >= config.num_epochs:
    warnings.append(f"config.warmup_epochs={config.warmup_epochs} is not below "
                    f"config.num_epochs={config.num_epochs}: the run never leaves warm-up")
  if config.log_every_steps > steps_per_epoch:
    warnings.append(f"config.log_every_steps={config.log_every_steps} is longer than an "
                    f"epoch ({steps_per_epoch} steps): few progress lines")
  if num_classes is not None and num_classes <= 5:
    warnings.append(f"top-5 is always 100% with {num_classes} classes")
  return warnings


class MetricWriter:
  """Console, TensorBoard and metrics.jsonl, from process 0 only."""

  def __init__(self, workdir: str, enabled: bool, resumed_at: int | None = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, workdir_layout.METRICS_FILE)
    self.tb = None
    if enabled:
      if resumed_at is not None:
        self._drop_rows_after(resumed_at)
      self.tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def _drop_rows_after(self, step: int) -> None:
    """A resumed run logs again the steps after its checkpoint: one row per step."""
    try:
      with open(self.path) as f:
        rows = f.readlines()
    except FileNotFoundError:
      return
    kept = [row for row in rows if json.loads(row).get("step", 0) <= step]
    if len(kept) != len(rows):
      outputs.write_text(self.path, "".join(kept))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    with self.tb.as_default():
      for key, value in metrics.items():
        tf.summary.scalar(key, float(value), step=int(step))
    self.tb.flush()


# Options saved with weights that are config keys of their own, or set by the data.
_OWN_KEYS = ("num_classes", "learnable_masks", "head_dropout", "drop_path_rate", "remat")


def adopt_init_from_model(config) -> None:
  """config.model = "" with config.init_from: the checkpoint's model and architecture
  (configs/finetune.py), so that fine-tuning needs only the checkpoint and the data."""
  if config.model or not config.init_from:
    return
  try:
    metadata = pretrained.read_metadata(pretrained.checkpoint_directory(config.init_from))
  except pretrained.CheckpointError as err:
    raise ConfigError(f"config.init_from: {err}") from None
  config.model = metadata["model"]
  config.model_overrides = ml_collections.ConfigDict(
      {k: tuple(v) if isinstance(v, list) else v for k, v in metadata["overrides"].items()
       if k not in _OWN_KEYS})
  print(f"model from {config.init_from}: {config.model} "
        f"{config.model_overrides.to_dict() or ''}".rstrip(), flush=True)


def take_num_classes_from_data(config) -> None:
  """config.num_classes = -1 (configs/finetune.py): the dataset's class count."""
  if config.num_classes != -1:
    return
  try:
    classes = pipeline.dataset_num_classes(
        pipeline.make_builder(data_settings.DatasetSource.from_config(config)))
  except pipeline.DataError as err:
    raise ConfigError(str(err)) from None
  if classes is None:
    raise ConfigError(f"config.num_classes=-1: {config.folder or config.dataset} does not say "
                      "how many classes it has; set --config.num_classes")
  config.num_classes = classes
  print(f"{classes} classes in {config.folder or config.dataset}", flush=True)


def expand_paths(config) -> None:
  """~ in the config's paths, as the tools and the shell expand it."""
  for key in PATH_KEYS:
    if config[key]:
      config[key] = os.path.expanduser(config[key])


def start_cluster(cluster: Cluster | None) -> None:
  if cluster is not None:
    # CPU-only clusters (and the tests) need a collectives implementation; it is
    # ignored on TPU and GPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=cluster.coordinator_address,
                               num_processes=cluster.num_processes,
                               process_id=cluster.process_id)


@dataclasses.dataclass(frozen=True)
class Data:
  train: pipeline.Source
  eval: pipeline.Source
  class_names: list[str] | None
  num_classes: int | None  # as the dataset states it


def load_data(config, process: int, processes: int) -> Data:
  """The training and evaluation splits. Process 0 prepares the dataset (if it must be)
  while the others wait; labels beyond config.num_classes stop the run here."""
  try:
    if process != 0:
      multihost_utils.sync_global_devices("dataset prepared")
    builder = pipeline.make_builder(data_settings.DatasetSource.from_config(config))
    if process == 0 and processes > 1:
      multihost_utils.sync_global_devices("dataset prepared")
    classes = pipeline.dataset_num_classes(builder)
    if classes is not None and classes > config.num_classes:
      raise ConfigError(
          f"config.num_classes={config.num_classes}, but the dataset has {classes} classes "
          f"(labels 0..{classes - 1}): set --config.num_classes={classes}")
    train = pipeline.make_source(builder, config.train_split)
    names = pipeline.class_names(builder)
    names = names if names and len(names) == config.num_classes else None
    return Data(train, pipeline.make_source(builder, config.eval_split), names, classes)
  except pipeline.DataError as err:
    raise ConfigError(str(err)) from None


def initialise_from(state, config, optimizer, state_sharding):
  """`state` with the parameters of config.init_from that fit, a fresh optimizer state
  and EMA; refused when no parameter outside the head would come from it."""
  try:
    _, stored = pretrained.load_pretrained(config.init_from)
  except pretrained.CheckpointError as err:
    raise ConfigError(f"config.init_from: {err}") from None
  params, report = pretrained.merge_pretrained(jax.device_get(state.params), stored["params"])
  paths = ["/".join(str(k.key) for k in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  loaded = [p for p in paths if p not in report.added]
  if not [p for p in loaded if not p.startswith("head")] and not config.init_from_partial:
    raise ConfigError(
        f"config.init_from: none of the {len(paths)} parameters outside the head fit "
        f"{config.init_from} (another architecture?): training would start from scratch. "
        "Set --config.init_from_partial=True to accept that")
  print(f"initialised {len(loaded)} of {len(paths)} parameters from {config.init_from}; "
        f"{report}", flush=True)
  params = jax.device_put(params, state_sharding.params)
  return state.replace(
      params=params,
      opt_state=jax.jit(optimizer.init, out_shardings=state_sharding.opt_state)(params),
      ema_params=jax.tree.map(jnp.copy, params) if config.ema_decay > 0 else None)


@dataclasses.dataclass
class Run:
  """What the parts of a run share once it is set up."""
  config: Any
  workdir: str
  data: Data
  model: Any
  options: dict
  partitioning: mesh.Partitioning
  schedule: Any
  optimizer: Any
  state_sharding: Any
  manager: Any
  best_manager: Any
  eval_data: preprocess.DataConfig
  steps_per_epoch: int
  total_steps: int
  process: int
  processes: int
  typed: settings.TrainSettings  # the config's typed groups, built once here

  def save(self, step: int, state) -> None:
    checkpoints.record_checksums(self.manager, step, state, self.process == 0)
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)


def run(config, workdir: str, *, cluster: Cluster | None = None,
        verbose: bool = False) -> None:
  """Train `config`'s model in `workdir`, resuming from its newest intact checkpoint.

  Args:
    config: an ml_collections config with every key of configs/default.py.
    workdir: where checkpoints, logs, metrics and the final weights go.
    cluster: join a multi-process run (jax.distributed) before anything else.
    verbose: library log lines on the console too (they always go to train.log).

  Raises:
    ConfigError: a mistake in the config, the data or the workdir (nothing written,
      and a refused resume leaves the run's files as they were).
    LossNotFinite: the loss became NaN or infinite (nothing saved after it).
  """
  quiet_console(verbose)
  start_cluster(cluster)
  expand_paths(config)
  adopt_init_from_model(config)
  take_num_classes_from_data(config)
  validate(config, jax.device_count())
  process, processes = jax.process_index(), jax.process_count()
  workdir = os.path.abspath(os.path.expanduser(workdir))
  check_workdir(workdir)
  data = load_data(config, process, processes)
  previous_config = read_previous_config(workdir)
  if previous_config and os.path.isdir(os.path.join(workdir, workdir_layout.CHECKPOINTS_DIR)):
    check_same_architecture(workdir, previous_config, config)
  # The workdir is made only once the data is known to be there: a mistake leaves nothing.
  created = not os.path.exists(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as err:
    raise ConfigError(f"--workdir {workdir}: {err.strerror}") from None
  lock = run_lock.RunLock(workdir)
  try:
    if process == 0:
      try:
        note = lock.acquire()
      except run_lock.Locked as err:
        raise ConfigError(str(err)) from None
      if note:
        print(note, flush=True)
    try:
      setup, state, resumed_at = set_up(config, workdir, data, previous_config, process,
                                        processes)
    except (ConfigError, KeyboardInterrupt):
      if created:  # a fresh run refused before training: leave nothing behind
        lock.release()
        shutil.rmtree(workdir, ignore_errors=True)
      raise
    try:
      train(setup, state, resumed_at)
    finally:
      setup.manager.close()
      setup.best_manager.close()
  finally:
    lock.release()


def set_up(config, workdir: str, data: Data, previous_config: dict, process: int,
           processes: int):
  """The model, optimizer, shardings and checkpoint managers, and the state: restored
  from the newest intact checkpoint, or fresh (from config.init_from if given).

  Returns:
    (Run, state, the step resumed from or None).
  """
  info = registry.model_info(config.model)
  crop_pct = config.crop_pct if config.crop_pct > 0 else info.crop_pct
  eval_data = preprocess.DataConfig(config.image_size, crop_pct, info.mean, info.std,
                                    info.interpolation)
  steps_per_epoch = pipeline.steps_per_epoch(data.train, config.batch_size)
  if steps_per_epoch == 0:
    raise ConfigError(f"config.batch_size={config.batch_size} exceeds the "
                      f"{data.train.num_examples} training examples")
  # Every sharding comes from `partitioning`.
  partitioning = mesh.Partitioning.create(config.mesh_model)
  typed = settings.of(config)  # config.num_classes is settled by now
  options = typed.model.create_options()
  model = registry.build_model(config.model, dtype=jnp.dtype(config.dtype), **options)
  schedule = schedules.learning_rate_schedule(typed.schedule, steps_per_epoch)
  optimizer = steps.make_optimizer(typed.optimiser, schedule)
  size = config.image_size

  def fresh_state(rng):
    params_rng, state_rng = jax.random.split(rng)
    params = model.init(params_rng, jnp.zeros((1, size, size, 3)))["params"]
    return steps.init_state(model, optimizer, params, typed.step, state_rng)

  abstract = jax.eval_shape(fresh_state, jax.random.PRNGKey(config.seed))
  state_sharding = partitioning.state(abstract)
  manager = ocp.CheckpointManager(
      os.path.join(workdir, workdir_layout.CHECKPOINTS_DIR),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                           enable_async_checkpointing=True))
  best_manager = ocp.CheckpointManager(
      os.path.join(workdir, workdir_layout.BEST_DIR),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["eval/top1"],
                                           best_mode="max"))
  setup = Run(config, workdir, data, model, options, partitioning, schedule, optimizer,
              state_sharding, manager, best_manager, eval_data, steps_per_epoch,
              typed.schedule.total_epochs * steps_per_epoch, process, processes, typed)
  try:
    latest = manager.latest_step()
    check_data_order(workdir, config, data.train.num_examples, latest is not None,
                     process == 0)
    if latest is not None:
      state, latest = restore(setup, abstract, previous_config)
    else:
      state = jax.jit(fresh_state, out_shardings=state_sharding)(
          jax.random.PRNGKey(config.seed))
      if config.init_from:
        state = initialise_from(state, config, optimizer, state_sharding)
  except BaseException:
    manager.close()
    best_manager.close()
    raise
  if process == 0:  # after the checks: a refused resume keeps the run's own config
    outputs.write_text(os.path.join(workdir, workdir_layout.CONFIG_FILE),
                       config.to_json_best_effort(indent=2))
    if data.class_names:  # for the tools, before final/ exists
      outputs.write_text(os.path.join(workdir, workdir_layout.CLASS_NAMES_FILE),
                         json.dumps(data.class_names))
  return setup, state, latest


def restore(setup: Run, abstract, previous_config: dict):
  """(state, step) of the newest intact checkpoint; damaged ones are said and set aside."""
  manager, primary = setup.manager, setup.process == 0
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, setup.state_sharding)
  try:
    state, latest = checkpoints.restore_newest_good(
        manager, lambda step: manager.restore(step, args=ocp.args.StandardRestore(target)),
        primary, lambda line: primary and print(line, flush=True))
  except checkpoints.NoGoodCheckpoint as err:
    raise ConfigError(str(err)) from None
  logging.info("resumed from step %d", latest)
  print(f"resumed from {manager.directory} at step {latest}", flush=True)
  config = setup.config
  changed = [f"{key} {previous_config[key]} -> {config[key]}" for key in SCHEDULE_KEYS
             if key in previous_config and previous_config[key] != config[key]]
  if changed and primary:
    print(f"note: the learning-rate schedule differs from the run's before: "
          f"{'; '.join(changed)}; it continues from step {latest} on the new schedule",
          flush=True)
  return state, latest


def evaluate(setup: Run, eval_fn, state) -> dict:
  """top-1 and top-5 over the evaluation split, every example once."""
  params = state.ema_params if state.ema_params is not None else state.params
  source, config = setup.data.eval, setup.config
  local_batch = (config.eval_batch_size or config.batch_size) // setup.processes
  totals = {"top1": 0.0, "top5": 0.0, "count": 0.0}
  for local, _ in pipeline.eval_batches(source, setup.eval_data, local_batch, setup.process,
                                        setup.processes, config.prefetch):
    result = jax.device_get(eval_fn(params, mesh.global_batch(setup.partitioning, local)))
    for key in totals:
      totals[key] += float(result[key])
  if int(totals["count"]) != source.num_examples:
    raise RuntimeError(f"evaluated {totals['count']} of {source.num_examples} examples")
  return {"eval/top1": totals["top1"] / totals["count"],
          "eval/top5": totals["top5"] / totals["count"]}


def save_final(setup: Run, state, step: int) -> str:
  """The run's weights (EMA's if kept) as a pretrained directory, WORKDIR/final."""
  final = os.path.join(setup.workdir, workdir_layout.FINAL_DIR)
  params = state.ema_params if state.ema_params is not None else state.params
  params = jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))
  pretrained.save_pretrained(final, setup.config.model, params,
                             settings.described_options(setup.options),
                             extra={"source": "train.py", "step": step,
                                    "data": dataclasses.asdict(setup.eval_data),
                                    "class_names": setup.data.class_names}, overwrite=True)
  return final


def _last_complete(manager) -> int | None:
  try:
    manager.wait_until_finished()
  except Exception:  # pylint: disable=broad-except  # the failed save itself
    pass
  manager.reload()  # what is on disk now, finished checkpoints only
  return manager.latest_step()


def train(setup: Run, state, resumed_at: int | None) -> None:  # pylint: disable=too-many-locals,too-many-statements
  """The loop: steps, logs, evaluations, checkpoints, signals, and the final weights."""
  config, workdir, manager = setup.config, setup.workdir, setup.manager
  process, processes, partitioning = setup.process, setup.processes, setup.partitioning
  steps_per_epoch, total_steps = setup.steps_per_epoch, setup.total_steps
  info = registry.model_info(config.model)
  log_to_file(workdir)
  writer = MetricWriter(workdir, process == 0, resumed_at)
  train_fn = jax.jit(
      lambda s, b: steps.train_step(s, b, model=setup.model, optimizer=setup.optimizer,
                                    options=setup.typed.step, mean=info.mean, std=info.std),
      in_shardings=(setup.state_sharding, partitioning.batch),
      out_shardings=(setup.state_sharding, partitioning.replicated), donate_argnums=(0,))
  eval_fn = jax.jit(lambda p, b: steps.eval_step(p, b, model=setup.model),
                    out_shardings=partitioning.replicated)

  stop = {"signal": None}

  def on_stop_signal(signum, frame):
    del frame
    stop["signal"] = signum

  # Ctrl-C as SIGTERM: the step in flight finishes, its state is saved, the run exits.
  signal.signal(signal.SIGTERM, on_stop_signal)
  signal.signal(signal.SIGINT, on_stop_signal)

  step = int(jax.device_get(state.step))
  first_step = step
  # The input pipeline is closed on every way out: a tf.data iterator left to the
  # interpreter's shutdown can wait forever (or abort) on its reads, which need Python.
  local_batches = pipeline.train_batches(setup.data.train, setup.typed.input,
                                         config.batch_size, step, process, processes)
  batches = mesh.prefetch_to_device(local_batches, partitioning)
  devices = jax.device_count()
  throughput = monitoring.Throughput(
      config.batch_size, jax.devices(),
      lambda: 3 * flops.model_flops(config.model, config.image_size, **setup.options).total)
  profiler = monitoring.Profiler(config.profile_steps, workdir)
  # Steps whose metrics are still on the devices: read at the next sync point (a log,
  # evaluation or checkpoint step, a signal, the end), never in between, so that the host
  # dispatches step after step without waiting for one to finish.
  pending: list[tuple[int, dict]] = []

  def read_pending() -> dict:
    """The newest step's metrics on the host, after checking every pending step's loss:
    the first non-finite one stops the run before anything is saved after it."""
    values = jax.device_get([metrics for _, metrics in pending])
    for (at, _), metrics in zip(pending, values):
      loss = float(metrics["loss"])
      if not np.isfinite(loss):
        manager.wait_until_finished()
        last_good = manager.latest_step()
        saved = (f"the last good checkpoint (step {last_good}) is in {manager.directory}"
                 if last_good is not None else "no checkpoint was saved before it")
        raise LossNotFinite(
            f"the loss became {loss} at step {at}; stopping without saving ({saved}): "
            "lower config.lr or set config.grad_clip, then restart.")
    pending.clear()
    return {key: float(value) for key, value in values[-1].items()} if values else {}

  def save_and_stop(step: int, reason: str) -> ConfigError:
    """Save the state of `step` (its losses checked first) for a rerun to resume from."""
    read_pending()
    if manager.latest_step() != step:
      setup.save(step, state)
    manager.wait_until_finished()
    return ConfigError(f"{reason}. The state of step {step} is saved in {manager.directory}: "
                       "the same command resumes from it")

  if process == 0:
    for line in recipe_warnings(config, steps_per_epoch, setup.data.num_classes):
      print(f"warning: {line}", flush=True)
  try:
    print(f"training {config.model} on {config.folder or config.dataset}: "
          f"{setup.data.train.num_examples} images, {steps_per_epoch} steps/epoch, "
          f"{total_steps} steps, global batch {config.batch_size} on {devices} devices, "
          f"peak lr {setup.typed.schedule.peak_lr:.3g}", flush=True)
    print("compiling the training step...", flush=True)
    window_start, window_steps = time.perf_counter(), 0
    profiler.after_step(step, state)
    while step < total_steps:
      try:
        batch = next(batches)
      except pipeline.DataError as err:
        raise save_and_stop(step, str(err)) from None
      state, metrics = train_fn(state, batch)
      step += 1
      window_steps += 1
      pending.append((step, metrics))
      profiler.after_step(step, state)
      first = step == first_step + 1
      log_now = step % config.log_every_steps == 0 or step == total_steps or first
      epoch_end = step % steps_per_epoch == 0
      epoch = step // steps_per_epoch
      eval_now = (epoch_end and epoch % config.eval_every_epochs == 0) or step == total_steps
      # Saved before the evaluation too: an evaluation that fails loses no training.
      save_now = step % config.checkpoint_every_steps == 0 or eval_now
      stopping = stop["signal"] is not None
      if not (log_now or eval_now or save_now or stopping):
        continue
      latest_metrics = read_pending()
      if log_now:
        elapsed = time.perf_counter() - window_start
        lr = float(setup.schedule(max(step // config.grad_accum_steps - 1, 0)))
        if first:  # its time is mostly compilation: no rate
          line, rates = f"  (first step; compiled in {elapsed:.0f} s)", {}
        else:
          line, rates = throughput.measure(window_steps, elapsed)
          line += f"  ETA {(total_steps - step) * elapsed / window_steps / 60:.1f} min"
        print(f"step {step}/{total_steps}  loss {latest_metrics['loss']:.4f}  "
              f"lr {lr:.3g}{line}", flush=True)
        writer.write(step, {"train/loss": latest_metrics["loss"], "train/lr": lr,
                            "train/grad_norm": latest_metrics["grad_norm"], **rates})
        window_start, window_steps = time.perf_counter(), 0
      if save_now:
        setup.save(step, state)
      if eval_now:
        try:
          results = evaluate(setup, eval_fn, state)
        except pipeline.DataError as err:
          raise save_and_stop(step, f"evaluation at step {step} failed: {err}") from None
        print(f"step {step} (epoch {epoch}): eval top-1 {results['eval/top1']:.4f}  "
              f"top-5 {results['eval/top5']:.4f}", flush=True)
        writer.write(step, results)
        setup.best_manager.save(step, args=ocp.args.StandardSave(state.params),
                                metrics=results)
      if stopping:
        if not save_now:  # a signal right after a scheduled save: that save is the one
          setup.save(step, state)
        manager.wait_until_finished()
        print(f"received signal {stop['signal']}: saved step {step}, exiting", flush=True)
        return
      if eval_now or save_now:  # the window's rate leaves out evaluation and saving
        window_start, window_steps = time.perf_counter(), 0
    manager.wait_until_finished()
    setup.best_manager.wait_until_finished()
    print(f"done: weights in {save_final(setup, state, step)}", flush=True)
  except (OSError, ValueError, RuntimeError, pretrained.CheckpointError) as err:
    if not pretrained.is_write_failure(err):
      raise
    saved = _last_complete(manager)
    raise ConfigError(
        f"{pretrained.write_error(workdir, err).split('; nothing')[0]}; training stopped at "
        f"step {step}" + (f"; the last complete checkpoint is step {saved}: free space and "
                          "run the same command to resume" if saved is not None else "")
    ) from None
  finally:
    profiler.close()
    batches.close()
    local_batches.close()
