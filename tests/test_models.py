"""The Flax models: registry, shapes, parameters, training behaviour, precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import spanet_jax
from spanet_jax import layers, registry, torch_reference
from conftest import TINY, TINY_ARCH, TINY_V2


def init_tiny(size=64, **overrides):
  model = spanet_jax.create_model(TINY, **overrides)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  return model, variables


def apply(model, *args, **kwargs):
  """model.apply under jit (eager dispatch of a whole network is slow on CPU)."""
  return jax.jit(model.apply, static_argnames=("train", "method"))(*args, **kwargs)


def param_count(name, **overrides):
  model = spanet_jax.create_model(name, **overrides)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["params"]))


def test_list_models():
  assert {"spanet_s", "spanet_m", "spanet_mx", "spanet_b", "spanet_bx"} <= set(
      spanet_jax.list_models())


def test_spanet_s_trainable_parameters():
  assert param_count("spanet_s") == 28_605_096


@pytest.mark.parametrize("name", ["spanet_s", "spanet_m", "spanet_mx", "spanet_b", "spanet_bx"])
def test_parameters_match_reference_and_paper(name):
  info = spanet_jax.model_info(name)
  with torch.device("meta"):
    reference = torch_reference.SPANet(**info.architecture)
  trainable = sum(p.numel() for p in reference.parameters() if p.requires_grad)
  count = param_count(name)
  assert count == trainable
  assert abs(count / 1e6 - info.paper_params_m) < 0.15  # the paper rounds to 0.1M


def test_metadata():
  s, b = spanet_jax.model_info("spanet_s"), spanet_jax.model_info("spanet_b")
  assert (s.crop_pct, b.crop_pct, s.input_size, s.interpolation) == (0.9, 0.95, 224, "bicubic")
  assert s.mean == (0.485, 0.456, 0.406) and s.std == (0.229, 0.224, 0.225)
  assert (s.paper_top1, spanet_jax.model_info("spanet_bx").paper_top1) == (83.1, 84.4)


def test_unknown_model_and_option_are_named():
  with pytest.raises(ValueError, match="unknown model 'spanet_xl'.*spanet_s"):
    spanet_jax.create_model("spanet_xl")
  with pytest.raises(ValueError, match="no option.*num_clases"):
    spanet_jax.create_model("spanet_s", num_clases=10)


def test_shapes_of_logits_and_stage_features(tiny_variables):
  model, variables = spanet_jax.create_model(TINY), tiny_variables
  x = jnp.ones((2, 96, 64, 3))
  assert apply(model, variables, x).shape == (2, 1000)
  features = apply(model, variables, x, method="stage_features")
  assert [f.shape for f in features] == [(2, 24, 16, 8), (2, 12, 8, 16), (2, 6, 4, 20),
                                         (2, 3, 2, 32)]


def test_features_only_backbone_has_stage_norms_and_no_head():
  model, variables = init_tiny(features_only=True)
  assert set(variables["params"]) == {"backbone", "out_norms_0", "out_norms_1", "out_norms_2",
                                      "out_norms_3"}
  features = apply(model, variables, jnp.ones((1, 64, 64, 3)))
  assert len(features) == 4 and features[3].shape == (1, 2, 2, 32)


def test_num_classes_zero_gives_pooled_features():
  model, variables = init_tiny(num_classes=0)
  assert "head" not in variables["params"]
  assert apply(model, variables, jnp.ones((1, 64, 64, 3))).shape == (1, 32)


def test_jit_and_grad_reach_every_parameter(tiny_variables):
  model, variables = spanet_jax.create_model(TINY, drop_path_rate=0.1, drop_rate=0.1), tiny_variables
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
  labels = jnp.array([3, 7])

  @jax.jit
  def loss_fn(params):
    logits = model.apply({"params": params}, x, train=True,
                         rngs={"dropout": jax.random.PRNGKey(2)})
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])

  loss, grads = jax.value_and_grad(loss_fn)(variables["params"])
  assert np.isfinite(float(loss))
  norms = {jax.tree_util.keystr(path): float(jnp.linalg.norm(g))
           for path, g in jax.tree_util.tree_leaves_with_path(grads)}
  assert all(np.isfinite(v) for v in norms.values())
  assert [k for k, v in norms.items() if v == 0.0] == []


def test_train_mode_is_stochastic_and_eval_deterministic(tiny_variables):
  model, variables = spanet_jax.create_model(TINY, drop_path_rate=0.5), tiny_variables
  x = jnp.ones((4, 64, 64, 3))
  a = apply(model, variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
  b = apply(model, variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(apply(model, variables, x), apply(model, variables, x))
  with pytest.raises(Exception, match="dropout"):
    model.apply(variables, x, train=True)  # no rng given for stochastic depth


def test_drop_path_rates_grow_linearly_over_all_blocks():
  # 5 blocks in all: rates 0, 0.1, 0.2, 0.3, 0.4 in order of depth.
  backbone = spanet_jax.spanet.SPANetBackbone(
      TINY_ARCH["layers"], TINY_ARCH["dims"], (2, 2, 1, 1), (16, 8, 4, 2),
      (False, False, True, True), drop_path_rate=0.4)
  rates = []
  original = spanet_jax.spanet.SPANetBlock.__call__

  def spy(self, x, train=False):
    rates.append(self.drop_path_rate)
    return original(self, x, train)

  spanet_jax.spanet.SPANetBlock.__call__ = spy
  try:
    jax.eval_shape(backbone.init, jax.random.PRNGKey(0), jnp.ones((1, 64, 64, 3)))
  finally:
    spanet_jax.spanet.SPANetBlock.__call__ = original
  np.testing.assert_allclose(rates, [0.0, 0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize("size", [64, 72])
def test_depthwise_implementations_agree(size, tiny_variables):
  model, variables = spanet_jax.create_model(TINY, depthwise_impl="conv"), tiny_variables
  x = jax.random.normal(jax.random.PRNGKey(3), (2, size, size, 3))
  shifted = spanet_jax.create_model(TINY, depthwise_impl="shift")
  np.testing.assert_allclose(apply(shifted, variables, x), apply(model, variables, x),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_size", [(1, 7), (7, 1), (3, 3), (5, 1), (1, 1)])
def test_shifted_depthwise_sum_is_the_grouped_convolution(kernel_size, rng):
  x = rng.standard_normal((2, 9, 11, 6)).astype(np.float32)
  kernel = rng.standard_normal(kernel_size + (6,)).astype(np.float32)
  bias = rng.standard_normal(6).astype(np.float32)
  kh, kw = kernel_size
  want = jax.lax.conv_general_dilated(
      x, kernel[:, :, None, :], (1, 1), ((kh // 2, kh // 2), (kw // 2, kw // 2)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=6,
      precision=jax.lax.Precision.HIGHEST) + bias
  got = layers.shifted_depthwise_sum(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias))
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("kernel_size,batch,use_bias", [
    ((1, 7), 2, True), ((7, 1), 3, True), ((3, 3), 12, True), ((5, 1), 1, False),
    ((1, 1), 2, True)])
def test_shifted_depthwise_sum_gradient_is_the_grouped_convolutions(kernel_size, batch,
                                                                    use_bias, rng):
  """The hand-written gradient (x, kernel, bias) equals autodiff of lax's grouped
  convolution; batches of 1, 3 and 12 take the batch fold's other group counts, and a
  scalar zero bias stands for no bias."""
  kh, kw = kernel_size
  x = jnp.asarray(rng.standard_normal((batch, 9, 11, 6)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal(kernel_size + (6,)), jnp.float32)
  bias = (jnp.asarray(rng.standard_normal(6), jnp.float32) if use_bias
          else jnp.zeros((), jnp.float32))
  weights = jnp.asarray(rng.standard_normal((batch, 9, 11, 6)), jnp.float32)

  def grouped(x, kernel, bias):
    y = jax.lax.conv_general_dilated(
        x, kernel[:, :, None, :], (1, 1), ((kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=6,
        precision=jax.lax.Precision.HIGHEST) + bias
    return jnp.sum(y * weights)

  shifted = lambda x, kernel, bias: jnp.sum(
      layers.shifted_depthwise_sum(x, kernel, bias) * weights)
  want = jax.grad(grouped, argnums=(0, 1, 2))(x, kernel, bias)
  got = jax.jit(jax.grad(shifted, argnums=(0, 1, 2)))(x, kernel, bias)
  for name, g, w in zip(("x", "kernel", "bias"), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    # Sums of up to batch * 99 float32 products: rounding relative to the largest entry.
    np.testing.assert_allclose(g, w, rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(w))),
                               err_msg=name)


def test_bfloat16_forward_close_to_float32(tiny_variables):
  model, variables = spanet_jax.create_model(TINY), tiny_variables
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 64, 64, 3))
  full = np.asarray(apply(model, variables, x))
  half_model = spanet_jax.create_model(TINY, dtype=jnp.bfloat16)
  half = apply(half_model, variables, x)
  assert half.dtype == jnp.bfloat16
  half = np.asarray(half, np.float32)
  assert np.linalg.norm(half - full) / np.linalg.norm(full) < 2e-2
  # The spectral filter stays in float32: the low-rank projections (B, 13, C) of the
  # default path, the complex64 spectra of the FFT path.
  assert "f32[2,13,8]" in str(jax.make_jaxpr(half_model.apply)(variables, x))
  fft_model = spanet_jax.create_model(TINY, dtype=jnp.bfloat16, spectral_impl="fft")
  assert "complex64" in str(jax.make_jaxpr(fft_model.apply)(variables, x))


def test_learnable_masks_start_at_the_formula_and_train(tiny_variables):
  fixed, variables = spanet_jax.create_model(TINY), tiny_variables
  learnable, learned_vars = init_tiny(learnable_masks=True)
  masks = learned_vars["params"]["backbone"]["stage0_block0"]["token_mixer"]["spectral_masks"]
  assert masks.shape == (3, 56, 56)  # the formula at the 224 training feature size
  # Same weights otherwise: at the training resolution both models agree.
  merged = {"params": _with_masks(variables["params"], learned_vars["params"])}
  x = jax.random.normal(jax.random.PRNGKey(5), (1, 224, 224, 3))
  np.testing.assert_allclose(apply(learnable, merged, x), apply(fixed, variables, x),
                             rtol=1e-5, atol=1e-5)
  # Another resolution resizes the masks; gradients reach them.
  small = jax.random.normal(jax.random.PRNGKey(6), (1, 96, 96, 3))
  grads = jax.jit(jax.grad(lambda p: jnp.sum(learnable.apply({"params": p}, small) ** 2)))(
      merged["params"])
  g = grads["backbone"]["stage2_block1"]["token_mixer"]["spectral_masks"]
  assert g.shape == (3, 14, 14) and float(jnp.abs(g).max()) > 0


def _with_masks(fixed_params, learnable_params):
  """The fixed model's weights plus the learnable model's (formula) masks."""
  def merge(fixed, learnable):
    if not isinstance(fixed, dict):
      return fixed
    out = {k: merge(fixed[k], learnable[k]) for k in fixed}
    if "spectral_masks" in learnable:
      out["spectral_masks"] = learnable["spectral_masks"]
    return out
  return merge(dict(fixed_params), dict(learnable_params))


def test_pretrained_directory_round_trip(tmp_path):
  model, variables = init_tiny(num_classes=10)
  spanet_jax.save_pretrained(str(tmp_path / "ckpt"), TINY, variables["params"],
                             {"num_classes": 10})
  loaded, loaded_vars = spanet_jax.load_pretrained(str(tmp_path / "ckpt"))
  assert loaded.num_classes == 10
  x = jnp.ones((1, 64, 64, 3))
  np.testing.assert_array_equal(apply(loaded, loaded_vars, x), apply(model, variables, x))
  with pytest.raises(spanet_jax.checkpoint.CheckpointError, match="already exists"):
    spanet_jax.save_pretrained(str(tmp_path / "ckpt"), TINY, variables["params"])
  with pytest.raises(spanet_jax.checkpoint.CheckpointError, match="no such checkpoint"):
    spanet_jax.load_pretrained(str(tmp_path / "missing"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging left behind


@pytest.mark.parametrize("overrides", [
    dict(spectral_impl="fft"), dict(spectral_impl="dft"), dict(conv_impl="conv"),
    dict(conv_impl="im2col", spectral_impl="lowrank", depthwise_impl="shift")])
def test_every_implementation_computes_the_default_model(overrides, tiny_variables):
  x = jax.random.normal(jax.random.PRNGKey(7), (2, 64, 96, 3))
  default = apply(spanet_jax.create_model(TINY), tiny_variables, x)
  other = apply(spanet_jax.create_model(TINY, **overrides), tiny_variables, x)
  np.testing.assert_allclose(other, default, rtol=1e-5, atol=1e-5)


def test_default_paths_on_cpu():
  from spanet_jax import spanet
  assert spanet.SPAM(radius=2, mask_size=(56, 56))._spectral_impl() == "lowrank"
  assert spanet.SPAM(radius=2, mask_size=(56, 56), learnable_masks=True)._spectral_impl() == "fft"


def test_lowrank_needs_fixed_masks_and_impls_are_checked():
  x = jnp.ones((1, 64, 64, 3))
  with pytest.raises(ValueError, match="'lowrank' needs the fixed masks"):
    jax.eval_shape(spanet_jax.create_model(TINY, learnable_masks=True, spectral_impl="lowrank").init,
                   jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="unknown spectral_impl 'fast'"):
    jax.eval_shape(spanet_jax.create_model(TINY, spectral_impl="fast").init,
                   jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("name", [TINY, TINY_V2["hybrid"]])
def test_remat_gives_the_same_gradients(name):
  """remat=True recomputes blocks in the backward pass: same parameters, same gradients
  (to float32 rounding of the recomputation), drop path included."""
  model = spanet_jax.create_model(name, drop_path_rate=0.2)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]
  rematted = model.clone(remat=True)
  assert jax.tree.structure(jax.eval_shape(rematted.init, jax.random.PRNGKey(0), x)["params"]) \
      == jax.tree.structure(params)

  def grads(module):
    loss = lambda p: jnp.mean(module.apply({"params": p}, x, train=True,
                                           rngs={"dropout": jax.random.PRNGKey(3)}) ** 2)
    return jax.jit(jax.grad(loss))(params)

  for plain, again in zip(jax.tree.leaves(grads(model)), jax.tree.leaves(grads(rematted))):
    scale = float(jnp.max(jnp.abs(plain))) + 1e-12
    assert float(jnp.max(jnp.abs(plain - again))) <= 2e-5 * scale
