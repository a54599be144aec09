"""Run configs: every recipe validates; mistakes are named."""

from pathlib import Path

import pytest

from engine.config import RunConfig
from engine.config_io import load_config
from engine.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_validates(recipe):
    config = load_config(recipe)
    assert isinstance(config, RunConfig)


def test_overrides_are_typed():
    config = load_config(ROOT / "configs/tiny.yaml", ["sampling.steps=3", "sampling.shift=2", "model.path=/w",
                                                      "train.lr=1e-4", "data.latent_shape=[3, 4, 6]"])
    assert (config.sampling.steps, config.sampling.shift, config.model.path) == (3, 2.0, "/w")
    assert isinstance(config.sampling.shift, float)
    assert config.train.lr == 1e-4  # PyYAML alone would read 1e-4 as a string
    assert config.data.latent_shape == (3, 4, 6)


def test_unknown_override_names_the_closest_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'sampling\.step'.*did you mean sampling\.steps"):
        load_config(None, ["sampling.step=3"])


def test_unknown_yaml_key_names_file_and_closest_key(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  presett: tiny\n")
    with pytest.raises(ConfigError, match=rf"{recipe}: unknown config key 'model\.presett'; did you mean model\.preset"):
        load_config(recipe)


@pytest.mark.parametrize("override, message", [
    ("sampling.steps=many", r"sampling\.steps='many': expected int, got str"),
    ("train.lr=fast", r"train\.lr='fast': expected float, got str"),
    ("data.latent_shape=[3, 4]", r"data\.latent_shape=\[3, 4\]: expected 3 items"),
    ("seed=true", r"seed=True: expected int, got bool"),
    ("model.attention_backend=xformers", r"expected one of 'sdpa', 'flash'"),
    ("sampling.steps=0", r"sampling\.steps=0: expected at least 1"),
    ("model.preset=wan3", r"model\.preset='wan3': expected one of"),
])
def test_wrong_values_name_field_value_and_expectation(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_recipe_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
