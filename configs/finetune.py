"""Fine-tune a converted (or trained) checkpoint on a small class-per-folder dataset.

  python train.py --config configs/finetune.py --workdir DIR \
      --config.init_from=weights/spanet_s --config.folder=/data/flowers

The ImageNet recipe of configs/default.py is for 1.28M images from scratch: on a few
hundred images its batch-scaled learning rate is too small, its warm-up outlasts the
run, and its mixing and RandAugment drown the signal. Here: an absolute lr of 1e-4 for
AdamW (lr_base_batch = batch_size), one warm-up epoch, a smooth per-update cosine over
30 epochs, light augmentation (crop and flip, no mixing, RandAugment or erasing), label
smoothing 0.1, a line every 10 steps and an evaluation every epoch. The class count is
the dataset's, the head re-initialised for it; every other tensor comes from init_from.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = ""  # "": the model and architecture of init_from (its spanet.json)
  config.init_from = ""  # required: a converted checkpoint or a train.py workdir
  config.folder = ""  # DIR/train/<class>/*, DIR/val/<class>/*
  config.eval_split = "val"
  config.num_classes = -1  # the dataset's
  config.drop_path_rate = 0.1

  config.batch_size = 32
  config.lr = 1e-4
  config.lr_base_batch = 32  # = batch_size: the lr is absolute
  config.lr_schedule = "cosine_per_update"
  config.num_epochs = 30
  config.warmup_epochs = 1
  config.cooldown_epochs = 0
  config.min_lr = 1e-6

  config.crop_scale = (0.5, 1.0)
  config.randaugment = ""
  config.mixup = 0.0
  config.cutmix = 0.0
  config.random_erasing = 0.0

  config.log_every_steps = 10
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 500
  return config
