"""Training: the device mesh and shardings (mesh), learning-rate schedules (schedules),
optimizer and pure steps (steps), state checkpoints with checksums (checkpoints), the
workdir's names and lock (workdir, run_lock), throughput, MFU and profiles (monitoring),
the loop train.py runs (loop), and the host-memory setting for XLA:CPU (host_memory)."""
