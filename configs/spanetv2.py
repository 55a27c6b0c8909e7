"""SPANetV2 on ImageNet-1k with its official recipe; the variant follows the colon.

  python train.py --config configs/spanetv2.py:s18_pure --workdir DIR
  python train.py --config configs/spanetv2.py:b36_hybrid --workdir DIR

Global batch 4096, lr 4e-3 for 4096 images (scaled linearly with --config.batch_size),
20 warmup epochs, 300 epochs, weight decay 0.05, mixed precision (bfloat16 here; the
spectral filter still runs in float32), and the augmentation recipe of SPANet. The
official training scripts train the hybrids with LAMB at lr 8e-3 and set the drop path,
head dropout and clipping per variant; those values are below.
"""

from configs import default

# variant: (drop path, head dropout, optimizer, lr for 4096 images, gradient clipping)
_RECIPES = {
    "s18_pure": (0.2, 0.0, "adamw", 4e-3, 0.0),
    "s18_hybrid": (0.15, 0.0, "lamb", 8e-3, 0.0),
    "s36_pure": (0.3, 0.0, "adamw", 4e-3, 0.0),
    "s36_hybrid": (0.3, 0.4, "lamb", 8e-3, 0.0),
    "m36_pure": (0.4, 0.0, "adamw", 4e-3, 0.0),
    "m36_hybrid": (0.4, 0.4, "lamb", 8e-3, 0.0),
    "b36_pure": (0.6, 0.0, "adamw", 4e-3, 0.0),
    "b36_hybrid": (0.6, 0.5, "lamb", 8e-3, 1.0),
}


def get_config(variant: str = "s18_pure"):
  if variant not in _RECIPES:
    raise ValueError(f"configs/spanetv2.py:{variant}: choose one of {', '.join(_RECIPES)}")
  drop_path, head_dropout, optimizer, lr, grad_clip = _RECIPES[variant]
  config = default.get_config()
  config.model = f"spanetv2_{variant}"
  config.drop_path_rate = drop_path
  config.head_dropout = head_dropout
  config.optimizer = optimizer
  config.lr = lr
  config.lr_base_batch = 4096
  config.batch_size = 4096
  config.grad_clip = grad_clip
  config.warmup_epochs = 20
  config.dtype = "bfloat16"
  return config
