"""The run's configuration: checked when made, round trips through the store's JSON."""

import json
import re

import pytest

from lsuv_pipeline import RunConfig
from lsuv_pipeline.errors import ConfigError


def test_a_config_round_trips_through_json_and_compares_equal():
    cfg = RunConfig(dataset="fashion-mnist", include=("conv",), dataset_options={"resize": 32})
    back = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.include == ("conv",)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"mode": "sideways"}, "--mode must be one of tensor, channel"),
        ({"target_std": 0.0}, "--target-std must be a positive number"),
        ({"tol": float("nan")}, "--tol must be a positive number"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"limit": 0}, "--limit must be at least 1"),
        ({"include": ("(",)}, "--include '(' is not a regular expression"),
        ({"seed": 1.5}, "--seed must be an integer"),
        ({"model": 3}, "model must be a name"),
    ],
)
def test_bad_values_are_config_errors_naming_the_option(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig(**kwargs)


def test_from_dict_refuses_what_is_not_a_config():
    with pytest.raises(ConfigError, match="unknown config keys: colour"):
        RunConfig.from_dict({"colour": "red"})
    with pytest.raises(ConfigError, match="must be a mapping of options, got str"):
        RunConfig.from_dict("ops")


def test_differences_name_each_option():
    assert RunConfig().differences(RunConfig(mode="channel", limit=5)) == [
        "limit: None -> 5",
        "mode: 'tensor' -> 'channel'",
    ]
