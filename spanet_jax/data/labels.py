"""ImageNet-1k class metadata, read from the files TensorFlow Datasets ships.

TFDS's imagenet2012 builder carries the 1,000 WordNet synset ids in class-index
order (`labels.txt`); its SI-Score dataset carries the matching human-readable names
(`IMAGENET_LABELS_LIST`). Both are read as files, so asking for a class name does
not import TensorFlow.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os

from spanet_jax import errors

NUM_IMAGENET_CLASSES = 1000


class LabelsError(errors.UserError):
  """The label files are missing from the installed TFDS."""


def _tfds_file(*parts: str) -> str:
  spec = importlib.util.find_spec("tensorflow_datasets")
  if spec is None or not spec.submodule_search_locations:
    raise LabelsError("tensorflow-datasets is not installed; it ships the ImageNet class "
                      "names (pip install -r requirements.txt)")
  path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
  if not os.path.isfile(path):
    raise LabelsError(f"the installed tensorflow-datasets has no {os.path.join(*parts)}")
  return path


@functools.cache
def imagenet_synsets() -> tuple[str, ...]:
  """WordNet ids ('n01440764', ...) in ImageNet-1k class-index order."""
  with open(_tfds_file("datasets", "imagenet2012", "labels.txt")) as f:
    synsets = tuple(line.strip() for line in f if line.strip())
  if len(synsets) != NUM_IMAGENET_CLASSES:
    raise LabelsError(f"TFDS's imagenet2012 labels.txt lists {len(synsets)} classes, not 1000")
  return synsets


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
  """Readable names ('tench, Tinca tinca', ...) in ImageNet-1k class-index order."""
  with open(_tfds_file("datasets", "siscore", "labels.py")) as f:
    tree = ast.parse(f.read())
  for node in tree.body:
    if (isinstance(node, ast.Assign) and len(node.targets) == 1
        and getattr(node.targets[0], "id", None) == "IMAGENET_LABELS_LIST"):
      names = tuple(ast.literal_eval(node.value))
      if len(names) == NUM_IMAGENET_CLASSES:
        return names
  raise LabelsError("the installed tensorflow-datasets has no 1000-entry IMAGENET_LABELS_LIST")


def short_name(name: str) -> str:
  """'tench, Tinca tinca' -> 'tench': the first synonym, for compact displays."""
  return name.split(",")[0].strip()
