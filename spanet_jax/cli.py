"""What the command-line tools share: user-error handling and atomic file writes."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from typing import Callable


class UsageError(Exception):
  """A bad argument; the message says which and why."""


def user_errors() -> tuple[type[Exception], ...]:
  """Exceptions that mean the user's input is wrong (one message, exit 2, no traceback)."""
  from spanet_jax import checkpoint, labels, preprocess  # pylint: disable=g-import-not-at-top

  errors = [UsageError, checkpoint.CheckpointError, preprocess.ImageError, labels.LabelsError]
  if "spanet_jax.data" in sys.modules:  # only tools that read datasets import TensorFlow
    errors.append(sys.modules["spanet_jax.data"].DataError)
  if "spanet_jax.export" in sys.modules:
    errors.append(sys.modules["spanet_jax.export"].ExportError)
  return tuple(errors)


def run(main: Callable[[], int]) -> int:
  """Call `main`; a user error becomes `error: ...` on stderr and exit status 2."""
  ignore_failed_read_reports()
  try:
    return main()
  except Exception as err:  # pylint: disable=broad-except
    if isinstance(err, user_errors()):
      print(f"error: {err}", file=sys.stderr)
      return 2
    raise


def ignore_failed_read_reports() -> None:
  """Drop the reports Orbax and TensorStore leave behind a failed checkpoint read (one
  per array still in flight: "Event loop is closed" from their threads, the same read
  error again from abandoned coroutines). The failure itself is reported, as one line,
  by whoever caught it; every other report passes through."""
  previous_except, previous_thread = sys.excepthook, threading.excepthook
  previous_unraisable = sys.unraisablehook

  def aftermath(value) -> bool:
    return ((isinstance(value, RuntimeError) and str(value) == "Event loop is closed")
            or "Encountered error while reading array index" in str(value))

  def except_hook(kind, value, traceback):
    if not (aftermath(value) and threading.current_thread() is not threading.main_thread()):
      previous_except(kind, value, traceback)

  def thread_hook(report):
    if not aftermath(report.exc_value):
      previous_thread(report)

  def unraisable_hook(report):
    if not aftermath(report.exc_value):
      previous_unraisable(report)

  sys.excepthook, threading.excepthook = except_hook, thread_hook
  sys.unraisablehook = unraisable_hook

  def console_filter(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not (aftermath(record.getMessage()) or (error is not None and aftermath(error)))

  for handler in logging.getLogger().handlers:  # log files keep the whole story
    if not isinstance(handler, logging.FileHandler):
      handler.addFilter(console_filter)


def write_atomically(path: str, text: str) -> None:
  """Write `text` to `path` through a temporary sibling, so readers never see half a file."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for secrets, not results
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def check_writable(path: str) -> None:
  """Fail before any work if `path` cannot be written (a directory, or an unwritable place)."""
  path = os.path.abspath(path)
  if os.path.isdir(path):
    raise UsageError(f"{path} is a directory; give a file name")
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
    raise UsageError(f"cannot write {path}: {parent} is not a writable directory")
