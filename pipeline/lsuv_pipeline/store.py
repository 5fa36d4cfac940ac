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
sha256 of its bytes and its torch dtype, so a missing chunk (which Zarr would read back as
fill values), a damaged one or an edited dtype is caught on read; :meth:`RunStore.check`
reads every array. The root attributes are checked against the schema when a store is
opened, and damaged metadata anywhere is a :class:`StoreError` naming the path.

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

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from . import moments as mom
from .errors import StoreError, write_error
from .layers import Unsolved
from .lock import LOCK_NAME
from .report import LayerStats, with_unsolved
from .schema import SCHEMA, TOOL, Section, check_root, layer_key
from .solve import Solution

__all__ = ["LayerRecord", "Partial", "RunStore"]

_TORCH_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
        torch.bool,
    )
}


def _to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    t = t.detach().cpu()
    dtype = str(t.dtype).removeprefix("torch.")
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: keep the bits
        return t.view(torch.int16).numpy(), dtype
    return t.numpy(), dtype


#: torch dtype name -> the numpy dtype its bytes are stored as.
_STORED_AS = {
    **{
        name: np.dtype(name)
        for name in (
            "float16",
            "float32",
            "float64",
            "int8",
            "int16",
            "int32",
            "int64",
            "uint8",
            "bool",
        )
    },
    "bfloat16": np.dtype("int16"),
}

#: Zarr's temporary files (``<name>.<uuid hex>.partial``), renamed into place when written.
_ZARR_TEMP = re.compile(r"\.[0-9a-f]{32}\.partial$")


def _reason(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


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

    def __init__(self, group, path: Path, *, writer: bool = False) -> None:
        self._group = group
        self.path = path
        self._ours: tuple | None = None
        if writer:
            st = os.stat(path)
            self._ours = (st.st_dev, st.st_ino, dict(group.attrs).get("run_id"))

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
                f"{str(path)!r}: its zarr.json cannot be read ({_reason(exc)}); expected a "
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
            group = zarr.open_group(str(path), mode="r+" if write else "r", zarr_format=3)
        except Exception as exc:
            raise StoreError(f"{str(path)!r} cannot be read as a Zarr v3 group: {exc}") from None
        if write:
            if not attrs.get("run_id"):  # a store an earlier version wrote
                try:
                    group.attrs.update({"run_id": uuid.uuid4().hex})
                except OSError as exc:
                    raise write_error(path, "the store's metadata", exc) from None
            _sweep_temp_files(path)
        return cls(group, path, writer=write)

    # -- writing safely ----------------------------------------------------------

    def _check_ours(self) -> None:
        """Refuse to write into a store that was deleted or replaced since it was opened."""
        if self._ours is None:
            raise StoreError(f"{str(self.path)!r} was opened for reading only")
        try:
            st = os.stat(self.path)
            run_id = json.loads((self.path / "zarr.json").read_text())["attributes"]["run_id"]
        except (OSError, ValueError, KeyError, TypeError):
            st, run_id = None, None
        if st is None or (st.st_dev, st.st_ino, run_id) != self._ours:
            raise StoreError(
                f"{str(self.path)!r} was deleted or replaced while this run was writing it; "
                "stopped without writing more: run the command again to start over"
            )

    @contextlib.contextmanager
    def _writing(self, what: str):
        """Check the store is still ours, then write; OS errors become one StoreError."""
        self._check_ours()
        try:
            yield
        except OSError as exc:
            raise write_error(self.path, what, exc) from None

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

    def _node(self, where: str, what: str = "group"):
        """The group or array at ``where``; missing or unreadable is a StoreError."""
        try:
            return self._group[where]
        except KeyError:
            raise StoreError(f"{str(self.path)!r}: {what} {where!r} is missing") from None
        except Exception as exc:
            raise StoreError(
                f"{str(self.path)!r}: {what} {where!r} cannot be read ({_reason(exc)}); the "
                "store is damaged"
            ) from None

    def has(self, where: str) -> bool:
        """Whether a group or array exists at ``where`` inside the run."""
        try:
            return where in self._group
        except Exception as exc:
            raise StoreError(
                f"{str(self.path)!r}: {where!r} cannot be read ({_reason(exc)}); the store is "
                "damaged"
            ) from None

    def _flag(self, where: str, name: str) -> bool:
        """Whether the group at ``where`` exists and has the attribute ``name`` set."""
        return self.has(where) and bool(self._node(where).attrs.get(name))

    # -- arrays ------------------------------------------------------------------

    def _put(self, group, name: str, value: torch.Tensor) -> None:
        data, dtype = _to_numpy(value)
        with self._writing(f"array {group.path}/{name}"):
            group.create_array(
                name,
                data=data,
                chunks=data.shape if data.ndim else (),
                attributes={"torch_dtype": dtype, "sha256": _digest(data)},
                overwrite=True,
            )

    def _get(self, where: str) -> torch.Tensor:
        """Read the array at ``where``, checking its checksum and its recorded dtype."""
        arr = self._node(where, "array")
        try:
            data = np.asarray(arr[...])
            attrs = dict(arr.attrs)
        except Exception as exc:
            raise StoreError(
                f"{str(self.path)!r}: array {where!r} cannot be read: {_reason(exc)}"
            ) from None
        if attrs.get("sha256") != _digest(data):
            raise StoreError(
                f"{str(self.path)!r}: array {where!r} does not match its recorded checksum "
                "(a chunk is missing or damaged)"
            )
        dtype = attrs.get("torch_dtype")
        if _STORED_AS.get(dtype) != data.dtype:
            raise StoreError(
                f"{str(self.path)!r}: array {where!r} records dtype {dtype!r} but holds "
                f"{data.dtype} values (damaged metadata)"
            )
        t = torch.from_numpy(data.copy())
        return t.view(torch.bfloat16) if dtype == "bfloat16" else t

    def _sub(self, where: str, *, create: bool = False):
        if not create:
            return self._node(where)
        with self._writing(f"group {where}"):
            return self._group.require_group(where)

    # -- model states ------------------------------------------------------------

    def write_state(self, kind: str, state: Mapping[str, torch.Tensor]) -> None:
        """Write a state dict under ``kind`` (``"initial"`` or ``"final"``)."""
        group = self._sub(kind, create=True)
        for name, value in state.items():
            self._put(group, name, value)
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
        self._put(group, "count", torch.full(m.mean.shape, m.count, dtype=torch.int64))
        self._put(group, "mean", m.mean)
        self._put(group, "var", m.var)

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
        self._put(group, "scale", solution.scale)
        self._put(group, "shift", solution.shift)
        with self._writing(f"layer {key}"):
            group.attrs.update({**attrs, "committed": True})

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
        problems: list[str] = []
        for meta in sorted(self.path.rglob("zarr.json")):
            where = meta.parent.relative_to(self.path).as_posix()
            if where == "." or where == "partial" or where.startswith("partial/"):
                continue  # the root is checked on open; partial records as they are read
            try:
                kind = json.loads(meta.read_text()).get("node_type")
            except (OSError, ValueError, AttributeError) as exc:
                problems.append(f"{where}/zarr.json cannot be read ({_reason(exc)})")
                continue
            if kind != "array":
                continue
            try:
                self._get(where)
            except StoreError as exc:
                problems.append(str(exc).removeprefix(f"{str(self.path)!r}: "))
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise StoreError(f"{str(self.path)!r} is damaged: " + "; ".join(problems[:5]) + more)

    def layer_stats(self) -> list[LayerStats]:
        """Per-layer statistics as far as the run got, for tables and plots."""
        attrs = self.attrs
        config = attrs.get("config", {})
        split, holdout = config.get("split", "train"), config.get("holdout")
        out = []
        for info in attrs.get("layers", []):
            name = info["name"]
            solved = self.committed(name)
            la = dict(self._node(f"layers/{info['key']}").attrs) if solved else {}
            section = Section("before", split)
            before = (
                self.read_moments(section, name) if self.section_complete(section, [name]) else None
            )
            after = {
                sp: self.read_moments(Section("verify", sp), name)
                for sp in (split, holdout)
                if sp and self.section_complete(Section("verify", sp), [name])
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
                    sub.create_array(name, shape=shape, chunks=(1, *shape[1:]), dtype=dtype)
            group.create_array("done", shape=(n_shards,), chunks=(1,), dtype="int8", fill_value=0)
            group.attrs.update(spec)  # last: a partial group with these attrs is usable
        return Partial(group, keyed, names, self._writing)

    def write_pass(self, name: str, index: int, calls: tuple[mom.Moments, ...]) -> None:
        """Record the merged per-call moments of pass ``index`` of an iterated layer."""
        key = layer_key(name)
        group = self._sub(f"passes/{key}/{index}", create=True)
        self._put(group, "count", torch.tensor([c.count for c in calls], dtype=torch.int64))
        self._put(group, "mean", torch.stack([c.mean for c in calls]))
        self._put(group, "m2", torch.stack([c.m2 for c in calls]))
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
            _sweep_temp_files(self.path)
            self._group.attrs.update({"status": "complete"})

    @staticmethod
    def wipe(path: str | Path, keep: tuple[str, ...] = ()) -> None:
        """Delete a run store's contents, keeping the folder and the entries in ``keep``."""
        try:
            for child in Path(path).iterdir():
                if child.name in keep:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        except OSError as exc:
            raise write_error(Path(path), "(replacing the old run)", exc) from None


def _sweep_temp_files(path: Path) -> None:
    """Remove the temporary files Zarr writes and renames into place (a kill can leave one)."""
    for tmp in path.rglob("*.partial"):
        if _ZARR_TEMP.search(tmp.name):
            tmp.unlink(missing_ok=True)


class Partial:
    """The per-shard moments of the pass in progress, one Zarr chunk per shard.

    Layers are named by module name in and out; their groups are their keys.
    ``writing(what)`` is the store's write guard: every shard is written through it.
    """

    def __init__(self, group, layers: list[tuple[str, int, int]], names: dict, writing) -> None:
        self._layers = layers
        self._names = names  # key -> layer name
        self._writing = writing
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
                out[i][self._names[key]] = tuple(
                    mom.Moments(
                        int(count[i, c]),
                        torch.from_numpy(mean[i, c].copy()),
                        torch.from_numpy(m2[i, c].copy()),
                    )
                    for c in range(count.shape[1])
                )
        return out

    def put(self, index: int, moments: dict[str, tuple[mom.Moments, ...]]) -> None:
        """Record shard ``index``; its done flag is written after its moments."""
        with self._writing(f"the record of shard {index}"):
            for key, calls, _ in self._layers:
                count, mean, m2 = self._arrays[key]
                parts = moments[self._names[key]]
                if len(parts) != calls:
                    raise StoreError(
                        f"layer {key!r}: expected {calls} calls per forward, got {len(parts)}"
                    )
                count[index] = np.array([p.count for p in parts], dtype=np.int64)
                mean[index] = torch.stack([p.mean for p in parts]).numpy()
                m2[index] = torch.stack([p.m2 for p in parts]).numpy()
            self._done[index] = 1
