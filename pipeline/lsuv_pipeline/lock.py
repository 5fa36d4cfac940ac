"""One writer per run store: an advisory lock that a crashed writer cannot leave stuck.

The lock is the file ``<store>/.writer.lock``. The writer holds an exclusive ``flock`` on it
for as long as it runs (the kernel drops it when the process dies, however it dies) and
writes its pid, host and start time into it for the message a second writer sees. Where
``flock`` does not reach across hosts (some network file systems), the recorded owner
decides: on the same host a dead pid means the lock is stale; on another host a lock
whose heartbeat (the file's mtime, touched every ``HEARTBEAT_S``) is older than
``STALE_AFTER_S`` is stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import StoreError, write_error

__all__ = ["LOCK_NAME", "writer_lock"]

LOCK_NAME = ".writer.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (guards against pid reuse), if known."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    now = _process_start(pid)
    return start is None or now is None or now == start


def _owner(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(owner: dict) -> str:
    since = owner.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} (since {when})"


def _stale(owner: dict, mtime: float) -> bool:
    if not owner.get("pid"):
        return True
    if owner.get("host") == socket.gethostname():
        return not _alive(int(owner["pid"]), owner.get("start"))
    return time.time() - mtime > STALE_AFTER_S


def _open_locked(path: Path, store: Path) -> int:
    """Open ``path`` and take its flock; retry if it was unlinked by a releasing writer."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(path)
            os.close(fd)
            raise StoreError(
                f"{str(store)!r} is being written by {_describe(owner)}; wait for it to "
                "finish, or stop it first"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # we locked a file the previous writer had just removed


@contextlib.contextmanager
def writer_lock(store: Path) -> Iterator[dict | None]:
    """Hold the writer lock of ``store`` for the duration of the block.

    A folder this call had to create (with any parents) is removed again on exit if it
    holds nothing but the lock then: a run that fails before writing its store leaves
    nothing behind.

    Yields:
        The previous owner's record when a stale lock was taken over, else ``None``.

    Raises:
        StoreError: Another live process holds the lock, or the folder cannot be created.
        ReadOnlyStore: The folder cannot be written (read-only file system, permissions).
    """
    store = Path(store)
    path = store / LOCK_NAME
    created = [p for p in (store, *store.parents) if not p.exists()]
    try:
        store.mkdir(parents=True, exist_ok=True)
        fd = _open_locked(path, store)
    except OSError as exc:
        _remove_empty(created)
        raise write_error(store, "its lock file", exc) from None
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield from _held(fd, path, store)
    finally:
        os.close(fd)  # also drops the flock
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed start created, innermost first, while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (the store was written), or gone


def _held(fd: int, path: Path, store: Path) -> Iterator[dict | None]:
    """The body of :func:`writer_lock` once the flock is held."""
    previous = _owner(path) or None
    if previous is not None and _alive_elsewhere(previous, path):
        raise StoreError(
            f"{str(store)!r} is locked by {_describe(previous)}; if that process is "
            f"gone, delete {str(path)!r}"
        )
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start": _process_start(os.getpid()),
        "since": time.time(),
    }
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
    except OSError as exc:
        raise write_error(store, "its lock file", exc) from None
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, stop), daemon=True)
    beat.start()
    try:
        yield previous
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(OSError):
            path.unlink()  # a released lock leaves nothing behind


def _alive_elsewhere(owner: dict, path: Path) -> bool:
    """Whether a recorded owner (not us) may still be running, though flock said free."""
    if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        return False
    return not _stale(owner, path.stat().st_mtime)


def _heartbeat(path: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(path)
