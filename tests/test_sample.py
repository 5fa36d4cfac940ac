"""--sample N: a seeded uniform draw of the solve split, not its first N items."""

import torch
from click.testing import CliRunner
from torch.utils.data import TensorDataset

import lsuv_pipeline
from lsuv_pipeline import RunConfig, open_run
from lsuv_pipeline.cli import cli
from lsuv_pipeline.data import DatasetSpec, limited, open_source, sampled, source_from


def class_sorted(n=1000, classes=10):
    """Items sorted by class, each image filled with its class: a folder read in order."""
    labels = torch.arange(n) * classes // n
    return source_from(TensorDataset(labels.float().view(n, 1, 1, 1).expand(n, 1, 2, 2)))


def classes_in(source) -> torch.Tensor:
    return source.batch(0, source.count)[:, 0, 0, 0].long().bincount(minlength=10)


def test_a_sample_holds_every_class_where_the_first_n_hold_one():
    src = class_sorted()
    assert classes_in(limited(src, 100)).tolist() == [100] + [0] * 9
    counts = classes_in(sampled(src, 100, seed=0))
    assert counts.sum() == 100 and (counts > 0).all() and counts.max() < 25


def test_the_draw_is_fixed_by_its_seed_and_part_of_the_fingerprint():
    src = class_sorted()
    a, b, c = sampled(src, 200, 1), sampled(src, 200, 1), sampled(src, 200, 2)
    assert torch.equal(a.batch(0, 200), b.batch(0, 200)) and a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint != src.fingerprint
    assert not torch.equal(a.indices, c.indices)
    assert torch.equal(a.batch(50, 70), a.batch(0, 200)[50:70])  # any range reads the same
    assert a.transform["sample"] == {"count": 200, "seed": 1, "of": 1000}
    assert sampled(src, 5000, 1) is src  # more than there are: all of it


def test_a_worker_reopens_the_same_sample_from_its_spec(data_root):
    spec = DatasetSpec(name="mnist", split="train", root=str(data_root), limit=3000, sample=300,
                       sample_seed=4)  # fmt: skip
    src = open_source(spec)
    again = open_source(src.spec)
    assert src.count == again.count == 300 and src.fingerprint == again.fingerprint
    assert torch.equal(src.batch(0, 300), again.batch(0, 300))
    assert "sample" not in DatasetSpec(name="mnist").to_dict()  # older records unchanged
    assert "sample" not in RunConfig().to_dict()


def test_compute_samples_the_solve_split_and_keeps_the_held_out_split_whole(tmp_path, data_root):
    out = tmp_path / "s.zarr"
    args = ["compute", "--data-root", str(data_root), "--out", str(out), "--limit", "3000",
            "--sample", "500", "--sample-seed", "3", "-q", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + result.stderr
    run = open_run(out)
    assert run.config.sample == 500 and run.config.sample_seed == 3
    attrs = run.attrs
    assert attrs["dataset"]["count"] == 500 and attrs["holdout"]["count"] == 3000
    assert attrs["dataset"]["transform"]["sample"] == {"count": 500, "seed": 3, "of": 3000}


def test_lsuv_takes_a_sample_of_the_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 2), torch.nn.Flatten(), torch.nn.Linear(16, 3)
    )
    x = torch.randn(400, 1, 3, 3)
    lsuv_pipeline.lsuv_(model, TensorDataset(x), samples=100, progress=False)
    with torch.no_grad():
        std = model[0](x).std(correction=0).item()
    assert 1e-4 < abs(std - 1) < 0.2  # exact over the 100 drawn, close over all 400
