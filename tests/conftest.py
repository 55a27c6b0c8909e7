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


# SPANetV2: widths divisible by 4 (ExSPAM groups) and, for attention, by 32; stage 0
# groups of 2 channels; two heads in the last stage.
TINY_V2_ARCH = dict(layers=(1, 1, 2, 1), dims=(8, 16, 32, 64))
TINY_V2 = {"pure": "spanetv2_tiny_pure_test", "hybrid": "spanetv2_tiny_hybrid_test"}
for _kind, _mixers in (("pure", ("exspam",) * 4),
                       ("hybrid", ("exspam", "exspam", "mixattention", "attention"))):
  registry.register(registry.ModelInfo(name=TINY_V2[_kind], family="spanetv2", crop_pct=1.0,
                                       architecture=dict(TINY_V2_ARCH, token_mixers=_mixers)))


def tiny_v2_reference(kind: str = "hybrid", seed: int = 0):
  """A randomised PyTorch SPANetV2 reference of a tiny architecture (eval mode)."""
  from spanet_jax import torch_reference, torch_reference_v2
  arch = registry.model_info(TINY_V2[kind]).architecture
  return torch_reference.randomize_(torch_reference_v2.SPANetV2(**arch), seed).eval()


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
