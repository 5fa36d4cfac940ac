"""Every Zarr read and write of a run: the schema, and reading it back.

A run is one Zarr v3 group (schema 1)::

    <run>.zarr/                 attrs: schema, tool, config, dataset, holdout, model,
                                layers (forward order), status, device, versions
      initial/<param>           the model's state before LSUV, written once
      layers/<key>/             one group per target layer, committed after its pass:
        count, mean, var          per-channel moments measured before solving it
        scale, shift              the update applied: W / scale, (b - shift) / scale
        running/                  the estimate after each shard of its first pass, in shard
          samples, mean, std,       order (``running.Running``; stores before it have none)
          mean_dev, std_dev
      final/<param>             the finished state (status "complete")
      before/<split>/<key>/     per-channel moments with the initial weights
      verify/<split>/<key>/     per-channel moments after LSUV
      passes/<key>/<p>/         per-call moments of each pass of a layer solved iteratively
      partial/                  the pass in progress: per-shard moments, one chunk per
                                shard, and a per-shard done flag written after them

Arrays hold numbers, attributes hold JSON; nothing is pickled. Every read and write goes
through ``zarrio.CheckedGroup`` (checksums and dtypes on every array, damaged metadata as
one error naming the path, a writer that notices its folder was deleted or replaced, OS
errors as one line); :meth:`RunStore.check` reads every array. The root attributes are
checked against the schema (``schema.py``) when a store is opened.

A layer group counts only once its ``committed`` attribute is set, which is written last;
a rerun reads ``initial`` and the committed updates back and continues from the partial
pass, so a run killed at any moment resumes to the same bytes (and the same files: Zarr's
temporary ``*.partial`` files a kill can leave are removed when the store is reopened for
writing). A writer checks before every write that its store is still the one it opened
(same folder, same ``run_id``), so a store deleted or replaced under a running writer is
never silently rebuilt. A full disk or a read-only folder is one :class:`StoreError`;
what was written before stays. Only the coordinating process calls this module.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import zarr

from . import moments as mom
from .errors import StoreError, first_line, write_error
from .lock import LOCK_NAME
from .partial import Partial
from .running import Running
from .schema import SCHEMA, TOOL, Section, check_root, layer_key
from .solve import Solution
from .zarrio import CheckedGroup, consolidate, sweep_temp_files

__all__ = ["LayerRecord", "Partial", "RunStore"]

#: The dimension of per-channel arrays (moments, scale and shift in channel mode).
CHANNEL = ("channel",)


@dataclass(frozen=True)
class LayerRecord:
    """A committed layer: its moments before the solve, the update, and how it went."""

    key: str
    before: mom.Moments
    solution: Solution
    attrs: dict


class RunStore(CheckedGroup):
    """One run's Zarr group. Create with :meth:`create`, open with :meth:`open`."""

    # -- opening -----------------------------------------------------------------

    @staticmethod
    def check_out(path: str | Path) -> bool:
        """Whether ``path`` holds a run store of ours; refuse anything else that exists.

        An empty folder (or one holding only a writer's lock) is fine: nothing is there.

        Raises:
            StoreError: ``path`` is a file, a folder of other things, or a Zarr group or a
                store this version does not write (another tool, another schema).
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise StoreError(f"{str(path)!r} exists and is not a folder; expected a run store")
        if path.is_dir() and not (path / "zarr.json").exists():
            others = [p.name for p in path.iterdir() if p.name != LOCK_NAME]
            if others:
                raise StoreError(
                    f"{str(path)!r} exists and is not a run store (it holds "
                    f"{', '.join(sorted(others)[:3])}); choose another --out"
                )
            return False
        if not (path / "zarr.json").exists():
            return False
        RunStore._root_attrs(path)  # ours and of this schema, else a StoreError
        return True

    @staticmethod
    def _root_attrs(path: Path) -> dict:
        """The root attributes of the store at ``path``, if it is a run store of ours."""
        try:
            meta = json.loads((path / "zarr.json").read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"{str(path)!r}: its zarr.json cannot be read ({first_line(exc)}); expected a "
                f"run store written by {TOOL}"
            ) from None
        attrs = meta.get("attributes") if isinstance(meta, dict) else None
        if meta.get("node_type") != "group" or meta.get("zarr_format") != 3:
            raise StoreError(f"{str(path)!r} is not a Zarr v3 group; expected a run store")
        attrs = attrs if isinstance(attrs, dict) else {}
        if attrs.get("tool") != TOOL:
            raise StoreError(f"{str(path)!r} is a Zarr group but not a run store of {TOOL}")
        if attrs.get("schema") != SCHEMA:
            raise StoreError(
                f"{str(path)!r} has store schema {attrs.get('schema')!r}; this version of "
                f"{TOOL} reads schema {SCHEMA}"
            )
        return attrs

    @classmethod
    def create(cls, path: str | Path, attrs: Mapping) -> RunStore:
        """Create a new run store at ``path`` (which must not exist) with root ``attrs``."""
        path = Path(path)
        if (path / "zarr.json").exists():
            raise StoreError(f"{str(path)!r} already exists")
        root = {"schema": SCHEMA, "tool": TOOL, "run_id": uuid.uuid4().hex, **attrs}
        try:
            group = zarr.open_group(str(path), mode="a", zarr_format=3)
            group.attrs.update(root)
        except OSError as exc:
            raise write_error(path, "the store's metadata", exc) from None
        return cls(group, path, writer=True)

    @classmethod
    def open(cls, path: str | Path, *, write: bool = False) -> RunStore:
        """Open an existing run store, checking it is one this version understands.

        Raises:
            StoreError: Not a run store of ours, another schema, or damaged root metadata.
        """
        path = Path(path)
        if not (path / "zarr.json").is_file():
            what = "does not exist" if not path.exists() else "is not a Zarr group"
            raise StoreError(f"{str(path)!r} {what}; expected a run store written by {TOOL}")
        attrs = cls._root_attrs(path)
        check_root(path, attrs)
        try:
            # the nodes' own metadata, never the consolidated copy kept for other readers
            group = zarr.open_group(
                str(path), mode="r+" if write else "r", zarr_format=3, use_consolidated=False
            )
        except Exception as exc:
            raise StoreError(f"{str(path)!r} cannot be read as a Zarr v3 group: {exc}") from None
        if write:
            if not attrs.get("run_id"):  # a store an earlier version wrote
                try:
                    group.attrs.update({"run_id": uuid.uuid4().hex})
                except OSError as exc:
                    raise write_error(path, "the store's metadata", exc) from None
            sweep_temp_files(path)
        return cls(group, path, writer=write)

    # -- writing safely ----------------------------------------------------------

    # -- attributes --------------------------------------------------------------

    @property
    def attrs(self) -> dict:
        """The root attributes (a copy)."""
        return dict(self._group.attrs)

    def update_attrs(self, attrs: Mapping) -> None:
        """Update root attributes."""
        with self._writing("the store's metadata"):
            self._group.attrs.update(dict(attrs))

    # -- reading nodes -----------------------------------------------------------

    # -- arrays ------------------------------------------------------------------

    # -- model states ------------------------------------------------------------

    def write_state(self, kind: str, state: Mapping[str, torch.Tensor]) -> None:
        """Write a state dict under ``kind`` (``"initial"`` or ``"final"``)."""
        group = self._sub(kind, create=True)
        for name, value in state.items():
            self._put(group, name, value)  # dims: <param>.dim0, ...
        with self._writing(f"group {kind}"):
            group.attrs.update({"names": list(state), "complete": True})

    def read_state(self, kind: str) -> dict[str, torch.Tensor]:
        """Read the state dict under ``kind`` in its recorded order."""
        group = self._sub(kind)
        names = group.attrs.get("names")
        if not group.attrs.get("complete") or not isinstance(names, list):
            raise StoreError(f"{str(self.path)!r}: {kind!r} weights were not completely written")
        return {name: self._get(f"{kind}/{name}") for name in names}

    # -- moments -----------------------------------------------------------------

    def _put_moments(self, group, m: mom.Moments) -> None:
        self._put(group, "count", torch.full(m.mean.shape, m.count, dtype=torch.int64), CHANNEL)
        self._put(group, "mean", m.mean, CHANNEL)
        self._put(group, "var", m.var, CHANNEL)

    def _get_moments(self, where: str) -> mom.Moments:
        count = self._get(f"{where}/count")
        mean = self._get(f"{where}/mean")
        var = self._get(f"{where}/var")
        n = int(count.flatten()[0]) if count.numel() else 0
        return mom.Moments(count=n, mean=mean, m2=var * n)

    def write_moments(self, section: Section, name: str, m: mom.Moments) -> None:
        """Write one layer's per-channel moments in ``section`` (e.g. verify on train)."""
        where = f"{section.path}/{layer_key(name)}"
        group = self._sub(where, create=True)
        self._put_moments(group, m)
        with self._writing(f"group {where}"):
            group.attrs.update({"complete": True})

    def read_moments(self, section: Section, name: str) -> mom.Moments:
        """Read moments written by :meth:`write_moments`."""
        where = f"{section.path}/{layer_key(name)}"
        if not self._sub(where).attrs.get("complete"):
            raise StoreError(f"{str(self.path)!r}: {where!r} was not completely written")
        return self._get_moments(where)

    # -- layers ------------------------------------------------------------------

    def commit_layer(
        self, name: str, before: mom.Moments, solution: Solution, attrs: Mapping
    ) -> None:
        """Write a solved layer; the ``committed`` marker goes last."""
        key = layer_key(name)
        where = f"layers/{key}"
        group = self._sub(where, create=True)
        self._put_moments(group, before)
        self._put(group, "scale", solution.scale, CHANNEL)  # () in tensor mode
        self._put(group, "shift", solution.shift, CHANNEL)
        with self._writing(f"layer {key}"):
            group.attrs.update({**attrs, "committed": True})

    def write_running(self, name: str, running: Running) -> None:
        """Write a layer's running estimate (before its commit; rewritten by a rerun)."""
        where = f"layers/{layer_key(name)}/running"
        group = self._sub(where, create=True)
        for field in Running.FIELDS:
            self._put(group, field, getattr(running, field), ("shard",))
        with self._writing(f"group {where}"):
            group.attrs.update({"complete": True})

    def read_running(self, name: str) -> Running | None:
        """A layer's running estimate, or ``None`` if it has none (a store written before
        they were recorded, or a layer not yet measured)."""
        where = f"layers/{layer_key(name)}/running"
        if not self._flag(where, "complete"):
            return None
        return Running(*(self._get(f"{where}/{field}") for field in Running.FIELDS))

    def committed(self, name: str) -> bool:
        """Whether the layer's commit marker is written."""
        return self._flag(f"layers/{layer_key(name)}", "committed")

    def read_layer(self, name: str) -> LayerRecord:
        """Read a committed layer."""
        key = layer_key(name)
        where = f"layers/{key}"
        attrs = dict(self._sub(where).attrs)
        if not attrs.get("committed"):
            raise StoreError(f"{str(self.path)!r}: layer {key!r} is not committed")
        solution = Solution(scale=self._get(f"{where}/scale"), shift=self._get(f"{where}/shift"))
        return LayerRecord(key, self._get_moments(where), solution, attrs)

    # -- checks ------------------------------------------------------------------

    def check_consistency(self) -> None:
        """Check that the store's parts agree with each other (metadata only, cheap).

        Raises:
            StoreError: No layers listed, layers on disk the list does not name, or a
                complete store with an uncommitted layer or unfinished weights.
        """
        attrs = self.attrs
        keys = [d["key"] for d in attrs["layers"]]
        on_disk = sorted(self._sub("layers").group_keys()) if self.has("layers") else []
        extra = [k for k in on_disk if k not in keys]
        if extra:
            raise StoreError(
                f"{str(self.path)!r}: layers/ holds {', '.join(extra[:5])}, which the run's "
                "'layers' attribute does not list (damaged metadata)"
            )
        if attrs["status"] != "complete":
            return
        missing = [d["name"] for d in attrs["layers"] if not self.committed(d["name"])]
        if missing:
            raise StoreError(
                f"{str(self.path)!r} is marked complete but layer(s) {', '.join(missing[:5])} "
                "are not committed (damaged metadata)"
            )
        for kind in ("initial", "final"):
            if not self._flag(kind, "complete"):
                raise StoreError(
                    f"{str(self.path)!r} is marked complete but its {kind!r} weights are not"
                )

    def check(self) -> None:
        """Read every array and check its checksum and dtype, and the store's consistency.

        Raises:
            StoreError: Naming every damaged part (up to 5) and how many there are.
        """
        self.check_consistency()
        # the root is checked on open; the partial record as its shards are read
        problems = self.check_arrays(skip=("partial",)) + self.check_consolidated()
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise StoreError(f"{str(self.path)!r} is damaged: " + "; ".join(problems[:5]) + more)

    def layer_attrs(self, name: str) -> dict:
        """A committed layer's attributes (passes, residuals, ...); ``{}`` if not committed."""
        if not self.committed(name):
            return {}
        return dict(self._node(f"layers/{layer_key(name)}").attrs)

    # -- passes: per-shard partials and finished multi-pass results ------------------

    def partial(self, pass_id: str, n_shards: int, layers: list[tuple[str, int, int]]) -> Partial:
        """Return the per-shard record of pass ``pass_id``, starting it afresh if needed.

        Args:
            pass_id: Identifies the pass (layer and pass number, or verify split).
            n_shards: Shards in the pass.
            layers: ``(name, calls, channels)`` of every layer the pass measures.
        """
        keyed = [(layer_key(name), calls, channels) for name, calls, channels in layers]
        spec = {"pass_id": pass_id, "shards": n_shards, "layers": [list(x) for x in keyed]}
        names = {layer_key(name): name for name, _, _ in layers}
        if self.has("partial"):
            group = self._node("partial")
            if {k: group.attrs.get(k) for k in spec} == spec:
                return Partial(group, keyed, names, self._writing)
        with self._writing("the partial-pass record"):
            group = self._group.create_group("partial", overwrite=True)
            for key, calls, channels in keyed:
                sub = group.create_group(key)
                for name, shape, dtype in (
                    ("count", (n_shards, calls), "int64"),
                    ("mean", (n_shards, calls, channels), "float64"),
                    ("m2", (n_shards, calls, channels), "float64"),
                ):
                    dims = ("shard", "call", *CHANNEL)[: len(shape)]
                    sub.create_array(name, shape=shape, chunks=(1, *shape[1:]), dtype=dtype,
                                     dimension_names=dims)  # fmt: skip
            group.create_array("done", shape=(n_shards,), chunks=(1,), dtype="int8", fill_value=0,
                               dimension_names=("shard",))  # fmt: skip
            group.attrs.update(spec)  # last: a partial group with these attrs is usable
        return Partial(group, keyed, names, self._writing)

    def write_pass(self, name: str, index: int, calls: tuple[mom.Moments, ...]) -> None:
        """Record the merged per-call moments of pass ``index`` of an iterated layer."""
        key = layer_key(name)
        group = self._sub(f"passes/{key}/{index}", create=True)
        counts = torch.tensor([c.count for c in calls], dtype=torch.int64)
        self._put(group, "count", counts, ("call",))
        self._put(group, "mean", torch.stack([c.mean for c in calls]), ("call", *CHANNEL))
        self._put(group, "m2", torch.stack([c.m2 for c in calls]), ("call", *CHANNEL))
        with self._writing(f"group passes/{key}/{index}"):
            group.attrs.update({"complete": True})

    def read_pass(self, name: str, index: int) -> tuple[mom.Moments, ...] | None:
        """The moments :meth:`write_pass` recorded, or ``None`` if that pass did not finish."""
        where = f"passes/{layer_key(name)}/{index}"
        if not self._flag(where, "complete"):
            return None
        count, mean, m2 = (self._get(f"{where}/{n}") for n in ("count", "mean", "m2"))
        return tuple(mom.Moments(int(n), mu, q) for n, mu, q in zip(count, mean, m2, strict=True))

    def section_complete(self, section: Section, names: list[str]) -> bool:
        """Whether every named layer of a moments section was written."""
        return all(self._flag(f"{section.path}/{layer_key(n)}", "complete") for n in names)

    def finish(self) -> None:
        """Drop the partial-pass record and mark the run complete (the last write)."""
        with self._writing("the completion mark"):
            if self.has("partial"):
                del self._group["partial"]
            sweep_temp_files(self.path)
            self._group.attrs.update({"status": "complete"})
            consolidate(self.path)
