"""Cluster job definitions (workflows/): the SLURM batch script on a real SLURM, the cron
line that resubmits it, and the Kubernetes manifests against the CLI.

The tests marked ``slurm`` submit jobs with ``sbatch`` to the SLURM that ``.ci/slurm-up``
starts (one node, this machine); they are skipped only where ``sbatch`` is absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import zarr
from click.testing import CliRunner

import lsuv_pipeline
from lsuv_pipeline.cli import cli

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "workflows" / "slurm" / "lsuv.sbatch"
CRON = REPO / "workflows" / "slurm" / "cron"
SCRONTAB = REPO / "workflows" / "slurm" / "scrontab"
KUBERNETES = REPO / "workflows" / "kubernetes"
COMPUTE = cli.commands["compute"]

# A few thousand images, in the same shards inline and on the cluster.
LIMIT = "3000"
SHARDS = ["--shard-size", "500", "--batch-size", "250"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}  # fmt: skip


@pytest.fixture(scope="module")
def data_root(data_root) -> Path:
    """The datasets folder, absolute: the scripts and jobs run in other folders."""
    return data_root.resolve()


def compute_options() -> set[str]:
    """Every option string of ``lsuv-pipeline compute``, secondary ones included."""
    return {o for p in COMPUTE.params for o in (*p.opts, *p.secondary_opts)}


def assert_cli_accepts(argv: list[str]) -> None:
    """Check that ``argv`` is a ``lsuv-pipeline compute`` command line the CLI parses."""
    assert argv[:2] == ["lsuv-pipeline", "compute"], argv
    unknown = {a.split("=")[0] for a in argv[2:] if a.startswith("-")} - compute_options()
    assert not unknown, f"not options of lsuv-pipeline compute: {sorted(unknown)}"
    COMPUTE.make_context("compute", argv[2:])  # raises click.UsageError on a bad value


def job_env(**extra: str) -> dict[str, str]:
    """The environment a job needs to run this checkout's lsuv-pipeline and dask."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # The job imports the same package as this test, whatever the install.
    package_root = str(Path(lsuv_pipeline.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    if (Path(sys.prefix) / "bin" / "activate").is_file():
        env["LSUV_VENV"] = sys.prefix
    env.update(extra)
    return env


def run_script(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    return subprocess.run(
        ["bash", str(SBATCH), *args], env=env or job_env(), cwd=cwd,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


# ---- the batch script's own checks (no SLURM needed) -------------------------------------


def test_sbatch_script_runs_a_compute_command_the_cli_accepts(tmp_path, data_root):
    result = run_script(
        "--check", f"LSUV_DATA_ROOT={data_root}", f"LSUV_LIMIT={LIMIT}",
        f"LSUV_OUT={tmp_path / 'run.zarr'}", "--", *SHARDS, "--no-verify", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout.strip().splitlines()[-1])
    assert_cli_accepts(argv)
    ctx = COMPUTE.make_context("compute", argv[2:])
    assert ctx.params["limit"] == int(LIMIT)
    assert ctx.params["data_root"] == str(data_root)
    assert ctx.params["scheduler_file"].endswith("scheduler.json")
    assert ctx.params["overwrite"] and ctx.params["quiet"] and not ctx.params["verify"]
    assert ctx.params["shard_size"] == 500


@pytest.mark.parametrize(
    ("param", "message"),
    [
        ("LSUV_DEVICE=tpu", "LSUV_DEVICE='tpu' is not cpu, cuda or auto"),
        ("LSUV_LIMIT=3k", "LSUV_LIMIT='3k' is not a positive integer"),
        ("LSUV_DATA_ROOT=/nonexistent/data", "LSUV_DATA_ROOT=/nonexistent/data is not a directory"),
        ("LSUV_OUT={file}", "exists and is not a folder"),
        ("LSUV_MODE=paper", "LSUV_MODE='paper' is not tensor or channel"),
        ("LSUV_EXTRA_ARGS=--frobnicate", "'--frobnicate' is not an option of lsuv-pipeline"),
        ("LSUV_EXTRA_ARGS=--workers 4", "--workers: this job runs its own dask cluster"),
        ("LSUV_EXTRA_ARGS=--limit 5", "set LSUV_LIMIT instead of passing --limit"),
        ("LSUV_VENV=/nonexistent", "LSUV_VENV=/nonexistent is not a virtualenv"),
        ("LIMIT=5", "unknown argument 'LIMIT=5'"),
    ],
)
def test_sbatch_script_refuses_a_bad_parameter_in_one_line(tmp_path, data_root, param, message):
    file = tmp_path / "not-a-store"
    file.write_text("")
    result = run_script(
        "--check", f"LSUV_DATA_ROOT={data_root}", param.format(file=file), cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.startswith("lsuv: error: "), result.stderr
    assert message in result.stderr
    assert result.stderr.count("\n") == 1


def test_sbatch_script_outside_a_job_says_to_submit_it(tmp_path):
    env = {k: v for k, v in job_env().items() if not k.startswith("SLURM_")}
    result = run_script(env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "not inside a SLURM job: submit it with sbatch" in result.stderr


def test_recurring_entries_call_the_batch_script():
    cron_line = cron_entry()[1]
    assert "flock -n" in cron_line and "sbatch --wait" in cron_line and "$LSUV_SCRIPT" in cron_line
    assert cron_entry()[0]["LSUV_SCRIPT"].endswith("workflows/slurm/lsuv.sbatch")
    lines = SCRONTAB.read_text().splitlines()
    entries = [line for line in lines if line and not line.startswith("#")]
    assert len(entries) == 1 and entries[0].split(maxsplit=5)[5].startswith("bash ")
    assert "workflows/slurm/lsuv.sbatch" in entries[0]
    scron = " ".join(line[len("#SCRON") :] for line in lines if line.startswith("#SCRON"))
    for option in ("--nodes", "--ntasks-per-node", "--time", "--chdir", "--output"):
        assert option in scron  # #SBATCH lines are not read for a scrontab entry


# ---- Kubernetes ---------------------------------------------------------------------------


def kubernetes_docs() -> dict[str, list[dict]]:
    files = sorted(KUBERNETES.rglob("*.yaml"))
    assert files
    return {str(f.relative_to(KUBERNETES)): list(yaml.safe_load_all(f.read_text())) for f in files}


def test_kubernetes_manifests_parse_and_the_kustomization_lists_them():
    docs = kubernetes_docs()
    for name, objects in docs.items():
        for obj in objects:
            assert obj.get("apiVersion") and obj.get("kind"), name
    kustomization = docs["kustomization.yaml"][0]
    assert sorted(kustomization["resources"]) == sorted(
        n for n in docs if n != "kustomization.yaml"
    )
    kinds = {o["kind"]: o for objects in docs.values() for o in objects}
    cronjob = kinds["CronJob"]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    pvcs = {o["metadata"]["name"] for objects in docs.values() for o in objects
            if o["kind"] == "PersistentVolumeClaim"}  # fmt: skip
    assert claims <= pvcs
    container = pod["containers"][0]
    assert container["image"] in {i["name"] for i in kustomization["images"]}
    generated = {g["name"] for g in kustomization["configMapGenerator"]}
    assert {e["configMapRef"]["name"] for e in container["envFrom"]} <= generated


def kubernetes_params() -> dict[str, str]:
    kustomization = kubernetes_docs()["kustomization.yaml"][0]
    (params,) = kustomization["configMapGenerator"]
    return dict(literal.split("=", 1) for literal in params["literals"])


@pytest.mark.parametrize(
    "override",
    [{}, {"LSUV_LIMIT": "3000", "LSUV_SCHEDULER": "tcp://dask:8786", "LSUV_OVERWRITE": "0",
          "LSUV_DEVICE": "cpu", "LSUV_EXTRA_ARGS": "--scheduler-timeout 300 --seed 1"}],
    ids=["inline-gpu", "dask"],
)  # fmt: skip
def test_kubernetes_cronjob_runs_a_compute_command_the_cli_accepts(tmp_path, override):
    """Run the container's command with a stub lsuv-pipeline that prints its arguments."""
    (cronjob,) = (o for objects in kubernetes_docs().values() for o in objects
                  if o["kind"] == "CronJob")  # fmt: skip
    container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    stub = tmp_path / "lsuv-pipeline"
    stub.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    stub.chmod(0o755)
    env = {**kubernetes_params(), **override, "PATH": f"{tmp_path}:/usr/bin:/bin"}
    env.update({e["name"]: e["value"] for e in container.get("env", [])})
    result = subprocess.run(
        [*container["command"], *container["args"]], env=env, capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    argv = ["lsuv-pipeline", *json.loads(result.stdout)]
    assert_cli_accepts(argv)
    params = COMPUTE.make_context("compute", argv[2:]).params
    assert params["out"] == env["LSUV_OUT"] and params["data_root"] == env["LSUV_DATA_ROOT"]
    assert params["scheduler"] == (env["LSUV_SCHEDULER"] or None)
    assert params["limit"] == (int(env["LSUV_LIMIT"]) if env["LSUV_LIMIT"] else None)
    assert params["overwrite"] == (env["LSUV_OVERWRITE"] == "1")


# ---- on a real SLURM ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch not found: SLURM is not installed here (.ci/slurm-up sets one up)")
    ping = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    assert ping.returncode == 0 and ping.stdout.strip(), f"SLURM does not answer: {ping.stderr}"


def run_job(cwd: Path, *args: str, env: dict[str, str], timeout: float = 900):
    """Submit the batch script and wait for it to end (``sbatch --wait``: no polling).

    ``args`` are sbatch options (--...), then its parameters. Returns the job id, its final
    state and exit code ("status:signal").
    """
    options = [a for a in args if a.startswith("--")]
    params = [a for a in args if not a.startswith("--")]
    try:
        result = subprocess.run(
            ["sbatch", "--parsable", "--wait", f"--chdir={cwd}", *options, str(SBATCH), *params],
            env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        job = (exc.stdout or b"").decode().strip().split(";")[0]
        subprocess.run(["scancel", job])
        pytest.fail(f"job {job} did not end in {timeout:g} s")
    job = result.stdout.strip().split(";")[0]
    assert job.isdigit(), result.stderr
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True,
                         text=True).stdout  # fmt: skip
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    assert fields.get("JobState") in FINAL_STATES, out
    return job, fields["JobState"], fields["ExitCode"]


def files_of(store: Path) -> dict[str, str]:
    """sha256 of every file of a store, less the writer's lock file."""
    return {
        str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(store.rglob("*"))
        if p.is_file() and p.name != ".writer.lock"
    }


def arrays(path: Path) -> dict[str, bytes]:
    out = {}

    def walk(group, prefix):
        for name, member in group.members():
            if isinstance(member, zarr.Array):
                out[prefix + name] = member[...].tobytes()
            else:
                walk(member, f"{prefix}{name}/")

    walk(zarr.open_group(str(path), mode="r"), "")
    return out


def cron_entry() -> tuple[dict[str, str], str]:
    """The variables and the command of the cron file's one entry."""
    variables, commands = {}, []
    for line in CRON.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if m := re.fullmatch(r"([A-Z_]+)=(.*)", line):
            variables[m[1]] = m[2]
        else:
            commands.append(line.split(maxsplit=5)[5])
    assert len(commands) == 1
    return variables, commands[0]


@pytest.fixture(scope="module")
def inline(tmp_path_factory, data_root) -> Path:
    """The store an inline run writes with the jobs' options."""
    out = tmp_path_factory.mktemp("inline") / "run.zarr"
    result = CliRunner().invoke(
        cli,
        ["compute", "--data-root", str(data_root), "--out", str(out), "--limit", LIMIT,
         *SHARDS, "--device", "cpu", "-q"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def assert_same_arrays(out: Path, inline: Path) -> None:
    assert lsuv_pipeline.open_run(out).status == "complete"
    left, right = arrays(out), arrays(inline)
    assert sorted(left) == sorted(right)
    for key, value in left.items():
        assert value == right[key], key


def small_job_env() -> dict[str, str]:
    """Small resources, so that the job fits any CI machine (SBATCH_* override #SBATCH)."""
    return job_env(SBATCH_TIMELIMIT="15", SBATCH_MEM_PER_CPU="1G")


def small_job_params(data_root: Path, out: Path) -> list[str]:
    return [f"LSUV_DATA_ROOT={data_root}", f"LSUV_OUT={out}", f"LSUV_LIMIT={LIMIT}",
            "LSUV_DEVICE=cpu", f"LSUV_EXTRA_ARGS={' '.join(SHARDS)}"]  # fmt: skip


@pytest.mark.slurm
def test_slurm_job_writes_the_inline_store_and_the_cron_rerun_finds_it_up_to_date(
    slurm, tmp_path, data_root, inline
):
    out = tmp_path / "job.zarr"
    env = small_job_env()
    job, state, code = run_job(tmp_path, *small_job_params(data_root, out), env=env)
    log = (tmp_path / f"lsuv-{job}.log").read_text()
    assert (state, code) == ("COMPLETED", "0:0"), log
    assert "on 1 node(s)" in log and "1 scheduler, 2 cpu worker(s)" in log
    assert_same_arrays(out, inline)
    assert not (tmp_path / ".lsuv-dask" / job).exists()  # a successful job cleans up

    # The cron entry, as cron would run it (its variables pointed at this test's files).
    before = files_of(out)
    variables, command = cron_entry()
    ours = {"LSUV_WORKDIR": str(tmp_path), "LSUV_SCRIPT": str(SBATCH), "LSUV_OUT": str(out),
            "LSUV_DATA_ROOT": str(data_root), "LSUV_VENV": env.get("LSUV_VENV", "")}  # fmt: skip
    assert set(ours) <= set(variables)
    cron_env = {**env, **{k: v for k, v in variables.items() if k != "MAILTO"}, **ours,
                "LSUV_LIMIT": LIMIT, "LSUV_DEVICE": "cpu",
                "LSUV_EXTRA_ARGS": " ".join(SHARDS)}  # fmt: skip
    rerun = subprocess.run(
        [variables.get("SHELL", "/bin/sh"), "-c", command], env=cron_env,
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert rerun.returncode == 0 and rerun.stdout == "", rerun.stdout + rerun.stderr
    (log,) = tmp_path.glob("lsuv-nightly-*.log")
    assert "is up to date (same config and dataset); nothing to compute" in log.read_text()
    assert files_of(out) == before


@pytest.mark.slurm
def test_slurm_job_spans_nodes_by_changing_nodes_alone(slurm, tmp_path, data_root, inline):
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True)
    if len(set(nodes.stdout.split())) < 2:
        pytest.skip("needs a SLURM of 2 nodes or more (SLURM_CI_NODES=2 .ci/slurm-up)")
    out = tmp_path / "job.zarr"
    job, state, code = run_job(
        tmp_path, "--nodes=2", *small_job_params(data_root, out), env=small_job_env()
    )
    log = (tmp_path / f"lsuv-{job}.log").read_text()
    assert (state, code) == ("COMPLETED", "0:0"), log
    assert "on 2 node(s)" in log and "1 scheduler, 4 cpu worker(s)" in log
    assert_same_arrays(out, inline)


@pytest.mark.slurm
@pytest.mark.parametrize(
    ("param", "message"),
    [
        ("LSUV_DEVICE=tpu", "lsuv: error: LSUV_DEVICE='tpu' is not cpu, cuda or auto"),
        ("LSUV_DATA_ROOT={missing}", "lsuv: error: LSUV_DATA_ROOT={missing} is not a directory"),
    ],
)
def test_slurm_job_with_a_bad_parameter_fails_with_a_clear_message(
    slurm, tmp_path, data_root, param, message
):
    missing = tmp_path / "no-such-data"
    params = [f"LSUV_DATA_ROOT={data_root}", param.format(missing=missing)]
    env = job_env(SBATCH_TIMELIMIT="5", SBATCH_MEM_PER_CPU="1G")
    job, state, code = run_job(tmp_path, *params, env=env, timeout=300)
    log = (tmp_path / f"lsuv-{job}.log").read_text()
    assert (state, code) == ("FAILED", "2:0"), log
    assert message.format(missing=missing) in log
    assert not (tmp_path / ".lsuv-dask").exists()  # no cluster was started
