"""The run store's schema: its names, its root attributes, and a run's identity.

``store.py`` reads and writes; this module says what the store holds and when a store on
disk is "the same run" as the one asked for. Other modules pass plain values (layer names,
splits, :class:`Section`) and never build key strings themselves.

- Layer groups are named by module name, ``"(model)"`` for the root module
  (:func:`layer_key`); moments sections are ``before/<split>`` (initial weights) and
  ``verify/<split>`` (after LSUV); a pass's per-shard record is identified by its pass id.
- The root attributes (:func:`root_attrs`) record what was computed and with what; those a
  reader relies on are checked against their JSON types on every open (:func:`check_root`).
- A store is the same run when config, dataset fingerprints and the model's class,
  structure and initial state all match (:func:`identity`, :func:`differences`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig
from .errors import ConfigError, LsuvError, StoreError

__all__ = [
    "SCHEMA",
    "TOOL",
    "Section",
    "check_root",
    "differences",
    "identity",
    "layer_key",
    "layer_pass_id",
    "root_attrs",
    "stored_identity",
    "versions",
]

SCHEMA = 1
TOOL = "lsuv-pipeline"


def layer_key(name: str) -> str:
    """Return the group key of a layer: its module name (``"(model)"`` for the root)."""
    return name or "(model)"


@dataclass(frozen=True)
class Section:
    """A moments section: every layer's moments over ``split``, ``"before"`` the solve
    (initial weights) or after it (``"verify"``)."""

    kind: str
    split: str

    @property
    def path(self) -> str:
        return f"{self.kind}/{self.split}"


def layer_pass_id(name: str, index: int) -> str:
    """The id of pass ``index`` (1-based) of layer ``name``'s solve."""
    return f"layer/{layer_key(name)}/{index}"


def versions() -> dict[str, str]:
    """Return the versions of the libraries that determine a run's numbers."""
    out = {"python": platform.python_version()}
    for dist in ("lsuv-pipeline", "torch", "torchvision", "numpy", "zarr", "dask", "distributed"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def root_attrs(
    *,
    config: dict,
    dataset: dict,
    holdout: dict | None,
    model: dict,
    layers: list[dict],
    unsolved: list[dict],
    tied: list[dict],
    device: str,
    allow_tf32: bool,
    numerics: dict,
) -> dict:
    """The root attributes of a new run (``store.RunStore.create`` adds schema, tool and
    run id). ``layers`` are ``LayerInfo.to_dict()`` records, in forward order."""
    return {
        "config": config,
        "dataset": dataset,
        "holdout": holdout,
        "model": model,
        "layers": [{**d, "key": layer_key(d["name"])} for d in layers],
        "unsolved": unsolved,
        "tied": tied,
        "status": "running",
        "device": device,
        "allow_tf32": allow_tf32,
        "numerics": numerics,
        "versions": versions(),
    }


#: The root attributes a reader relies on, and the JSON type each must have.
_ROOT_TYPES = {
    "config": dict,
    "dataset": dict,
    "model": dict,
    "layers": list,
    "status": str,
}
_LAYER_TYPES = {
    "name": str,
    "kind": str,
    "calls": int,
    "dependent": bool,
    "channels": int,
    "key": str,
}


def check_root(path: Path, attrs: dict) -> None:
    """Check the root attributes a reader relies on have the types of the schema.

    Raises:
        StoreError: Naming the first attribute that is missing or of another type.
    """

    def damaged(key: str, expected: str, value) -> StoreError:
        got = type(value).__name__ if key in attrs else "nothing"
        return StoreError(
            f"{str(path)!r}: root attribute {key!r} is damaged (expected {expected}, got {got})"
        )

    for key, kind in _ROOT_TYPES.items():
        if not isinstance(attrs.get(key), kind):
            raise damaged(key, f"a JSON {kind.__name__}", attrs.get(key))
    if attrs["status"] not in ("running", "complete"):
        raise damaged("status", "'running' or 'complete'", attrs["status"])
    if not attrs["layers"]:
        raise damaged("layers", "a non-empty list of layers", attrs["layers"])
    for layer in attrs["layers"]:
        if not isinstance(layer, dict) or any(
            type(layer.get(k)) is not t for k, t in _LAYER_TYPES.items()
        ):
            raise damaged("layers", "a list of layer records", layer)
    for key in ("holdout", "numerics", "verification"):
        if attrs.get(key) is not None and not isinstance(attrs[key], dict):
            raise damaged(key, "a JSON object or null", attrs[key])
    unsolved = attrs.get("unsolved", [])
    if not isinstance(unsolved, list) or not all(isinstance(u, dict) for u in unsolved):
        raise damaged("unsolved", "a list of layer records", unsolved)
    try:
        RunConfig.from_dict(attrs["config"])
    except (ConfigError, TypeError) as exc:
        raise StoreError(f"{str(path)!r}: root attribute 'config' is damaged ({exc})") from None


#: Identity keys from the model's description, and what a difference in them means.
_MODEL_KEYS = {
    "model class": ("class", ""),
    "model structure": ("structure", " (other layers or layer settings)"),
    "model initial state": ("initial", " (other initial weights: another seed or init)"),
}


def identity(
    config: RunConfig, dataset_fingerprint: str, holdout_fingerprint: str | None, model: dict
) -> dict:
    """What a store must match to be resumed or to count as up to date.

    ``model`` is the model's provenance (``models.describe_model`` and how it was made);
    its class, structure and initial-state digests are compared, the rest is recorded.
    """
    return {
        "config": config.to_dict(),
        "dataset fingerprint": dataset_fingerprint,
        "held-out fingerprint": holdout_fingerprint,
        **{key: model.get(field) for key, (field, _) in _MODEL_KEYS.items()},
        "provenance": model,
    }


def stored_identity(attrs: dict) -> dict:
    holdout = attrs.get("holdout") or {}
    model = attrs.get("model", {})
    return {
        "config": attrs.get("config"),
        "dataset fingerprint": attrs.get("dataset", {}).get("fingerprint"),
        "held-out fingerprint": holdout.get("fingerprint"),
        **{key: model.get(field) for key, (field, _) in _MODEL_KEYS.items()},
    }


def differences(stored: dict, wanted: dict) -> list[str]:
    """``"what: stored -> wanted"`` for everything in which a store is another run."""
    out = []
    for key, want in wanted.items():
        have = stored.get(key)
        if key == "config" and isinstance(have, dict):
            with contextlib.suppress(LsuvError):  # fill keys a store predates with defaults
                have = RunConfig.from_dict(have).to_dict()
            # both ways: an option at its default is left out of a config (``to_dict``), so
            # a key only the store has (``--sample``, ``--compile``) is a difference too
            keys = list(want) + [k for k in have if k not in want]
            out += [
                f"--{k.replace('_', '-')}: {have.get(k)!r} -> {want.get(k)!r}"
                for k in keys
                if have.get(k) != want.get(k)
            ]
        elif key == "provenance":
            continue  # recorded, not compared: the digests above say what matters
        elif have != want:
            why = _MODEL_KEYS.get(key, ("", ""))[1]
            out.append(f"{key}: {_short(have)} -> {_short(want)}{why}")
    return out


def _short(value):
    """A digest cut to a readable length; other values as they are."""
    if isinstance(value, str) and value.startswith("sha256:"):
        return value[:19]
    return value
