"""What the command-line tools share: user-error handling and atomic file writes."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from typing import Callable

from spanet_jax import errors, outputs
from spanet_jax.models import pretrained


class UsageError(errors.UserError):
  """A bad argument; the message says which and why."""


def ignore_failed_read_reports() -> None:
  """Drop the reports Orbax and TensorStore leave behind a failed checkpoint read or
  write (one per array still in flight: "Event loop is closed" from their threads, the
  same read or disk-full error again from abandoned coroutines). The failure itself is
  reported, as one line, by whoever caught it; every other report passes through.
  Process-wide, so the entry points install it (run below, train.py), once."""
  if getattr(sys.excepthook, "ignores_failed_read_reports", False):
    return
  previous_except, previous_thread = sys.excepthook, threading.excepthook
  previous_unraisable = sys.unraisablehook

  def aftermath(value) -> bool:
    return ((isinstance(value, RuntimeError) and str(value) == "Event loop is closed")
            or "Encountered error while reading array index" in str(value)
            or pretrained.is_write_failure(value))

  def except_hook(kind, value, traceback):
    if not (aftermath(value) and threading.current_thread() is not threading.main_thread()):
      previous_except(kind, value, traceback)

  def thread_hook(report):
    if not aftermath(report.exc_value):
      previous_thread(report)

  def unraisable_hook(report):
    if not aftermath(report.exc_value):
      previous_unraisable(report)

  except_hook.ignores_failed_read_reports = True
  sys.excepthook, threading.excepthook = except_hook, thread_hook
  sys.unraisablehook = unraisable_hook

  def console_filter(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not (aftermath(record.getMessage()) or (error is not None and aftermath(error)))

  for handler in logging.getLogger().handlers:  # log files keep the whole story
    if not isinstance(handler, logging.FileHandler):
      handler.addFilter(console_filter)


def run(main: Callable[[], int]) -> int:
  """Call `main`; a user error (errors.UserError) becomes `error: ...` on stderr and exit
  status 2. Every command-line tool goes through here."""
  ignore_failed_read_reports()
  try:
    return main()
  except errors.UserError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2


def write_atomically(path: str, text: str) -> None:
  """Write `text` to `path` through outputs.write_text; a full disk or a lost permission
  is a one-line error."""
  try:
    outputs.write_text(path, text)
  except OSError as err:
    raise UsageError(pretrained.write_error(os.path.abspath(path), err)) from None


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


def refuse_output_over_input(output: str, flag: str, inputs) -> None:
  """Fail before any work if the output `output` (given as `flag`) is one of `inputs`
  (files or directories) or contains one: writing it would replace or delete the
  user's data."""
  target = os.path.realpath(os.path.expanduser(output))
  for given in inputs:
    if not given or str(given).startswith("init:"):
      continue
    source = os.path.realpath(os.path.expanduser(str(given)))
    if target == source:
      raise UsageError(f"{flag} {output} is also an input ({given}); writing it would "
                       "replace it: give another path")
    if source.startswith(target.rstrip(os.sep) + os.sep):
      raise UsageError(f"{flag} {output} contains the input {given}; writing it would "
                       "delete it: give another path")


def refuse_replacing_non_json(output: str, flag: str) -> None:
  """Fail before any work if `output` exists and is not JSON: `--json photo.jpg more.jpg`
  hands the first image to the flag, which would overwrite it."""
  if not os.path.isfile(output):
    return
  try:
    with open(output, encoding="utf-8") as f:
      json.load(f)
  except (OSError, ValueError):
    raise UsageError(f"{flag} {output} exists and is not a JSON file: it would be "
                     f"overwritten. If it is an image, {flag} took it as its value: put "
                     f"{flag} FILE after the images") from None
