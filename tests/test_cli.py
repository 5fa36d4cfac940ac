import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lsuv_pipeline.cli import cli

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
        ["compute", "--data-root", str(data_root), "--out", str(out), "--limit", "600", "-q"],
    )
    assert result.exit_code == 0, result.output
    assert "conv4" in result.output and "std test" in result.output
    assert "5 layers solved in 5 passes" in result.output
    assert (out / "zarr.json").is_file()
