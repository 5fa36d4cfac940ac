"""The main job on the real, full MNIST training split, checked independently.

It runs the command that made the shipped checkpoint (README, "Use the shipped init") and
compares every array with ``data/mnist-mj.zarr`` under the reproducibility contract: byte
for byte when this machine has the numerics fingerprint the checkpoint records (CPU vendor
and model, instruction set, library builds: ``numerics.py``), else within 1e-6 relative
(1e-7 absolute for values that are themselves rounding noise, like a solved layer's mean of
1e-8). MKL and oneDNN choose kernels by CPU vendor and model, not only by instruction set:
an AMD EPYC and an Intel Xeon that both report AVX512 differ in the last bit of ``l1``.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zarr

from lsuv_pipeline.models import mj
from tests.stores import assert_same_run

LAYERS = ["conv1", "conv2", "conv3", "conv4", "l1"]
SHIPPED = Path(__file__).resolve().parents[1] / "data" / "mnist-mj.zarr"
DOCUMENTED = ["compute", "--dataset", "mnist", "--model", "mj", "--seed", "0"]


def float64_layer_stats(model, images: torch.Tensor, names, batch=1000):
    """Per-layer mean and std over all samples, sums in float64.

    The model runs in float32, as it trains: its outputs are those of a float64 model to
    about 1e-6 relative, far inside the 1e-4 checked, at a fifth of the time.
    """
    model = model.eval()
    sums = {n: torch.zeros(2, dtype=torch.float64) for n in names}
    counts = dict.fromkeys(names, 0)

    def hook(name):
        def f(module, inputs, out):
            out = out.double()
            sums[name] += torch.stack([out.sum(), out.square().sum()])
            counts[name] += out.numel()

        return f

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        for s in range(0, images.shape[0], batch):
            x = images[s : s + batch].to(torch.float32).div(255).sub(0.1307).div(0.3081)
            model(x.unsqueeze(1))
    for h in handles:
        h.remove()
    out = {}
    for n in names:
        mean = sums[n][0] / counts[n]
        var = sums[n][1] / counts[n] - mean.square()  # fine here: mean ~ 0, var ~ 1
        out[n] = (mean.item(), var.sqrt().item())
    return out


@pytest.mark.slow
def test_compute_on_full_mnist_gives_every_layer_mean_0_std_1(tmp_path, data_root):
    out = tmp_path / "run.zarr"
    script = Path(sys.executable).with_name("lsuv-pipeline")
    proc = subprocess.run(
        [str(script), *DOCUMENTED, "--data-root", str(data_root), "--out", str(out), "-q"],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "5 layers solved in 5 passes" in proc.stderr

    # the same run as the shipped checkpoint: its bytes on its hardware, else within tolerance
    promise = assert_same_run(out, SHIPPED)
    print(f"compared with the shipped checkpoint: {promise}")

    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["status"] == "complete"
    assert g.attrs["dataset"]["count"] == 60000
    model = mj()
    state = {k: torch.from_numpy(g[f"final/{k}"][...]) for k in model.state_dict()}
    model.load_state_dict(state)
    for name in LAYERS:
        for part in ("count", "mean", "var", "scale", "shift"):
            assert part in g[f"layers/{name}"], (name, part)
        for section in ("verify/train", "verify/test", "before/train"):
            assert f"{section}/{name}/var" in g
        assert g[f"layers/{name}/running/samples"][-1] == 60000, name

    from torchvision.datasets import MNIST

    images = MNIST(str(data_root), train=True, download=False).data
    stats = float64_layer_stats(model, images, LAYERS)
    for name, (mean, std) in stats.items():
        assert abs(mean) <= 1e-4, (name, mean)
        assert abs(std - 1) <= 1e-4, (name, std)
