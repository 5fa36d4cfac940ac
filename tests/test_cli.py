import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lsuv_pipeline.cli import CLOSED_PIPE, cli

COMMANDS = [name for name in cli.commands]


def run(*args, env=None):
    """Run the installed console script, as a user would."""
    script = Path(sys.executable).with_name("lsuv-pipeline")
    return subprocess.run(
        [str(script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize("command", [[], *[[c] for c in COMMANDS]])
def test_help_for_every_command(command):
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def one_line_error(result, *needles):
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert code in (1, 2)  # 2: usage error (click convention), 1: anything else
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--mode", "sideways"], ["--mode", "sideways"]),
        (["--batch-size", "0"], ["--batch-size"]),
        (["--target-std", "-1"], ["--target-std"]),
        (["--limit", "many"], ["--limit"]),
        (["--dataset", "mnits"], ["unknown dataset 'mnits'"]),
        (["--device", "tpu"], ["--device", "tpu"]),
        (["--bogus"], ["--bogus"]),
    ],
)
def test_bad_option_values_are_one_line_errors(tmp_path, data_root, args, needles):
    result = CliRunner().invoke(
        cli, ["compute", "--data-root", str(data_root), "--out", str(tmp_path / "r.zarr"), *args]
    )
    one_line_error(result, *needles)
    assert not (tmp_path / "r.zarr").exists()


def test_missing_data_root_is_a_one_line_error_from_the_installed_command(tmp_path):
    result = run("compute", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"))
    one_line_error(result, "nowhere", "--data-root")


def test_data_root_without_the_dataset_is_a_one_line_error(tmp_path):
    result = run(
        "compute", "--data-root", str(tmp_path), "--no-download", "--out", str(tmp_path / "r")
    )
    one_line_error(result, "mnist not found")


def test_compute_prints_the_table_and_writes_the_store(tmp_path, data_root):
    out = tmp_path / "r.zarr"
    result = CliRunner().invoke(
        cli,
        ["compute", "--data-root", str(data_root), "--out", str(out), "--limit", "600"],
    )
    assert result.exit_code == 0, result.output
    assert "conv4" in result.stdout and "std test" in result.stdout
    assert "5 layers solved in 5 passes" in result.stderr
    assert (out / "zarr.json").is_file()


# -- exit statuses, streams and JSON --------------------------------------------------

SMALL = ["--limit", "600", "--shard-size", "300", "--batch-size", "150", "--device", "cpu"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("cli") / "r.zarr"
    result = CliRunner().invoke(
        cli, ["compute", "--data-root", str(data_root), "--out", str(out), *SMALL, "-q"]
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(
    "args,code",
    [
        (["--dataset", "mnits"], 2),  # unknown name: a usage mistake, like Click's own
        (["--split", "validation"], 2),
        (["--model", "resnet1800"], 2),
        (["--model", "no_such_package.module:factory"], 1),  # a module that fails to import
        (["--mode", "sideways"], 2),
        (["--data-root", "/nonexistent/data"], 1),  # missing data: the job is broken
    ],
)
def test_exit_status_tells_a_usage_mistake_from_a_broken_job(tmp_path, data_root, args, code):
    argv = ["compute", "--data-root", str(data_root), "--out", str(tmp_path / "r.zarr"), *args]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == code, result.output
    one_line_error(result)


def test_a_bare_command_prints_its_help_not_an_error():
    result = run()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: lsuv-pipeline") and "compute" in result.stdout
    assert "Error" not in result.stdout + result.stderr


def test_results_go_to_stdout_and_notes_to_stderr(tmp_path, data_root, small_run):
    result = CliRunner().invoke(
        cli, ["compute", "--data-root", str(data_root), "--out", str(small_run), *SMALL]
    )
    assert result.exit_code == 0
    assert "is up to date" in result.stderr and "is up to date" not in result.stdout
    assert result.stdout.startswith("layer ")  # the table, and nothing else
    out = tmp_path / "new.zarr"
    result = CliRunner().invoke(
        cli, ["compute", "--data-root", str(data_root), "--out", str(out), *SMALL]
    )
    assert "wrote" in result.stderr and "wrote" not in result.stdout
    assert result.stdout.startswith("layer ")


def test_quiet_silences_the_notes_of_every_command(tmp_path, small_run):
    for argv in (["show", str(small_run), "-q", "--plot", str(tmp_path / "p.png")],
                 ["export", str(small_run), "-q", "--out", str(tmp_path / "w.pt")]):  # fmt: skip
        result = CliRunner().invoke(cli, argv)
        assert result.exit_code == 0, result.output
        assert result.stderr == "", (argv, result.stderr)
    assert (tmp_path / "p.png").is_file() and (tmp_path / "w.pt").is_file()


def test_show_writes_its_plot_even_when_stdout_closes_early(tmp_path, small_run):
    script = Path(sys.executable).with_name("lsuv-pipeline")
    png = tmp_path / "x.png"
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line, as after ``| head -0``
    proc = subprocess.run([str(script), "show", str(small_run), "--plot", str(png)],
                          stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)  # fmt: skip
    os.close(write)
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert proc.returncode == CLOSED_PIPE, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert "Exception ignored" not in proc.stderr, proc.stderr


JSON_KEYS = {"schema", "command", "run", "status", "config", "dataset", "holdout", "model",
             "numerics", "verification", "on_target", "layers"}  # fmt: skip
LAYER_KEYS = {"name", "kind", "solved", "reason", "has_bias", "passes", "converged",
              "residual", "before", "after", "flags"}  # fmt: skip


def check_document(doc, command):
    assert set(doc) >= JSON_KEYS and doc["command"] == command
    assert doc["schema"] == "lsuv-pipeline.report/1"
    assert [layer["name"] for layer in doc["layers"]] == ["conv1", "conv2", "conv3", "conv4", "l1"]
    for layer in doc["layers"]:
        assert set(layer) >= LAYER_KEYS, set(layer) ^ LAYER_KEYS
        for m in layer["after"].values():
            assert {"count", "mean", "std", "residual_mean", "residual_std", "on_target"} <= set(m)
            assert isinstance(m["std"], float) and m["count"] > 0
    return doc


def test_json_is_one_document_on_stdout(tmp_path, data_root, small_run):
    import json

    result = CliRunner().invoke(cli, ["show", str(small_run), "--json"])
    assert result.exit_code == 0, result.output
    doc = check_document(json.loads(result.stdout), "show")
    assert doc["status"] == "complete" and doc["on_target"] is True
    l1 = doc["layers"][-1]
    assert abs(l1["after"]["train"]["std"] - 1) < 1e-4 and l1["after"]["train"]["on_target"]
    assert l1["after"]["test"]["on_target"] is None  # held out: reported, not judged
    assert doc["config"]["limit"] == 600 and doc["dataset"]["count"] == 600

    result = CliRunner().invoke(
        cli, ["compute", "--data-root", str(data_root), "--out", str(small_run), *SMALL, "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = check_document(json.loads(result.stdout), "compute")
    assert doc["outcome"]["up_to_date"] is True

    result = CliRunner().invoke(
        cli, ["verify", str(small_run), "--data-root", str(data_root), "--json", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    doc = check_document(json.loads(result.stdout), "verify")
    assert doc["verify"] == {"split": "train", "tol": 1e-4, "failures": []}
    assert all(set(layer["after"]) == {"train"} for layer in doc["layers"])

    out = tmp_path / "off.zarr"
    result = CliRunner().invoke(
        cli, ["compute", "--data-root", str(data_root), "--out", str(out), *SMALL, "--json",
              "--tol", "1e-30"],
    )  # fmt: skip
    assert result.exit_code == 3, result.output
    doc = check_document(json.loads(result.stdout), "compute")
    assert doc["on_target"] is False and doc["verification"]["off_target"]
