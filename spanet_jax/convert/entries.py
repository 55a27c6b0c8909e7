"""What a key table is made of: one Entry per official tensor, naming its Flax parameter
and how the tensor is laid out in each framework."""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

from spanet_jax import errors


class ConversionError(errors.UserError):
  """A checkpoint that cannot be converted; the message says why, for the user."""


# How an official tensor maps onto its Flax counterpart.
CONV = "conv"        # (O, I, kh, kw) <-> (kh, kw, I, O)
POINTWISE = "1x1"    # (O, I, 1, 1)   <-> (I, O) Dense kernel
LINEAR = "linear"    # (O, I)         <-> (I, O)
VECTOR = "vector"    # (C,)           <-> (C,)
AS_IS = "as is"      # any shape, unchanged (SPANetV2's learned filters)
GROUPED = "grouped"  # (O, I/G, 1, 1) grouped 1x1 conv <-> (G, I/G, O/G)
MASK = "mask"        # (1, H, W) centred SPF mask <-> one row of (3, H, W) spectral_masks


@dataclasses.dataclass(frozen=True)
class Entry:
  torch_key: str
  flax_path: tuple[str, ...]
  kind: str
  stage: int = -1  # for MASK entries: which stage and which chunk's lambda
  chunk: int = -1


def weights(prefix: str, path: tuple[str, ...], kind: str, bias: bool = True,
            weight_name: str | None = None) -> list[Entry]:
  """The entries of one official module: `prefix.weight` (and `prefix.bias`) under the
  Flax module at `path` ("scale" for vectors, else "kernel", unless named)."""
  weight_name = weight_name or ("scale" if kind == VECTOR else "kernel")
  entries = [Entry(f"{prefix}.weight", path + (weight_name,), kind)]
  if bias:
    entries.append(Entry(f"{prefix}.bias", path + ("bias",), VECTOR))
  return entries


def block_depths(keys: Iterable[str], block_key: re.Pattern) -> dict[int, int]:
  """Blocks per stage container, read off keys that `block_key` matches as
  (container index, block index): each container's highest block index plus one."""
  depths: dict[int, int] = {}
  for key in keys:
    match = block_key.match(key)
    if match:
      index, block = int(match.group(1)), int(match.group(2))
      depths[index] = max(depths.get(index, 0), block + 1)
  return depths
