"""The iterated solve of a layer whose calls feed each other."""

import pytest
import torch
from torch import nn

from lsuv_pipeline import moments as mom
from lsuv_pipeline.refine import Refinement
from lsuv_pipeline.solve import rescale_, residual, solve


class Twice(nn.Module):
    """A conv applied twice in a row: its second input depends on its first output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1).double()

    def pooled(self, x):
        y1 = self.conv(x)
        y2 = self.conv(torch.relu(y1))
        return mom.merge(mom.from_batch(y1), mom.from_batch(y2)), mom.from_batch(y1)


def naive_passes(model, x, tol, mode):
    """Passes the plain LSUV repeat (rescale from pooled moments) takes to reach tol."""
    for passes in range(1, 100):
        with torch.no_grad():
            m, _ = model.pooled(x)
        if residual(m, mode=mode, target_std=1.0).within(tol):
            return passes
        rescale_(model.conv, solve(m, mode=mode, target_std=1.0, has_bias=True))
    return 100


@pytest.mark.parametrize("mode", ["tensor", "channel"])
def test_refinement_converges_where_one_step_is_not_exact_and_beats_the_plain_repeat(mode):
    x = torch.relu(torch.randn(64, 4, 8, 8, dtype=torch.float64))
    model = Twice()
    base = [p.detach().clone() for p in model.conv.parameters()]
    plain = naive_passes(model, x, 1e-4, mode)
    with torch.no_grad():
        for p, b in zip(model.conv.parameters(), base, strict=True):
            p.copy_(b)

    with torch.no_grad():
        pooled, first_call = model.pooled(x)
    sol = solve(first_call, mode=mode, target_std=1.0, has_bias=True)
    ref = Refinement(sol, pooled, mode=mode, target_std=1.0, has_bias=True)
    passes = 1
    while passes < 30:
        passes += 1
        with torch.no_grad():
            for p, b in zip(model.conv.parameters(), base, strict=True):
                p.copy_(b)
        rescale_(model.conv, ref.solution)
        with torch.no_grad():
            m, _ = model.pooled(x)
        if residual(m, mode=mode, target_std=1.0).within(1e-4):
            break
        ref.step(m)
    assert residual(m, mode=mode, target_std=1.0).within(1e-4)
    assert passes < plain, (passes, plain)
