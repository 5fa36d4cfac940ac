"""The README's commands are what CI runs."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```sh\n(.+?)\n```", (REPO / "README.md").read_text())


def test_ci_runs_exactly_the_readme_test_command():
    commands = readme_commands()
    test_command = next(c for c in commands if "pytest" in c)
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def test_readme_main_command_runs_the_main_job():
    main = next(c for c in readme_commands() if "compute" in c)
    assert main.endswith("lsuv-pipeline compute --dataset mnist")
