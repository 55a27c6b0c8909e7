"""SPANet-MX on ImageNet-1k with the official recipe (docs/architecture.md, Training recipe).

The paper gives no drop-path rate for this variant; ours continues S, M, B's trend."""

from configs import default


def get_config():
  config = default.get_config()
  config.model = "spanet_mx"
  config.drop_path_rate = 0.3
  return config
