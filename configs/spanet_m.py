"""SPANet-M on ImageNet-1k with the official recipe (docs/architecture.md, Training recipe)."""

from configs import default


def get_config():
  config = default.get_config()
  config.model = "spanet_m"
  config.drop_path_rate = 0.2
  return config
