"""The official training recipe (timm 0.6.11's train.py, as the official scripts run it):
its learning rate for every update, and its AdamW updates, against ours.

The official schedule and optimiser are written out here from timm's formulas and
PyTorch's own AdamW, independently of spanet_jax.train.
"""

import functools
import math

import jax
import numpy as np
import pytest

import spanet_jax
from configs import default
from spanet_jax import convert
from spanet_jax.data import augment
from spanet_jax.models import registry
from spanet_jax.train import schedules, steps
from spanet_jax.train import settings
from conftest import TINY, state_dict_numpy, tiny_reference


class TimmCosineEpochs:
  """timm's CosineLRScheduler as the official train.py runs it (t_in_epochs=True, one cycle,
  no noise, k_decay 1), written out from its formulas: lr(t) for epoch t."""

  def __init__(self, base_lr, t_initial, lr_min, warmup_t, warmup_lr_init):
    self.base_lr, self.t_initial, self.lr_min = base_lr, t_initial, lr_min
    self.warmup_t, self.warmup_lr_init = warmup_t, warmup_lr_init
    self.warmup_step = (base_lr - warmup_lr_init) / warmup_t if warmup_t else 1

  def get_lr(self, t):
    if t < self.warmup_t:
      return self.warmup_lr_init + t * self.warmup_step
    cycle, t_curr = t // self.t_initial, t - self.t_initial * (t // self.t_initial)
    if cycle >= 1:  # cycle_limit 1: past the cycle, min_lr
      return self.lr_min
    return self.lr_min + 0.5 * (self.base_lr - self.lr_min) * (
        1 + math.cos(math.pi * t_curr / self.t_initial))


def official_update_lrs(base_lr, epochs, warmup_epochs, cooldown_epochs, warmup_lr, min_lr,
                        updates_per_epoch):
  """The lr of every optimizer update of the official run: create_scheduler's epochs plus
  cooldown, the scheduler stepped once per epoch (step_update changes nothing)."""
  scheduler = TimmCosineEpochs(base_lr, epochs, min_lr, warmup_epochs, warmup_lr)
  return [scheduler.get_lr(epoch) for epoch in range(epochs + cooldown_epochs)
          for _ in range(updates_per_epoch)]


@pytest.mark.parametrize("accum,warmup", [(1, 5), (2, 5), (1, 0)])
def test_official_schedule_gives_timm_per_epoch_lr_for_every_update(accum, warmup):
  """A scaled-down official recipe: 12 epochs (5 of warm-up) plus 10 cooldown, 4 updates
  per epoch: every update's lr within float32 rounding of timm's, cooldown included."""
  config = default.get_config()
  config.num_epochs, config.warmup_epochs, config.cooldown_epochs = 12, warmup, 10
  config.batch_size, config.grad_accum_steps = 256, accum
  assert config.lr_schedule == "cosine_per_epoch"  # the default is the official one
  peak = 1e-3 * 256 * accum / 1024
  expected = official_update_lrs(peak, 12, warmup, 10, 1e-6, 1e-5, updates_per_epoch=4)
  assert len(expected) == 88
  schedule = schedules.learning_rate_schedule(settings.of(config).schedule,
                                              batches_per_epoch=4 * accum)
  ours = [float(schedule(count)) for count in range(88)]
  np.testing.assert_allclose(ours, expected, rtol=1e-6)
  if warmup:
    assert ours[:4] == [pytest.approx(1e-6, rel=1e-6)] * 4  # the whole first epoch
    assert max(ours[:20]) < peak and ours[20] < peak  # the peak itself is never used
  assert settings.of(config).schedule.total_epochs == 22


def official_adamw(model, lr, weight_decay=0.05):
  """timm's create_optimizer_v2('adamw'): no weight decay on 1-D parameters and biases."""
  import torch
  decay, no_decay = [], []
  for name, param in model.named_parameters():
    if param.requires_grad:
      (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
  return torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                            {"params": decay, "weight_decay": weight_decay}],
                           lr=lr, betas=(0.9, 0.999), eps=1e-8)


def label_smoothing_cross_entropy(logits, target, smoothing):
  """timm's LabelSmoothingCrossEntropy."""
  logprobs = logits.log_softmax(dim=-1)
  nll = -logprobs.gather(dim=-1, index=target[:, None])[:, 0]
  return ((1 - smoothing) * nll - smoothing * logprobs.mean(dim=-1)).mean()


def test_adamw_updates_with_the_official_schedule_match_pytorch():
  """Four updates (warm-up, two cosine epochs, cooldown; one update per epoch) from the
  same weights on the same batches, augmentation, mixing and drop path off, label
  smoothing 0.1: each parameter's total update equals PyTorch's to a relative L2 of
  1e-3 over all parameters (2.4e-5 here; a learning rate 5% off gives 5e-2)."""
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  reference = tiny_reference().train()
  name, overrides, start = convert.torch_to_flax(state_dict_numpy(reference))
  model = spanet_jax.create_model(name, **overrides)
  info = registry.model_info(TINY)

  config = default.get_config()
  config.num_epochs, config.warmup_epochs, config.cooldown_epochs = 3, 1, 1
  config.batch_size, config.lr_base_batch = 4, 4  # peak lr: the absolute 1e-3
  config.mixup = config.cutmix = config.random_erasing = 0.0
  config.drop_path_rate = 0.0
  schedule = schedules.learning_rate_schedule(settings.of(config).schedule, batches_per_epoch=1)
  optimizer = steps.make_optimizer(settings.of(config).optimiser, schedule)
  state = steps.init_state(model, optimizer, start, settings.of(config).step, jax.random.PRNGKey(0))
  train_step = jax.jit(functools.partial(steps.train_step, model=model, optimizer=optimizer,
                                         options=settings.of(config).step, mean=info.mean,
                                               std=info.std))

  lrs = official_update_lrs(1e-3, 3, 1, 1, 1e-6, 1e-5, updates_per_epoch=1)
  torch_optimizer = official_adamw(reference, lrs[0])
  rng = np.random.default_rng(0)
  for lr in lrs:
    batch = {"image": rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8),
             "label": rng.integers(0, 1000, (4,)).astype(np.int32)}
    state, _ = train_step(state, batch)
    images = np.asarray(augment.normalize(batch["image"], info.mean, info.std))
    for group in torch_optimizer.param_groups:  # the scheduler's step(epoch)
      group["lr"] = lr
    logits = reference(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    loss = label_smoothing_cross_entropy(logits, torch.from_numpy(batch["label"]).long(), 0.1)
    torch_optimizer.zero_grad()
    loss.backward()
    torch_optimizer.step()

  _, _, theirs = convert.torch_to_flax(state_dict_numpy(reference))
  flat = lambda tree: dict(jax.tree_util.tree_leaves_with_path(tree))
  start, ours, theirs = flat(start), flat(jax.device_get(state.params)), flat(theirs)
  assert ours.keys() == theirs.keys()
  ours_update = np.concatenate([(ours[k] - start[k]).ravel() for k in ours])
  their_update = np.concatenate([(theirs[k] - start[k]).ravel() for k in ours])
  assert np.linalg.norm(their_update) > 0
  relative = np.linalg.norm(ours_update - their_update) / np.linalg.norm(their_update)
  assert relative < 1e-3, relative
