"""No tool writes over what it reads: an output that is an input or contains one is
refused with one line before any work, and the input is untouched."""

import hashlib
import os
import pathlib
import shutil

import pytest

import convert_torch_weights
import evaluate
import export
import predict
import spectral_analysis
from spanet_jax.data import preprocess
from conftest import TINY, run_main


def digest(path: pathlib.Path) -> str:
  files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
  return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


@pytest.fixture
def photos(tmp_path):
  paths = []
  for source in preprocess.sample_photo_paths()[:2]:
    paths.append(tmp_path / os.path.basename(source))
    shutil.copy(source, paths[-1])
  return paths


def refused(main, *args):
  code, _, stderr = run_main(main, *args)
  lines = stderr.strip().splitlines()
  assert code == 2 and "Traceback" not in stderr, stderr
  assert lines and lines[-1].startswith("error: "), stderr
  return lines[-1]


def test_predict_json_onto_an_image(photos):
  """argparse takes the first image as --json's value: it must not be overwritten."""
  before = digest(photos[0])
  line = refused(predict.main, "--checkpoint", f"init:{TINY}", "--json", *photos)
  assert f"--json {photos[0]} exists and is not a JSON file" in line
  assert digest(photos[0]) == before


def test_export_onto_its_own_checkpoint(tmp_path, tiny_variables):
  import spanet_jax
  checkpoint = tmp_path / "ck"
  spanet_jax.save_pretrained(str(checkpoint), TINY, tiny_variables["params"])
  before = digest(checkpoint)
  for output in (checkpoint, tmp_path):
    line = refused(export.main, "--checkpoint", checkpoint, "--format", "stablehlo",
                   "--output", output, "--overwrite")
    assert f"--output {output}" in line and str(checkpoint) in line
  assert digest(checkpoint) == before


def test_evaluate_spectral_analysis_and_converter_outputs_onto_inputs(tmp_path, photos):
  before = digest(photos[0])
  line = refused(spectral_analysis.main, "--checkpoint", f"init:{TINY}", "--images",
                 *photos, "--out", tmp_path / "figure.png", "--csv", photos[0])
  assert "--csv" in line and "is also an input" in line
  folder = tmp_path / "val"
  (folder / "n01").mkdir(parents=True)
  line = refused(evaluate.main, "--checkpoint", f"init:{TINY}", "--data", folder / "n01",
                 "--predictions", folder)
  assert "--predictions" in line and "contains the input" in line
  pth = tmp_path / "weights.pth"
  pth.write_bytes(b"not really weights")
  line = refused(convert_torch_weights.main, "--input", pth, "--output", pth, "--to-torch",
                 "--overwrite")
  assert "--output" in line and "is also an input" in line
  assert pth.read_bytes() == b"not really weights" and digest(photos[0]) == before
