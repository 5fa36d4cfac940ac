"""The numerics of a process: what decides the bits of a pass, and pinning what can be pinned.

Identical bytes can only be promised between runs whose kernels are the same. On the CPU,
PyTorch picks its vector kernels by instruction set (``get_cpu_capability()``), and MKL and
oneDNN pick theirs by CPU vendor and model too: an AMD EPYC and an Intel Xeon that both
report AVX512 sum a matrix product in different orders and differ in the last bit. On CUDA
the GPU model and the CUDA / cuDNN builds decide. :func:`fingerprint` records all of it;
:func:`numerics_key` is the digest of the fields that decide the bits, so two runs are
bitwise comparable exactly when their keys are equal.

The thread count is recorded but is not part of the key: in every test here one and two
threads (dask workers against an inline run) gave the same bytes. It is recorded so that a
difference on other hardware can be traced to it; it is not promised.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import re
from collections.abc import Iterator

import torch

from .errors import ExecutorError, StoreError

__all__ = [
    "KERNEL_ENV",
    "Admission",
    "check_resume",
    "fingerprint",
    "numerics_differences",
    "numerics_key",
    "reproducible",
    "with_mixed",
]

#: Environment variables that change which kernels run (recorded when set).
KERNEL_ENV = (
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_DEBUG_CPU_TYPE",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "OPENBLAS_CORETYPE",
)


@functools.cache
def _cpu() -> dict[str, str]:
    """Vendor, model name and family/model numbers of this CPU (Linux: /proc/cpuinfo)."""
    fields = {"vendor_id": "", "model name": "", "cpu family": "", "model": ""}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, sep, value = line.partition(":")
            key = key.strip()
            if not sep:
                if any(fields.values()):
                    break  # the first processor is enough
                continue
            if key in fields and not fields[key]:
                fields[key] = value.strip()
    return {
        "cpu_vendor": fields["vendor_id"] or platform.machine(),
        "cpu_model": fields["model name"] or platform.processor() or "unknown",
        "cpu_family_model": f"{fields['cpu family'] or '?'}/{fields['model'] or '?'}",
    }


@functools.cache
def _libraries() -> dict[str, str]:
    """The BLAS and oneDNN builds torch was compiled with, from ``torch.__config__.show()``."""
    shown = torch.__config__.show()
    out = {"torch": torch.__version__}
    mkl = re.search(r"Math Kernel Library Version ([^\n]+?) for", shown)
    if mkl:
        out["blas"] = f"MKL {mkl.group(1)}"
    else:
        blas = re.search(r"BLAS_INFO=(\w+)", shown)
        out["blas"] = blas.group(1) if blas else "unknown"
    onednn = re.search(r"MKL-DNN (v[\d.]+)", shown) or re.search(r"oneDNN (v[\d.]+)", shown)
    out["onednn"] = onednn.group(1) if onednn else "none"
    return out


def fingerprint(device: torch.device | str = "cpu") -> dict:
    """Return what decides the bits of a pass on ``device`` in this process.

    Returns:
        A JSON-able dict: ``device`` type, CPU vendor, model name and family/model numbers,
        PyTorch's CPU capability, the torch / BLAS / oneDNN builds, for CUDA the GPU name,
        compute capability and CUDA / cuDNN versions, the kernel-choosing environment
        variables that are set (:data:`KERNEL_ENV`), and the thread count (informational).
    """
    device = torch.device(device)
    out: dict = {"device": device.type, **_cpu()}
    out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    out.update(_libraries())
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        out["gpu"] = torch.cuda.get_device_name(index)
        out["gpu_capability"] = f"{major}.{minor}"
        out["cuda"] = torch.version.cuda or "unknown"
        out["cudnn"] = str(torch.backends.cudnn.version())
    env = {k: os.environ[k] for k in KERNEL_ENV if os.environ.get(k)}
    if env:
        out["env"] = env
    out["threads"] = torch.get_num_threads()
    return out


def numerics_key(fp: dict) -> str:
    """Digest of the fields of a fingerprint that decide the bits (all but ``threads``)."""
    decisive = {k: v for k, v in fp.items() if k not in ("threads", "key", "mixed")}
    text = json.dumps(decisive, sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def numerics_differences(a: dict, b: dict) -> list[str]:
    """``"field: a -> b"`` for every decisive field in which two fingerprints differ."""
    keys = sorted((set(a) | set(b)) - {"threads", "key", "mixed"})
    return [f"{k}: {a.get(k)} -> {b.get(k)}" for k in keys if a.get(k) != b.get(k)]


class Admission:
    """The fingerprint a pool of processes (dask workers, ranks) computes with, and the
    other ones it has admitted.

    Args:
        reference: The pool's fingerprint: the one every result is compared against.
        allow_mixed: Record another fingerprint instead of refusing it.
        unit: What the pool is made of (``"worker"``, ``"rank"``), for the message.
    """

    def __init__(self, reference: dict, *, allow_mixed: bool, unit: str) -> None:
        self.reference = reference
        self.allow_mixed = allow_mixed
        self.unit = unit
        self._key = numerics_key(reference)
        self._mixed: dict[str, dict] = {}  # numerics key -> fingerprint, other than ours

    @property
    def mixed(self) -> list[dict]:
        """The admitted fingerprints other than the reference, once each, in order."""
        return list(self._mixed.values())

    def admit(self, fp: dict, who: str, than: str) -> None:
        """Check the fingerprint of ``who`` against the reference (``than`` names whose it
        is); record another one, or refuse it.

        Raises:
            ExecutorError: ``fp`` decides other bits and mixing is not allowed.
        """
        key = numerics_key(fp)
        if key == self._key or key in self._mixed:
            return
        if not self.allow_mixed:
            raise ExecutorError(
                f"{who} computes with other numerics than {than} "
                f"({'; '.join(numerics_differences(self.reference, fp))}), so the result "
                f"would depend on which {self.unit} ran which shard; use {self.unit}s of one "
                "hardware type and library build, or pass --allow-mixed-hardware (recorded "
                "in the store)"
            )
        self._mixed[key] = fp


def with_mixed(record: dict, others: list[dict]) -> tuple[dict, int]:
    """A store's ``numerics`` record with the fingerprints in ``others`` that it does not
    hold yet added to its ``mixed`` list; and how many were new."""
    known = {numerics_key(fp) for fp in record.get("mixed", [])} | {record.get("key")}
    new = [fp for fp in others if numerics_key(fp) not in known]
    if not new:
        return record, 0
    return {**record, "mixed": [*record.get("mixed", []), *new]}, len(new)


def check_resume(record: dict, current: dict, *, allow_mixed: bool, where: str) -> dict:
    """The ``numerics`` record of a store resumed with ``current``'s numerics.

    Returns the record unchanged when the keys match, else (with ``allow_mixed``) with
    ``current`` added to its mixed list.

    Raises:
        StoreError: The store was started with other numerics and mixing is not allowed.
    """
    if record.get("key") == numerics_key(current):
        return record
    if not allow_mixed:
        differ = "; ".join(numerics_differences(record, current)) or (
            "its recorded key differs" if record else "none recorded"
        )
        raise StoreError(
            f"{where} was started with other numerics than this machine has ({differ}); "
            "finishing it here would mix them: rerun where it started, pass --overwrite to "
            "start again here, or --allow-mixed-hardware to finish it here (recorded in the "
            "store)"
        )
    return with_mixed(record, [current])[0]


@contextlib.contextmanager
def reproducible(device: torch.device, *, allow_tf32: bool = False) -> Iterator[None]:
    """Pin the numerics of a pass: no TF32, deterministic cuDNN; restored on exit."""
    if device.type != "cuda":
        yield
        return
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
        ) = saved
