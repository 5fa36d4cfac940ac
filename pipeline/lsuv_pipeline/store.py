"""Every Zarr read and write of a run: the schema, and reading it back.

A run is one Zarr v3 group (schema 1)::

    <run>.zarr/                 attrs: schema, tool, config, dataset, holdout, model,
                                layers (forward order), status, device, versions
      initial/<param>           the model's state before LSUV, written once
      layers/<key>/             one group per target layer, committed after its pass:
        count, mean, var          per-channel moments measured before solving it
        scale, shift              the update applied: W / scale, (b - shift) / scale
      final/<param>             the finished state (status "complete")
      before/<split>/<key>/     per-channel moments with the initial weights
      verify/<split>/<key>/     per-channel moments after LSUV
      passes/<key>/<p>/         per-call moments of each pass of a layer solved iteratively
      partial/                  the pass in progress: per-shard moments, one chunk per
                                shard, and a per-shard done flag written after them

Arrays hold numbers, attributes hold JSON; nothing is pickled. Every array records the
sha256 of its bytes, so a missing chunk (which Zarr would read back as fill values) or a
damaged one is caught on read. A layer group counts only once its ``committed`` attribute
is set, which is written last; a rerun reads ``initial`` and the committed updates back and
continues from the partial pass, so a run killed at any moment resumes to the same bytes.
Only the coordinating process calls this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import platform
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import moments as mom
from .errors import StoreError
from .layers import Unsolved
from .report import LayerStats, with_unsolved
from .solve import Solution

__all__ = ["SCHEMA", "LayerRecord", "Partial", "RunStore", "layer_key", "versions"]

SCHEMA = 1
TOOL = "lsuv-pipeline"

_TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
)}  # fmt: skip


def layer_key(name: str) -> str:
    """Return the group key of a layer: its module name (``"(model)"`` for the root)."""
    return name or "(model)"


def versions() -> dict[str, str]:
    """Return the versions of the libraries that determine a run's numbers."""
    out = {"python": platform.python_version()}
    for dist in ("lsuv-pipeline", "torch", "torchvision", "numpy", "zarr", "dask", "distributed"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def _to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    t = t.detach().cpu()
    dtype = str(t.dtype).removeprefix("torch.")
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: keep the bits
        return t.view(torch.int16).numpy(), dtype
    return t.numpy(), dtype


def _digest(a: np.ndarray) -> str:
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@dataclass(frozen=True)
class LayerRecord:
    """A committed layer: its moments before the solve, the update, and how it went."""

    key: str
    before: mom.Moments
    solution: Solution
    attrs: dict


class RunStore:
    """One run's Zarr group. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, group, path: Path) -> None:
        self._group = group
        self.path = path

    # -- opening -----------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, attrs: Mapping) -> RunStore:
        """Create a new run store at ``path`` (which must not exist) with root ``attrs``."""
        import zarr

        path = Path(path)
        if (path / "zarr.json").exists():
            raise StoreError(f"{str(path)!r} already exists")
        try:
            group = zarr.open_group(str(path), mode="a", zarr_format=3)
        except OSError as exc:
            raise StoreError(f"cannot create run store {str(path)!r}: {exc}") from None
        group.attrs.update({"schema": SCHEMA, "tool": TOOL, **attrs})
        return cls(group, path)

    @classmethod
    def open(cls, path: str | Path, *, write: bool = False) -> RunStore:
        """Open an existing run store, checking it is one this version understands."""
        import zarr

        path = Path(path)
        if not (path / "zarr.json").is_file():
            what = "does not exist" if not path.exists() else "is not a Zarr group"
            raise StoreError(f"{str(path)!r} {what}; expected a run store written by {TOOL}")
        try:
            group = zarr.open_group(str(path), mode="r+" if write else "r", zarr_format=3)
            attrs = dict(group.attrs)
        except Exception as exc:
            raise StoreError(f"{str(path)!r} cannot be read as a Zarr v3 group: {exc}") from None
        if attrs.get("tool") != TOOL:
            raise StoreError(f"{str(path)!r} is a Zarr group but not a run store of {TOOL}")
        if attrs.get("schema") != SCHEMA:
            raise StoreError(
                f"{str(path)!r} has store schema {attrs.get('schema')!r}; this version of "
                f"{TOOL} reads schema {SCHEMA}"
            )
        return cls(group, path)

    # -- attributes --------------------------------------------------------------

    @property
    def attrs(self) -> dict:
        """The root attributes (a copy)."""
        return dict(self._group.attrs)

    def update_attrs(self, attrs: Mapping) -> None:
        """Update root attributes."""
        self._group.attrs.update(dict(attrs))

    # -- arrays ------------------------------------------------------------------

    def _put(self, group, name: str, value: torch.Tensor) -> None:
        data, dtype = _to_numpy(value)
        group.create_array(
            name,
            data=data,
            chunks=data.shape if data.ndim else (),
            attributes={"torch_dtype": dtype, "sha256": _digest(data)},
            overwrite=True,
        )

    def _get(self, group, name: str, where: str) -> torch.Tensor:
        full = f"{where}/{name}"
        try:
            arr = group[name]
        except KeyError:
            raise StoreError(f"{str(self.path)!r}: array {full!r} is missing") from None
        try:
            data = arr[...]
        except Exception as exc:
            raise StoreError(f"{str(self.path)!r}: array {full!r} cannot be read: {exc}") from None
        data = np.asarray(data)
        attrs = arr.attrs
        if attrs.get("sha256") != _digest(data):
            raise StoreError(
                f"{str(self.path)!r}: array {full!r} does not match its recorded checksum "
                "(a chunk is missing or damaged)"
            )
        t = torch.from_numpy(data.copy())
        dtype = attrs.get("torch_dtype")
        if dtype == "bfloat16":
            return t.view(torch.bfloat16)
        if dtype not in _TORCH_DTYPES:
            raise StoreError(f"{str(self.path)!r}: array {full!r} has unknown dtype {dtype!r}")
        return t

    def _sub(self, path: str, *, create: bool = False):
        try:
            return self._group.require_group(path) if create else self._group[path]
        except KeyError:
            raise StoreError(f"{str(self.path)!r}: group {path!r} is missing") from None

    def has(self, path: str) -> bool:
        """Whether a group or array exists at ``path`` inside the run."""
        return path in self._group

    # -- model states ------------------------------------------------------------

    def write_state(self, kind: str, state: Mapping[str, torch.Tensor]) -> None:
        """Write a state dict under ``kind`` (``"initial"`` or ``"final"``)."""
        group = self._sub(kind, create=True)
        for name, value in state.items():
            self._put(group, name, value)
        group.attrs.update({"names": list(state), "complete": True})

    def read_state(self, kind: str) -> dict[str, torch.Tensor]:
        """Read the state dict under ``kind`` in its recorded order."""
        group = self._sub(kind)
        if not group.attrs.get("complete"):
            raise StoreError(f"{str(self.path)!r}: {kind!r} weights were not completely written")
        return {name: self._get(group, name, kind) for name in group.attrs["names"]}

    # -- moments -----------------------------------------------------------------

    def _put_moments(self, group, m: mom.Moments) -> None:
        self._put(group, "count", torch.full(m.mean.shape, m.count, dtype=torch.int64))
        self._put(group, "mean", m.mean)
        self._put(group, "var", m.var)

    def _get_moments(self, group, where: str) -> mom.Moments:
        count = self._get(group, "count", where)
        mean = self._get(group, "mean", where)
        var = self._get(group, "var", where)
        n = int(count.flatten()[0]) if count.numel() else 0
        return mom.Moments(count=n, mean=mean, m2=var * n)

    def write_moments(self, section: str, key: str, m: mom.Moments) -> None:
        """Write one layer's per-channel moments under ``section/key`` (e.g. verify/train)."""
        group = self._sub(f"{section}/{key}", create=True)
        self._put_moments(group, m)
        group.attrs.update({"complete": True})

    def read_moments(self, section: str, key: str) -> mom.Moments:
        """Read moments written by :meth:`write_moments`."""
        where = f"{section}/{key}"
        group = self._sub(where)
        if not group.attrs.get("complete"):
            raise StoreError(f"{str(self.path)!r}: {where!r} was not completely written")
        return self._get_moments(group, where)

    # -- layers ------------------------------------------------------------------

    def commit_layer(
        self, key: str, before: mom.Moments, solution: Solution, attrs: Mapping
    ) -> None:
        """Write a solved layer; the ``committed`` marker goes last."""
        where = f"layers/{key}"
        group = self._sub(where, create=True)
        self._put_moments(group, before)
        self._put(group, "scale", solution.scale)
        self._put(group, "shift", solution.shift)
        group.attrs.update({**attrs, "committed": True})

    def committed(self, key: str) -> bool:
        """Whether the layer's commit marker is written."""
        where = f"layers/{key}"
        return where in self._group and bool(self._group[where].attrs.get("committed"))

    def read_layer(self, key: str) -> LayerRecord:
        """Read a committed layer."""
        where = f"layers/{key}"
        group = self._sub(where)
        attrs = dict(group.attrs)
        if not attrs.get("committed"):
            raise StoreError(f"{str(self.path)!r}: layer {key!r} is not committed")
        solution = Solution(
            scale=self._get(group, "scale", where), shift=self._get(group, "shift", where)
        )
        return LayerRecord(key, self._get_moments(group, where), solution, attrs)

    def layer_stats(self) -> list[LayerStats]:
        """Per-layer statistics as far as the run got, for tables and plots."""
        attrs = self.attrs
        config = attrs.get("config", {})
        split, holdout = config.get("split", "train"), config.get("holdout")
        out = []
        for info in attrs.get("layers", []):
            key = info["key"]
            solved = self.committed(key)
            la = dict(self._group[f"layers/{key}"].attrs) if solved else {}
            section = f"before/{split}"
            before = (
                self.read_moments(section, key) if self.section_complete(section, [key]) else None
            )
            after = {
                sp: self.read_moments(f"verify/{sp}", key)
                for sp in (split, holdout)
                if sp and self.section_complete(f"verify/{sp}", [key])
            }
            out.append(
                LayerStats(
                    name=info["name"],
                    kind=info["kind"],
                    passes=la.get("passes", 0),
                    converged=la.get("converged", False),
                    has_bias=la.get("has_bias", True),
                    solved=solved,
                    before=before,
                    after=after,
                )
            )
        return with_unsolved(out, [Unsolved.from_dict(d) for d in attrs.get("unsolved", [])])

    # -- passes: per-shard partials and finished multi-pass results ------------------

    def partial(self, pass_id: str, n_shards: int, layers: list[tuple[str, int, int]]) -> Partial:
        """Return the per-shard record of pass ``pass_id``, starting it afresh if needed.

        Args:
            pass_id: Identifies the pass (layer and pass number, or verify split).
            n_shards: Shards in the pass.
            layers: ``(key, calls, channels)`` of every layer the pass measures.
        """
        spec = {"pass_id": pass_id, "shards": n_shards, "layers": [list(x) for x in layers]}
        if "partial" in self._group:
            group = self._group["partial"]
            if {k: group.attrs.get(k) for k in spec} == spec:
                return Partial(group, layers)
        group = self._group.create_group("partial", overwrite=True)
        for key, calls, channels in layers:
            sub = group.create_group(key)
            for name, shape, dtype in (
                ("count", (n_shards, calls), "int64"),
                ("mean", (n_shards, calls, channels), "float64"),
                ("m2", (n_shards, calls, channels), "float64"),
            ):
                sub.create_array(name, shape=shape, chunks=(1, *shape[1:]), dtype=dtype)
        group.create_array("done", shape=(n_shards,), chunks=(1,), dtype="int8", fill_value=0)
        group.attrs.update(spec)  # last: a partial group with these attrs is usable
        return Partial(group, layers)

    def write_pass(self, key: str, index: int, calls: tuple[mom.Moments, ...]) -> None:
        """Record the merged per-call moments of pass ``index`` of an iterated layer."""
        group = self._sub(f"passes/{key}/{index}", create=True)
        self._put(group, "count", torch.tensor([c.count for c in calls], dtype=torch.int64))
        self._put(group, "mean", torch.stack([c.mean for c in calls]))
        self._put(group, "m2", torch.stack([c.m2 for c in calls]))
        group.attrs.update({"complete": True})

    def read_pass(self, key: str, index: int) -> tuple[mom.Moments, ...] | None:
        """The moments :meth:`write_pass` recorded, or ``None`` if that pass did not finish."""
        where = f"passes/{key}/{index}"
        if where not in self._group or not self._group[where].attrs.get("complete"):
            return None
        group = self._group[where]
        count = self._get(group, "count", where)
        mean = self._get(group, "mean", where)
        m2 = self._get(group, "m2", where)
        return tuple(mom.Moments(int(n), mu, q) for n, mu, q in zip(count, mean, m2, strict=True))

    def section_complete(self, section: str, keys: list[str]) -> bool:
        """Whether every layer of a moments section (e.g. ``verify/train``) was written."""
        return all(
            f"{section}/{k}" in self._group and self._group[f"{section}/{k}"].attrs.get("complete")
            for k in keys
        )

    def finish(self) -> None:
        """Drop the partial-pass record and mark the run complete (the last write)."""
        if "partial" in self._group:
            del self._group["partial"]
        self._group.attrs.update({"status": "complete"})

    @staticmethod
    def wipe(path: str | Path, keep: tuple[str, ...] = ()) -> None:
        """Delete a run store's contents, keeping the folder and the entries in ``keep``."""
        for child in Path(path).iterdir():
            if child.name in keep:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


class Partial:
    """The per-shard moments of the pass in progress, one Zarr chunk per shard."""

    def __init__(self, group, layers: list[tuple[str, int, int]]) -> None:
        self._layers = layers
        # opened once: looking an array up in its group reads its metadata from disk, which
        # cost more than the writes themselves (about 1 ms each, 10 per shard)
        self._arrays = {
            key: tuple(group[key][n] for n in ("count", "mean", "m2")) for key, _, _ in layers
        }
        self._done = group["done"]

    def done(self) -> dict[int, dict[str, tuple[mom.Moments, ...]]]:
        """Shard index -> per-layer per-call moments, for every shard already finished."""
        flags = np.asarray(self._done[...])
        finished = np.flatnonzero(flags).tolist()
        if not finished:
            return {}
        out: dict[int, dict[str, tuple[mom.Moments, ...]]] = {i: {} for i in finished}
        for key, _, _ in self._layers:
            count, mean, m2 = (np.asarray(a[...]) for a in self._arrays[key])
            for i in finished:
                out[i][key] = tuple(
                    mom.Moments(int(count[i, c]), torch.from_numpy(mean[i, c].copy()),
                                torch.from_numpy(m2[i, c].copy()))
                    for c in range(count.shape[1])
                )  # fmt: skip
        return out

    def put(self, index: int, moments: dict[str, tuple[mom.Moments, ...]]) -> None:
        """Record shard ``index``; its done flag is written after its moments."""
        for key, calls, _ in self._layers:
            count, mean, m2 = self._arrays[key]
            parts = moments[key]
            if len(parts) != calls:
                raise StoreError(
                    f"layer {key!r}: expected {calls} calls per forward, got {len(parts)}"
                )
            count[index] = np.array([p.count for p in parts], dtype=np.int64)
            mean[index] = torch.stack([p.mean for p in parts]).numpy()
            m2[index] = torch.stack([p.m2 for p in parts]).numpy()
        self._done[index] = 1
