"""Training: the device mesh and shardings (mesh), optimizer and pure steps (steps),
state checkpoints with checksums (checkpoints), the loop train.py runs (loop), and the
host-memory setting for XLA:CPU (host_memory)."""
