"""One measurement in a fresh process: a solve's wall time, its peak memory, a forward's time.

``python -m benchmarks.probe '<json spec>'`` prints one JSON line. In order:

1. open the split (``repeat`` copies of it, without copying) and build the model (MJ unless
   the spec names another) under seed 0;
2. warm up: one forward of one batch (thread pools, kernel choice), reset the peak RSS to
   the current RSS (``common.reset_peak``) and read it: the baseline, data and model in;
3. run the solve ``method`` (timed) and read the peak RSS again: the solve's peak;
4. if ``forward``: time one plain no-grad forward pass over the split (one copy of it), the
   unit the solve's time is divided by, measured seconds after the solve in the same
   process so that both see the same machine load; it runs after the solve so that it
   cannot raise the solve's peak.

It prints the page faults the computing thread took during the method (``thread_faults``)
and the process's system time then (``sys_s``). For ``ours-*`` it also prints ``digest``,
a SHA-256 over every array of the run store (``common.store_digest``), so runs that must
agree bitwise (cache on and off) can be compared.

Spec keys: method, dataset, model, data_root, limit, repeat, batch_size, threads, work,
forward, allocator (``"command"``: set up the process's allocator as the ``lsuv-pipeline``
command does, ``allocator.tune``), serve (hand the open split to ``compute(data=...)``
instead of letting it open the dataset by name, as dask workers must), workers (dask).
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from lsuv_pipeline import RunConfig, compute
from lsuv_pipeline.layers import trace
from lsuv_pipeline.models import ModelSpec, build_model
from lsuv_pipeline.shard import PassPlan, measure_shard

from . import baselines
from .common import (
    Repeated,
    forward_pass,
    one_batch,
    peak_rss_mib,
    reset_peak,
    source,
    store_digest,
)

#: Cost-section methods: name -> what the probe runs.
METHODS = (
    "forward",
    "forward-moments",
    "ours-tensor",
    "ours-nocache",
    "naive-full",
    "pypi-lsuv-256",
    "seed-lsuv-256",
)


def _solve(spec: dict, model, src, work: Path) -> dict:
    method, bs = spec["method"], spec["batch_size"]
    if method == "forward":
        started = time.perf_counter()
        forward_pass(model, src, bs)
        return {"solve_s": time.perf_counter() - started}
    if method in ("forward-moments", "forward-moments-compiled"):
        # the pipeline's own measuring pass, every layer at once
        compiling, extra = 0.0, {}
        if method.endswith("compiled"):  # built before the clock starts, timed apart
            from lsuv_pipeline import compiled

            compiling = compiled.prepare()
            extra = {"compiled": True}
        plan = PassPlan(tuple(trace(model, src.batch(0, 2))), None, bs, **extra)
        batches = (src.batch(i, min(i + bs, src.count)) for i in range(0, src.count, bs))
        started = time.perf_counter()
        measure_shard(model, batches, plan, device=torch.device("cpu"))
        return {"solve_s": time.perf_counter() - started, "compile_s": compiling}
    if method in ("ours-tensor", "ours-nocache", "ours-compiled", "ours-default"):
        extra = {"compile": True} if method == "ours-compiled" else {}
        config = RunConfig(
            dataset=spec["dataset"], model=spec.get("model", "mj"),
            verify=method == "ours-default", batch_size=bs, seed=0, **extra,
        )  # fmt: skip
        kwargs = {"cache": method != "ours-nocache", "workers": spec.get("workers")}
        started = time.perf_counter()
        if spec.get("serve", True) and method != "ours-default":  # not held twice
            result = compute(config, work / "run.zarr", model=model, data=src, device="cpu",
                             **kwargs)  # fmt: skip
        else:  # the pipeline opens the data itself, as dask workers and the CLI do
            config = RunConfig(**{**config.to_dict(), "limit": spec["limit"]})
            result = compute(
                config, work / "run.zarr", model=model, data_root=spec["data_root"],
                device="cpu", download=False, **kwargs,
            )  # fmt: skip
        # result.seconds: the solve (every layer's pass and write), without opening the
        # data, tracing and creating the store, which call_s includes.
        return {
            # the default compute is timed whole: its solve, verification passes and writes
            "solve_s": time.perf_counter() - started
            if method == "ours-default"
            else result.seconds,
            "compile_s": getattr(result, "compile_seconds", 0.0),
            "call_s": time.perf_counter() - started,
            "passes": result.passes,
            "digest": store_digest(work / "run.zarr"),
        }
    if method == "naive-full":
        started = time.perf_counter()
        baselines.naive_full_(model, src, batch_size=bs)
        return {"solve_s": time.perf_counter() - started}
    if method in ("pypi-lsuv-256", "seed-lsuv-256"):
        size = int(method.rsplit("-", 1)[1])
        batch = one_batch(src, size, seed=0)  # drawn before the clock starts
        started = time.perf_counter()
        if method.startswith("pypi"):
            from lsuv import lsuv_with_singlebatch

            lsuv_with_singlebatch(model, batch, verbose=False, device=torch.device("cpu"))
        else:
            baselines.seed_lsuv_(model, batch)
        return {"solve_s": time.perf_counter() - started}
    raise ValueError(f"unknown method {method!r}")


def main(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    if spec.get("allocator") == "command":  # as ``lsuv-pipeline`` sets up its own process
        from lsuv_pipeline import allocator

        allocator.tune()
    src = source(spec["dataset"], "train", spec["data_root"], spec["limit"])
    if spec.get("repeat", 1) > 1:
        src = Repeated(src, spec["repeat"])
    model = build_model(
        ModelSpec(name=spec.get("model", "mj")),
        seed=0,
        in_channels=src.sample_shape[0],
        num_classes=src.num_classes or 10,
    )
    with torch.no_grad():
        model.eval()(src.batch(0, min(spec["batch_size"], src.count)))
    reset = reset_peak()
    base = peak_rss_mib()  # the current RSS when the reset worked
    started = resource.getrusage(resource.RUSAGE_THREAD), resource.getrusage(resource.RUSAGE_SELF)
    with tempfile.TemporaryDirectory(dir=spec["work"]) as tmp:
        out = _solve(spec, model, src, Path(tmp))
    ended = resource.getrusage(resource.RUSAGE_THREAD), resource.getrusage(resource.RUSAGE_SELF)
    # page faults the computing thread took itself, and the process's time in the kernel
    out["thread_faults"] = ended[0].ru_minflt - started[0].ru_minflt
    out["sys_s"] = ended[1].ru_stime - started[1].ru_stime
    out["base_rss_mib"] = base
    out["peak_reset"] = reset
    out["peak_rss_mib"] = peak_rss_mib()
    if spec.get("forward"):  # over one copy of the split: the unit at every size
        unit = src.inner if isinstance(src, Repeated) else src
        started = time.perf_counter()
        forward_pass(model, unit, spec["batch_size"])
        out["forward_s"] = time.perf_counter() - started
    out["count"] = src.count
    return out


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
