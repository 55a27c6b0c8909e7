"""The pieces of a training step: optimizer, state, and the pure steps
`train_step(state, batch)` and `eval_step(params, batch)`. The learning-rate schedules
are in schedules.py; the mesh and every sharding are declared in mesh.py."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from spanet_jax.data import augment
from spanet_jax.models import registry


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # batches consumed (micro-steps when accumulating gradients)
  params: Any
  opt_state: Any
  ema_params: Any  # None without EMA
  rng: jax.Array


def decay_mask(params):
  """Weight decay on kernels only: not on 1-D parameters (norms, biases, scales)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


# How the model trains, not what it computes: left out of saved checkpoints' metadata.
TRAINING_ONLY_OPTIONS = ("drop_path_rate", "head_dropout", "remat")


def model_options(config) -> dict[str, Any]:
  """The create_model options a training config asks for (without dtype): what builds
  the model in train.py (described_options gives what its saved weights are described
  with)."""
  overrides = config["model_overrides"]
  overrides = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
  options = {"num_classes": config["num_classes"], "drop_path_rate": config["drop_path_rate"],
             "remat": bool(config.get("remat", False)), **overrides}
  family = registry.model_info(config["model"]).family
  if family == "spanet":
    options["learnable_masks"] = bool(config["learnable_masks"])
  elif config["learnable_masks"]:
    raise ValueError(f"config.learnable_masks: {config['model']}'s masks are always learned; "
                     "leave it False")
  if family == "spanetv2":
    options["head_dropout"] = config.get("head_dropout", 0.0)
  elif config.get("head_dropout", 0.0):
    raise ValueError(f"config.head_dropout: {config['model']} has no MLP head (SPANetV2 only)")
  return options


def described_options(options: dict[str, Any]) -> dict[str, Any]:
  """model_options without TRAINING_ONLY_OPTIONS: what saved weights are described with."""
  return {k: v for k, v in options.items() if k not in TRAINING_ONLY_OPTIONS}


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  parts = []
  if config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  if config.optimizer == "lamb":  # SPANetV2's hybrids were trained with LAMB
    parts.append(optax.lamb(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                            weight_decay=config.weight_decay, mask=decay_mask))
  else:
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay, mask=decay_mask))
  optimizer = optax.chain(*parts)
  if config.grad_accum_steps > 1:
    optimizer = optax.MultiSteps(optimizer, every_k_schedule=config.grad_accum_steps)
  return optimizer


def init_state(model, optimizer, params, config, rng) -> TrainState:
  ema = jax.tree.map(jnp.copy, params) if config.ema_decay > 0 else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), ema_params=ema, rng=rng)


def train_step(state: TrainState, batch: dict, *, model, optimizer, config, mean, std):
  """One micro-step: normalisation (by the model's `mean` and `std`) and random erasing
  of the uint8 images, mixup/cutmix, forward, cross-entropy, update. Pure: jit it with
  the static arguments bound (train/loop.py does).

  Args:
    state: the TrainState; its rng and step seed every random draw.
    batch: {"image": uint8 (B, H, W, 3), "label": int32 (B,)}.
    model: the Flax module.
    optimizer: the optax transformation (steps.make_optimizer).
    config: the training config (mixup, cutmix, label smoothing, EMA, ...).
    mean, std: the model's input normalisation (0-1 scale).

  Returns:
    (the next TrainState, {"loss", "grad_norm"}).
  """
  step_rng = jax.random.fold_in(state.rng, state.step)
  mix_rng, dropout_rng, erase_rng = jax.random.split(step_rng, 3)
  images = augment.normalize(batch["image"], mean, std)
  images = augment.random_erasing(erase_rng, images, config.random_erasing)
  images, targets = augment.mix_batch(
      mix_rng, images, batch["label"], config.num_classes, config.mixup,
      config.cutmix, config.mixup_switch_prob, config.label_smoothing)

  def loss_fn(params):
    logits = model.apply({"params": params}, images, train=True, rngs={"dropout": dropout_rng})
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    ema = jax.tree.map(lambda e, p: config.ema_decay * e + (1 - config.ema_decay) * p,
                       ema, params)
  metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       ema_params=ema), metrics


def eval_step(params, batch: dict, *, model):
  """Summed top-1 / top-5 hits and example count of a masked batch."""
  logits = model.apply({"params": params}, batch["image"], train=False).astype(jnp.float32)
  labels, mask = batch["label"], batch["mask"]
  top1 = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  k = min(5, logits.shape[-1])
  top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1).astype(jnp.float32)
  return {"top1": jnp.sum(top1 * mask), "top5": jnp.sum(top5 * mask), "count": jnp.sum(mask)}
