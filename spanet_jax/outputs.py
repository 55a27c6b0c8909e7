"""Writing an output so that no reader ever sees half of it and a failed write leaves
the previous output as it was: the new one is written beside it under a temporary
name, then renamed into place. Every tool, the converter and the training loop write
through here."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from typing import Callable


def write_file(path: str, write: Callable[[str], object]) -> None:
  """Call `write(temporary)` for a temporary sibling of `path` (same folder, same
  extension, so writers that choose a format by the name choose the right one), then
  rename it onto `path`. Whatever fails (the exception propagates), the temporary file
  is gone and `path` holds what it held before. The folder is created if need be."""
  path = os.path.abspath(path)
  folder, name = os.path.split(path)
  os.makedirs(folder, exist_ok=True)
  fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.",
                                   suffix=os.path.splitext(name)[1])
  os.close(fd)
  try:
    write(temporary)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 is for secrets, not results
    os.replace(temporary, path)
  except BaseException:
    if os.path.lexists(temporary):
      os.remove(temporary)
    raise


def write_text(path: str, text: str) -> None:
  """write_file for a text."""
  write_file(path, lambda temporary: pathlib.Path(temporary).write_text(text))


def write_bytes(path: str, data: bytes) -> None:
  """write_file for bytes."""
  write_file(path, lambda temporary: pathlib.Path(temporary).write_bytes(data))


def replace(staging: str, path: str) -> None:
  """Move a finished output (a file or a directory) from `staging` to `path`. An old
  output at `path` is set aside as PATH.old first and removed only once the new one is
  in place, so an interruption leaves either output whole (and PATH.old, which the next
  replace clears)."""
  old = path.rstrip("/") + ".old"
  _remove(old)
  if os.path.lexists(path):
    os.replace(path, old)
    os.replace(staging, path)
    _remove(old)
  else:
    os.replace(staging, path)


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)
