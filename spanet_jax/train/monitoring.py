"""What the loop reports about speed: images/s (per device too), model FLOP utilisation
where the device's peak is known, and jax.profiler traces of chosen steps."""

from __future__ import annotations

import os

import jax

from spanet_jax.train import workdir as workdir_layout

# Peak dense bfloat16 FLOP/s per device (vendors' figures), matched against
# jax.Device.device_kind. MFU is stated against these whatever the compute dtype.
PEAK_FLOPS = (
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports itself as "TPU v5"
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
    ("A100", 312e12),
    ("H100", 989e12),
)


def peak_flops(device_kind: str) -> float | None:
  """The device's peak bfloat16 FLOP/s, or None when it is not in PEAK_FLOPS."""
  for name, flops in PEAK_FLOPS:
    if device_kind.startswith(name) or f" {name}" in device_kind:
      return flops
  return None


class Throughput:
  """Images/s of a window of steps, per device, and MFU (3x the forward FLOPs per image
  for the forward and backward passes, over the devices' peak)."""

  def __init__(self, batch_size: int, devices: list, train_flops_per_image=None):
    """`train_flops_per_image`: a callable giving the training FLOPs per image, called
    only when the devices' peak is known (it traces the model)."""
    self.batch_size = batch_size
    self.num_devices = len(devices)
    self.peak = peak_flops(devices[0].device_kind)
    self.flops = train_flops_per_image() if self.peak and train_flops_per_image else None

  def measure(self, steps: int, seconds: float) -> tuple[str, dict]:
    """(the console line's part, the metrics) for `steps` steps in `seconds`."""
    rate = steps * self.batch_size / seconds
    per_device = rate / self.num_devices
    line = f"  {rate:.1f} img/s ({per_device:.1f}/device)"
    rates = {"train/images_per_s": rate, "train/images_per_s_per_device": per_device}
    if self.flops:
      mfu = per_device * self.flops / self.peak
      line += f"  MFU {100 * mfu:.1f}%"
      rates["train/mfu"] = mfu
    return line, rates


class Profiler:
  """A jax.profiler trace of steps start+1 .. start+count (config.profile_steps), written
  under WORKDIR/profile for TensorBoard's profile tab or Perfetto."""

  def __init__(self, profile_steps, workdir: str):
    start, count = tuple(profile_steps) if profile_steps else (0, 0)
    self.start, self.stop = start, start + count
    self.enabled = count > 0
    self.directory = os.path.join(workdir, workdir_layout.PROFILE_DIR)
    self.running = False

  def after_step(self, step: int, state) -> None:
    if not self.enabled:
      return
    if step == self.start and not self.running:
      jax.block_until_ready(state)  # the trace holds the chosen steps only
      jax.profiler.start_trace(self.directory)
      self.running = True
    elif step == self.stop and self.running:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.running = False
      print(f"profile of steps {self.start + 1}-{self.stop} written under {self.directory}",
            flush=True)

  def close(self) -> None:
    if self.running:
      jax.profiler.stop_trace()
      self.running = False
