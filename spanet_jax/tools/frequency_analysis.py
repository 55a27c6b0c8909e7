"""The paper's spectral analysis of a model's features (docs/architecture.md, The paper's spectral analysis).

For the output of every block: the 2-D Fourier transform over H and W, its log
amplitude (log(|F| + 1e-6), the guard only matters for exact zeros), centred, averaged
over images and channels; then the half-diagonal from the centre outwards, minus its
value at the centre. The curve says how much each frequency is damped relative to DC;
its last value (the highest frequency on the diagonal) plotted against depth shows how
much high-frequency content each layer keeps.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

LOG_EPS = 1e-6
_BLOCK_NAME = re.compile(r"stage(\d+)_block(\d+)$")


@dataclasses.dataclass(frozen=True)
class BlockSpectrum:
  block: int  # position in the network, from 0
  stage: int
  index_in_stage: int
  height: int
  width: int
  frequencies: np.ndarray  # per-axis frequency of each diagonal point, in units of pi
  relative_log_amplitude: np.ndarray  # 0 at the centre (DC)

  @property
  def high_frequency(self) -> float:
    """The curve's value at the highest frequency it reaches."""
    return float(self.relative_log_amplitude[-1])


def _is_block(module, method_name: str) -> bool:
  return method_name == "__call__" and bool(_BLOCK_NAME.search(module.name or ""))


def mean_log_amplitude_maps(model, variables, images: jax.Array) -> dict[str, jax.Array]:
  """{block path: sum over images of the channel-mean log |fft2| of its output (H, W)}."""
  _, state = model.apply(variables, images, train=False, capture_intermediates=_is_block,
                         mutable=["intermediates"])
  flat = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
  maps = {}
  for path, value in flat:
    name = "/".join(str(getattr(k, "key", k)) for k in path[:-1])
    if name.endswith("__call__"):
      name = name[:-len("/__call__")]
    spectrum = jnp.fft.fft2(value.astype(jnp.float32), axes=(1, 2))
    log_amplitude = jnp.log(jnp.abs(spectrum) + LOG_EPS)
    # A SPANet given an explicit batch_parts > 1 records each part separately.
    maps[name] = maps.get(name, 0.0) + jnp.sum(jnp.mean(log_amplitude, axis=-1), axis=0)
  return maps


def relative_diagonal(mean_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(frequencies in units of pi, relative log amplitude) along the centred half-diagonal."""
  height, width = mean_map.shape
  centred = np.fft.fftshift(mean_map)
  steps = min(height - height // 2, width - width // 2)
  k = np.arange(steps)
  diagonal = centred[height // 2 + k, width // 2 + k]
  # Bin k of an n-point DFT is the angular frequency 2 pi k / n.
  frequencies = 2.0 * k / min(height, width)
  return frequencies, diagonal - diagonal[0]


def analyse(model, variables, images: np.ndarray, batch_size: int = 16,
            progress=None) -> list[BlockSpectrum]:
  """BlockSpectrum of every block, in network order, averaged over `images` (NHWC)."""
  if len(images) == 0:
    raise ValueError("no images to analyse")
  fn = jax.jit(lambda batch: mean_log_amplitude_maps(model, variables, batch))
  totals = None
  for start in range(0, len(images), batch_size):
    maps = jax.device_get(fn(jnp.asarray(images[start:start + batch_size])))
    totals = maps if totals is None else {k: totals[k] + maps[k] for k in totals}
    if progress:
      progress(min(start + batch_size, len(images)), len(images))
  located = []
  for name, total in totals.items():
    match = _BLOCK_NAME.search(name)
    located.append(((int(match.group(1)), int(match.group(2))), total / len(images)))
  located.sort(key=lambda item: item[0])
  spectra = []
  for block, ((stage, index), mean_map) in enumerate(located):
    frequencies, curve = relative_diagonal(np.asarray(mean_map, np.float64))
    spectra.append(BlockSpectrum(block, stage, index, mean_map.shape[0], mean_map.shape[1],
                                 frequencies, curve))
  return spectra


CSV_HEADER = ("model", "checkpoint", "block", "stage", "index_in_stage", "normalized_depth",
              "height", "width", "high_frequency_relative_log_amplitude",
              "frequencies_pi", "relative_log_amplitude")


def csv_rows(label: str, checkpoint: str, spectra: Sequence[BlockSpectrum]) -> list[list]:
  """One row per block; the curve and its frequencies as space-separated numbers."""
  return [[label, checkpoint, s.block, s.stage, s.index_in_stage,
           f"{(s.block + 1) / len(spectra):.6f}", s.height, s.width, f"{s.high_frequency:.6f}",
           " ".join(f"{f:.6f}" for f in s.frequencies),
           " ".join(f"{v:.6f}" for v in s.relative_log_amplitude)] for s in spectra]


def plot(results: dict[str, Sequence[BlockSpectrum]], path: str) -> None:
  """One panel of curves per model (colour = depth) and one of the high-frequency value
  against normalised depth with every model; written as an image file."""
  from matplotlib import cm, colors  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  count = len(results)
  figure = Figure(figsize=(4.2 * (count + 1), 3.8), layout="constrained")
  axes = figure.subplots(1, count + 1, squeeze=False)[0]
  colormap = colors.LinearSegmentedColormap.from_list(
      "depth", cm.plasma(np.linspace(0.0, 0.9, 256)))  # plasma without its pale yellow end
  for ax, (label, spectra) in zip(axes, results.items()):
    for s in spectra:
      ax.plot(s.frequencies, s.relative_log_amplitude,
              color=colormap((s.block + 1) / len(spectra)), linewidth=1.2)
    figure.colorbar(cm.ScalarMappable(colors.Normalize(0, 1), colormap), ax=ax,
                    label="normalised depth", fraction=0.05, pad=0.02)
    ax.set_title(label, fontsize=10)
    ax.set_xlabel("frequency (x pi)")
    ax.set_ylabel("relative log amplitude")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
  depth_ax = axes[-1]
  for label, spectra in results.items():
    depth = [(s.block + 1) / len(spectra) for s in spectra]
    depth_ax.plot(depth, [s.high_frequency for s in spectra], marker="o", markersize=3,
                  label=label)
  depth_ax.set_title("highest frequency vs depth", fontsize=10)
  depth_ax.set_xlabel("normalised depth")
  depth_ax.set_ylabel("relative log amplitude")
  depth_ax.grid(alpha=0.3)
  depth_ax.legend(fontsize=8)
  figure.savefig(path, dpi=110)
