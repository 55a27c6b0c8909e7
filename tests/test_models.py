"""The Flax models: registry, shapes, parameters, training behaviour, precision."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
torch = pytest.importorskip("torch")  # the PyTorch references need it
from flax import linen as nn

import spanet_jax
from spanet_jax.models import layers, metaformer, spanet, spanetv2
from spanet_jax.reference import spanet_torch
from spanet_jax.ops import activations, batching, depthwise, norms, platform
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
    reference = spanet_torch.SPANet(**info.architecture)
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
  model = spanet_jax.create_model(TINY, drop_path_rate=0.4)
  rates = []
  original = metaformer.MetaFormerBlock.__call__

  def spy(self, x, train=False):
    rates.append(self.drop_path_rate)
    return original(self, x, train)

  metaformer.MetaFormerBlock.__call__ = spy
  try:
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 64, 64, 3)))
  finally:
    metaformer.MetaFormerBlock.__call__ = original
  np.testing.assert_allclose(rates, [0.0, 0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize("size", [64, 72])
def test_depthwise_implementations_agree(size, tiny_variables):
  model, variables = spanet_jax.create_model(TINY, depthwise_impl="conv"), tiny_variables
  x = jax.random.normal(jax.random.PRNGKey(3), (2, size, size, 3))
  shifted = spanet_jax.create_model(TINY, depthwise_impl="shift")
  np.testing.assert_allclose(apply(shifted, variables, x), apply(model, variables, x),
                             rtol=1e-5, atol=1e-5)


def lax_depthwise(x, kernel, bias, channels_first=False):
  """lax's grouped convolution with PyTorch's padding: the reference the shifted sums
  are checked against."""
  kh, kw = kernel.shape[:2]
  layout = "NCHW" if channels_first else "NHWC"
  y = jax.lax.conv_general_dilated(
      x, kernel[:, :, None, :], (1, 1), ((kh // 2, kh // 2), (kw // 2, kw // 2)),
      dimension_numbers=(layout, "HWIO", layout), feature_group_count=kernel.shape[-1],
      precision=jax.lax.Precision.HIGHEST)
  return y + (bias[:, None, None] if channels_first and bias.ndim else bias)


@pytest.mark.parametrize("kernel_size", [(1, 7), (7, 1), (3, 3), (5, 1), (1, 1)])
def test_shifted_depthwise_sum_is_the_grouped_convolution(kernel_size, rng):
  x = rng.standard_normal((2, 9, 11, 6)).astype(np.float32)
  kernel = rng.standard_normal(kernel_size + (6,)).astype(np.float32)
  bias = rng.standard_normal(6).astype(np.float32)
  want = lax_depthwise(x, kernel, bias)
  got = depthwise.shifted_depthwise_sum(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias))
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("kernel_size,batch,height,use_bias", [
    ((1, 7), 2, 9, True), ((7, 1), 3, 9, True), ((3, 3), 12, 9, True),
    ((5, 1), 1, 9, False), ((1, 1), 2, 9, True), ((1, 7), 2, 8, True),
    ((7, 1), 1, 8, True), ((1, 7), 16, 9, True)])
def test_shifted_depthwise_sum_gradient_is_the_grouped_convolutions(kernel_size, batch,
                                                                    height, use_bias, rng):
  """The hand-written gradient (x, kernel, bias) equals autodiff of lax's grouped
  convolution. The kernel gradient adds the positions in slices: the batches and
  heights here cut them every way it does (by the whole batch, by a divisor of it, by
  the batch times a power of two of the next axis, not at all), and a scalar zero bias
  stands for no bias."""
  x = jnp.asarray(rng.standard_normal((batch, height, 11, 6)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal(kernel_size + (6,)), jnp.float32)
  bias = (jnp.asarray(rng.standard_normal(6), jnp.float32) if use_bias
          else jnp.zeros((), jnp.float32))
  weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  grouped = lambda x, kernel, bias: jnp.sum(lax_depthwise(x, kernel, bias) * weights)
  shifted = lambda x, kernel, bias: jnp.sum(
      depthwise.shifted_depthwise_sum(x, kernel, bias) * weights)
  want = jax.grad(grouped, argnums=(0, 1, 2))(x, kernel, bias)
  got = jax.jit(jax.grad(shifted, argnums=(0, 1, 2)))(x, kernel, bias)
  for name, g, w in zip(("x", "kernel", "bias"), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    # Sums of up to batch * 99 float32 products: rounding relative to the largest entry.
    np.testing.assert_allclose(g, w, rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(w))),
                               err_msg=name)


def test_gelu_and_its_gradient_are_pytorchs(rng):
  """activations.gelu and its hand-written gradient against torch's exact GELU and autograd,
  including far in the tails."""
  x = np.concatenate([rng.standard_normal(500) * 3, [-12.0, -6.0, 0.0, 6.0, 12.0]])
  x = x.astype(np.float32)
  weights = rng.standard_normal(x.shape).astype(np.float32)
  x_torch = torch.tensor(x, requires_grad=True)
  y_torch = torch.nn.functional.gelu(x_torch)
  (y_torch * torch.tensor(weights)).sum().backward()
  y = jax.jit(activations.gelu)(x)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(activations.gelu(x) * weights)))(x)
  np.testing.assert_allclose(y, y_torch.detach().numpy(), rtol=2e-6, atol=1e-6)
  np.testing.assert_allclose(grad, x_torch.grad.numpy(), rtol=2e-6, atol=1e-6)


def test_gelu_mlp_and_its_gradient_are_pytorchs(rng):
  """activations.gelu_mlp (fc1, GELU, fc2 with a hand-written gradient) against the same
  layers in PyTorch, value and every gradient."""
  x, k1, b1, k2, b2 = (rng.standard_normal(shape).astype(np.float32) for shape in
                       ((300, 8), (8, 32), (32,), (32, 8), (8,)))
  weights = rng.standard_normal((300, 8)).astype(np.float32)
  torch_args = [torch.tensor(a, requires_grad=True) for a in (x, k1, b1, k2, b2)]
  tx, tk1, tb1, tk2, tb2 = torch_args
  ty = torch.nn.functional.gelu(tx @ tk1 + tb1) @ tk2 + tb2
  (ty * torch.tensor(weights)).sum().backward()
  loss = lambda *args: jnp.sum(activations.gelu_mlp(*args) * weights)
  y = jax.jit(activations.gelu_mlp)(x, k1, b1, k2, b2)
  grads = jax.jit(jax.grad(loss, argnums=tuple(range(5))))(x, k1, b1, k2, b2)
  np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-5, atol=1e-5)
  for name, g, t in zip(("x", "kernel1", "bias1", "kernel2", "bias2"), grads, torch_args):
    want = t.grad.numpy()
    # Sums of up to 300 float32 products: rounding relative to the largest entry.
    np.testing.assert_allclose(g, want, rtol=0, atol=1e-5 * float(np.max(np.abs(want))),
                               err_msg=name)


def test_hand_written_gradients_keep_less_for_the_backward_pass():
  """What the hand-written gradients are for: compiled, the gradient of a stack of MLPs
  and of norms needs less scratch memory than autodiff of the same formulas (which keep
  each GELU output and each x - mean for the backward pass)."""
  x = jnp.ones((8, 32, 32, 16), jnp.float32)
  k1, k2 = jnp.ones((16, 64)), jnp.ones((64, 16))
  b1, b2 = jnp.ones(64), jnp.ones(16)
  scale, bias = jnp.ones(16), jnp.zeros(16)

  def scratch(layer, x, *params):
    def stack(x, *params):
      for _ in range(4):
        x = x + layer(x, *params)
      return jnp.sum(x)
    grad = jax.jit(jax.grad(stack, argnums=tuple(range(len(params) + 1))))
    return grad.lower(x, *params).compile().memory_analysis().temp_size_in_bytes

  flat = x.reshape(-1, 16)
  plain_mlp = lambda x, k1, b1, k2, b2: activations._gelu(x @ k1 + b1) @ k2 + b2
  assert scratch(activations.gelu_mlp, flat, k1, b1, k2, b2) < scratch(plain_mlp, flat, k1, b1, k2, b2)
  theirs = nn.GroupNorm(num_groups=1, epsilon=1e-5, use_fast_variance=False)
  flax_norm = lambda x, scale, bias: theirs.apply({"params": {"scale": scale, "bias": bias}}, x)
  ours = lambda x, scale, bias: norms.single_group_norm(x, scale, bias, 1e-5)
  assert scratch(ours, x, scale, bias) < scratch(flax_norm, x, scale, bias)


def test_depthwise_kernel_gradient_keeps_no_per_tap_products():
  """The kernel gradient adds every tap's products in one pass over slices of the
  positions, so its scratch stays near two activations (the padded input and the
  slice sums). Reducing each tap's product separately, the previous form, needed
  about seven: XLA:CPU materialised every product for its reduction."""
  x = jnp.ones((8, 28, 28, 64), jnp.float32)
  weights = jnp.full(x.shape, 0.5)
  bias = jnp.zeros(64)
  loss = lambda kernel, x, weights: jnp.sum(
      depthwise.shifted_depthwise_sum(x, kernel, bias) * weights)
  for kernel in (jnp.full((1, 7, 64), 0.1), jnp.full((7, 1, 64), 0.1)):
    compiled = jax.jit(jax.grad(loss)).lower(kernel, x, weights).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 3 * x.nbytes


def test_chained_depthwise_gradients_compute_each_input_gradient_once():
  """SPAM's row then column convolution, differentiated: the column convolution's
  input gradient (a 7-tap sum) feeds each of the row convolution's kernel-gradient
  reductions. It must be computed once and read, not recomputed inside every one of
  them (what XLA:CPU did: 4.7 times the products of the two convolutions
  differentiated separately, and an HLO module to match). No bias, so the bias gradient cannot be
  what keeps it in memory."""
  def products(fn, *args):
    hlo = jax.jit(jax.grad(fn, argnums=tuple(range(len(args))))).lower(*args).compile()
    return len(re.findall(r" multiply\(", hlo.as_text()))

  x = jnp.ones((8, 7, 7, 512), jnp.float32)  # SPANet-S's last stage
  weights = jnp.full(x.shape, 0.5)
  row, column = jnp.full((1, 7, 512), 0.1), jnp.full((7, 1, 512), 0.2)
  conv = lambda x, kernel: depthwise.shifted_depthwise_sum(x, kernel, jnp.zeros((), x.dtype))
  alone = sum(products(lambda x, k: jnp.sum(conv(x, k) * weights), x, kernel)
              for kernel in (row, column))
  chained = products(lambda x, r, c: jnp.sum(conv(conv(x, r), c) * weights), x, row, column)
  assert chained < 2 * alone


@pytest.mark.parametrize("shape,dtype", [((3, 5, 7, 6), jnp.float32), ((2, 6), jnp.float32),
                                         ((2, 4, 4, 8), jnp.bfloat16)])
def test_single_group_norm_is_flax_group_norm_with_its_gradient(shape, dtype, rng):
  """SingleGroupNorm computes nn.GroupNorm(num_groups=1)'s function with the same
  parameters, and its hand-written gradient equals autodiff of nn.GroupNorm, for every
  input and parameter (4-D features, 2-D pooled features, bfloat16)."""
  x = jnp.asarray(rng.standard_normal(shape) * 2 + 0.5, dtype)
  ours = layers.group_norm(dtype=dtype)
  theirs = nn.GroupNorm(num_groups=1, epsilon=1e-5, use_fast_variance=False, dtype=dtype)
  params = {"scale": jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)}
  shapes = lambda m: jax.tree.map(jnp.shape, m.init(jax.random.PRNGKey(0), x)["params"])
  assert shapes(ours) == shapes(theirs) == jax.tree.map(jnp.shape, params)
  weights = jnp.asarray(rng.standard_normal(shape), jnp.float32)

  def loss(module):
    return lambda p, x: jnp.sum(module.apply({"params": p}, x).astype(jnp.float32) * weights)

  y_ours, y_theirs = (m.apply({"params": params}, x) for m in (ours, theirs))
  assert y_ours.dtype == y_theirs.dtype == dtype
  tolerance = 1e-2 if dtype == jnp.bfloat16 else 2e-6
  np.testing.assert_allclose(np.asarray(y_ours, np.float32), np.asarray(y_theirs, np.float32),
                             rtol=tolerance, atol=tolerance)
  want = jax.grad(loss(theirs), argnums=(0, 1))(params, x)
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    scale = float(np.max(np.abs(w)))
    np.testing.assert_allclose(g, w, rtol=0, atol=(2e-2 if dtype == jnp.bfloat16 else 2e-6) * scale)


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
  # (B per part: 1 when the batch runs as two parts, as it does by default on one CPU.)
  assert re.search(r"f32\[[12],13,8\]", str(jax.make_jaxpr(half_model.apply)(variables, x)))
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
  with pytest.raises(spanet_jax.CheckpointError, match="already exists"):
    spanet_jax.save_pretrained(str(tmp_path / "ckpt"), TINY, variables["params"])
  with pytest.raises(spanet_jax.CheckpointError, match="no such checkpoint"):
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


@pytest.mark.slow
def test_batch_parts_compute_the_whole_batch(tiny_variables):
  """The batch run as independent parts (the default on one CPU device: 2 for an even
  batch) gives every sample's logits, features and gradients as the whole batch does."""
  # The default resolves through batch_parts_for: 2 for this even batch, as checked below.
  assert batching.batch_parts_for(4, None) == 2 and batching.batch_parts_for(3, None) == 1
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 64, 64, 3))
  features = lambda m: apply(m, tiny_variables, x, method="stage_features")
  loss = lambda p, m: jnp.sum(m.apply({"params": p}, x, train=True) ** 2)
  grads = lambda m: jax.jit(jax.grad(loss), static_argnums=1)(tiny_variables["params"], m)
  whole = spanet_jax.create_model(TINY, batch_parts=1)
  whole_logits, whole_features, whole_grads = (apply(whole, tiny_variables, x),
                                               features(whole), grads(whole))
  for parts in (2, 4):
    model = spanet_jax.create_model(TINY, batch_parts=parts)
    np.testing.assert_allclose(apply(model, tiny_variables, x), whole_logits, rtol=1e-5,
                               atol=1e-6)
    for got, want in zip(features(model), whole_features):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads(model)),
                            jax.tree.leaves(whole_grads)):
      assert float(jnp.max(jnp.abs(g - w))) <= 1e-5 * float(jnp.max(jnp.abs(w))) + 1e-7, path
  with pytest.raises(ValueError, match=r"batch_parts=3 must be a positive divisor of the batch \(4\)"):
    apply(spanet_jax.create_model(TINY, batch_parts=3), tiny_variables, x)


def test_captured_intermediates_hold_the_whole_batch(tiny_variables):
  """With batch_parts left to auto, capture_intermediates records each block once, for
  the whole batch, as a model without parts does; an explicit count records each part."""
  x = jax.random.normal(jax.random.PRNGKey(4), (4, 32, 32, 3))
  captured = lambda model: jax.jit(lambda v: model.apply(
      v, x, capture_intermediates=True, mutable=["intermediates"])[1]["intermediates"])(
          tiny_variables)
  block = lambda tree: tree["backbone"]["stage0_block0"]["__call__"]
  whole = captured(spanet_jax.create_model(TINY, batch_parts=1))
  auto = captured(spanet_jax.create_model(TINY))
  assert jax.tree.structure(auto) == jax.tree.structure(whole)
  (auto_block,), (whole_block,) = block(auto), block(whole)
  assert auto_block.shape[0] == 4
  np.testing.assert_allclose(auto_block, whole_block, rtol=1e-5, atol=1e-6)
  parts = block(captured(spanet_jax.create_model(TINY, batch_parts=2)))
  assert [p.shape[0] for p in parts] == [2, 2]
  np.testing.assert_allclose(jnp.concatenate(parts), whole_block, rtol=1e-5, atol=1e-6)


def test_default_paths_on_cpu():
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


@pytest.mark.slow
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


@pytest.mark.parametrize("kernel_size,use_bias", [((3, 3), True), ((5, 5), False), ((1, 7), True)])
def test_channels_first_depthwise_sum_and_its_gradient_are_the_grouped_convolutions(
    kernel_size, use_bias, rng):
  """The (B, C, H, W) form ExSPAM uses on CPU, value and (x, kernel, bias) gradients,
  against autodiff of lax's grouped convolution in NCHW."""
  x = jnp.asarray(rng.standard_normal((3, 6, 9, 11)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal(kernel_size + (6,)), jnp.float32)
  bias = (jnp.asarray(rng.standard_normal(6), jnp.float32) if use_bias
          else jnp.zeros((), jnp.float32))
  weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  grouped = lambda x, kernel, bias: lax_depthwise(x, kernel, bias, channels_first=True)
  shifted = lambda x, kernel, bias: depthwise.shifted_depthwise_sum(x, kernel, bias, True)
  want = grouped(x, kernel, bias)
  np.testing.assert_allclose(jax.jit(shifted)(x, kernel, bias), want, rtol=0,
                             atol=2e-6 * float(jnp.max(jnp.abs(want))))
  loss = lambda f: lambda x, kernel, bias: jnp.sum(f(x, kernel, bias) * weights)
  want = jax.grad(loss(grouped), argnums=(0, 1, 2))(x, kernel, bias)
  got = jax.jit(jax.grad(loss(shifted), argnums=(0, 1, 2)))(x, kernel, bias)
  for name, g, w in zip(("x", "kernel", "bias"), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    np.testing.assert_allclose(g, w, rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(w))),
                               err_msg=name)


@pytest.mark.parametrize("use_bias", [True, False])
def test_layer_norm_gradient_is_autodiffs(use_bias, rng):
  """norms.layer_norm's hand-written gradient against autodiff of the plain formula."""
  x = jnp.asarray(rng.standard_normal((2, 5, 7, 12)) * 3 + 1, jnp.float32)
  scale = jnp.asarray(rng.standard_normal(12), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(12), jnp.float32) if use_bias else None
  weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  def plain(x, scale, bias):
    centred = x - jnp.mean(x, -1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(centred ** 2, -1, keepdims=True) + 1e-6) * scale
    return y if bias is None else y + bias

  loss = lambda f: lambda x, scale, bias: jnp.sum(f(x, scale, bias) * weights)
  written = lambda x, scale, bias: norms.layer_norm(x, scale, bias, 1e-6)
  np.testing.assert_allclose(written(x, scale, bias), plain(x, scale, bias), rtol=0, atol=1e-5)
  want = jax.grad(loss(plain), argnums=(0, 1, 2))(x, scale, bias)
  got = jax.jit(jax.grad(loss(written), argnums=(0, 1, 2)))(x, scale, bias)
  for name, g, w in zip(("x", "scale", "bias"), got, want):
    if w is None:
      assert g is None
      continue
    np.testing.assert_allclose(g, w, rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(w))),
                               err_msg=name)


@pytest.mark.parametrize("name,option,value", [
    (TINY, "spectral_impl", "fast"), (TINY, "depthwise_impl", "grouped"),
    (TINY, "conv_impl", "winograd"), ("spanetv2_s18_pure", "spectral_impl", "lowrank")])
def test_option_values_are_checked_when_the_model_is_built(name, option, value):
  with pytest.raises(ValueError, match=f"unknown {option} '{value}'; choose from auto"):
    spanet_jax.create_model(name, **{option: value})
  with pytest.raises(ValueError, match=f"unknown {option} '{value}'"):
    (layers.DepthwiseConv((3, 3), impl=value) if option == "depthwise_impl" else
     layers.StridedConv(8, (3, 3), impl=value) if option == "conv_impl" else
     spanet.SPAM(radius=2, mask_size=(8, 8), spectral_impl=value) if name == TINY else
     spanetv2.ExSPAM((8, 8), spectral_impl=value))


def test_every_auto_choice_is_the_platforms():
  """SPAM's filter with fixed masks is the low-rank form on every backend; learned masks
  take FFTs on CPU and DFT products on accelerators (ops.platform)."""
  for backend in ("cpu", "gpu", "tpu"):
    with platform.target(backend):
      assert spanet.SPAM(radius=2, mask_size=(8, 8))._spectral_impl() == "lowrank"
      learned = spanet.SPAM(radius=2, mask_size=(8, 8), learnable_masks=True)._spectral_impl()
      assert learned == ("fft" if backend == "cpu" else "dft")
