"""Shared fixtures: tiny SPANet and SPANetV2 models, registered for the test session
only, and their PyTorch reference twins."""

import dataclasses
import fcntl
import getpass
import os
import shutil
import tempfile

# Tests compile many small programs on 2 CPU cores and run each a few times: compile
# time is most of the run. LLVM's expensive passes, and XLA:CPU's MLIR fusion emitters
# (its older elemental emitters compile about a third faster), cost more than they
# could ever save here. These flags change only how the machine code is produced and
# run; every comparison in the tests is against PyTorch or another of our own programs.
# Two test workers share the 2 cores, so each runs XLA's and PyTorch's operations on
# one thread: a thread pool per process would only contend with the other worker.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                      "--xla_cpu_use_fusion_emitters=false "
                      "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Many tests, and the train.py and tool processes they start, compile the same programs
# (the same model at the same shapes through another jit): one compilation cache for the
# whole run, inherited by every process it starts, compiles each program once. Cached
# executables are the ones XLA would build again (the cache key is the program and
# every compile option).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"spanet_jax_tests_{getpass.getuser()}", "compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import numpy as np
import pytest

from spanet_jax.models import registry

# Uneven channel chunks everywhere (8 -> 3,3,2; 16 -> 6,6,4; 20 -> 7,7,6; 32 -> 11,11,10),
# res scale in stages 2 and 3, two blocks in one stage: every layout rule is exercised.
TINY_ARCH = dict(layers=(1, 1, 2, 1), dims=(8, 16, 20, 32))
TINY = "spanet_tiny_test"
TINY_INFOS = [registry.ModelInfo(name=TINY, family="spanet", architecture=TINY_ARCH)]


# SPANetV2: widths divisible by 4 (ExSPAM groups) and, for attention, by 32; stage 0
# groups of 2 channels; two heads in the last stage.
TINY_V2_ARCH = dict(layers=(1, 1, 2, 1), dims=(8, 16, 32, 64))
TINY_V2 = {"pure": "spanetv2_tiny_pure_test", "hybrid": "spanetv2_tiny_hybrid_test"}
TINY_INFOS += [registry.ModelInfo(name=TINY_V2[kind], family="spanetv2", crop_pct=1.0,
                                  architecture=dict(TINY_V2_ARCH, token_mixers=mixers))
               for kind, mixers in (("pure", ("exspam",) * 4),
                                    ("hybrid", ("exspam", "exspam", "mixattention",
                                                "attention")))]


@pytest.fixture(scope="session", autouse=True)
def tiny_models():
  """The tiny models in the registry while the tests run (and only then)."""
  with registry.registered(*TINY_INFOS):
    yield


def one_block_per_stage(name: str) -> registry.ModelInfo:
  """A registered variant's widths, mixers and metadata with one block per stage: what a
  variant's width changes (channel chunks, heads, groups) at a small fraction of the
  compile time of its full depth (the blocks of a stage are alike)."""
  info = registry.model_info(name)
  return dataclasses.replace(info, name=f"{name}_one_block_per_stage",
                             architecture=dict(info.architecture, layers=(1, 1, 1, 1)))


def assert_full_size_conversion(name: str, reference) -> None:
  """The full-size official-layout state_dict of `name` converts to exactly the
  parameter tree (paths and shapes) of the Flax model (abstract: nothing compiled)."""
  import jax
  import jax.numpy as jnp
  import spanet_jax
  from spanet_jax import convert
  got_name, overrides, params = convert.torch_to_flax(state_dict_numpy(reference))
  assert got_name == name
  model = spanet_jax.create_model(name, **overrides)
  want = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                        jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))["params"]
  assert jax.tree.structure(params) == jax.tree.structure(want)
  assert [p.shape for p in jax.tree.leaves(params)] == [w.shape for w in jax.tree.leaves(want)]


def tiny_v2_reference(kind: str = "hybrid", seed: int = 0):
  """A randomised PyTorch SPANetV2 reference of a tiny architecture (eval mode)."""
  from spanet_jax.reference import spanet_torch, spanetv2_torch
  arch = registry.model_info(TINY_V2[kind]).architecture
  return spanet_torch.randomize_(spanetv2_torch.SPANetV2(**arch), seed).eval()


def tiny_reference(seed: int = 0, **kwargs):
  """A randomised PyTorch reference of the tiny architecture (eval mode)."""
  from spanet_jax.reference import spanet_torch
  return spanet_torch.randomize_(spanet_torch.SPANet(**TINY_ARCH, **kwargs), seed).eval()


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


def _reference_gradients(reference, x_nhwc, labels, dtype):
  """Every parameter's gradient of the reference's cross-entropy loss, computed in
  `dtype`, converted like the weights (gradients have the weights' shapes and layouts;
  buffers, such as fixed masks, keep their values)."""
  import copy
  import torch
  from spanet_jax import convert
  reference = copy.deepcopy(reference).to(dtype)
  x = torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()).to(dtype)
  loss = torch.nn.functional.cross_entropy(reference(x), torch.from_numpy(labels))
  loss.backward()
  grads = {k: (v.grad if v.grad is not None else v).detach().numpy().copy()
           for k, v in reference.state_dict(keep_vars=True).items()}
  return convert.torch_to_flax(grads)[2]


def assert_gradients_match_autograd(reference, model, variables, rng):
  """Every parameter's gradient of a cross-entropy loss, against PyTorch autograd with
  the float64 gradient as the exact value: within relative L2 2e-5 (the logits
  tolerance) or, for sums whose terms cancel (scalars that sum over every activation,
  where PyTorch's own float32 gradient can be off by ~5e-5), within 10x PyTorch's own
  float32 error, as the two sum in different orders. A wrong formula is off by order 1."""
  import jax
  import jax.numpy as jnp
  import torch
  x = rng.standard_normal((3, 64, 64, 3)).astype(np.float32)
  labels = np.array([1, 5, 9])
  exact = _reference_gradients(reference, x, labels, torch.float64)
  torch_float32 = _reference_gradients(reference, x, labels, torch.float32)

  def loss_fn(params):
    logits = model.apply({"params": params}, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  got = jax.jit(jax.grad(loss_fn))(variables["params"])
  assert jax.tree.structure(got) == jax.tree.structure(exact)
  relative = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - b)
                                / (np.linalg.norm(b) + 1e-30))
  for (path, g), w, t in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(exact),
                             jax.tree.leaves(torch_float32)):
    error = relative(g, w)
    assert error < max(2e-5, 10 * relative(t, w)), (jax.tree_util.keystr(path), error,
                                                   relative(t, w))


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


def shared_across_workers(tmp_path_factory, name: str, make) -> str:
  """A directory that `make(path)` fills once for the whole test run: the first pytest-xdist
  worker to ask makes it while the others wait, then every worker gets the same path
  (for results that cost a training run or a dataset build)."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # the run's directory, above each worker's own
  path = base / f"shared_{name}"
  with open(base / f"shared_{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not (base / f"shared_{name}.done").exists():
        if path.exists():  # a worker failed half-way: start again
          shutil.rmtree(path)
        path.mkdir()
        make(path)
        (base / f"shared_{name}.done").touch()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return str(path)
