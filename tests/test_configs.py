"""The configs/ files and the typed groups the loop builds from a config."""

import importlib

import pytest

from configs import default, spanet, spanetv2
from spanet_jax.data import settings as data_settings
from spanet_jax.train import settings


@pytest.mark.parametrize("variant", sorted(spanet.DROP_PATH))
def test_each_spanet_file_is_the_variant_config(variant):
  named = importlib.import_module(f"configs.spanet_{variant}").get_config()
  assert named.to_dict() == spanet.get_config(variant).to_dict()
  assert named.model == f"spanet_{variant}"
  assert named.drop_path_rate == spanet.DROP_PATH[variant]


@pytest.mark.parametrize("module", [spanet, spanetv2])
def test_an_unknown_variant_names_the_choices(module):
  with pytest.raises(ValueError, match="choose one of"):
    module.get_config("xl")


def test_the_typed_groups_carry_the_config_values():
  config = spanetv2.get_config("s18_hybrid")
  config.crop_scale = [0.2, 1.0]
  typed = settings.of(config)
  assert typed.optimiser.optimizer == "lamb" and typed.model.head_dropout == 0.0
  assert typed.input.crop_scale == (0.2, 1.0)  # lists become tuples: frozen, hashable
  assert typed.schedule.peak_lr == pytest.approx(config.lr)  # batch 4096 = lr_base_batch
  assert typed.schedule.total_epochs == config.num_epochs + config.cooldown_epochs
  assert hash(typed.step) == hash(settings.of(config).step)  # a static jit argument
  assert typed.model.create_options()["drop_path_rate"] == config.drop_path_rate


def test_a_run_config_json_without_newer_keys_takes_the_defaults():
  saved = default.get_config().to_dict()
  saved["model"] = "spanet_s"
  del saved["remat"], saved["head_dropout"]
  options = settings.ModelOptions.from_config(saved)
  assert (options.remat, options.head_dropout) == (False, 0.0)
  del saved["seed"]
  with pytest.raises(KeyError, match="'seed'"):
    data_settings.TrainInput.from_config(saved)
