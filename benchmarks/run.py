"""Run every benchmark side by side; write RESULTS.md, results.json and PNG plots.

::

    python benchmarks/run.py --data-root ../shared/data            # full: about 50 min, 2 cores
    python benchmarks/run.py --data-root ../shared/data --quick    # about 2 minutes
    python benchmarks/run.py --data-root ../shared/data --section cost   # one section again

A full run writes into ``benchmarks/`` (the committed results); a quick run into
``benchmarks/quick/``, which git ignores, so a smoke test never overwrites the evidence.

Sections (one module each): 1 cost (``cost.py``), 2 init quality (``quality.py``),
3 training (``training.py``), 4 scaling (``scaling.py``). Every number in RESULTS.md,
the plain-language findings included, is computed from this run's measurements, which are
also written raw to ``results.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (str(REPO), str(REPO / "pipeline")):  # benchmark this checkout's package
    if _path not in sys.path:
        sys.path.insert(0, _path)

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import click  # noqa: E402

from benchmarks import cost, quality, scaling, training  # noqa: E402
from benchmarks.common import DATA_ROOT, Settings, load_average, log, machine, table  # noqa: E402

SECTIONS = {"cost": cost, "quality": quality, "training": training, "scaling": scaling}
#: Where the evidence at the paper's scale is (separate scripts, their own reports).
DEEPER = (
    "Deep thin plain networks (depth 11 and 19) trained from every init: [deep.md](deep.md) "
    "(`benchmarks/deep.py`). How many samples a solve needs, per layer, for mj, resnet18 "
    "and a small ViT: [samples.md](samples.md) (`benchmarks/samples.py`). The floor of a "
    "solve, before and after, eager and `--compile`: [floor.md](floor.md) "
    "(`benchmarks/floor.py`); in the command's own process, whose helper thread faults new "
    "memory in: [floor-command.md](floor-command.md) (`benchmarks/floor.py --section "
    "command`)."
)


def _require() -> None:
    """Fail early, with the fix, when a comparison's package is missing."""
    missing = []
    for module, dist in (("lsuv", "lsuv==0.3.0"), ("matplotlib", "matplotlib")):
        try:
            __import__(module)
        except ImportError:
            missing.append(dist)
    if missing:
        raise click.ClickException(
            f"the benchmarks need {', '.join(missing)}: pip install {' '.join(missing)}"
        )


def run(settings: Settings, only: tuple[str, ...] = ()) -> Path:
    """Measure every section (or ``only`` these), record the raw numbers, write the report.

    With ``only``, the other sections' numbers are taken from the ``results.json`` already
    in ``settings.out``, which must come from a run with the same settings.
    """
    settings.out.mkdir(parents=True, exist_ok=True)
    raw = {"machine": machine(settings), "settings": settings.record(), "seconds": {}}
    if only:
        raw = _previous(settings, only, raw)
    now = f"{raw['machine']['date (UTC)']}, commit {raw['machine']['commit']}"
    for name, module in SECTIONS.items():
        if only and name not in only:
            continue
        t = time.perf_counter()
        log(f"section {name}")
        raw[name] = module.measure(settings)
        raw["seconds"][name] = time.perf_counter() - t
        raw.setdefault("measured", {})[name] = now
    raw["seconds"]["total"] = sum(raw["seconds"].get(n, 0.0) for n in SECTIONS)
    raw["machine"]["load average at end (1, 5, 15 min)"] = load_average()
    (settings.out / "results.json").write_text(json.dumps(raw, indent=1))
    path = write(raw, settings)
    log(f"wrote {path} in {raw['seconds']['total'] / 60:.1f} min")
    return path


def _previous(settings: Settings, only: tuple[str, ...], raw: dict) -> dict:
    """The sections not in ``only``, from the results.json in ``settings.out``."""
    path = settings.out / "results.json"
    if not path.is_file():
        raise click.ClickException(f"--section needs the other sections' {path}; none there")
    old = json.loads(path.read_text())
    if old["settings"] != json.loads(json.dumps(settings.record())):
        raise click.ClickException(f"{path} was measured with other settings: {old['settings']}")
    kept = [n for n in SECTIONS if n not in only]
    raw.update({n: old[n] for n in kept})
    raw["seconds"] = {n: old["seconds"][n] for n in kept}
    # when and at which commit each kept section was measured (its own run, however old)
    default = f"{old['machine']['date (UTC)']}, commit {old['machine']['commit']}"
    raw["measured"] = {n: old.get("measured", {}).get(n, default) for n in kept}
    raw["machine"]["kept from an earlier run"] = "; ".join(
        f"{n}: {raw['measured'][n]}" for n in kept
    )
    return raw


def write(raw: dict, settings: Settings) -> Path:
    """Write RESULTS.md and the plots into ``settings.out`` from the raw numbers."""
    parts = [
        _head(settings, raw["machine"], raw["seconds"]),
        *(SECTIONS[n].render(raw[n], settings, settings.out) for n in SECTIONS),
    ]
    path = settings.out / "RESULTS.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path


def rerender(results: Path, out: Path | None) -> Path:
    """Rewrite RESULTS.md and the plots from a results.json, measuring nothing."""
    raw = json.loads(results.read_text())
    record = {k: tuple(v) if isinstance(v, list) else v for k, v in raw["settings"].items()}
    out = (out or results.parent).resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings(data_root=Path(), out=out, work=Path(), **record)
    return write(raw, settings)


def _command(settings: Settings) -> str:
    """The command line that reproduces this run's settings (paths left out)."""
    flags = ["--quick"] if settings.quick else []
    defaults = Settings.make(quick=settings.quick, data_root=Path(), out=Path(), work=Path())
    for name in ("limit", "repeats", "threads", "jobs"):
        if getattr(settings, name) != getattr(defaults, name):
            flags.append(f"--{name} {getattr(settings, name)}")
    if settings.seeds != defaults.seeds:
        flags.append(f"--seeds {len(settings.seeds)}")
    return " ".join(["python benchmarks/run.py", *flags])


def _head(settings: Settings, info: dict, seconds: dict) -> str:
    if settings.quick:
        mode = "quick mode: a smoke test on small subsets, one repeat; not the evidence"
    else:
        mode = "full mode"
    limit = "whole splits" if settings.limit is None else f"first {settings.limit} per split"
    rows = [[k, v] for k, v in info.items()]
    rows.append(["samples", limit])
    rows.append(["wall time", ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())])
    return "\n".join(
        [
            "# Benchmarks: cost, init quality, training, scaling",
            "",
            f"Written by `{_command(settings)}` ({mode}). Every number and every sentence of "
            "findings below is computed from this run's measurements (raw values in "
            "`results.json`). The machine is shared and its timings noisy: times are "
            "reported as ratios of runs made side by side, medians over repeats.",
            "",
            DEEPER,
            "",
            table(["machine", ""], rows, right=2),
        ]
    )


@click.command()
@click.option("--quick", is_flag=True, help="Small subsets and one repeat: a smoke test.")
@DATA_ROOT
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    show_default="benchmarks/; with --quick benchmarks/quick/, git-ignored",
    help="Where RESULTS.md, results.json and the plots go.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=256),
    help="Samples per split [default: all; 4096 with --quick].",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    help="Timed runs per measurement [default: 3; 1 with --quick].",
)
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    help="Training seeds 0..N-1 [default: 3; 1 with --quick].",
)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Torch threads per process.")  # fmt: skip
@click.option("--jobs", type=click.IntRange(min=1), default=2, show_default=True,
              help="Training runs in parallel.")  # fmt: skip
@click.option(
    "--render",
    "render_from",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Measure nothing: rewrite RESULTS.md and the plots from this results.json "
    "(into its folder, or --out).",
)
@click.option(
    "--section",
    "sections",
    multiple=True,
    type=click.Choice(list(SECTIONS)),
    help="Measure only this section (repeatable); the others are kept from the "
    "results.json in --out, which must have the same settings.",
)
def main(quick, data_root, out, limit, repeats, seeds, threads, jobs, render_from, sections):
    """Measure cost, init quality, training and scaling; write RESULTS.md and plots."""
    _require()
    if render_from is not None:
        click.echo(rerender(render_from, out))
        return
    overrides = {"threads": threads, "jobs": jobs}
    if repeats is not None:
        overrides["repeats"] = repeats
    if seeds is not None:
        overrides["seeds"] = tuple(range(seeds))
    with tempfile.TemporaryDirectory(prefix="lsuv-bench-") as work:
        settings = Settings.make(
            quick=quick,
            limit=limit,
            data_root=data_root.resolve(),
            out=(out or REPO / "benchmarks" / ("quick" if quick else "")).resolve(),
            work=Path(work),
            **overrides,
        )
        path = run(settings, tuple(sections))
    click.echo(path)


if __name__ == "__main__":
    main()
