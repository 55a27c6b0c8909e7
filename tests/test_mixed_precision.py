"""--config.dtype=bfloat16: what runs in bfloat16 and what stays float32 in the traced
training step, for both families and in the CPU and accelerator formulations."""

import functools

import jax
import jax.extend as jex
import jax.numpy as jnp
import pytest

from configs import default
from spanet_jax.models import registry, spectral
from spanet_jax.ops import norms, platform
from spanet_jax.train import schedules, steps
from spanet_jax.train import settings

PRODUCTS = ("conv_general_dilated", "dot_general")


def traced_operations(jaxpr, scope=""):
  """(primitive, input dtypes, output dtypes, name stack) of every operation, nested
  programs (custom gradients, jit) included, with their callers' name stacks."""
  for eqn in jaxpr.eqns:
    stack = f"{scope}/{eqn.source_info.name_stack}"
    for param in eqn.params.values():
      if isinstance(param, (jex.core.Jaxpr, jex.core.ClosedJaxpr)):
        yield from traced_operations(getattr(param, "jaxpr", param), stack)
    yield (eqn.primitive.name, {str(v.aval.dtype) for v in eqn.invars if hasattr(v, "aval")},
           {str(v.aval.dtype) for v in eqn.outvars}, stack)


@pytest.mark.parametrize("backend", ["cpu", "tpu"])
@pytest.mark.parametrize("name,dims", [("spanet_s", (8, 16, 24, 32)),
                                       ("spanetv2_s18_hybrid", (8, 16, 32, 64))])
def test_bfloat16_training_step_dtypes(name, dims, backend):
  config = default.get_config()
  config.model, config.dtype = name, "bfloat16"
  with platform.target(backend):
    model = registry.build_model(name, dtype=jnp.bfloat16, layers=(1, 1, 1, 1), dims=dims)
    typed = settings.of(config)
    optimizer = steps.make_optimizer(typed.optimiser,
                                     schedules.learning_rate_schedule(typed.schedule, 10))
    images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.uint8)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)["params"]
    state = jax.eval_shape(
        lambda p: steps.init_state(model, optimizer, p, typed.step, jax.random.PRNGKey(0)),
        params)
    batch = {"image": images, "label": jax.ShapeDtypeStruct((2,), jnp.int32)}
    step = functools.partial(steps.train_step, model=model, optimizer=optimizer,
                             options=typed.step, mean=(0.5,) * 3, std=(0.5,) * 3)
    closed = jax.make_jaxpr(step)(state, batch)
  operations = list(traced_operations(closed.jaxpr))

  # Parameters, optimiser moments, the loss and the gradient norm: float32.
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf
  _, metrics = jax.eval_shape(step, state, batch)
  assert metrics["loss"].dtype == jnp.float32

  in_filter = lambda stack: spectral.FILTER_SCOPE in stack
  in_statistics = lambda stack: norms.STATISTICS_SCOPE in stack
  model_products = [(ins, stack) for prim, ins, _, stack in operations
                    if prim in PRODUCTS and not in_filter(stack) and not in_statistics(stack)]
  assert len(model_products) > 20
  # Every convolution and matrix product of the model, forward and backward: bfloat16.
  assert all(ins == {"bfloat16"} for ins, _ in model_products), [
      (ins, stack[-60:]) for ins, stack in model_products if ins != {"bfloat16"}]
  # The spectral filter (FFTs, DFT or low-rank products, masks) and the statistics of
  # every norm: float32 (complex64 for spectra).
  kept = [(prim, ins) for prim, ins, _, stack in operations
          if (in_filter(stack) and prim in PRODUCTS + ("fft",))
          or (in_statistics(stack) and prim in PRODUCTS + ("reduce_sum", "rsqrt"))]
  assert kept and all(ins <= {"float32", "complex64"} for _, ins in kept), kept
  if backend == "tpu":
    assert any(in_filter(stack) and prim == "dot_general" for prim, _, _, stack in operations)
  # Softmax (attention's, and the loss's log-softmax) in float32.
  softmax = [ins for prim, ins, _, _ in operations if prim in ("exp", "log", "reduce_max")
             and ins != {"bfloat16"}]
  assert softmax
  assert all(ins <= {"float32"} for prim, ins, _, _ in operations
             if prim in ("reduce_max", "log")), "a softmax ran in bfloat16"
