"""The CPU a run computes on, as far as bit-identity of the results depends on it.

numba compiles the kernels for the host CPU (``fastmath`` lets LLVM reassociate sums, and
the instructions it picks depend on the CPU's features), so the same state and data give
bit-identical results on the same CPU type only. A checkpoint records :func:`host_info`;
on resume :func:`compare_hosts` tells whether the continuation can be bit-identical to an
uninterrupted run (same CPU type) or only state-exact (another CPU type: the state loads
exactly, later steps may differ by rounding).
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Any

__all__ = ["host_info", "compare_hosts", "cpu_model"]


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name (``model name`` of /proc/cpuinfo; ``platform.processor()`` or
    the machine type where that file does not exist)."""
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model Name", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _numba_target() -> tuple[str, str]:
    """(CPU name, SHA-256 prefix of the feature string) numba's LLVM compiles for: the
    ``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES`` overrides if set, else the host's."""
    import llvmlite.binding as ll
    import numba

    name = numba.config.CPU_NAME or ll.get_host_cpu_name()
    features = numba.config.CPU_FEATURES or ll.get_host_cpu_features().flatten()
    return str(name), hashlib.sha256(str(features).encode()).hexdigest()[:16]


def host_info() -> dict[str, str]:
    """What a checkpoint records about the CPU: ``cpu_model`` (e.g. "AMD EPYC 9654"),
    ``machine`` (e.g. "x86_64"), ``numba_cpu_name`` (LLVM's target, e.g. "znver4") and
    ``numba_cpu_features`` (a 16-hex-digit digest of LLVM's feature string)."""
    name, features = _numba_target()
    return {"cpu_model": cpu_model(), "machine": platform.machine(), "numba_cpu_name": name,
            "numba_cpu_features": features}


def compare_hosts(saved: dict[str, Any] | None, current: dict[str, str]) -> tuple[bool, str]:
    """(same CPU type?, one log line) for a checkpoint written on ``saved`` and resumed on
    ``current`` (both :func:`host_info` dicts; ``saved`` None for checkpoints that predate
    the record)."""
    def show(h: dict[str, Any]) -> str:
        return f"{h.get('cpu_model', '?')} (numba target {h.get('numba_cpu_name', '?')}, " \
               f"features {h.get('numba_cpu_features', '?')})"

    if not saved:
        return False, (f"the checkpoint does not record its CPU; resuming on {show(current)}: the state loads "
                       "exactly; the continuation is bit-identical to an uninterrupted run only on the same CPU type")
    keys = ("cpu_model", "machine", "numba_cpu_name", "numba_cpu_features")
    if all(saved.get(k) == current.get(k) for k in keys):
        return True, (f"same CPU type as the checkpoint's, {show(current)}: the continuation is bit-identical "
                      "to an uninterrupted run")
    return False, (f"the checkpoint was written on {show(saved)}, this is {show(current)}: the state loads "
                   "exactly, but the continuation may differ from an uninterrupted run by rounding")
