"""From options to live objects: devices, models and their provenance, the caller's RNG."""

import random

import numpy as np
import pytest
import torch

from lsuv_pipeline import RunConfig
from lsuv_pipeline.context import keeps_callers_rng, model_for, recorded_config, resolve_device
from lsuv_pipeline.data import DatasetSpec, open_source
from lsuv_pipeline.errors import ConfigError, ModelError


@pytest.mark.parametrize(
    "device,message",
    [("tpu", "unknown --device 'tpu'"), ("cuda:7", "cuda")],
)
def test_a_device_that_cannot_be_used_is_a_config_error(device, message):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(ConfigError, match=message):
        resolve_device(device)
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_built_model_is_recorded_with_its_name_and_seed_a_given_one_as_given(data_root):
    src = open_source(DatasetSpec(name="mnist", root=str(data_root), limit=4))
    built, made = model_for(RunConfig(seed=3), None, src)
    assert made["source"] == "built" and made["name"] == "mj" and made["seed"] == 3
    again, _ = model_for(RunConfig(seed=3), None, src)
    assert all(
        torch.equal(a, b)
        for a, b in zip(built.state_dict().values(), again.state_dict().values(), strict=True)
    )
    mine = torch.nn.Linear(2, 2)
    model, given = model_for(RunConfig(), mine, src)
    assert model is mine and given["source"] == "caller" and "seed" not in given
    with pytest.raises(ModelError, match=r"must be a torch\.nn\.Module"):
        model_for(RunConfig(), "mj", src)
    assert recorded_config(RunConfig(seed=5), model_given=True).seed is None
    assert recorded_config(RunConfig(seed=5, orthogonal=True), model_given=True).seed == 5


def test_the_callers_random_states_are_restored_even_on_an_error():
    @keeps_callers_rng
    def draws():
        torch.rand(3), np.random.rand(3), random.random()
        raise ValueError("after drawing")

    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    with pytest.raises(ValueError):
        draws()
    assert torch.equal(states[0], torch.get_rng_state())
    assert np.array_equal(states[1], np.random.get_state()[1]) and states[2] == random.getstate()
