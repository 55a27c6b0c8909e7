"""SPANetV2: the Flax models against the PyTorch reference, the converter, the pieces.

Tolerance as for SPANet: relative L2 difference of logits (and stage features) at most
2e-5 with identical top-1; float32 rounding gives about 1e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
torch = pytest.importorskip("torch")  # the PyTorch references need it
F = torch.nn.functional

import convert_torch_weights
import spanet_jax
from spanet_jax import convert
from spanet_jax.models import layers, registry, spectral
from spanet_jax.reference import spanet_torch, spanetv2_torch
from spanet_jax.reference.verify import REL_L2_TOLERANCE, compare_outputs
from spanet_jax.ops import attention, grouped
from conftest import (TINY_V2, assert_full_size_conversion, assert_gradients_match_autograd,
                      one_block_per_stage, run_main, state_dict_numpy, tiny_v2_reference)

V2_MODELS = [f"spanetv2_{size}_{kind}" for size in ("s18", "s36", "m36", "b36")
             for kind in ("pure", "hybrid")]


def converted(reference, model_name=None):
  name, overrides, params = convert.torch_to_flax(state_dict_numpy(reference), model_name)
  return spanet_jax.create_model(name, **overrides), {"params": params}


def outputs(reference, model, variables, x_nhwc, method=None):
  with torch.no_grad():
    x = torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())
    expected = reference.stage_features(x) if method else reference(x)
  if method:  # the reference's stage outputs are channels-last already
    expected = [e.numpy().transpose(0, 3, 1, 2) for e in expected]
  else:
    expected = expected.numpy()
  actual = jax.jit(model.apply, static_argnames="method")(variables, x_nhwc, method=method)
  return expected, jax.device_get(actual)


def assert_parity(expected, actual, size=0):
  result = compare_outputs(expected, actual, "random", size)
  assert result.passed, str(result)
  return result


# ---------------------------------------------------------------------------------------
# The pieces.


@pytest.mark.parametrize("shape,size", [((56, 29), (64, 33)), ((56, 29), (16, 9)),
                                        ((14, 8), (7, 4)), ((7, 4), (9, 5)), ((5, 3), (1, 1)),
                                        ((1, 1), (4, 3)), ((28, 15), (28, 15))])
def test_bicubic_align_corners_resize_matches_pytorch(shape, size, rng):
  x = rng.standard_normal((3,) + shape).astype(np.float32)
  want = F.interpolate(torch.from_numpy(x)[None], size=size, mode="bicubic",
                       align_corners=True)[0].numpy()
  got = np.asarray(spectral.resize_bicubic_align_corners(jnp.asarray(x), *size))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=4e-6)


def test_resize_differs_from_jax_image_resize():
  """Why it is hand-written: jax.image.resize samples half-pixel centres (and a = -0.5)."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 14, 8)), jnp.float32)
  ours = spectral.resize_bicubic_align_corners(x, 28, 15)
  theirs = jax.image.resize(x, (1, 28, 15), "cubic")
  assert float(jnp.max(jnp.abs(ours - theirs))) > 1e-2
  np.testing.assert_allclose(ours[0, [0, -1]][:, [0, -1]], x[0, [0, -1]][:, [0, -1]],
                             atol=1e-6)  # align_corners keeps the corners


def test_dft_and_fft_paths_agree(rng):
  reference = tiny_v2_reference("pure")
  model, variables = converted(reference)
  x = jnp.asarray(rng.standard_normal((2, 96, 64, 3)), jnp.float32)
  fft = jax.jit(model.clone(spectral_impl="fft").apply)(variables, x)
  dft = jax.jit(model.clone(spectral_impl="dft").apply)(variables, x)
  assert compare_outputs(np.asarray(fft), np.asarray(dft), "random", 96).rel_l2 < 2e-6
  with pytest.raises(ValueError, match="spectral_impl"):
    jax.eval_shape(model.clone(spectral_impl="lowrank").apply, variables, x)


def test_parameter_counts_equal_the_reference():
  for name in ("spanetv2_s18_pure", "spanetv2_s18_hybrid"):
    model = spanet_jax.create_model(name)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    flax_count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes))
    reference = spanetv2_torch.SPANetV2(**registry.model_info(name).architecture)
    assert flax_count == sum(p.numel() for p in reference.parameters())
  assert flax_count == 26_991_948  # S18 hybrid; the paper rounds to 27M


@pytest.mark.slow
def test_train_mode_gradients_and_bfloat16(rng):
  model = spanet_jax.create_model(TINY_V2["hybrid"], drop_path_rate=0.3, head_dropout=0.2)
  x = jnp.asarray(rng.standard_normal((2, 64, 64, 3)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)

  def loss(params):
    logits = model.apply({"params": params}, x, train=True,
                         rngs={"dropout": jax.random.PRNGKey(1)})
    return jnp.mean(logits ** 2)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > 0.9 * len(norms)
  filters = grads["backbone"]["stage0_block0"]["token_mixer"]["filter_1"]
  assert float(jnp.abs(filters).max()) > 0  # the masks learn
  bf16 = jax.jit(model.clone(dtype=jnp.bfloat16).apply)(variables, x)
  fp32 = jax.jit(model.apply)(variables, x)
  assert bf16.dtype == jnp.bfloat16
  assert compare_outputs(np.asarray(fp32), np.asarray(bf16, np.float32), "random", 64).rel_l2 < 5e-2


@pytest.mark.parametrize("shape", [(2, 5, 7, 4, 3, 8), (8, 4, 4, 4, 16, 8), (1, 3, 2, 2, 5, 3)])
def test_grouped_projection_and_its_gradient_match_the_einsum(shape, rng):
  """The broadcast form and its written-out gradient against the einsum and autodiff,
  to float32 rounding; shapes cover batches the kernel gradient cuts in slices (8) or not."""
  batch, height, width, inputs, groups, outputs = shape
  x = jnp.asarray(rng.standard_normal((batch, height, width, inputs, groups)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((groups, inputs, outputs)), jnp.float32)
  probe = jnp.asarray(rng.standard_normal((batch, height, width, groups, outputs)), jnp.float32)
  einsum = lambda x, k: jnp.einsum("bhwig,gio->bhwgo", x, k,
                                   precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(grouped.grouped_projection(x, kernel), einsum(x, kernel),
                             rtol=1e-5, atol=1e-5)
  loss = lambda fn: lambda x, k: jnp.sum(fn(x, k) * probe)
  got = jax.jit(jax.grad(loss(grouped.grouped_projection), argnums=(0, 1)))(x, kernel)
  want = jax.grad(loss(einsum), argnums=(0, 1))(x, kernel)
  for g, w in zip(got, want):
    assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("use_bias", [False, True])
def test_channel_layer_norm_is_flax_layer_norm(use_bias, rng):
  """ChannelLayerNorm (means as products on CPU) against nn.LayerNorm: the same
  parameters, values and gradients to float32 rounding, and bfloat16 in and out. The
  input has a large common offset, where a careless variance loses digits."""
  from flax import linen as nn
  x = jnp.asarray(rng.standard_normal((2, 5, 7, 24)) * 3 + 40, jnp.float32)
  ours = layers.ChannelLayerNorm(epsilon=1e-6, use_bias=use_bias)
  flax_norm = nn.LayerNorm(epsilon=1e-6, use_bias=use_bias, use_fast_variance=False)
  variables = flax_norm.init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(ours.init(jax.random.PRNGKey(0), x)) == jax.tree.structure(variables)
  params = {"scale": jnp.asarray(rng.standard_normal(24), jnp.float32)}
  if use_bias:
    params["bias"] = jnp.asarray(rng.standard_normal(24), jnp.float32)
  variables = {"params": params}
  np.testing.assert_allclose(jax.jit(ours.apply)(variables, x), flax_norm.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  probe = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  loss = lambda module: lambda v, x: jnp.sum(module.apply(v, x) * probe)
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(variables, x)
  want = jax.grad(loss(flax_norm), argnums=(0, 1))(variables, x)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=str(path))
  half = lambda module: module.clone(dtype=jnp.bfloat16).apply(variables,
                                                               x.astype(jnp.bfloat16))
  assert half(ours).dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half(ours), np.float32),
                             np.asarray(half(flax_norm), np.float32), rtol=2e-2, atol=2e-2)


def test_attention_forms_agree(rng):
  """dot_product_attention (keys first, divided after the product, on CPU) against the
  plain softmax form: values, gradients of q, k and v, and bfloat16."""
  q, k, v, probe = (jnp.asarray(rng.standard_normal((2, 49, 3, 8)) * 2, jnp.float32)
                    for _ in range(4))
  plain = lambda q, k, v: attention._softmax_attention(q, k, v, 8 ** -0.5)
  ours = lambda q, k, v: attention.dot_product_attention(q, k, v, 8 ** -0.5)
  np.testing.assert_allclose(jax.jit(ours)(q, k, v), plain(q, k, v), rtol=1e-5, atol=1e-6)
  loss = lambda fn: lambda *args: jnp.sum(fn(*args) * probe)
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  half = [a.astype(jnp.bfloat16) for a in (q, k, v)]
  assert ours(*half).dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(ours(*half), np.float32),
                             np.asarray(plain(*half), np.float32), rtol=3e-2, atol=3e-2)


# ---------------------------------------------------------------------------------------
# Parity with the reference and the converter.


@pytest.mark.parametrize("kind", ["pure", "hybrid"])
@pytest.mark.parametrize("height,width", [(224, 224), (64, 64), (96, 128), (160, 160)])
def test_tiny_logits_and_stage_features(kind, height, width, rng):
  """224 uses the stored masks as they are; other sizes resize them (bicubic)."""
  reference = tiny_v2_reference(kind)
  model, variables = converted(reference)
  x = rng.standard_normal((2, height, width, 3)).astype(np.float32)
  assert_parity(*outputs(reference, model, variables, x), size=height)
  expected, actual = outputs(reference, model, variables, x, method="stage_features")
  assert [a.shape for a in actual] == [e.transpose(0, 2, 3, 1).shape for e in expected]
  assert_parity(expected, actual, size=height)


def test_round_trip_is_exact_and_keeps_official_order():
  state_dict = state_dict_numpy(tiny_v2_reference("hybrid"))
  name, overrides, params = convert.torch_to_flax(state_dict)
  assert name == TINY_V2["hybrid"]  # inferred from the tensors, mixers included
  back = convert.flax_to_torch(params, name, overrides)
  assert list(back) == list(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_grouped_projection_layout_matters(rng):
  """A transposed grouped 1x1 kernel (the easy mistake) changes the output."""
  reference = tiny_v2_reference("pure")
  model, variables = converted(reference)
  x = rng.standard_normal((1, 64, 64, 3)).astype(np.float32)
  expected, _ = outputs(reference, model, variables, x)
  params = jax.tree.map(np.array, variables["params"])
  mixer = params["backbone"]["stage1_block0"]["token_mixer"]
  groups, per_in, per_out = mixer["proj_0"].shape
  mixer["proj_0"] = mixer["proj_0"].reshape(groups, per_out, per_in).transpose(0, 2, 1)
  wrong = jax.device_get(jax.jit(model.apply)({"params": params}, x))
  assert compare_outputs(expected, wrong, "random", 64).rel_l2 > 100 * REL_L2_TOLERANCE


FULL_SIZE = "spanetv2_s18_hybrid"  # both mixer kinds at a published depth


@pytest.mark.slow
@pytest.mark.parametrize("name", V2_MODELS)
def test_every_variant_at_224_and_256(name, rng):
  """spanetv2_s18_hybrid at full size; every other variant's full-size weights convert
  to exactly its Flax parameter tree, and its widths and mixers run against the
  reference with one block per stage (depth repeats identical blocks)."""
  torch.manual_seed(0)
  info = registry.model_info(name)
  if name != FULL_SIZE:
    assert_full_size_conversion(name, spanetv2_torch.SPANetV2(**info.architecture))
    info = one_block_per_stage(name)
  with registry.registered(info):
    reference = spanet_torch.randomize_(spanetv2_torch.SPANetV2(**info.architecture)).eval()
    model, variables = converted(reference)
    assert model.token_mixers == info.architecture["token_mixers"]
    for size in (224, 256):
      x = rng.standard_normal((1, size, size, 3)).astype(np.float32)
      assert_parity(*outputs(reference, model, variables, x), size=size)


@pytest.mark.slow
def test_converter_cli_verifies_and_rejects_a_mismatch(tmp_path):
  reference = tiny_v2_reference("hybrid", seed=5)
  pth = tmp_path / "v2.pth"
  torch.save({"state_dict_ema": {f"module.{k}": v for k, v in reference.state_dict().items()}},
             pth)
  out = tmp_path / "converted"
  code, stdout, stderr = run_main(convert_torch_weights.main, "--input", pth, "--output", out,
                                  "--verify", "--verify-sizes", "224", "96")
  assert code == 0, stderr
  assert "verification passed" in stdout and stdout.count("top-1 agree 100%") == 4
  model, variables = spanet_jax.load_pretrained(str(out))
  x = np.random.default_rng(0).standard_normal((1, 64, 64, 3)).astype(np.float32)
  assert_parity(*outputs(reference, model, variables, x))
  # Back to PyTorch: the reference loads it strictly.
  exported = tmp_path / "back.pth"
  code, _, stderr = run_main(convert_torch_weights.main, "--to-torch", "--input", out,
                             "--output", exported, "--verify", "--verify-sizes", "64")
  assert code == 0, stderr
  fresh = spanetv2_torch.SPANetV2(**registry.model_info(TINY_V2["hybrid"]).architecture)
  fresh.load_state_dict(torch.load(exported, weights_only=True), strict=True)
  # The wrong family, a missing tensor: one message each, nothing written.
  code, _, stderr = run_main(convert_torch_weights.main, "--input", pth, "--output",
                             tmp_path / "x", "--model", "spanet_s")
  assert code == 2 and "does not fit spanet_s" in stderr and TINY_V2["hybrid"] in stderr
  broken = {k: v for k, v in reference.state_dict().items()
            if k != "stages.2.0.token_mixer.local_conv.weight"}
  torch.save(broken, tmp_path / "broken.pth")
  code, _, stderr = run_main(convert_torch_weights.main, "--input", tmp_path / "broken.pth",
                             "--output", tmp_path / "y", "--model", TINY_V2["hybrid"])
  assert code == 2 and "stages.2.0.token_mixer.local_conv.weight" in stderr, stderr
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pure", "hybrid"])
def test_tiny_gradients_match_pytorch_autograd(kind, rng):
  """Training computes the reference's gradients: every parameter's gradient within
  float32 rounding of PyTorch's float64 autograd gradient (conftest's check; StarReLU's
  scalars are its sums whose terms cancel). Covers the hand-written gradients (grouped
  projection, depthwise convolutions, GELU, norms)."""
  reference = tiny_v2_reference(kind)
  assert_gradients_match_autograd(reference, *converted(reference), rng)


# ---------------------------------------------------------------------------------------
# The dense-prediction backbone (official mmdet/mmseg SPANetV2).


def dense_reference(kind="hybrid", seed=0):
  arch = registry.model_info(TINY_V2[kind]).architecture
  return spanet_torch.randomize_(spanetv2_torch.SPANetV2(**arch, fork_feat=True), seed).eval()


@pytest.mark.parametrize("kind", ["pure", "hybrid"])
def test_dense_backbone_matches_the_official_layout_at_detection_sizes(kind, rng):
  """An mmdet checkpoint (`backbone.` keys, the unused classifier norm and head kept):
  features_only with the per-stage norms; stage outputs equal the reference's at square
  and non-square sizes where every learned mask is resized."""
  reference = dense_reference(kind)
  mmdet = {"state_dict": {f"backbone.{k}": v for k, v in reference.state_dict().items()},
           "meta": {"epoch": 12}}
  state_dict = convert.unwrap_state_dict(mmdet)
  assert any(k.startswith("head.") for k in state_dict)  # kept by the official backbone
  model, variables = converted_state_dict(state_dict, TINY_V2[kind])
  assert model.features_only and "out_norms_3" in variables["params"]
  assert "head" not in variables["params"] and "norm" not in variables["params"]
  for height, width in ((128, 128), (96, 160)) if kind == "hybrid" else ((96, 160),):
    x = rng.standard_normal((2, height, width, 3)).astype(np.float32)
    with torch.no_grad():
      expected = [e.numpy() for e in reference(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))]
    actual = jax.device_get(jax.jit(model.apply)(variables, x))
    assert [a.shape for a in actual] == [e.transpose(0, 2, 3, 1).shape for e in expected]
    assert_parity(expected, actual, height)


def converted_state_dict(state_dict, name):
  name, overrides, params = convert.torch_to_flax(state_dict, name)
  return spanet_jax.create_model(name, **overrides), {"params": params}


def test_dense_backbone_out_indices_feature_info_and_round_trip(rng):
  reference = dense_reference()
  state_dict = state_dict_numpy(reference)
  name, overrides, params = convert.torch_to_flax(state_dict, TINY_V2["hybrid"])
  model = spanet_jax.create_model(name, **overrides, out_indices=(1, 3))
  assert [f["reduction"] for f in model.feature_info] == [8, 32]
  x = rng.standard_normal((1, 64, 96, 3)).astype(np.float32)
  two = jax.jit(model.apply)({"params": params}, x)
  four = jax.jit(spanet_jax.create_model(name, **overrides).apply)({"params": params}, x)
  np.testing.assert_array_equal(two[0], four[1])
  np.testing.assert_array_equal(two[1], four[3])
  back = convert.flax_to_torch(params, name, overrides)
  used = {k: v for k, v in state_dict.items() if not k.startswith(("norm.", "head."))}
  assert list(back) == list(used)
  for key, value in used.items():
    np.testing.assert_array_equal(back[key], value)
  with pytest.raises(ValueError, match="a features_only model has no head"):
    model.apply({"params": params}, x, method="forward_features")


def test_full_size_dense_backbone_converts():
  arch = registry.model_info("spanetv2_s18_hybrid").architecture
  module = spanetv2_torch.SPANetV2(**arch, fork_feat=True)
  name, overrides, params = convert.torch_to_flax(state_dict_numpy(module))
  assert name == "spanetv2_s18_hybrid" and overrides["features_only"]
  model = spanet_jax.create_model(name, **overrides)
  want = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                        jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32))["params"]
  assert jax.tree.structure(params) == jax.tree.structure(want)
