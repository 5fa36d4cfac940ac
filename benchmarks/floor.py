"""The floor: mj on full MNIST, one thread, before and after, in units of a forward pass.

Side by side in one run, each measurement a fresh process (``probe.py``) that times its
method and then one plain no-grad forward pass over the same split; the ratio of the two is
the measurement. Two revisions of the package are measured: this checkout ("after") and
``--before`` (extracted with ``git archive`` into a temporary folder), each under glibc's
default allocator, as a user's process runs, and under the benchmarks' tuned one
(``common.MALLOC_ENV``), as ``cost.py`` runs. Methods take turns within a repeat, their
order rotating from one repeat to the next; tables give medians over the repeats.

* ``forward-moments``: one forward pass that reduces every layer's output to moments;
* ``ours-tensor``: the cached solve, verification off (``result.seconds``);
* ``ours-default``: the whole default ``compute`` (solve, verification of the training
  and test splits, writes), timed around the call, the data opened by name as the CLI
  opens it;
* ``forward-moments-compiled``, ``ours-compiled``: the same with ``--compile``, whose
  compile time is reported in its own column and not in the ratio.

    python benchmarks/floor.py [--quick] [--write] [--before REV]
    python benchmarks/floor.py --render   # floor.md again from floor.json, no measuring
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (str(REPO), str(REPO / "pipeline")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import io  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import click  # noqa: E402

from benchmarks.common import (  # noqa: E402
    DATA_ROOT,
    OUT,
    code_commit,
    cpu_model,
    load_average,
    log,
    median,
    run_probe,
    table,
)

#: The revision measured as "before" by default: main before the floor was lowered.
BEFORE = "6dae0ed"
FULL = {"limit": None, "repeats": 3}
QUICK = {"limit": 1024, "repeats": 1}
BATCH = 256

#: (revision, allocator, method) in the order of a repeat.
CASES = (
    ("before", "default", "forward-moments"),
    ("after", "default", "forward-moments"),
    ("after", "default", "forward-moments-compiled"),
    ("before", "default", "ours-tensor"),
    ("after", "default", "ours-tensor"),
    ("after", "default", "ours-compiled"),
    ("before", "default", "ours-default"),
    ("after", "default", "ours-default"),
    ("before", "tuned", "forward-moments"),
    ("after", "tuned", "forward-moments"),
    ("before", "tuned", "ours-tensor"),
    ("after", "tuned", "ours-tensor"),
)
#: ``--section command``: the command's own process (``allocator.tune``), before and after;
#: its before revision must have ``allocator.tune`` (from 2aff49e).
COMMAND_CASES = tuple(
    (rev, "command", method)
    for method in ("forward-moments", "ours-tensor", "ours-default")
    for rev in ("before", "after")
)
SECTIONS = {"main": ("floor", CASES), "command": ("floor-command", COMMAND_CASES)}
#: Allocator -> the title of its table.
ALLOCATORS = {
    "default": "glibc's default allocator (a user's process)",
    "tuned": "the benchmarks' tuned allocator (`common.MALLOC_ENV`)",
    "command": "the command's own process (`allocator.tune`: its malloc settings and the "
    "thread that faults new heap in)",
}

#: Method -> (what it is, the issue's target ratio).
TARGETS = {
    "forward-moments": ("forward + moments of every layer", 1.15),
    "forward-moments-compiled": ("the same, --compile", 1.15),
    "ours-tensor": ("cached solve, no verification", 1.3),
    "ours-compiled": ("the same, --compile", 1.3),
    "ours-default": ("whole default compute", 3.5),
}


def extract(rev: str, into: Path) -> Path:
    """The package of revision ``rev`` in ``into``; return its ``pipeline`` folder."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "pipeline"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "pipeline"


def measure(data_root: Path, sizes: dict, before: str, cases=CASES) -> dict:
    runs: dict[str, list[dict]] = {"|".join(c): [] for c in cases}
    with tempfile.TemporaryDirectory(prefix="lsuv-floor-") as tmp:
        work = Path(tmp)
        packages = {"before": extract(before, work / "before"), "after": None}
        spec = {"dataset": "mnist", "data_root": str(data_root), "limit": sizes["limit"],
                "batch_size": BATCH, "threads": 1, "work": str(work), "forward": True}  # fmt: skip
        for r in range(sizes["repeats"]):
            turn = r % len(cases)
            for case in cases[turn:] + cases[:turn]:
                rev, alloc, method = case
                log(f"floor: repeat {r + 1}/{sizes['repeats']}: {rev}, {alloc} malloc, {method}")
                extra = {"allocator": "command"} if alloc == "command" else {}
                out = run_probe({**spec, **extra, "method": method}, 1, packages[rev],
                                alloc == "tuned")  # fmt: skip
                runs["|".join(case)].append(out)
    return {"runs": runs}


def _ratio(runs: list[dict]) -> tuple[float, float, float]:
    ratios = [r["solve_s"] / r["forward_s"] for r in runs]
    return median(ratios), min(ratios), max(ratios)


def summary(raw: dict) -> dict[str, dict]:
    out = {}
    for key, runs in raw["runs"].items():
        ratio, low, high = _ratio(runs)
        out[key] = {
            "ratio": ratio,
            "low": low,
            "high": high,
            "solve_s": median([r["solve_s"] for r in runs]),
            "forward_s": median([r["forward_s"] for r in runs]),
            "compile_s": median([r.get("compile_s", 0.0) for r in runs]),
            "faults": median([r["thread_faults"] for r in runs])
            if "thread_faults" in runs[0]
            else None,
            "sys_s": median([r["sys_s"] for r in runs]) if "sys_s" in runs[0] else None,
            "runs": len(runs),
            "digests": sorted({r["digest"] for r in runs if "digest" in r}),
        }
    return out


def render(raw: dict) -> str:
    s = summary(raw)
    sizes = raw["sizes"]
    lines = [
        "# The floor: mj on full MNIST, one thread, before and after",
        "",
        f"`{raw['command']}`: the MNIST training split"
        + (f" (first {sizes['limit']})" if sizes["limit"] else " (60000 images)")
        + f", batches of {BATCH}, torch on 1 thread, each measurement a fresh process timing "
        "its method and then one plain no-grad forward pass over the split; ratios are "
        f"method / forward within a process, medians of {sizes['repeats']} interleaved "
        f"repeat(s). Before: revision `{raw['before']}`; after: commit {raw['commit']}.",
        "",
    ]
    for alloc, title in ALLOCATORS.items():
        rows = []
        methods = [m for m in TARGETS if f"after|{alloc}|{m}" in s]
        if not methods:
            continue
        for method in methods:
            what, target = TARGETS[method]
            base = "forward-moments" if method.startswith("forward") else method
            base = "ours-tensor" if method == "ours-compiled" else base
            b = s.get(f"before|{alloc}|{base}")
            a = s[f"after|{alloc}|{method}"]
            rows.append([
                method, what,
                f"{b['ratio']:.2f} ({b['low']:.2f}–{b['high']:.2f})" if b else "–",
                f"{a['ratio']:.2f} ({a['low']:.2f}–{a['high']:.2f})",
                f"≤ {target}", "yes" if a["ratio"] <= target else "no",
                f"{b['solve_s']:.1f}" if b else "–", f"{a['solve_s']:.1f}",
                f"{a['solve_s'] / b['solve_s']:.2f}" if b else "–",
                f"{b['forward_s']:.1f}, {a['forward_s']:.1f}" if b else f"{a['forward_s']:.1f}",
                f"{a['compile_s']:.1f}" if a["compile_s"] else "–",
            ])  # fmt: skip
            if alloc == "command":  # where the first touch of new memory went
                rows[-1] += [f"{b['faults']:,.0f}, {a['faults']:,.0f}" if b else "–",
                             f"{b['sys_s']:.1f}, {a['sys_s']:.1f}" if b else "–"]  # fmt: skip
        header = ["method", "what", "before / forward (range)", "after / forward (range)",
                  "target", "met", "before s", "after s", "after s / before s",
                  "forward s (before, after)", "compile s"]  # fmt: skip
        if alloc == "command":
            header += ["thread faults (before, after)", "system s (before, after)"]
        lines += [f"## {title[0].upper()}{title[1:]}", "", table(header, rows, right=2), ""]
    forwards = {a: [v["forward_s"] for k, v in s.items() if f"|{a}|" in k] for a in ALLOCATORS}
    spans = {a: f"{min(f):.1f}–{max(f):.1f} s" for a, f in forwards.items() if f}
    lines += [
        "Seconds are medians of the method's own runs; `after s / before s` compares the two "
        "revisions on the same method, which the reference forward does not enter."
    ]
    if "default" in spans:
        lines[-1] += (
            " Under glibc's default allocator the reference forward, run after the method in "
            f"the same process, took {spans['default']} (medians per method): it is faster "
            "after a cached solve, which leaves glibc's thresholds raised and its heap warm, "
            "than after a forward-moments pass, so ratios there compare before with after, "
            "not one method with another."
        )
    for alloc, what in (("tuned", "the tuned allocator"), ("command", "the command's own")):
        if alloc in spans:
            lines[-1] += f" Under {what} it took {spans[alloc]}."
    if "command" in spans:
        lines[-1] += (
            " Faults are those the computing thread took itself during the method, system "
            "seconds the whole process's then (medians)."
        )
    lines.append("")
    alloc = next(a for a in ALLOCATORS if spans.get(a))
    same = [
        m
        for m in ("ours-tensor", "ours-default")
        if f"before|{alloc}|{m}" in s
        and len(set(s[f"before|{alloc}|{m}"]["digests"] + s[f"after|{alloc}|{m}"]["digests"])) == 1
    ]
    lines += [
        "Stores: "
        + (
            f"before and after wrote byte-identical stores for {', '.join(same)}"
            if same
            else "before and after stores differ"
        )
        + (
            "; the compiled solve's store is its own (other bits, the same statistics to "
            "float32 rounding)."
            if "after|default|ours-compiled" in s
            else "."
        ),
        "",
        f"Machine: {raw.get('cpu') or cpu_model()}, load average at start {raw['load']}; "
        f"{raw['date']} UTC.",
        "",
    ]
    return "\n".join(lines)


@click.command()
@click.option("--quick", is_flag=True, help="A smoke test: 1024 images, one repeat.")
@DATA_ROOT
@click.option("--before", default=BEFORE, show_default=True, help="Revision measured as before.")
@click.option(
    "--section",
    type=click.Choice(sorted(SECTIONS)),
    default="main",
    show_default=True,
    help="main: user and benchmark allocators (floor.md); command: the command's own "
    "process (floor-command.md, --before from 2aff49e on).",
)
@click.option("--write", is_flag=True, help="Write the .md and .json (else print only).")
@click.option("--render", "render_only", is_flag=True, help="Rebuild the .md from the .json.")
@OUT
def main(quick, data_root, before, section, write, render_only, out):
    """Time forward-moments, the cached solve and the default compute, before and after."""
    folder = (out or REPO / "benchmarks" / ("quick" if quick else "")).resolve()
    name, cases = SECTIONS[section]
    if render_only:
        raw = json.loads((folder / f"{name}.json").read_text())
    else:
        sizes = QUICK if quick else FULL
        load = load_average()
        raw = measure(data_root.resolve(), sizes, before, cases)
        raw.update(
            load=load,
            before=before,
            sizes=sizes,
            cpu=cpu_model(),
            commit=code_commit([f"{name}.md", f"{name}.json"]),
            date=time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            command="python benchmarks/floor.py"
            + (" --quick" if quick else "")
            + (f" --section {section} --before {before}" if section != "main" else ""),
        )
    text = render(raw)
    click.echo(text)
    if write or render_only:
        folder.mkdir(parents=True, exist_ok=True)
        if not render_only:
            (folder / f"{name}.json").write_text(json.dumps(raw, indent=1))
        (folder / f"{name}.md").write_text(text)
        log(f"wrote {folder / f'{name}.md'}")


if __name__ == "__main__":
    main()
