"""spanet_jax.outputs: a failed write leaves the old output whole and no temporary file."""

import os

import pytest

from spanet_jax import outputs


def _listing(folder):
  return sorted(os.listdir(folder))


def test_write_file_replaces_only_when_the_writer_finishes(tmp_path):
  path = tmp_path / "result.json"
  path.write_text("old")

  def fails(temporary):
    with open(temporary, "w") as f:
      f.write("half")
    raise OSError(28, "No space left on device")

  with pytest.raises(OSError, match="No space left"):
    outputs.write_file(str(path), fails)
  assert path.read_text() == "old" and _listing(tmp_path) == ["result.json"]
  with pytest.raises(KeyboardInterrupt):
    outputs.write_file(str(path), lambda temporary: (_ for _ in ()).throw(KeyboardInterrupt))
  assert path.read_text() == "old" and _listing(tmp_path) == ["result.json"]
  outputs.write_text(str(path), "new")
  assert path.read_text() == "new" and _listing(tmp_path) == ["result.json"]
  assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_the_temporary_file_keeps_the_extension_and_folders_are_made(tmp_path):
  seen = []
  outputs.write_file(str(tmp_path / "new" / "figure.png"),
                     lambda temporary: (seen.append(temporary),
                                        open(temporary, "wb").close()))
  assert seen[0].endswith(".png") and os.path.dirname(seen[0]) == str(tmp_path / "new")
  assert _listing(tmp_path / "new") == ["figure.png"]


def test_replace_swaps_directories_and_clears_a_left_over_old(tmp_path):
  target, staging = tmp_path / "model", tmp_path / "staging"
  target.mkdir()
  (target / "a").write_text("old")
  (tmp_path / "model.old").mkdir()  # left by an interrupted earlier replace
  staging.mkdir()
  (staging / "b").write_text("new")
  outputs.replace(str(staging), str(target))
  assert _listing(target) == ["b"] and _listing(tmp_path) == ["model"]
