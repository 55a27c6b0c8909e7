"""One train.py run per workdir: a lock file naming the host and process that hold it.

A second run on the same workdir stops with one line instead of racing the first for
its checkpoints. A lock left by a run that died (its process is gone from this host) is
taken over; one held on another host is reported with how to clear it.
"""

from __future__ import annotations

import json
import os
import socket

LOCK_FILE = ".train.lock"


class Locked(Exception):
  """Another run holds the workdir."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process: alive
    return True
  return True


class RunLock:
  """`with RunLock(workdir):` holds the workdir for this process's run."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.held = False

  def _owner(self) -> dict:
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  def acquire(self) -> str | None:
    """Take the lock; returns a note when a dead run's lock was taken over."""
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    note = None
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        owner = self._owner()
        same_host = owner.get("host") == me["host"]
        pid = owner.get("pid")
        if same_host and isinstance(pid, int) and not _alive(pid):
          note = f"note: took over the lock of an earlier run (pid {pid}) that is gone"
          os.unlink(self.path)
          continue
        holder = (f"pid {pid} on {owner.get('host')}" if owner else "an unknown process")
        raise Locked(f"{os.path.dirname(self.path)} is in use by another train.py run "
                     f"({holder}); wait for it to finish, or use another --workdir. If no run "
                     f"is going, delete {self.path}") from None
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self.held = True
      return note
    raise Locked(f"could not take {self.path}")

  def release(self) -> None:
    if self.held:
      try:
        os.unlink(self.path)
      except FileNotFoundError:
        pass
      self.held = False
