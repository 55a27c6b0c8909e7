"""Keep freed host memory mapped, so XLA:CPU does not page-fault its scratch every step.

XLA:CPU allocates all of an execution's intermediate buffers as one block (1.7 GB for
a SPANet-S training step at batch 8). glibc's malloc serves a block that large with a
fresh mmap, from the worker thread's own arena, and unmaps it when it is freed, so
every step faults its whole scratch in again (about 450,000 page faults here; the step
ran 10 to 15% faster without them on a 2-core machine). With a single arena, no mmap for large blocks and no
trimming, the block comes from the heap and, once the heap has settled, most steps
reuse it (now and then glibc carves it anew and it is faulted in again).

This is a process-wide malloc setting: it only takes effect for threads created
afterwards, so call `keep_freed_memory()` before NumPy or JAX start threads (before
importing them, or at least before the first computation or jax.devices()). train.py
does it before importing either.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# Distributions that give JAX an accelerator backend.
_ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "libtpu", "jax-rocm", "jax_rocm")


def cpu_only() -> bool:
  """Whether JAX will run on the CPU: JAX_PLATFORMS says cpu, or no accelerator
  plugin is installed. (Checked without starting a backend.)"""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms == "cpu"
  names = (dist.metadata["Name"] or "" for dist in importlib.metadata.distributions())
  return not any(name.lower().startswith(_ACCELERATOR_PLUGINS) for name in names)


def keep_freed_memory() -> bool:
  """Make glibc's malloc keep freed memory for reuse (one arena, large blocks from
  the heap, no trimming). Returns False, changing nothing, where malloc is not glibc's.

  Memory a step frees stays resident for the next one, so the process's resident size
  stays at its peak rather than falling between steps; the peak itself is unchanged.
  """
  path = ctypes.util.find_library("c")
  if path is None:
    return False
  libc = ctypes.CDLL(path)
  if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
    return False
  # -1 disables trimming altogether (mallopt(3)); 0 mmaps means large blocks come from
  # the heap, which one arena makes the main heap for every thread.
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
