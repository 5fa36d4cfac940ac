"""Progress events of a run, and their display as tqdm bars on stderr."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

__all__ = ["Progress", "TqdmProgress", "as_progress"]


class Progress:
    """Receives progress events; the default ignores them."""

    def pass_started(self, label: str, total: int) -> None:
        """A pass over ``total`` samples begins."""

    def advance(self, n: int) -> None:
        """``n`` more samples of the current pass are done."""

    def pass_finished(self) -> None:
        """The current pass ended."""

    def note(self, text: str) -> None:
        """A message worth showing between passes."""

    def warn(self, text: str) -> None:
        """A message shown even when notes are not: warnings, and which layers the run
        solves and leaves (default: a note)."""
        self.note(text)


class TqdmProgress(Progress):
    """One tqdm bar per pass on stderr (unless ``bars=False``), messages between them
    (notes unless ``notes=False``; warnings always)."""

    def __init__(self, *, bars: bool = True, notes: bool = True) -> None:
        self._bar = None
        self._bars = bars
        self._notes = notes

    def pass_started(self, label: str, total: int) -> None:
        if not self._bars:
            return
        self._bar = tqdm(total=total, desc=label, unit="img", unit_scale=True, leave=True)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def pass_finished(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def note(self, text: str) -> None:
        if self._notes:
            tqdm.write(text, file=sys.stderr)

    def warn(self, text: str) -> None:
        tqdm.write(text, file=sys.stderr)


def as_progress(progress: Progress | bool | None) -> Progress:
    """``True``: bars on stderr; ``False``/``None``: silent; else the object itself."""
    if progress is True:
        return TqdmProgress()
    return progress or Progress()
