"""Bytes per device of what a training run carries between steps: weights, gradients, optimizer state.

Counted leaf by leaf from :func:`llmjax.planning.params.param_specs` and the shardings the rules table
gives them, the way ``llmjax.train`` builds them:

* weights: ``param_dtype`` (fp32 master weights, also under bf16 mixed precision); int8 weight-only
  quantization stores every kernel and embedding table in int8 with one fp32 scale per output channel
  (last axis) and keeps norms and relative-position tables in fp32;
* gradients: w.r.t. the fp32 master weights, so fp32 and sharded like the weights; none for a frozen
  (int8) base;
* optimizer state (``llmjax.train.optim``: optax, applied per layer of a scanned stack):
    - AdamW: first and second moments, fp32, sharded like the weights (8 bytes a parameter);
    - Adafactor: per layer matrix whose two largest dimensions are >= 128, a row and a column
      statistic (size / largest + size / second largest) plus a one-element placeholder, all
      replicated (``llmjax.sharding`` replicates statistics of another rank than their parameter);
      other leaves a full second moment sharded like the weight and two placeholders; with momentum
      (``optim.b1``) a full fp32 first moment as well;
    - int32 step counters: per optimizer transform that counts, one per layer of each scanned stack
      (``per_layer`` vmaps the optimizer over the layer axis) and one per other group.
* train-state scalars: ``step``, ``skipped_steps`` (int32) and the ``rng`` key (uint32[2]).

``tests/test_calc.py`` checks these against ``llmjax.sharding.state_bytes_per_device`` of the abstract
train state and against XLA's argument bytes of the compiled step: they are equal to the byte.
"""

from __future__ import annotations

import math

from llmjax.planning.params import ParamSpec, PlanError, param_specs

ADAFACTOR_MIN_DIM_TO_FACTOR = 128  # optax.adafactor's default, which llmjax.train.optim keeps
FP32, INT32 = 4, 4
TRAIN_STATE_SCALAR_BYTES = 4 + 4 + 8  # step, skipped_steps (int32), rng (uint32[2])
OPTIMIZERS = ("adamw", "adafactor")
# Groups optax.multi_transform keeps a state for (llmjax.models.scan.STACKS plus the unstacked rest).
STACK_PREFIXES = (("layers",), ("encoder", "layers"), ("decoder", "layers"))


def _stacked(spec: ParamSpec) -> bool:
    return any(spec.path[:len(p)] == p for p in STACK_PREFIXES)


def _per_device(spec: ParamSpec, mesh: dict[str, int], itemsize: int) -> int:
    return math.prod(spec.shard_shape(mesh)) * itemsize


def weight_bytes(specs: list[ParamSpec], mesh: dict[str, int], storage: str) -> int:
    """Per-device bytes of the weights stored as ``"fp32"``, ``"bf16"`` (a serving copy) or ``"int8"``."""
    total = 0
    for spec in specs:
        if storage == "int8" and spec.is_matrix:
            scales = spec.shard_shape(mesh)[-1] * math.prod(spec.shard_shape(mesh)[:-2] or (1,))
            total += _per_device(spec, mesh, 1) + scales * FP32
        else:
            total += _per_device(spec, mesh, 2 if storage == "bf16" else FP32)
    return total


def _adafactor_leaf(spec: ParamSpec, mesh: dict[str, int]) -> int:
    """Bytes of Adafactor's second-moment state for one leaf (all its layers, if stacked)."""
    layers = spec.shape[0] if _stacked(spec) else 1
    shape = spec.shape[1:] if _stacked(spec) else spec.shape
    if len(shape) >= 2 and sorted(shape)[-2] >= ADAFACTOR_MIN_DIM_TO_FACTOR:
        largest, second = sorted(shape)[-1], sorted(shape)[-2]
        size = math.prod(shape)
        return layers * (size // largest + size // second + 1) * FP32  # replicated row, column, placeholder
    return _per_device(spec, mesh, FP32) + layers * 2 * FP32  # full moment (sharded) + two placeholders


def counters(specs: list[ParamSpec], optimizer: str, momentum: bool) -> int:
    """Bytes of the optimizer's int32 step counters (see the module docstring)."""
    per_transform = {"adamw": 2, "adafactor": 3 if momentum else 2}[optimizer]  # adam/rms + schedule (+ ema)
    groups = 1  # the unstacked leaves
    for prefix in STACK_PREFIXES:
        depths = {s.shape[0] for s in specs if s.path[:len(prefix)] == prefix}
        groups += depths.pop() if depths else 1  # an empty group still holds scalar counters
    return per_transform * groups * INT32


def optimizer_bytes(specs: list[ParamSpec], mesh: dict[str, int], optimizer: str, momentum: bool = False) -> int:
    """Per-device bytes of the optimizer state of ``specs`` (all trainable)."""
    if optimizer not in OPTIMIZERS:
        raise PlanError(f"optimizer {optimizer!r} is not one llmjax trains with; use one of {list(OPTIMIZERS)}")
    if optimizer == "adamw":
        moments = sum(2 * _per_device(s, mesh, FP32) for s in specs)
    else:
        moments = sum(_adafactor_leaf(s, mesh) for s in specs)
        if momentum:
            moments += sum(_per_device(s, mesh, FP32) for s in specs)
    return moments + counters(specs, optimizer, momentum)


def state_bytes(config, mesh: dict[str, int], optimizer: str, momentum: bool = False) -> dict[str, int]:
    """Per-device bytes of a full fine-tuning train state: ``params``, ``opt_state``, ``scalars``."""
    specs = param_specs(config)
    return {"params": weight_bytes(specs, mesh, "fp32"),
            "opt_state": optimizer_bytes(specs, mesh, optimizer, momentum),
            "scalars": TRAIN_STATE_SCALAR_BYTES}
