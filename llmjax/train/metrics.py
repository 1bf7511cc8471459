"""Training metrics: TensorBoard + JSONL writers, throughput, and model FLOPs utilization (MFU).

MFU = model FLOPs per second / peak FLOP/s, where the model FLOPs of a step come from
``llmjax.models.step_flops`` (formula in that module's docstring:
``6 * matmul params * tokens + 12 * layers * d_attn * keys * tokens``, with T5's encoder
and decoder tokens counted separately) and the peak is a datasheet number or
``measure_matmul_peak_flops``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp


def measure_matmul_peak_flops(size: int = 1024, dtype=jnp.float32, seconds: float = 1.0) -> float:
    """Achieved FLOP/s of a jitted ``[size, size]`` matmul on the default device: the practical peak.

    A stand-in for a datasheet number where there is none (a CPU); pass the datasheet
    peak instead on accelerators.
    """
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or runs < 3:
        matmul(a).block_until_ready()
        runs += 1
    return 2 * size**3 * runs / elapsed


class Throughput:
    """Steps, tokens and FLOPs per second over the steps since the last ``report``."""

    def __init__(self, tokens_per_step: int, flops_per_step: float, peak_flops_per_sec: float | None):
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.peak_flops_per_sec = peak_flops_per_sec
        self.reset()

    def reset(self) -> None:
        self._start, self._steps = time.perf_counter(), 0

    def add_step(self) -> None:
        self._steps += 1

    def report(self) -> dict[str, float]:
        """``steps_per_sec``, ``tokens_per_sec``, ``step_time_ms`` and ``mfu`` (if a peak is known); resets."""
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        steps = self._steps
        self.reset()
        if steps == 0:
            return {}
        out = {
            "steps_per_sec": steps / elapsed,
            "tokens_per_sec": steps * self.tokens_per_step / elapsed,
            "step_time_ms": 1000 * elapsed / steps,
        }
        if self.peak_flops_per_sec:
            out["mfu"] = steps * self.flops_per_step / elapsed / self.peak_flops_per_sec
        return out


class MetricsWriter:
    """Scalars to TensorBoard (``<dir>/tensorboard``) and one JSON line per call (``<dir>/metrics.jsonl``).

    Only process 0 writes (every process computes the same global metrics).
    """

    def __init__(self, directory: str | Path, enabled: bool | None = None):
        self.directory = Path(directory)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tensorboard = None
        self._jsonl = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.directory.mkdir(parents=True, exist_ok=True)
            self._tensorboard = SummaryWriter(str(self.directory / "tensorboard"))
            self._jsonl = open(self.directory / "metrics.jsonl", "a")

    def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        """Record ``metrics`` (floats) at ``step`` under ``prefix/name``."""
        if not self.enabled:
            return
        values = {name: float(value) for name, value in metrics.items()}
        for name, value in values.items():
            self._tensorboard.add_scalar(f"{prefix}/{name}", value, step)
        self._jsonl.write(json.dumps({"step": step, "split": prefix, **values}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tensorboard.close()
            self._jsonl.close()
            self.enabled = False
