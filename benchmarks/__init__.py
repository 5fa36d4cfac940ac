"""Benchmarks of lsuv-pipeline against the inits people use: cost, quality, training, scaling.

``python benchmarks/run.py [--quick]`` measures every section side by side in one run and
writes ``RESULTS.md``, ``results.json`` and PNG plots (see ``run.py``). Each section is one
module with ``measure(settings) -> dict`` and ``render(results, out) -> str``; the inits
compared live in ``baselines.py``, the child process that times and sizes one solve in
``probe.py``.
"""
