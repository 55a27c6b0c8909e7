"""Every training option and its default, in one place. Variant configs override a few.

  python train.py --config configs/spanet_s.py --workdir DIR --config.batch_size=256
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Model: a registered name plus create_model overrides (dtype is set from `dtype`).
  config.model = "spanet_s"
  config.model_overrides = ml_collections.ConfigDict()
  config.drop_path_rate = 0.1
  config.learnable_masks = False  # SPANet only; SPANetV2's masks are always learned
  config.head_dropout = 0.0  # SPANetV2's MLP head only
  config.dtype = "float32"  # or "bfloat16": compute dtype; parameters stay float32
  config.remat = False  # recompute each block in the backward pass: less memory, more time
  config.init_from = ""  # a converted or trained checkpoint directory to start from
  # init_from refuses a checkpoint from which nothing outside the head would load;
  # True accepts it (training then starts from scratch but for what fits).
  config.init_from_partial = False

  # Data, read through TFDS. `folder` (class-per-folder train/ and val/) wins over `dataset`.
  config.dataset = "imagenet2012"
  config.data_dir = ""  # TFDS data_dir ("" = TFDS's default)
  config.manual_dir = ""  # where a manually downloaded dataset (ImageNet) lies
  config.folder = ""
  config.train_split = "train"
  config.eval_split = "validation"
  config.num_classes = 1000
  config.image_size = 224
  config.crop_pct = -1.0  # evaluation crop; -1 = the model's metadata
  config.prefetch = 2

  # Augmentation (the official recipe).
  config.crop_scale = (0.08, 1.0)
  config.crop_ratio = (3 / 4, 4 / 3)
  config.resize_antialias = False  # True: PIL's antialiased bicubic (timm's), ~3x slower
  config.hflip = 0.5
  config.randaugment = "rand-m9-mstd0.5-inc1"  # timm's policy string; "" = off
  config.random_erasing = 0.25  # probability; per-pixel normal noise (timm's "pixel" mode)
  config.mixup = 0.8
  config.cutmix = 1.0
  config.mixup_switch_prob = 0.5
  config.label_smoothing = 0.1

  # Optimisation: AdamW (or LAMB). The official recipe's lr is absolute: 1e-3 at its global
  # batch of 1024. Here it scales linearly with the images per update, lr * batch_size *
  # grad_accum_steps / lr_base_batch: the official 1e-3 when they are 1024; set
  # lr_base_batch to their product for an absolute lr.
  config.optimizer = "adamw"  # or "lamb"
  config.batch_size = 1024  # global, over all devices and hosts
  config.lr = 1e-3
  config.lr_base_batch = 1024
  # The official schedule: timm's cosine stepped once per epoch (schedules.py), 5 warm-up
  # epochs from warmup_lr, the cosine over num_epochs, then cooldown_epochs at min_lr:
  # 310 epochs in all. "cosine_per_update" ramps and decays smoothly per update instead.
  config.lr_schedule = "cosine_per_epoch"
  config.num_epochs = 300
  config.warmup_epochs = 5
  config.cooldown_epochs = 10
  config.warmup_lr = 1e-6
  config.min_lr = 1e-5
  config.weight_decay = 0.05  # not applied to 1-D parameters (norms, biases, scales)
  config.b1 = 0.9
  config.b2 = 0.999
  config.eps = 1e-8
  config.grad_clip = 0.0  # global-norm clipping; 0 = off
  # Accumulate gradients over this many batches of batch_size per update (the official
  # script's total batch is batch_size * grad_accum_steps): the mean of their gradients,
  # as its loss / grad_accum_steps gives.
  config.grad_accum_steps = 1
  config.ema_decay = 0.0  # 0 = no EMA of weights

  # Parallelism: a (data, model) device mesh; model > 1 shards parameters and
  # optimizer state over that axis (FSDP-style) for the larger variants.
  config.mesh_model = 1

  # Bookkeeping.
  config.seed = 0
  config.log_every_steps = 50
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.eval_batch_size = 0  # 0 = batch_size
  # (start, count): a jax.profiler trace of steps start+1 .. start+count under
  # WORKDIR/profile (TensorBoard's profile tab, or Perfetto); () = none.
  config.profile_steps = ()
  return config
