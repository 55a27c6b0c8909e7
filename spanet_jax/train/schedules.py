"""Learning-rate schedules, as functions of the optimizer's update count.

`cosine_per_epoch` is the official recipe's: timm's cosine scheduler stepped once per
epoch (`t_in_epochs=True`, as timm's train.py runs it). Every update of epoch e uses

  e < warmup:             warmup_lr + e * (peak - warmup_lr) / warmup
  warmup <= e < epochs:   min_lr + (peak - min_lr) * (1 + cos(pi * e / epochs)) / 2
  epochs <= e:            min_lr   (the cooldown epochs)

so the first epoch runs at warmup_lr, the peak itself is never used during warm-up, and
the cosine runs on the absolute epoch (it starts just below the peak). `cosine_per_update`
ramps linearly per update from warmup_lr to the peak, then decays over the remaining
updates of `num_epochs` epochs to min_lr; the cooldown epochs run at min_lr.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from spanet_jax.train import settings

SCHEDULES = ("cosine_per_epoch", "cosine_per_update")


def epoch_lr(epoch: jax.Array, *, peak: float, warmup_lr: float, warmup_epochs: float,
             num_epochs: int, min_lr: float) -> jax.Array:
  """timm's cosine schedule (t_in_epochs) at the (float) epoch `epoch`."""
  warming = warmup_lr + epoch * (peak - warmup_lr) / max(warmup_epochs, 1e-12)
  cosine = min_lr + 0.5 * (peak - min_lr) * (1 + jnp.cos(math.pi * epoch / num_epochs))
  return jnp.where(epoch < warmup_epochs, warming,
                   jnp.where(epoch < num_epochs, cosine, min_lr))


def update_epochs(count, batches_per_epoch: int, grad_accum_steps: int):
  """The epoch in which update `count` (0-based) is applied: at the end of its last
  batch, batch (count + 1) * grad_accum_steps - 1 of the run."""
  return ((count + 1) * grad_accum_steps - 1) // batches_per_epoch


def learning_rate_schedule(config: settings.Schedule,
                           batches_per_epoch: int) -> optax.Schedule:
  """The learning rate of each optimizer update (the count optax passes).

  Args:
    config: the schedule's settings.
    batches_per_epoch: global batches in one epoch (micro-steps when accumulating).
  """
  peak = config.peak_lr
  accum = config.grad_accum_steps
  if config.lr_schedule == "cosine_per_epoch":
    def schedule(count):
      epoch = update_epochs(jnp.asarray(count), batches_per_epoch, accum)
      return epoch_lr(epoch.astype(jnp.float32), peak=peak, warmup_lr=config.warmup_lr,
                      warmup_epochs=config.warmup_epochs, num_epochs=config.num_epochs,
                      min_lr=config.min_lr)
    return schedule
  if config.lr_schedule == "cosine_per_update":
    updates_per_epoch = max(batches_per_epoch // accum, 1)
    total = max(config.num_epochs * updates_per_epoch, 1)
    warmup = min(int(config.warmup_epochs * updates_per_epoch), total - 1)
    # Past `total` updates (the cooldown epochs) optax's schedule stays at min_lr.
    return optax.warmup_cosine_decay_schedule(
        init_value=config.warmup_lr, peak_value=peak, warmup_steps=warmup,
        decay_steps=total, end_value=config.min_lr)
  raise ValueError(f"config.lr_schedule={config.lr_schedule!r}: use one of "
                   f"{', '.join(SCHEDULES)}")
