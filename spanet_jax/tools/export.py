"""Serving artifacts of a model with its weights embedded: StableHLO (jax.export) and
TensorFlow SavedModel (jax2tf), traced with the formulations of the target platforms
(`platform.target`), not those of the exporting machine.
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import shutil
import tempfile
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spanet_jax import errors, outputs
from spanet_jax.ops import platform


class ExportError(errors.UserError):
  """An artifact that cannot be written as asked; the message says why."""


def _forward(model, variables):
  params = jax.tree.map(jnp.asarray, variables)
  return lambda images: model.apply(params, images, train=False).astype(jnp.float32)


def _input_shape(batch: int | None, size: tuple[int, int]) -> str:
  return f"({'b' if batch is None else batch}, {size[0]}, {size[1]}, 3)"


def stablehlo(model, variables, size: tuple[int, int], batch: int | None = None,
              platforms: Sequence[str] = ("cpu", "cuda", "tpu")) -> bytes:
  """A serialized jax.export artifact: float32 NHWC images -> float32 logits.

  Args:
    model, variables: the model and its weights (embedded in the artifact).
    size: (height, width) of the images.
    batch: a fixed batch, or None for any batch.
    platforms: where it must run (jax.export platform names).

  Returns:
    Bytes for jax.export.deserialize(bytes).call(images).
  """
  shape = jax.export.symbolic_shape(_input_shape(batch, size))
  with platform.target(platform.backend_for_platforms(platforms)):
    exported = jax.export.export(jax.jit(_forward(model, variables)),
                                 platforms=tuple(platforms))(
        jax.ShapeDtypeStruct(shape, jnp.float32))
  return bytes(exported.serialize())


def savedmodel(model, variables, size: tuple[int, int], path: str, batch: int | None = None,
               platforms: Sequence[str] = ("cpu",), formulations: str | None = None) -> None:
  """A TensorFlow SavedModel whose `serving_default` signature maps `images` (float32
  NHWC) to `logits`, runnable from TensorFlow alone; written atomically. `formulations`
  ('cpu', 'gpu', 'tpu') overrides the platforms' choice of formulations."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (only this artifact needs it)
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  backend = formulations or platform.backend_for_platforms(platforms)
  with platform.target(backend, portable_ops=True):
    converted = jax2tf.convert(_forward(model, variables),
                               polymorphic_shapes=[_input_shape(batch, size)],
                               with_gradient=False,
                               native_serialization_platforms=tuple(platforms))
    module = tf.Module()
    module.serve = tf.function(lambda images: {"logits": converted(images)}, autograph=False)
    signature = module.serve.get_concrete_function(
        tf.TensorSpec([batch, size[0], size[1], 3], tf.float32, name="images"))
  staging = path.rstrip("/") + ".staging"
  shutil.rmtree(staging, ignore_errors=True)
  tf.saved_model.save(module, staging, signatures={"serving_default": signature})
  outputs.replace(staging, path)


def tflite(savedmodel_path: str, path: str) -> None:
  """A TFLite flatbuffer converted from a SavedModel written by `savedmodel`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    with _stderr_to_file() as noise:  # the converter's C++ diagnostics, kept off the console
      flatbuffer = tf.lite.TFLiteConverter.from_saved_model(savedmodel_path).convert()
  except Exception as err:  # pylint: disable=broad-except  (the converter raises many kinds)
    reasons = [line.split("error: ", 1)[1] for line in
               (str(err) + "\n" + noise.read_text()).splitlines() if "error: " in line]
    raise ExportError("the TFLite converter does not take this model: "
                      f"{reasons[0] if reasons else type(err).__name__}") from None
  outputs.write_bytes(path, flatbuffer)


def run_tflite(path: str, images: np.ndarray) -> np.ndarray:
  """Logits of a TFLite artifact on `images` (its batch), through TensorFlow's interpreter."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  with warnings.catch_warnings():  # its deprecation notice, five lines on the console
    warnings.simplefilter("ignore", UserWarning)
    interpreter = tf.lite.Interpreter(model_path=path)
  interpreter.allocate_tensors()
  interpreter.set_tensor(interpreter.get_input_details()[0]["index"], images)
  interpreter.invoke()
  return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


@contextlib.contextmanager
def _stderr_to_file():
  """Send file descriptor 2 (C++ logging) to a temporary file; yields its path."""
  with tempfile.TemporaryDirectory() as folder:
    log = pathlib.Path(folder) / "stderr"
    saved = os.dup(2)
    with open(log, "wb") as f:
      os.dup2(f.fileno(), 2)
      try:
        yield log
      finally:
        os.dup2(saved, 2)
        os.close(saved)


def check_output(path: str, overwrite: bool) -> None:
  if os.path.exists(path) and not overwrite:
    raise ExportError(f"{path} exists; pass --overwrite or choose another --output")
  parent = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as err:
    raise ExportError(f"cannot create {parent}: {err.strerror}") from None
  if not os.access(parent, os.W_OK):
    raise ExportError(f"cannot write in {parent}")


def compare(want: np.ndarray, got: np.ndarray) -> float:
  """Relative L2 difference of two logit arrays."""
  want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def contract_path(output: str) -> str:
  """Where the preprocessing description of an artifact goes: OUTPUT.json beside it."""
  return output.rstrip("/") + ".json"


def preprocessing_contract(loaded, artifact_format: str, size, batch, verified,
                           unverified) -> dict:
  """What a server must do to an image before the artifact sees it, and what it gets."""
  data = loaded.data
  return {
      "model": loaded.name, "checkpoint": loaded.path, "format": artifact_format,
      "input": {"name": "images", "dtype": "float32", "layout": "NHWC",
                "shape": [batch, size[0], size[1], 3],
                "normalised": True,
                "how": "RGB pixels / 255, minus mean, divided by std, per channel"},
      "preprocessing": {"resize_shorter_side_to": math.floor(min(size) / data.crop_pct),
                        "interpolation": data.interpolation, "center_crop": list(size),
                        "crop_pct": data.crop_pct, "input_size": data.input_size,
                        "mean": list(data.mean), "std": list(data.std)},
      "output": {"name": "logits", "shape": [batch, loaded.num_classes],
                 "softmax": "not applied"},
      "class_names": list(loaded.class_names),
      "platforms_verified": list(verified), "platforms_unverified": list(unverified),
  }
