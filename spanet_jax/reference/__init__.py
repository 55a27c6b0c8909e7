"""PyTorch references of both families with the official parameter names, and the
numerical comparison against them (verify). Needs the torch extra."""
