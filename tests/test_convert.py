"""convert_torch_weights.py and spanet_jax.convert: containers, round trips, bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
torch = pytest.importorskip("torch")  # the PyTorch references need it

import convert_torch_weights
import spanet_jax
from spanet_jax import convert
from spanet_jax.models import registry
from spanet_jax.reference import spanet_torch, verify
from conftest import TINY, run_main, state_dict_numpy, tiny_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_equal(a, b):
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def tiny_state_dict():
  return state_dict_numpy(tiny_reference())


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
  """A random SPANet-S checkpoint in the official layout, as a training run saves it."""
  reference = spanet_torch.randomize_(spanet_torch.SPANet(), seed=1)
  path = tmp_path_factory.mktemp("official") / "spanet-small.pth"
  torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()},
              "epoch": 299, "arch": "spanet_small"}, path)
  return str(path), reference.eval()


def run_cli(*args):
  return run_main(convert_torch_weights.main, *args)


# ---------------------------------------------------------------------------------------
# The library.


def test_round_trip_is_exact_and_keeps_official_order(tiny_state_dict):
  name, overrides, params = convert.torch_to_flax(tiny_state_dict)
  assert name == TINY
  back = convert.flax_to_torch(params, name, overrides)
  assert list(back) == list(tiny_state_dict)
  for key, value in tiny_state_dict.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_conversion_fills_every_flax_parameter(tiny_state_dict, tiny_variables):
  _, _, params = convert.torch_to_flax(tiny_state_dict)
  shapes = jax.tree.map(np.shape, tiny_variables["params"])
  assert jax.tree.map(np.shape, params) == shapes


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"state_dict": sd, "epoch": 3},
    lambda sd: {"model": sd, "optimizer": {"lr": 1e-3}},
    lambda sd: {"state_dict_ema": sd},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},
    lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    lambda sd: {"state_dict": {**{f"backbone.{k}": v for k, v in sd.items()},
                               "neck.fpn.weight": torch.zeros(3)}},
], ids=["bare", "state_dict", "model", "state_dict_ema", "module", "state_dict+module",
        "mmdet-backbone"])
def test_every_container_gives_the_same_params(wrap, tmp_path):
  reference = tiny_reference()
  path = tmp_path / "ckpt.pth"
  torch.save(wrap(reference.state_dict()), path)
  _, _, params = convert.torch_to_flax(convert.load_state_dict_file(str(path)))
  _, _, expected = convert.torch_to_flax(state_dict_numpy(reference))
  assert tree_equal(params, expected)


@pytest.mark.parametrize("name", ["spanet_s", "spanet_m", "spanet_mx", "spanet_b", "spanet_bx"])
def test_variant_is_inferred_from_shapes(name):
  with torch.device("meta"):
    reference = spanet_torch.SPANet(**registry.model_info(name).architecture)
  shapes = {k: np.empty(v.shape, np.float32) for k, v in reference.state_dict().items()}
  architecture = convert.infer_architecture(shapes)
  assert convert.matching_model(architecture) == name
  assert architecture.mask_sizes == (56, 28, 14, 7) and architecture.num_classes == 1000


def test_learnable_masks_convert_and_match_the_reference(rng):
  reference = tiny_reference()
  with torch.no_grad():
    for name, param in reference.named_parameters():
      if name.endswith("filter"):  # trained, asymmetric masks
        param.copy_(torch.rand(param.shape))
  state_dict = state_dict_numpy(reference)
  with pytest.raises(convert.ConversionError, match="differs from SPANet's mask formula"):
    convert.torch_to_flax(state_dict)
  name, overrides, params = convert.torch_to_flax(state_dict, learnable_masks=True)
  model = spanet_jax.create_model(name, **overrides)
  results = verify.verify(model, {"params": params}, state_dict, sizes=(224,))
  assert all(r.passed for r in results), [str(r) for r in results]
  back = convert.flax_to_torch(params, name, overrides)
  assert all(np.array_equal(back[k], v) for k, v in state_dict.items())


# ---------------------------------------------------------------------------------------
# The command line: success paths.


@pytest.mark.slow
def test_cli_converts_verifies_loads_and_exports(small_checkpoint, tmp_path):
  path, reference = small_checkpoint
  out = tmp_path / "weights" / "spanet_s"  # parent directories are created, as in the README
  # One size at full size (every size is one more compile of the full model): the tiny
  # models' conversions verify at several sizes.
  code, stdout, stderr = run_cli("--input", path, "--output", out, "--verify",
                                 "--verify-sizes", "224")
  assert code == 0, stderr
  assert "spanet_s" in stdout and "verification passed" in stdout
  assert stdout.count("top-1 agree 100%") == 2  # random inputs and photographs

  metadata = json.loads((out / "spanet.json").read_text())
  assert metadata["architecture"]["layers"] == [4, 4, 12, 4]
  assert metadata["data"]["crop_pct"] == 0.9 and len(metadata["class_names"]) == 1000
  assert metadata["class_names"][0].startswith("tench")
  # What was verified is what was written: the loaded weights are the conversion's.
  model, variables = spanet_jax.load_pretrained(str(out))
  assert model == spanet_jax.create_model("spanet_s")
  assert tree_equal(variables, {"params": convert.torch_to_flax(state_dict_numpy(reference))[2]})

  exported = tmp_path / "export" / "exported.pth"
  code, stdout, stderr = run_cli("--to-torch", "--input", out, "--output", exported)
  assert code == 0, stderr
  original = reference.state_dict()
  loaded = torch.load(exported, weights_only=True)
  assert list(loaded) == list(original)
  assert all(torch.equal(loaded[k], v) for k, v in original.items())
  spanet_torch.SPANet().load_state_dict(loaded, strict=True)


def test_cli_exports_to_torch_and_verifies_at_every_size(tiny_state_dict, tmp_path):
  path = tmp_path / "tiny.pth"
  torch.save({k: torch.from_numpy(v) for k, v in tiny_state_dict.items()}, path)
  code, _, stderr = run_cli("--input", path, "--output", tmp_path / "flax")
  assert code == 0, stderr
  exported = tmp_path / "exported.pth"
  code, stdout, stderr = run_cli("--to-torch", "--input", tmp_path / "flax", "--output",
                                 exported, "--verify", "--verify-sizes", "64", "96")
  assert code == 0, stderr
  assert "verification passed" in stdout and stdout.count("top-1 agree 100%") == 4
  loaded = torch.load(exported, weights_only=True)
  assert list(loaded) == list(tiny_state_dict)
  assert all(np.array_equal(loaded[k].numpy(), v) for k, v in tiny_state_dict.items())


def test_cli_as_a_program(small_checkpoint, tmp_path):
  path, _ = small_checkpoint
  out = tmp_path / "converted"
  ok = subprocess.run([sys.executable, "convert_torch_weights.py", "--model", "spanet_s",
                       "--input", path, "--output", str(out)],
                      cwd=REPO, capture_output=True, text=True)
  assert ok.returncode == 0, ok.stderr
  assert sorted(os.listdir(out)) == ["params", "spanet.json"]
  bad = subprocess.run([sys.executable, "convert_torch_weights.py", "--input", str(out),
                        "--output", str(tmp_path / "x")],
                       cwd=REPO, capture_output=True, text=True)
  assert bad.returncode == 2
  assert "Traceback" not in bad.stderr and bad.stderr.startswith("error: ")
  assert not (tmp_path / "x").exists()


def test_failed_verification_writes_nothing(tiny_state_dict, tmp_path, monkeypatch):
  path = tmp_path / "tiny.pth"
  torch.save({k: torch.from_numpy(v) for k, v in tiny_state_dict.items()}, path)
  monkeypatch.setattr(verify, "REL_L2_TOLERANCE", 0.0)
  code, stdout, stderr = run_cli("--input", path, "--output", tmp_path / "out", "--verify",
                                 "--verify-sizes", "64")
  assert code == 1 and "FAIL" in stdout and "not written" in stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pth"]


# ---------------------------------------------------------------------------------------
# The command line: bad input. Each gives exit 2, one "error:" line, and writes nothing.


def _save(tmp_path, state_dict, name="bad.pth"):
  path = tmp_path / name
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, path)
  return path


def _bad_input_cases(tmp_path, tiny_state_dict, small_path):
  sd = dict(tiny_state_dict)
  missing = {k: v for k, v in sd.items() if k != "network.4.1.mlp.fc1.weight"}
  unexpected = {**sd, "network.4.1.extra.weight": np.zeros(3, np.float32)}
  misshaped = {**sd, "network.2.0.token_mixer.pws.1.weight": np.zeros((16, 5, 1, 1), np.float32)}
  bad_mask = dict(sd)
  bad_mask["network.6.0.token_mixer.sps.2.filter"] = sd[
      "network.6.0.token_mixer.sps.2.filter"] * 1.5
  nan_weight = dict(sd)
  nan_weight["network.4.1.mlp.fc1.weight"] = np.where(
      np.arange(sd["network.4.1.mlp.fc1.weight"].size).reshape(
          sd["network.4.1.mlp.fc1.weight"].shape) == 7, np.nan,
      sd["network.4.1.mlp.fc1.weight"]).astype(np.float32)
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(open(small_path, "rb").read()[:100_000])
  text = tmp_path / "notes.pth"
  text.write_text("not a checkpoint\n")
  pickled = tmp_path / "object.pth"
  torch.save({"state_dict": torch.nn.Linear(2, 2)}, pickled)  # refused by weights_only
  random_bytes = tmp_path / "random.pth"
  random_bytes.write_bytes(np.random.default_rng(0).integers(0, 256, 1000, np.uint8).tobytes())
  return {
      "no such file": (["--input", tmp_path / "nope.pth"], "no such file"),
      "truncated": (["--input", truncated], "cannot read .*truncated"),
      "not a checkpoint": (["--input", text], "cannot read .*notes.pth"),
      "pickled object": (["--input", pickled], "cannot read .*object.pth.*other than tensors"),
      "random bytes": (["--input", random_bytes], "cannot read .*random.pth.*: its bytes are not a PyTorch checkpoint"),
      "missing key": (["--input", _save(tmp_path, missing, "m.pth")],
                      "missing keys: network.4.1.mlp.fc1.weight"),
      "unexpected key": (["--input", _save(tmp_path, unexpected, "u.pth")],
                         "unexpected keys: network.4.1.extra.weight"),
      "mis-shaped key": (["--input", _save(tmp_path, misshaped, "s.pth")],
                         r"wrong shapes for network.2.0.token_mixer.pws.1.weight \(16, 5, 1, 1\) "
                         r"\(expected \(16, 6, 1, 1\)\)"),
      "mask": (["--input", _save(tmp_path, bad_mask, "k.pth")],
               "network.6.0.token_mixer.sps.2.filter differs from SPANet's mask formula"),
      "NaN weight": (["--input", _save(tmp_path, nan_weight, "nan.pth")],
                     "NaN or infinite values in network.4.1.mlp.fc1.weight"),
      "wrong model": (["--input", small_path, "--model", "spanet_m"],
                      "does not fit spanet_m: missing keys: network.0.4.norm1.weight.*"
                      r"looks like spanet_s \(layers \[4, 4, 12, 4\]"),
      "unknown model": (["--input", small_path, "--model", "spanet_xl"], "unknown model"),
      "unregistered shape": (["--input", _save(tmp_path, {
          k: v for k, v in sd.items() if not k.startswith("network.4.1.")}, "n.pth")],
                             r"cannot tell the model: .*layers \[1, 1, 1, 1\]"),
  }


CASES = ["no such file", "truncated", "not a checkpoint", "pickled object", "random bytes",
         "missing key",
         "unexpected key", "mis-shaped key", "mask", "NaN weight", "wrong model",
         "unknown model", "unregistered shape"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_message(case, tmp_path, tiny_state_dict, small_checkpoint):
  args, pattern = _bad_input_cases(tmp_path, tiny_state_dict, small_checkpoint[0])[case]
  before = sorted(os.listdir(tmp_path))
  code, _, stderr = run_cli(*args, "--output", tmp_path / "out")
  assert code == 2
  assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
  assert __import__("re").search(pattern, stderr), stderr
  assert "weights_only" not in stderr  # torch's advice to unpickle anything: never given
  assert sorted(os.listdir(tmp_path)) == before  # nothing written, nothing left behind


def test_existing_output_is_not_overwritten(tmp_path, tiny_state_dict):
  path = _save(tmp_path, tiny_state_dict, "tiny.pth")
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("good state")
  code, _, stderr = run_cli("--input", path, "--output", out)
  assert code == 2 and "already exists; pass --overwrite" in stderr
  assert (out / "keep.txt").read_text() == "good state"
  code, _, stderr = run_cli("--input", path, "--output", out, "--overwrite")
  assert code == 0, stderr
  assert sorted(os.listdir(out)) == ["params", "spanet.json"]


def test_an_output_that_cannot_be_created_is_one_line(tmp_path, tiny_state_dict):
  path = _save(tmp_path, tiny_state_dict, "tiny.pth")
  a_file = tmp_path / "a_file"
  a_file.write_text("keep")
  for args, message in [(("--output", a_file / "sub" / "out"), "a_file is a file"),
                        (("--output", a_file, "--overwrite"), "is a file; the output is a "
                                                               "directory")]:
    code, _, stderr = run_cli("--input", path, *args)
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert message in stderr, stderr
  assert a_file.read_text() == "keep"


def test_to_torch_rejects_a_non_checkpoint_directory(tmp_path):
  (tmp_path / "empty").mkdir()
  code, _, stderr = run_cli("--to-torch", "--input", tmp_path / "empty",
                            "--output", tmp_path / "x.pth")
  assert code == 2 and "not a spanet-jax checkpoint" in stderr
  assert not (tmp_path / "x.pth").exists()


def test_the_key_table_in_docs_is_the_converters():
  with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                         "checkpoint_keys.md")) as f:
    assert f.read() == convert.key_table_markdown() + "\n", (
        "docs/checkpoint_keys.md is stale: regenerate it with the command at its top")


def test_a_half_precision_checkpoint_converts_and_its_entry_is_named(tmp_path):
  """fp16 weights (masks equal to the formula at half precision) convert; a file that
  holds both a state_dict and its EMA says which it read; a directory is named as one."""
  reference = tiny_reference()
  half = {k: v.half() for k, v in reference.state_dict().items()}
  pth = tmp_path / "half.pth"
  torch.save({"state_dict": half, "state_dict_ema": half}, pth)
  code, stdout, stderr = run_main(convert_torch_weights.main, "--input", pth, "--model", TINY,
                                  "--output", tmp_path / "out")
  assert code == 0, stderr
  assert f"read {pth} (its 'state_dict' entry): {TINY}" in stdout
  _, variables = spanet_jax.load_pretrained(str(tmp_path / "out"))
  kernel = variables["params"]["head"]["kernel"]
  np.testing.assert_array_equal(kernel, half["head.weight"].float().numpy().T)
  code, _, stderr = run_main(convert_torch_weights.main, "--input", tmp_path, "--output",
                             tmp_path / "again")
  assert code == 2 and "is a directory: give the .pth file" in stderr
