"""One rank of a ``torch.distributed`` job (or one process alone) running lsuv-pipeline.

    python -m torch.distributed.run --nproc-per-node 2 rank_driver.py OUT [options]
    python rank_driver.py OUT --alone            # the single-process reference

Every rank builds the same model and the same data: 16384 small images in four shards of
4096, the first half at scale 1 and the second at 100, so a rank that merged only its own
shards, or merged them in another order, ends with other weights. Each rank writes its
final weights and what the call returned to ``OUT/rank<R>.pt`` (``OUT/alone.pt`` alone).

Options: ``--api lsuv_`` (a loader with a DistributedSampler) or ``compute`` (a store at
``OUT/run.zarr``); ``--other-seed`` gives rank 1 other initial weights; ``--other-data``
gives rank 1 other data (an error on every rank); ``--first-half`` runs on rank 0's half
alone; ``--die-after-commits N`` ends every rank, as a crash does, after N layers.
"""

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lsuv_pipeline
from lsuv_pipeline import RunConfig, compute, store
from lsuv_pipeline.errors import LsuvError

SHARD = 4096


def data(rank: int, other: bool) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * SHARD, 1, 8, 8, generator=g) + 0.5
    x[2 * SHARD :] *= 100.0
    if other and rank == 1:
        x = x * 2
    return TensorDataset(x, torch.arange(len(x)) % 10)


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )  # fmt: skip


def die_after(n: int) -> None:
    """End this process at once, as a crash does, right after its n-th layer commit."""
    commit, seen = store.RunStore.commit_layer, []

    def dying(self, *args, **kwargs):
        commit(self, *args, **kwargs)
        seen.append(1)
        if len(seen) == n:
            os._exit(9)

    store.RunStore.commit_layer = dying


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--alone", action="store_true")
    p.add_argument("--api", choices=["lsuv_", "compute"], default="lsuv_")
    p.add_argument("--other-seed", action="store_true")
    p.add_argument("--other-data", action="store_true")
    p.add_argument("--first-half", action="store_true")
    p.add_argument("--die-after-commits", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.die_after_commits:
        die_after(args.die_after_commits)
    if not args.alone:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if not args.alone else 0
    net = model(1 + (rank if args.other_seed else 0))
    ds = data(rank, args.other_data)
    if args.first_half:  # what rank 0 alone would see: what a missing exchange gives
        ds = TensorDataset(*(t[: 2 * SHARD] for t in ds.tensors))
    record = {}
    try:
        if args.api == "lsuv_":
            sampler = None if args.alone else DistributedSampler(ds, shuffle=True)
            loader = DataLoader(ds, batch_size=256, sampler=sampler)
            lsuv_pipeline.lsuv_(net, loader, progress=False, device="cpu")
        else:
            config = RunConfig(dataset="scaled", holdout=None, shard_size=SHARD)
            result = compute(config, args.out / "run.zarr", model=net, data=ds, device="cpu")
            record.update(passes=result.passes, up_to_date=result.up_to_date,
                          path=str(result.path))  # fmt: skip
    except LsuvError as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["state"] = net.state_dict()
    name = "alone" if args.alone else f"rank{rank}"
    torch.save(record, args.out / f"{name}.pt")
    if not args.alone:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
