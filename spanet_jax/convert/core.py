"""Official PyTorch SPANet and SPANetV2 state_dicts <-> Flax params, in both directions.

One key table per family (spanet_keys.py, spanetv2_keys.py) lists, for an architecture,
every official key with the Flax parameter it becomes and how the tensor is laid out;
both directions read it, the table chosen by the model's family in the registry.
Tensors are handled as numpy arrays here; reading and writing `.pth` files (torch)
happens in `load_state_dict_file` / `save_state_dict_file` only.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np

from spanet_jax import outputs
from spanet_jax.convert import spanet_keys, spanetv2_keys
from spanet_jax.convert.entries import (AS_IS, CONV, GROUPED, LINEAR, MASK, POINTWISE,
                                       VECTOR, ConversionError, Entry)
from spanet_jax.models import pretrained, registry, spectral

# The key table of each model family, by the family name the registry gives a model.
KEY_TABLES = {table.FAMILY: table for table in (spanet_keys, spanetv2_keys)}

CONTAINER_KEYS = ("state_dict", "model", "state_dict_ema")
STRIPPED_PREFIXES = ("module.", "backbone.")


def _to_flax(array: np.ndarray, kind: str, flax_shape: tuple[int, ...]) -> np.ndarray:
  if kind == GROUPED:
    # Output channel g * (O/G) + o of a grouped conv reads inputs g * (I/G) + i; the
    # file's (O, I/G) does not say G, the model's (G, I/G, O/G) does.
    groups, per_group_in, per_group_out = flax_shape
    return array[:, :, 0, 0].reshape(groups, per_group_out, per_group_in).transpose(0, 2, 1)
  if kind == CONV:
    return array.transpose(2, 3, 1, 0)
  if kind == POINTWISE:
    return array[:, :, 0, 0].T
  if kind == LINEAR:
    return array.T
  return array


def _to_torch(array: np.ndarray, kind: str) -> np.ndarray:
  if kind == GROUPED:
    groups, per_group_in, per_group_out = array.shape
    return array.transpose(0, 2, 1).reshape(groups * per_group_out, per_group_in)[:, :, None,
                                                                                  None]
  if kind == CONV:
    return array.transpose(3, 2, 0, 1)
  if kind == POINTWISE:
    return array.T[:, :, None, None]
  if kind == LINEAR:
    return array.T
  return array


def _torch_shape(flax_shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  return _to_torch(np.empty(flax_shape, np.float32), kind).shape


# ---------------------------------------------------------------------------------------
# Reading what a checkpoint holds.


def unwrap_state_dict(obj: Any) -> "StateDict":
  """The model's tensors from any container seen in the SPANet ecosystem, as numpy.

  Accepts a bare state_dict or one held under state_dict / model / state_dict_ema,
  with keys prefixed by `module.` (DDP) and/or `backbone.` (mmdet/mmseg, whose other
  parts -- neck, heads -- are dropped).
  """
  entry = None
  if isinstance(obj, Mapping):
    for key in CONTAINER_KEYS:
      if isinstance(obj.get(key), Mapping):
        entry, obj = key, obj[key]
        break
  if not isinstance(obj, Mapping) or not obj:
    raise ConversionError("the file holds no state_dict (expected a dict of tensors, or one "
                          f"under {', '.join(repr(k) for k in CONTAINER_KEYS)})")
  tensors = {}
  for key, value in obj.items():
    if not hasattr(value, "shape"):
      continue  # metadata such as an epoch counter stored beside the tensors
    tensors[str(key)] = value
  if not tensors:
    raise ConversionError("the file's dict holds no tensors")
  for prefix in STRIPPED_PREFIXES:
    if any(k.startswith(prefix) for k in tensors):
      tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
  return StateDict({k: _as_numpy(v) for k, v in tensors.items()}, entry)


class StateDict(dict):
  """official key -> numpy array, and which entry of the file's dict held it (None: the
  file is the state_dict itself)."""

  def __init__(self, tensors: Mapping[str, np.ndarray], entry: str | None = None):
    super().__init__(tensors)
    self.entry = entry


def _as_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu()
    if value.dtype.is_floating_point:
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def matching_model(arch) -> str | None:
  """The registered model of the same family and architecture, if any."""
  for name in registry.list_models():
    info = registry.model_info(name)
    if info.family == arch.family and all(
        tuple(value) == tuple(getattr(arch, key)) for key, value in info.architecture.items()):
      return name
  return None


def infer_architecture(state_dict: Mapping[str, np.ndarray]):
  """The architecture a state_dict holds, read by the key table of its family."""
  for table in KEY_TABLES.values():
    if table.IDENTIFYING_KEY in state_dict:
      return table.infer_architecture(state_dict)
  known = " nor ".join(f"'{t.IDENTIFYING_KEY}' ({t.FAMILY})" for t in KEY_TABLES.values())
  raise ConversionError(f"neither {known} in the file: not a SPANet checkpoint "
                        f"(first keys: {', '.join(list(state_dict)[:5])})")


def describe(arch) -> str:
  name = matching_model(arch)
  family = "SPANetV2" if arch.family == "spanetv2" else "SPANet"
  return f"{name} ({arch.describe()})" if name else f"no registered {family} ({arch.describe()})"


def key_map(model_name: str, model) -> list[Entry]:
  """Every official key of a built model, in official order, with its Flax path: the
  key table of the model's registered family."""
  table = KEY_TABLES[registry.model_info(model_name).family]
  return table.key_map(table.architecture_of(model), tuple(model.res_scale_stages))


def _list(keys, limit: int = 8) -> str:
  keys = list(keys)
  shown = ", ".join(keys[:limit])
  return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# ---------------------------------------------------------------------------------------
# The two directions.


def torch_to_flax(state_dict: Mapping[str, np.ndarray], model_name: str | None = None,
                  learnable_masks: bool = False) -> tuple[str, dict[str, Any], dict]:
  """Convert an official-layout state_dict to Flax params.

  Args:
    state_dict: official key -> array (numpy or torch), as `load_state_dict_file` reads.
    model_name: the registered model to convert to; default the one whose
      architecture the state_dict has.
    learnable_masks: keep SPANet's stored masks as parameters (for trained masks);
      otherwise they are checked against the mask formula and not stored.

  Returns:
    (model name, create_model overrides, Flax params as nested dicts of numpy arrays).

  Raises:
    ConversionError: missing, unexpected or mis-shaped keys, non-finite values or a
      mask that is not the formula's, naming them and the variant the file looks like.
  """
  arch = infer_architecture(state_dict)
  if model_name is None:
    model_name = matching_model(arch)
    if model_name is None:
      raise ConversionError(f"cannot tell the model: the file is {describe(arch)}; "
                            f"known: {', '.join(registry.list_models())}")
  family = registry.model_info(model_name).family
  if family != arch.family:
    raise ConversionError(f"the file does not fit {model_name}: it is {describe(arch)}")
  overrides = arch.overrides()
  if learnable_masks and family == "spanet":  # SPANetV2's masks are always learned
    overrides["learnable_masks"] = True
  model = registry.build_model(model_name, **overrides)
  # The key table of the model asked for; the file's own shape only names what it is.
  entries = key_map(model_name, model)
  expected_keys = {e.torch_key for e in entries}
  missing = [e.torch_key for e in entries if e.torch_key not in state_dict]
  unused = arch.unused_keys(state_dict)
  unexpected = [k for k in state_dict if k not in expected_keys and k not in unused]
  problems = []
  if missing:
    problems.append(f"missing keys: {_list(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {_list(unexpected)}")
  if problems:
    raise ConversionError(f"the file does not fit {model_name}: {'; '.join(problems)}. "
                          f"The file looks like {describe(arch)}.")
  non_finite = [key for key in expected_keys
                if not np.all(np.isfinite(np.asarray(state_dict[key], np.float64)))]
  if non_finite:
    raise ConversionError(f"the file holds NaN or infinite values in {_list(sorted(non_finite))}"
                          f": damaged or diverged weights are not converted")

  wanted = _param_shapes(model)
  params: dict = {}
  masks: dict[tuple[str, ...], list[np.ndarray]] = {}
  bad_shapes = []
  for entry in entries:
    array = state_dict[entry.torch_key]
    if entry.kind == MASK:
      size = arch.mask_sizes[entry.stage]
      if array.shape != (1, size, size):
        bad_shapes.append(f"{entry.torch_key} {tuple(array.shape)} (expected (1, {size}, {size}))")
      elif learnable_masks:
        masks.setdefault(entry.flax_path, []).append(array[0].astype(np.float32))
      else:
        _check_mask(entry, array[0], size, model.radii[entry.stage])
      continue
    flax_shape = tuple(_get(wanted, entry.flax_path).shape)
    want = _torch_shape(flax_shape, entry.kind)
    if tuple(array.shape) != want:
      bad_shapes.append(f"{entry.torch_key} {tuple(array.shape)} (expected {want})")
      continue
    _set(params, entry.flax_path,
         np.ascontiguousarray(_to_flax(array, entry.kind, flax_shape)))
  if bad_shapes:
    raise ConversionError(f"the file does not fit {model_name}: wrong shapes for "
                          f"{_list(bad_shapes)}. The file looks like {describe(arch)}.")
  for path, chunks in masks.items():
    _set(params, path, np.stack(chunks))
  return model_name, overrides, params


def _check_mask(entry: Entry, stored: np.ndarray, size: int, radius: float) -> None:
  lamb = spectral.SPAM_LAMBDAS[entry.chunk]
  formula = spectral.centred_mask(size, size, radius, lamb)
  # A half-precision checkpoint stores the formula rounded to its precision.
  roundings = [formula] + [formula.astype(dtype).astype(np.float32)
                           for dtype in (np.float16, ml_dtypes.bfloat16)]
  if not any(np.array_equal(stored.astype(np.float32), r) for r in roundings):
    worst = float(np.max(np.abs(stored - formula)))
    raise ConversionError(
        f"{entry.torch_key} differs from SPANet's mask formula (radius {radius}, lambda "
        f"{lamb:.1f}; max difference {worst:.3g}); if the masks were trained, convert them "
        "as learnable masks")


def _param_shapes(model) -> dict:
  """The Flax model's own parameter shapes (abstract: nothing is computed)."""
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32))
  return abstract["params"]


def flax_to_torch(params: Mapping, model_name: str, overrides: Mapping[str, Any]
                  ) -> dict[str, np.ndarray]:
  """Flax params to an official-layout state_dict.

  Args:
    params: the Flax params of `model_name` built with `overrides`.
    model_name: a registered model name.
    overrides: the create_model options the params were made with.

  Returns:
    official key -> float32 numpy array, in the official key order (fixed SPANet masks
    written from the formula, as the official model stores them).
  """
  model = registry.build_model(model_name, **overrides)
  state_dict = {}
  for entry in key_map(model_name, model):
    if entry.kind != MASK:
      array = np.asarray(_get(params, entry.flax_path), np.float32)
      state_dict[entry.torch_key] = np.ascontiguousarray(_to_torch(array, entry.kind))
    elif model.learnable_masks:
      state_dict[entry.torch_key] = np.asarray(
          _get(params, entry.flax_path), np.float32)[entry.chunk][None].copy()
    else:
      size = model.mask_sizes[entry.stage]
      state_dict[entry.torch_key] = spectral.centred_mask(
          size, size, model.radii[entry.stage], spectral.SPAM_LAMBDAS[entry.chunk])[None].copy()
  return state_dict


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
  for name in path:
    tree = tree[name]
  return tree


# ---------------------------------------------------------------------------------------
# Files.


def load_state_dict_file(path: str) -> dict[str, np.ndarray]:
  """Read a .pth safely (torch's weights_only reader: no code in the file runs).

  Args:
    path: a .pth file: a bare state_dict or one under state_dict / model /
      state_dict_ema, keys possibly prefixed by module. or backbone.

  Returns:
    official key -> numpy array.

  Raises:
    ConversionError: no such file, or bytes that are not a checkpoint of tensors.
  """
  import torch  # pylint: disable=g-import-not-at-top

  if os.path.isdir(path):
    raise ConversionError(f"{path} is a directory: give the .pth file (a converted "
                          "checkpoint directory is what --to-torch reads)")
  if not os.path.isfile(path):
    raise ConversionError(f"no such file: {path}")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as err:  # pylint: disable=broad-except  # any reader failure: bad bytes
    refused_by_safe_reader = "weights_only" in str(err) or "Weights only" in str(err)
    if refused_by_safe_reader and zipfile.is_zipfile(path):
      # torch's text goes on to advise weights_only=False: unsafe for a file from elsewhere.
      detail = "it holds Python objects other than tensors, which are never unpickled here"
    elif refused_by_safe_reader or isinstance(
        err, (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, KeyError)):
      # Outside a zip archive torch reads the bytes as a legacy pickle; arbitrary bytes
      # then fail as a forbidden opcode, which says nothing useful to the user.
      detail = "its bytes are not a PyTorch checkpoint"
    else:
      detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    raise ConversionError(f"cannot read {path} as a PyTorch checkpoint (truncated, or not a "
                          f".pth file?): {detail}") from None
  return unwrap_state_dict(obj)


def save_state_dict_file(state_dict: Mapping[str, np.ndarray], path: str) -> None:
  """Write a .pth atomically (a temporary sibling renamed into place).

  Args:
    state_dict: official key -> numpy array.
    path: the file to write; a failed write leaves nothing at it.
  """
  import torch  # pylint: disable=g-import-not-at-top

  tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
  try:
    outputs.write_file(path, lambda temporary: torch.save(tensors, temporary))
  except (OSError, RuntimeError) as err:  # a full disk, a lost permission
    raise ConversionError(pretrained.write_error(path, err)) from None


# Block and stage indices in keys and paths, generalised for the key tables in docs/.
_INDEX_PATTERNS = (
    (re.compile(r"^network\.(\d+)\.(\d+)\."), "network.{2s}.{b}."),
    (re.compile(r"^network\.(\d+)\.proj"), "network.{2s-1}.proj"),
    (re.compile(r"^stages\.(\d+)\.(\d+)\."), "stages.{s}.{b}."),
    (re.compile(r"^downsample_layers\.(\d+)\."), "downsample_layers.{s}."),
    (re.compile(r"^norm\d\."), "norm{2s}."),
    (re.compile(r"stage\d+_block\d+"), "stage{s}_block{b}"),
    (re.compile(r"downsample\d+"), "downsample{s}"),
    (re.compile(r"out_norms_\d+"), "out_norms_{s}"),
)
_KIND_NOTES = {
    CONV: "conv kernel, (O, I, kh, kw) -> (kh, kw, I, O)",
    POINTWISE: "1x1 conv as a Dense kernel, (O, I, 1, 1) -> (I, O)",
    LINEAR: "linear kernel, (O, I) -> (I, O)",
    VECTOR: "vector, unchanged",
    AS_IS: "unchanged",
    GROUPED: "grouped 1x1 conv, (O, I/G, 1, 1) -> (G, I/G, O/G)",
    MASK: "(1, H, W) centred mask -> row k of spectral_masks (3, H, W) (learnable_masks "
          "only; otherwise checked against the formula and not stored)",
}


def _generalise(text: str, family: str) -> str:
  if family == "spanetv2":  # its dense backbone numbers the stage norms 0-3
    text = re.sub(r"^norm\d\.", "norm{s}.", text)
  for pattern, replacement in _INDEX_PATTERNS:
    text = pattern.sub(replacement, text)
  return text


def key_table_markdown() -> str:
  """docs/checkpoint_keys.md: every official key pattern of both families (classifier
  and dense-prediction backbone) with its Flax parameter path, from the converter's own
  key tables."""
  sections = [("SPANet (`spanet_s`; every variant has the same patterns)", "spanet_s", {}),
              ("SPANet dense-prediction backbone (`features_only=True`)", "spanet_s",
               {"features_only": True}),
              ("SPANetV2 hybrid (`spanetv2_s18_hybrid`; pure models lack the attention rows)",
               "spanetv2_s18_hybrid", {}),
              ("SPANetV2 dense-prediction backbone (`features_only=True`; the file's `norm.*` "
               "and `head.*`, which the official backbone keeps but never uses, are dropped)",
               "spanetv2_s18_hybrid", {"features_only": True})]
  lines = ["# Official checkpoint keys and Flax parameter paths", "",
           "Generated from `spanet_jax.convert`'s key tables (`python -c \"from spanet_jax "
           "import convert; print(convert.key_table_markdown())\" > docs/checkpoint_keys.md`"
           "; a test keeps it current). `{s}` is the stage (0-3), `{b}` the block within it; "
           "Flax paths are under `params`.", ""]
  for title, name, overrides in sections:
    model = registry.build_model(name, **overrides)
    entries = key_map(name, model)
    lines += [f"## {title}", "", "| official key | Flax path | conversion |", "| --- | --- | --- |"]
    seen = set()
    for entry in entries:
      family = registry.model_info(name).family
      row = (_generalise(entry.torch_key, family),
             _generalise("/".join(entry.flax_path), family), entry.kind)
      if row not in seen:
        seen.add(row)
        lines.append(f"| `{row[0]}` | `{row[1]}` | {_KIND_NOTES[entry.kind]} |")
    lines.append("")
  return "\n".join(lines)
