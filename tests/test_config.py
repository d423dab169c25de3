"""params.yaml and overrides: bad input fails before any work, naming the key."""

from __future__ import annotations

import pytest

from spottune.config import load_params, parse_overrides, validate_params
from spottune.errors import ConfigError


def test_repository_params_file_is_valid():
    from pathlib import Path

    params = load_params(Path(__file__).parents[1] / "params.yaml")
    assert params.model.backbone == "efficientnet_lite0" and params.model.weights == "imagenet"


@pytest.mark.parametrize(
    "raw,key,words",
    [
        ({"optim": {"lr_net": -0.1}}, "optim.lr_net", "greater than 0"),
        ({"optim": {"learning_rate": 0.1}}, "optim.learning_rate", "unknown key"),
        ({"model": {"backbone": "vgg16"}}, "model.backbone", "resnet50"),
        ({"model": {"method": "magic"}}, "model.method", "spottune"),
        ({"training": {}}, "training", "unknown key"),
        ({"data": {"image_size": "big"}}, "data.image_size", "integer"),
        ({"model": {"weights": "missing.pth"}}, "model", "missing.pth"),
        ({"model": {"backbone": "resnet26", "weights": "imagenet"}}, "model", "resnet26"),
    ],
)
def test_bad_values_name_the_key(raw, key, words):
    with pytest.raises(ConfigError) as err:
        validate_params(raw, "params.yaml")
    assert key in str(err.value) and words in str(err.value) and "params.yaml" in str(err.value)


def test_overrides_are_parsed_as_yaml_and_merged(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("optim:\n  epochs: 7\n  lr_net: 0.5\n")
    params = load_params(path, ["optim.lr_net=0.25", "policy.global_k=3", "optim.step_milestones=[2, 4]"])
    assert (params.optim.epochs, params.optim.lr_net, params.policy.global_k) == (7, 0.25, 3)
    assert params.optim.step_milestones == (2, 4)


@pytest.mark.parametrize("pair", ["epochs", "=3", "optim.epochs.x=1"])
def test_malformed_overrides_are_refused(pair):
    with pytest.raises(ConfigError):
        load_params(None, [pair])


@pytest.mark.parametrize("pair", [".0=1", ".==", "optim..epochs=2", "optim.=1"])
def test_an_override_key_with_an_empty_part_is_named(pair):
    with pytest.raises(ConfigError, match="empty part") as e:
        load_params(None, [pair])
    assert repr(pair) in str(e.value)


def test_not_yaml_and_not_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_params(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(listing)


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_runtime_settings_come_from_the_environment(monkeypatch):
    from spottune.settings import RuntimeSettings

    monkeypatch.delenv("SPOTTUNE_CUDA_GRAPHS", raising=False)
    assert RuntimeSettings().cuda_graphs is True  # training steps replay as CUDA graphs unless told not to
    monkeypatch.setenv("SPOTTUNE_CUDA_GRAPHS", "false")
    monkeypatch.setenv("SPOTTUNE_PROGRESS", "0")
    settings = RuntimeSettings()
    assert settings.cuda_graphs is False and settings.progress is False
