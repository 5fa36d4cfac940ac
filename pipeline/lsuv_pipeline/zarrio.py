"""Checked access to a Zarr group on disk: every read and every write goes through here.

:class:`CheckedGroup` is the layer below the run store (``store.py``):

- arrays are written with the sha256 of their bytes and their torch dtype, and read back
  only if both still hold (a missing chunk reads back as fill values, so it fails the
  checksum; an edited dtype attribute fails the dtype check);
- a node whose metadata cannot be read, anywhere in the tree, is a :class:`StoreError`
  naming its path, never a JSON or Zarr traceback;
- a writer checks before every write that the folder is still the one it opened (same
  inode, same ``run_id`` in its root ``zarr.json``), and OS errors (a full disk, a
  read-only folder) become one :class:`StoreError` (``errors.write_error``);
- Zarr's temporary files (``<name>.<uuid>.partial``, renamed into place once written,
  left behind by a kill) are swept away;
- a run without a store of its own writes into a :func:`scratch_folder`, removed after.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.errors import ZarrUserWarning

from .errors import StoreError, first_line, write_error

__all__ = ["CheckedGroup", "consolidate", "failed_write", "scratch_folder", "sweep_temp_files"]

#: Whether a write into a store failed with an OS error here (reported as one StoreError).
_failed = False


def failed_write() -> None:
    """Note that a write failed with an OS error, which the caller reports.

    zarr runs some writes side by side; when one fails, the others may fail too (the same
    full disk, or a ``zarr.json`` the failed one left) with nobody awaiting them, and
    asyncio would print each one's traceback at exit, after the error line. From here on
    those leftovers, OS errors only, are dropped; any other is shown as before.
    """
    global _failed
    if _failed:
        return
    _failed = True
    from zarr.core.sync import _get_loop

    def handler(loop, context) -> None:
        exc = context.get("exception")
        unawaited = "never retrieved" in context.get("message", "")
        if not (unawaited and isinstance(exc, OSError)):
            loop.default_exception_handler(context)

    _get_loop().set_exception_handler(handler)


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


def _digest(a: np.ndarray) -> str:
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


class CheckedGroup:
    """A Zarr group and the folder it lives in, read and written with the checks above.

    Args:
        group: The open ``zarr.Group``.
        path: Its folder.
        writer: Whether this process writes it (then its identity is taken now).
    """

    def __init__(self, group, path: Path, *, writer: bool = False) -> None:
        self._group = group
        self.path = path
        self._ours: tuple | None = None
        if writer:
            st = os.stat(path)
            self._ours = (st.st_dev, st.st_ino, dict(group.attrs).get("run_id"))

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
            failed_write()
            raise write_error(self.path, what, exc) from None

    def _node(self, where: str, what: str = "group"):
        """The group or array at ``where``; missing or unreadable is a StoreError."""
        try:
            return self._group[where]
        except KeyError:
            raise StoreError(f"{str(self.path)!r}: {what} {where!r} is missing") from None
        except Exception as exc:
            raise StoreError(
                f"{str(self.path)!r}: {what} {where!r} cannot be read ({first_line(exc)}); the "
                "store is damaged"
            ) from None

    def has(self, where: str) -> bool:
        """Whether a group or array exists at ``where`` inside the run."""
        try:
            return where in self._group
        except Exception as exc:
            raise StoreError(
                f"{str(self.path)!r}: {where!r} cannot be read ({first_line(exc)}); the store is "
                "damaged"
            ) from None

    def _flag(self, where: str, name: str) -> bool:
        """Whether the group at ``where`` exists and has the attribute ``name`` set."""
        return self.has(where) and bool(self._node(where).attrs.get(name))

    def _put(self, group, name: str, value: torch.Tensor, dims: tuple[str, ...] = ()) -> None:
        """Write one array, one chunk, with its checksum and torch dtype.

        ``dims`` names its dimensions (for xarray and other readers); by default they are
        ``<name>.dim0``, ``<name>.dim1``, ... (unique, so no two arrays of a group clash).
        """
        data, dtype = _to_numpy(value)
        if len(dims) != data.ndim:
            dims = tuple(f"{name}.dim{i}" for i in range(data.ndim))
        with self._writing(f"array {group.path}/{name}"):
            group.create_array(
                name,
                data=data,
                chunks=data.shape if data.ndim else (),
                dimension_names=dims,
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
                f"{str(self.path)!r}: array {where!r} cannot be read: {first_line(exc)}"
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

    def check_consolidated(self) -> list[str]:
        """Where the consolidated metadata (for other readers) differs from the nodes' own."""
        try:
            root = json.loads((self.path / "zarr.json").read_text())
        except (OSError, ValueError) as exc:
            return [f"zarr.json cannot be read ({first_line(exc)})"]
        meta = (root.get("consolidated_metadata") or {}).get("metadata")
        if not isinstance(meta, dict):
            return []
        problems = []
        for where, recorded in sorted(meta.items()):
            node = self.path / where / "zarr.json"
            try:
                own = json.loads(node.read_text())
            except (OSError, ValueError):
                problems.append(f"the consolidated metadata lists {where!r}, which is missing")
                continue
            own.pop("consolidated_metadata", None)
            recorded = {k: v for k, v in recorded.items() if k != "consolidated_metadata"}
            if _normal(own) != _normal(recorded):
                problems.append(f"{where!r}: its metadata differs from the consolidated copy")
        return problems

    def check_arrays(self, skip: tuple[str, ...] = ()) -> list[str]:
        """Read every array under the group, checking it; return what is damaged.

        Arrays under the paths in ``skip`` are left out.
        """
        problems: list[str] = []
        for meta in sorted(self.path.rglob("zarr.json")):
            where = meta.parent.relative_to(self.path).as_posix()
            if where == "." or any(where == s or where.startswith(s + "/") for s in skip):
                continue
            try:
                kind = json.loads(meta.read_text()).get("node_type")
            except (OSError, ValueError, AttributeError) as exc:
                problems.append(f"{where}/zarr.json cannot be read ({first_line(exc)})")
                continue
            if kind != "array":
                continue
            try:
                self._get(where)
            except StoreError as exc:
                problems.append(str(exc).removeprefix(f"{str(self.path)!r}: "))
        return problems


def _normal(meta: dict) -> dict:
    """Metadata without the keys Zarr fills in when absent, for comparing two copies."""
    return {k: v for k, v in meta.items() if v not in (None, [], {}) or k == "attributes"}


def consolidate(path: Path) -> None:
    """Write the consolidated metadata other readers (xarray) open a finished store with.

    Readers of this package read every node's own metadata; ``check`` compares the two.
    """
    with warnings.catch_warnings():
        # Zarr warns that consolidated metadata is an extension of the v3 format (which is
        # why it is only written for other readers) and that the writer's lock file is not
        # a node of the hierarchy
        warnings.simplefilter("ignore", ZarrUserWarning)
        zarr.consolidate_metadata(str(path), zarr_format=3)


def sweep_temp_files(path: Path) -> None:
    """Remove the temporary files Zarr writes and renames into place (a kill can leave one)."""
    for tmp in path.rglob("*.partial"):
        if _ZARR_TEMP.search(tmp.name):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def scratch_folder(prefix: str) -> Iterator[Path]:
    """A new temporary folder, removed on exit; one :class:`StoreError` if it cannot be
    made (a full or unwritable temporary directory), never an ``OSError``."""
    try:
        tmp = tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True)
    except OSError as exc:
        where = tempfile.gettempdir()
        raise StoreError(
            f"cannot create a temporary folder in {where!r} for the run: "
            f"{exc.strerror or exc}; set TMPDIR to a writable folder with free space, or "
            "give the run a store of its own (store=)"
        ) from None
    with tmp as path:
        yield Path(path)
