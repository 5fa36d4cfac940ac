"""Comparing run stores in tests: byte for byte on the same numerics, else within tolerance."""

from __future__ import annotations

import numpy as np
import zarr

#: Across numerics fingerprints (README, "Reproducible per hardware"): every stored number
#: agrees within this relative tolerance, or this absolute one for values that are
#: rounding noise themselves (a solved layer's mean of 1e-8).
RTOL, ATOL = 1e-6, 1e-7


def store_arrays(path, skip=lambda key: False) -> dict:
    """Every array of a run store by its path, the partial-pass record (and what ``skip``
    says) excepted."""
    out = {}

    def walk(group, prefix):
        for name, member in group.members():
            full = f"{prefix}{name}"
            if isinstance(member, zarr.Array):
                if not skip(full):
                    out[full] = member[...]
            elif full != "partial":
                walk(member, full + "/")

    walk(zarr.open_group(str(path), mode="r"), "")
    return out


def same_bytes(a, b) -> bool:
    """Whether two stores hold the same arrays with the same dtypes and bytes."""
    left, right = store_arrays(a), store_arrays(b)
    return sorted(left) == sorted(right) and all(
        v.dtype == right[k].dtype and v.tobytes() == right[k].tobytes() for k, v in left.items()
    )


def assert_same_bytes(a, b) -> None:
    """Assert :func:`same_bytes`, naming the first array that differs."""
    left, right = store_arrays(a), store_arrays(b)
    assert sorted(left) == sorted(right)
    for key, value in left.items():
        assert value.dtype == right[key].dtype, key
        assert value.tobytes() == right[key].tobytes(), key


def store_files(path) -> list[str]:
    """Every file of a store, relative to it (the partial-pass record and lock excepted)."""
    from pathlib import Path

    root = Path(path)
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file()
        and p.name != ".writer.lock"
        and not p.relative_to(root).as_posix().startswith("partial/")
    )


def numerics(path) -> dict:
    """The numerics record of a store (its fingerprint, key and any mixed fingerprints)."""
    return dict(zarr.open_group(str(path), mode="r").attrs.get("numerics") or {})


def bitwise_comparable(a, b) -> bool:
    """Whether two stores were computed with the same numerics, neither of them mixed."""
    na, nb = numerics(a), numerics(b)
    return (
        bool(na.get("key"))
        and na.get("key") == nb.get("key")
        and not (na.get("mixed") or nb.get("mixed"))
    )


def assert_same_run(a, b, skip=lambda key: False) -> str:
    """The contract: same bytes on the same numerics, else every array within RTOL/ATOL
    (the arrays ``skip`` names left out of both).

    Returns ``"bitwise"`` or ``"tolerance"``: which promise was checked.
    """
    left, right = store_arrays(a, skip), store_arrays(b, skip)
    if bitwise_comparable(a, b):
        assert sorted(left) == sorted(right)
        for key, value in left.items():
            assert value.dtype == right[key].dtype, key
            assert value.tobytes() == right[key].tobytes(), key
        return "bitwise"
    assert sorted(left) == sorted(right)
    for key, value in left.items():
        assert value.dtype == right[key].dtype, key
        if value.dtype.kind in "iub":
            assert np.array_equal(value, right[key]), key
        else:
            assert np.allclose(value, right[key], rtol=RTOL, atol=ATOL), key
    return "tolerance"
