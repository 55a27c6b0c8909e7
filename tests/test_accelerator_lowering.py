"""Every backend branch traces and lowers for the accelerators we claim: the training
and evaluation steps exported with jax.export for TPU and CUDA (no hardware needed).
Both take the same formulations (ops/platform.py chooses per CPU or accelerator), so
one trace is lowered for both."""

import functools

import jax
import jax.numpy as jnp
import pytest

from configs import default
from spanet_jax.models import registry
from spanet_jax.ops import platform
from spanet_jax.train import schedules, steps
from spanet_jax.train import settings


PLATFORMS = ("cuda", "tpu")


@pytest.mark.parametrize("name,options", [
    ("spanet_s", {"dims": (8, 16, 24, 32)}),  # fixed masks: the low-rank filter
    ("spanet_s", {"dims": (8, 16, 24, 32), "learnable_masks": True}),  # the DFT filter
    ("spanetv2_s18_hybrid", {"dims": (8, 16, 32, 64)}),  # ExSPAM, (Mix)Attention
])
def test_train_and_eval_steps_export_for_accelerators(name, options):
  config = default.get_config()
  config.model = name
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.uint8)
  labels = jax.ShapeDtypeStruct((2,), jnp.int32)
  assert platform.backend_for_platforms(PLATFORMS) == "tpu"
  with platform.target("tpu"):
    model = registry.build_model(name, layers=(1, 1, 1, 1), dtype=jnp.bfloat16, **options)
    typed = settings.of(config)
    optimizer = steps.make_optimizer(typed.optimiser,
                                     schedules.learning_rate_schedule(typed.schedule, 10))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)["params"]
    state = jax.eval_shape(
        lambda p: steps.init_state(model, optimizer, p, typed.step, jax.random.PRNGKey(0)),
        params)
    train = jax.jit(functools.partial(steps.train_step, model=model, optimizer=optimizer,
                                      options=typed.step, mean=(0.5,) * 3, std=(0.5,) * 3))
    evaluate = jax.jit(functools.partial(steps.eval_step, model=model))
    exported_train = jax.export.export(train, platforms=PLATFORMS)(
        state, {"image": images, "label": labels})
    exported_eval = jax.export.export(evaluate, platforms=PLATFORMS)(
        params, {"image": jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32), "label": labels,
                 "mask": jax.ShapeDtypeStruct((2,), jnp.float32)})
  for exported in (exported_train, exported_eval):
    assert exported.platforms == PLATFORMS
    assert "stablehlo" in exported.mlir_module()
  text = exported_train.mlir_module()
  assert "bf16" in text and ("fft" in text or "dot_general" in text)
