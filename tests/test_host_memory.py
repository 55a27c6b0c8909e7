"""host_memory.keep_freed_memory: XLA:CPU's scratch block is reused, not faulted in again."""

import subprocess
import sys

import pytest

from spanet_jax.train import host_memory

# A jitted program whose scratch is one ~84 MiB block (four cumulative sums, each a
# 16 MiB intermediate, are alive together), run 30 times; prints the scratch size in
# pages and the page faults of each of the last 12 runs (the heap has settled by then:
# after 20 runs it sometimes had not).
PROGRAM = """
import resource, sys
from spanet_jax.train import host_memory
if sys.argv[1] == "keep":
  assert host_memory.keep_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((2048, 2048))
f = jax.jit(lambda x: jnp.sum(jnp.cumsum(jnp.sin(x), 0) * jnp.cumsum(jnp.cos(x), 1)[::-1]
                             + jnp.cumsum(x, 1)[:, ::-1] * jnp.cumsum(x, 0).T, 0))
faults = []
for _ in range(30):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(f.lower(x).compile().memory_analysis().temp_size_in_bytes // 4096, *faults[18:])
"""


def scratch_pages_and_faults(mode: str) -> tuple[int, list[int]]:
  result = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True,
                          text=True, check=True)
  pages, *faults = map(int, result.stdout.split())
  # Above glibc's largest mmap threshold (32 MiB): mmapped by default, however the
  # threshold has adapted.
  assert pages > 32 * 2**20 // 4096
  return pages, faults


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_scratch_is_reused_instead_of_faulted_in_every_run():
  # glibc's default: the block is mapped afresh, and faulted in, on every run.
  pages, faults = scratch_pages_and_faults("default")
  assert sum(faults) > len(faults) * pages // 2, faults
  # Kept: once the heap has settled, most runs reuse resident memory. (Now and then the
  # heap's layout makes glibc carve the block anew, so a few runs still fault it in.)
  pages, faults = scratch_pages_and_faults("keep")
  assert sum(faults) < 5 * pages, faults


def test_cpu_only_follows_jax_platforms(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory.cpu_only()
  monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
  assert not host_memory.cpu_only()
  monkeypatch.delenv("JAX_PLATFORMS")
  assert host_memory.cpu_only()  # this machine has no accelerator plugin installed
