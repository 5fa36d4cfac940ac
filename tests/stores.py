"""Comparing run stores in tests: every array, byte for byte."""

from __future__ import annotations

import zarr


def store_arrays(path) -> dict:
    """Every array of a run store by its path, the partial-pass record excepted."""
    out = {}

    def walk(group, prefix):
        for name, member in group.members():
            full = f"{prefix}{name}"
            if isinstance(member, zarr.Array):
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
