"""SPANet-BX on ImageNet-1k with the official recipe (docs/architecture.md, Training recipe)."""

from configs import spanet


def get_config():
  return spanet.get_config("bx")
