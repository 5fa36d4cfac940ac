"""Benchmarks of lsuv-pipeline against the inits people use: cost, quality, training, scaling.

``python benchmarks/run.py [--quick]`` measures every section side by side in one run and
writes ``RESULTS.md``, ``results.json`` and PNG plots (see ``run.py``). Each section is one
module with ``measure(settings) -> dict`` and ``render(results, out) -> str``; the inits
compared live in ``baselines.py``, the child process that times and sizes one solve in
``probe.py``.

``python benchmarks/zoo.py [--quick] [--write]`` is separate: it solves every torchvision
classifier (up to 150M parameters), a few timm models and two small transformers, checks
each in float64 and writes ``zoo.md`` and ``zoo.json`` (see ``zoo.py``).

``python benchmarks/deep.py`` and ``python benchmarks/samples.py`` (``[--quick] [--write]``)
are separate too: deep thin plain networks trained from every init (``deep.md``), and how
far a solve on N samples leaves each layer from the full set's (``samples.md``).

``python benchmarks/floor.py [--quick] [--write] [--before REV]`` times forward-moments,
the cached solve and the default compute on full MNIST for this checkout and another
revision, eager and compiled (``floor.md``).
"""
