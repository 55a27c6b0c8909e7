"""The Python in README.md and docs/ runs as written: every ```python block is executed,
with the tiny test models standing in for spanet_s and spanetv2_s18_hybrid and 64-pixel
images for 224 (the published models' sizes are checked by the parity and model
tests)."""

import pathlib
import re

import jax
import jax.numpy as jnp
import pytest

import export
import spanet_jax
from conftest import TINY, TINY_V2, run_main

REPO = pathlib.Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCKS = [(path.name, number, block) for path in DOCS for number, block in enumerate(
    re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  """weights/spanet_s and spanet_s.stablehlo (+ .json), as the README's commands make them."""
  root = tmp_path_factory.mktemp("docs")
  model = spanet_jax.create_model(TINY)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]
  spanet_jax.save_pretrained(str(root / "weights" / "spanet_s"), TINY, params)
  code, _, stderr = run_main(export.main, "--checkpoint", root / "weights" / "spanet_s",
                             "--format", "stablehlo", "--output", root / "spanet_s.stablehlo",
                             "--size", 64, 64)
  assert code == 0, stderr
  return root


def test_the_docs_have_python_to_run():
  assert len(BLOCKS) >= 2


@pytest.mark.parametrize("name,number,block", BLOCKS,
                         ids=[f"{name}-{number}" for name, number, _ in BLOCKS])
def test_python_block_runs(name, number, block, workspace, monkeypatch):
  del name, number
  monkeypatch.chdir(workspace)
  code = (block.replace('"spanet_s"', f'"{TINY}"').replace("224", "64")
          .replace('"spanetv2_s18_hybrid"', f'"{TINY_V2["hybrid"]}"'))
  exec(compile(code, "<docs>", "exec"), {})  # pylint: disable=exec-used
