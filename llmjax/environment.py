"""What a run ran on: the processor, the accelerators, and the versions of the libraries that compute.

The same code and seed give bit-identical runs on one machine, and not always across machines. XLA compiles for the
processor's vector instructions, and capping them (``XLA_FLAGS=--xla_cpu_max_isa=AVX`` on an AVX2 machine) changes
the bits of a matmul, a sum or a small T5's loss (``labs/experiments/xla_isa_bits.py``); thousands of training steps
carry such a difference (the lab's instruction-tuned base, built by the same code on an Intel Xeon and on an AMD
EPYC, summarizes zero-shot at 0.637 and 0.657; ``labs/experiments/README.md``). So a run records where it ran:
``describe()`` is a dict of plain values that a training run appends to ``environment.jsonl`` at each start or
resume and keeps in its checkpoints' metadata, and that the lab keeps in ``results.json``.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path

import jax

# The libraries whose versions decide what a run computes (and how it is read back).
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "llmjax")
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16",
              "asimd", "sve")  # x86 then Arm
CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_value(cpuinfo: Path, keys: tuple[str, ...]) -> str | None:
    """The value of the first ``cpuinfo`` line that starts with one of ``keys`` (None where there is none, or no
    readable file: not Linux)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(keys):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The processor's name (``/proc/cpuinfo``'s ``model name`` on Linux), else what ``platform`` knows."""
    return _cpuinfo_value(cpuinfo, ("model name",)) or platform.processor() or platform.machine() or "unknown"


def vector_extensions(cpuinfo: Path = CPUINFO) -> list[str]:
    """The processor's SIMD extensions among :data:`SIMD_FLAGS` (``/proc/cpuinfo``'s flags on Linux, Arm's
    ``Features``; an empty list where they cannot be read)."""
    flags = set((_cpuinfo_value(cpuinfo, ("flags", "Features")) or "").split())
    return [f for f in SIMD_FLAGS if f in flags]


def _memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):  # not every platform names these
        return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe() -> dict:
    """This process's machine and software, JSON-ready: ``cpu``, ``cpu_count``, ``simd`` (:func:`vector_extensions`),
    ``memory_gib``, ``platform``, ``python``, ``versions`` (each of :data:`LIBRARIES`, ``None`` where not
    installed), ``backend``, ``devices`` (``{kind: count}`` over every process's devices), ``process_count`` and
    ``xla_flags`` (the ``XLA_FLAGS`` environment variable)."""
    devices: dict[str, int] = {}
    for device in jax.devices():
        devices[device.device_kind] = devices.get(device.device_kind, 0) + 1
    memory = _memory_gib()
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "simd": vector_extensions(),
        "memory_gib": None if memory is None else round(memory, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in LIBRARIES},
        "backend": jax.default_backend(),
        "devices": devices,
        "process_count": jax.process_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def one_line(environment: dict | None = None) -> str:
    """``describe()`` (or a saved one) for a log line or a report: processor, cores, memory, devices, versions."""
    env = describe() if environment is None else environment
    devices = ", ".join(f"{count} x {kind}" for kind, count in env["devices"].items())
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items() if version)
    memory = "" if env.get("memory_gib") is None else f", {env['memory_gib']} GiB"
    simd = f", {'/'.join(env['simd'])}" if env.get("simd") else ""
    flags = f"; XLA_FLAGS={env['xla_flags']!r}" if env.get("xla_flags") else ""
    return (f"{env['cpu']} ({env['cpu_count']} cores{memory}{simd}); {env['backend']}: {devices}; "
            f"python {env['python']}, {versions}{flags}")


if __name__ == "__main__":  # python -m llmjax.environment: what a run here would record
    import json

    json.dump(describe(), sys.stdout, indent=2)
    print()
