"""Run ``lsuv-pipeline ARGS`` and SIGKILL this very process at a chosen point.

    python crash_driver.py POINT:N [lsuv-pipeline arguments]

POINT is where to kill, N which occurrence:
    none      never (a reference run with the same driver)
    shard     right after the N-th shard's moments are recorded
    torn      while recording the N-th shard: after its moments, before its done flag
    commit    right after the N-th layer is committed
    final     after the N-th array of the final weights is written
    status    just before the run is marked complete
    pass      when the N-th pass starts (its shard record opened, nothing submitted yet)
    sigint    right after the N-th shard is handed to its record's writer, send this
              process SIGINT (as Ctrl-C does) once, and go on

With ``$CRASH_DRIVER_KILL_PID`` set, that process is killed instead (a dask scheduler, say)
and the run goes on, to show what it makes of the loss.

Also registers the test model ``twice`` (a conv applied twice in a row).
"""

import os
import signal
import sys

from torch import nn
from torch.nn import functional as F

from lsuv_pipeline import models, partial, store


class Twice(nn.Module):
    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.shared(x))
        x = F.relu(self.shared(x))
        return self.head(x.mean((2, 3)))


models.MODELS["twice"] = Twice

point, _, nth = sys.argv[1].partition(":")
nth = int(nth or 1)
seen = 0


victim = int(os.environ.get("CRASH_DRIVER_KILL_PID") or os.getpid())
sig = signal.SIGINT if point == "sigint" else signal.SIGKILL


def tick():
    global seen
    seen += 1
    if seen == nth or (seen > nth and victim == os.getpid() and sig == signal.SIGKILL):
        os.kill(victim, sig)


def after(cls, name, when=lambda *a, **k: True):
    orig = getattr(cls, name)

    def wrapped(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        if when(self, *args, **kwargs):
            tick()
        return out

    setattr(cls, name, wrapped)


if point == "shard":
    after(partial.Partial, "_write")  # the record's write (on its own thread), not its queueing
elif point == "sigint":
    after(partial.Partial, "put")  # in the computing thread, as a key press would land
elif point == "torn":
    orig_write = partial.Partial._write

    def torn(self, index, rows):
        done = self._done

        class Flag:  # write the moments, then die where the done flag would go
            def __setitem__(self, key, value):
                tick()
                done[key] = value

        self._done = Flag()
        try:
            orig_write(self, index, rows)
        finally:
            self._done = done

    partial.Partial._write = torn
elif point == "commit":
    after(store.RunStore, "commit_layer")
elif point == "final":
    after(store.RunStore, "_put", lambda self, group, *a: group.path.startswith("final"))
elif point == "status":
    orig_finish = store.RunStore.finish

    def finish(self):
        tick()
        orig_finish(self)

    store.RunStore.finish = finish
elif point == "pass":
    after(store.RunStore, "partial")
elif point != "none":
    raise SystemExit(f"unknown point {point!r}")

from lsuv_pipeline.cli import main  # noqa: E402

sys.argv = ["lsuv-pipeline", *sys.argv[2:]]
main()
