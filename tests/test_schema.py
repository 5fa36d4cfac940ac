"""The store's schema: names, root attributes checked on open, a run's identity."""

import re
from pathlib import Path

import pytest

from lsuv_pipeline import RunConfig
from lsuv_pipeline.errors import StoreError
from lsuv_pipeline.schema import (
    Section,
    check_root,
    differences,
    identity,
    layer_key,
    layer_pass_id,
    root_attrs,
    stored_identity,
)

MODEL = {
    "class": "m.Net",
    "structure": "sha256:" + "a" * 64,
    "initial": "sha256:" + "b" * 64,
    "source": "caller",
}
LAYER = {"name": "conv1", "kind": "Conv2d", "calls": 1, "dependent": False, "channels": 8}


def attrs(**change):
    a = root_attrs(
        config=RunConfig().to_dict(),
        dataset={"name": "mnist", "fingerprint": "sha256:d"},
        holdout=None,
        model=MODEL,
        layers=[LAYER],
        unsolved=[],
        tied=[],
        device="cpu",
        allow_tf32=False,
        numerics={"key": "sha256:n"},
    )
    return {**a, **change}


def test_names_of_layers_sections_and_passes():
    assert layer_key("") == "(model)" and layer_key("layer1.0.conv1") == "layer1.0.conv1"
    assert Section("verify", "test").path == "verify/test"
    assert layer_pass_id("", 2) == "layer/(model)/2"


def test_root_attributes_record_the_layer_keys_and_pass_the_schema_check():
    a = attrs()
    assert a["layers"] == [{**LAYER, "key": "conv1"}] and a["status"] == "running"
    assert "torch" in a["versions"]
    check_root(Path("x"), a)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"dataset": "x"}, "'dataset' is damaged (expected a JSON dict, got str)"),
        ({"layers": []}, "'layers' is damaged (expected a non-empty list"),
        ({"layers": [{"name": 3}]}, "'layers' is damaged (expected a list of layer records"),
        ({"status": "done"}, "'status' is damaged (expected 'running' or 'complete'"),
        ({"config": {"mode": "sideways"}}, "'config' is damaged (--mode must be one of"),
        ({"numerics": [1]}, "'numerics' is damaged (expected a JSON object or null"),
    ],
)
def test_a_damaged_root_attribute_is_named(change, message):
    with pytest.raises(StoreError, match=re.escape(message)):
        check_root(Path("x"), attrs(**change))


def test_identity_compares_config_data_and_model_digests_but_not_the_rest():
    wanted = identity(RunConfig(), "sha256:d", None, MODEL)
    assert differences(stored_identity(attrs()), wanted) == []
    other = {**MODEL, "initial": "sha256:" + "c" * 64, "source": "built"}
    diff = differences(
        stored_identity(attrs()), identity(RunConfig(mode="channel"), "sha256:e", None, other)
    )
    assert diff == [
        "--mode: 'tensor' -> 'channel'",
        "dataset fingerprint: sha256:d -> sha256:e",
        "model initial state: sha256:bbbbbbbbbbbb -> sha256:cccccccccccc (other initial "
        "weights: another seed or init)",
    ]


@pytest.mark.parametrize(
    "made_with",
    [{"sample": 300}, {"compile": True}],
    ids=["sample", "compile"],
)
def test_a_store_of_an_option_left_out_now_is_another_run(tmp_path, data_root, made_with):
    # an option at its default is not written into the config, so the stored config has a
    # key the wanted one lacks: that is a difference too, not an up-to-date store
    from lsuv_pipeline import compute

    base = dict(limit=600, shard_size=300, batch_size=100, holdout=None, verify=False)
    out = tmp_path / "r.zarr"
    compute(RunConfig(**base, **made_with), out, data_root=data_root, device="cpu")
    (option,) = made_with
    with pytest.raises(StoreError, match=f"--{option}"):
        compute(RunConfig(**base), out, data_root=data_root, device="cpu")
