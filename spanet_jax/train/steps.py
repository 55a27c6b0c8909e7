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
from spanet_jax.train import settings


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


def make_optimizer(config: settings.Optimiser,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
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


def init_state(model, optimizer, params, options: settings.StepOptions, rng) -> TrainState:
  ema = jax.tree.map(jnp.copy, params) if options.ema_decay > 0 else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), ema_params=ema, rng=rng)


def train_step(state: TrainState, batch: dict, *, model, optimizer,
               options: settings.StepOptions, mean, std):
  """One micro-step: normalisation (by the model's `mean` and `std`) and random erasing
  of the uint8 images, mixup/cutmix, forward, cross-entropy, update. Pure: jit it with
  the static arguments bound (train/loop.py does).

  Args:
    state: the TrainState; its rng and step seed every random draw.
    batch: {"image": uint8 (B, H, W, 3), "label": int32 (B,)}.
    model: the Flax module.
    optimizer: the optax transformation (steps.make_optimizer).
    options: random erasing, mixup, cutmix, label smoothing, EMA.
    mean, std: the model's input normalisation (0-1 scale).

  Returns:
    (the next TrainState, {"loss", "grad_norm"}).
  """
  step_rng = jax.random.fold_in(state.rng, state.step)
  mix_rng, dropout_rng, erase_rng = jax.random.split(step_rng, 3)
  images = augment.normalize(batch["image"], mean, std)
  images = augment.random_erasing(erase_rng, images, options.random_erasing)
  images, targets = augment.mix_batch(
      mix_rng, images, batch["label"], options.num_classes, options.mixup,
      options.cutmix, options.mixup_switch_prob, options.label_smoothing)

  def loss_fn(params):
    logits = model.apply({"params": params}, images, train=True, rngs={"dropout": dropout_rng})
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    ema = jax.tree.map(lambda e, p: options.ema_decay * e + (1 - options.ema_decay) * p,
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
