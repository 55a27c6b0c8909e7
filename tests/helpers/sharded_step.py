"""Run one train_step of a tiny SPANet on each of several meshes; print the losses, save
the gradients.

Used by tests/test_train.py in a subprocess with 8 virtual CPU devices:
  python sharded_step.py OUT_DIR DEVICES:MODEL_AXIS [DEVICES:MODEL_AXIS ...]
writes OUT_DIR/DEVICES_MODEL_AXIS.npz for each mesh and prints one JSON line
{"DEVICES:MODEL_AXIS": {"loss": ..., "param_specs": [...]}, ...}.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import spanet_jax
from configs import default
from spanet_jax.train import mesh, steps
from spanet_jax.train import settings


def sharded_step(model, params, num_devices: int, model_axis: int, grads_path: str) -> dict:
  config = default.get_config()
  config.num_classes, config.image_size, config.batch_size = 10, 32, 16
  config.drop_path_rate = 0.0
  partitioning = mesh.Partitioning.create(model_axis, jax.devices()[:num_devices])
  optimizer = optax.sgd(1.0)  # so that params - new params = gradients
  state = steps.init_state(model, optimizer, params, settings.of(config).step,
                           jax.random.PRNGKey(1))
  sharding = partitioning.state(jax.eval_shape(lambda: state))
  state = jax.device_put(state, sharding)
  rng = np.random.default_rng(0)
  batch = mesh.global_batch(partitioning, {
      "image": rng.integers(0, 256, (16, 32, 32, 3)).astype(np.uint8),
      "label": rng.integers(0, 10, 16).astype(np.int32)})

  step = jax.jit(lambda s, b: steps.train_step(s, b, model=model, optimizer=optimizer,
                                                  options=settings.of(config).step, mean=(0.5,) * 3,
                                                  std=(0.25,) * 3),
                 in_shardings=(sharding, partitioning.batch), out_shardings=(sharding, None))
  new_state, metrics = step(state, batch)
  specs = sorted({str(leaf.sharding.spec) for leaf in jax.tree.leaves(new_state.params)})
  grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), jax.device_get(state.params),
                       jax.device_get(new_state.params))
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(grads)}
  np.savez(grads_path, **flat)
  return {"loss": float(metrics["loss"]), "param_specs": specs}


def main(out_dir: str, meshes: list[str]) -> None:
  model = spanet_jax.create_model("spanet_s", layers=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                                  num_classes=10)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  results = {}
  for mesh_shape in meshes:
    num_devices, model_axis = (int(n) for n in mesh_shape.split(":"))
    results[mesh_shape] = sharded_step(model, params, num_devices, model_axis,
                                       os.path.join(out_dir, f"{num_devices}_{model_axis}.npz"))
  print(json.dumps(results))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2:])
