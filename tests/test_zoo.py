"""The model zoo's quick mode runs in-process and fills every column it promises.

Timings are not asserted; what is: each model gets a record, solved never exceeds total and
the rest is named with a reason, the float64 check's figures are numbers and put a solved
float32 CNN at std 1, and a model the run fails on (or one too large) is recorded, not raised.
"""

from __future__ import annotations

import math

import pytest
from benchmarks import zoo
from torch import nn

from tests.test_benchmarks import number, tables

SAMPLES = 64
COLUMNS = ["model", "params (M)", "input", "solved / total", "max abs(mean) f64",
           "max abs(std−1) f64", "s", "status", "left (by reason)"]  # fmt: skip


class ZeroConv(nn.Module):
    """A conv whose weight is all zero: the run has no layer left to solve and says so."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        nn.init.zeros_(self.conv.weight)

    def forward(self, x):
        return self.conv(x)


BROKEN = zoo.Entry(name="zero-conv", build=lambda c, s: ZeroConv())
HUGE = zoo.Entry(name="huge", build=lambda c, s: None, count=lambda: zoo.MAX_PARAMS + 1)


@pytest.fixture(scope="module")
def raw(data_root) -> dict:
    names = [*zoo.QUICK, BROKEN.name, HUGE.name]
    return zoo.sweep(names, data_root, SAMPLES, extra=[BROKEN, HUGE])


def records(raw) -> dict[str, dict]:
    return {m["name"]: m for m in raw["models"]}


def test_every_model_gets_a_record_and_a_large_one_is_skipped_with_its_size(raw):
    assert list(records(raw)) == [*zoo.QUICK, BROKEN.name]
    assert raw["skipped"] == [{"name": "huge", "params": zoo.MAX_PARAMS + 1}]


def test_a_model_the_run_fails_on_is_recorded_with_its_error_not_raised(raw):
    broken = records(raw)[BROKEN.name]
    assert broken["status"] == "failed"
    assert broken["error"].startswith("ConfigError: no layer is left to solve"), broken["error"]
    assert "\n" not in broken["error"]


def test_solved_is_at_most_total_and_every_other_weight_module_is_named(raw):
    for m in raw["models"]:
        if m["status"] == "failed":
            continue
        assert 0 < m["solved"] <= m["total"], m["name"]
        left = [n for names in m["left"].values() for n in names]
        assert len(left) == len(set(left)) == m["total"] - m["solved"], m["name"]
        assert all(m["left"]), m["name"]  # every reason is a non-empty string


def test_the_float64_check_puts_a_solved_float32_cnn_at_mean_0_std_1(raw):
    for name in ("mj", "resnet18"):
        m = records(raw)[name]
        assert m["status"] == "ok", m["error"]
        assert m["input"] == "1x32x32"
        assert len(m["layers"]) == m["solved"]
        for layer in m["layers"].values():
            assert math.isfinite(layer["mean"]) and math.isfinite(layer["std"]), layer
        assert m["max_abs_std_dev"] < 1e-4, m
        assert m["max_abs_mean"] < 1e-4, m


def test_the_table_has_a_row_per_model_with_every_column(raw):
    text = zoo.render(raw)
    rows = next(t for t in tables(text) if t and "solved / total" in t[0])
    assert list(rows[0]) == COLUMNS
    assert [r["model"].strip("`") for r in rows] == [m["name"] for m in raw["models"]]
    for r, m in zip(rows, raw["models"], strict=True):
        assert r["status"].startswith(m["status"])
        number(r["s"])
        if m["status"] == "failed":
            assert m["error"].split(":")[0] in r["status"]
            continue
        solved, total = (int(v) for v in r["solved / total"].split(" / "))
        assert solved <= total
        assert number(r["max abs(std−1) f64"]) == pytest.approx(m["max_abs_std_dev"], rel=0.01)
        number(r["max abs(mean) f64"])
        number(r["params (M)"])
    assert "Totals: 5 models run" in text and "`huge` (150.0M)" in text
