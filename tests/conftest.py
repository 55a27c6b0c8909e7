"""Shared fixtures: a tiny registered SPANet and its PyTorch reference twin."""

import os

# Tests compile many small programs on 2 CPU cores: LLVM's expensive passes cost more
# time than they could ever save here (numerics are unaffected).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import numpy as np
import pytest

from spanet_jax import registry

# Uneven channel chunks everywhere (8 -> 3,3,2; 16 -> 6,6,4; 20 -> 7,7,6; 32 -> 11,11,10),
# res scale in stages 2 and 3, two blocks in one stage: every layout rule is exercised.
TINY_ARCH = dict(layers=(1, 1, 2, 1), dims=(8, 16, 20, 32))
TINY = "spanet_tiny_test"
registry.register(registry.ModelInfo(name=TINY, family="spanet", architecture=TINY_ARCH))


def tiny_reference(seed: int = 0, **kwargs):
  """A randomised PyTorch reference of the tiny architecture (eval mode)."""
  from spanet_jax import torch_reference
  return torch_reference.randomize_(torch_reference.SPANet(**TINY_ARCH, **kwargs), seed).eval()


def run_main(main, *args):
  """A tool's main(argv) in-process; returns (exit code, stdout, stderr)."""
  import contextlib
  import io
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = main([str(a) for a in args])
  return code, out.getvalue(), err.getvalue()


def state_dict_numpy(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


@pytest.fixture(scope="session")
def tiny_variables():
  """Initialised variables of the tiny classifier (init compiles slowly: share them)."""
  import jax
  import jax.numpy as jnp
  import spanet_jax
  model = spanet_jax.create_model(TINY)
  return jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))


@pytest.fixture
def rng():
  return np.random.default_rng(0)
