"""Memory of a training run per device: weights, gradients, optimizer state, activations.

``plan_memory(config, ...)`` adds up :mod:`llmjax.planning.state` (exact, leaf by leaf) and
:mod:`llmjax.planning.activations` (a formula) for a mesh, batch, length, precision, optimizer and
remat policy. Precisions, as ``llmjax`` trains:

* ``fp32``: weights, gradients, optimizer state and compute in fp32 (the course's "32-bit": 4 bytes
  to hold a parameter, 4 + 4 + 8 = 16 to train it with AdamW, before activations);
* ``bf16``: mixed precision, the run configs' ``dtype: bfloat16``: fp32 master weights, gradients and
  moments, activations in bf16 (softmax, norms' statistics and logits stay fp32); holding the model
  for inference in bf16 takes 2 bytes a parameter;
* ``int8``: weight-only int8 (kernels and embeddings int8 with fp32 per-output-channel scales) as a
  frozen base: no gradients or optimizer state for it (QLoRA-style tuning trains adapters on top,
  not counted here), bf16 activations.
"""

from __future__ import annotations

import dataclasses
import math

from llmjax.model_config import REMAT_POLICY_NAMES, family_of
from llmjax.planning.activations import ActivationBytes, Shapes, activation_bytes
from llmjax.planning.params import PlanError, check_mesh, count_params, param_specs
from llmjax.planning.state import OPTIMIZERS, TRAIN_STATE_SCALAR_BYTES, optimizer_bytes, weight_bytes

PRECISIONS = {"fp32": 4, "bf16": 2, "int8": 2}  # precision -> compute (activation) bytes
GB = 1e9   # the course's "GB"
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one training setup (see the module docstring for the precisions).

    weights, gradients, optimizer: exact; activations: kept for the backward pass, ``working``: one
    layer's intermediates recomputed/differentiated in the backward pass; gathered: fsdp's all-gathered
    weights of one layer and their gradient before the reduce-scatter (0 without fsdp); inference:
    the weights held in the precision for serving (no gradients, optimizer or activations kept).
    ``by_policy``: the activations (kept + working) under every remat policy, for comparison.
    """

    params: int
    precision: str
    optimizer: str
    remat: str
    mesh: dict
    rows_per_device: int
    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    working: int
    gathered: int
    inference: int
    by_policy: dict

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer_state + self.activations + self.working
                + self.gathered + TRAIN_STATE_SCALAR_BYTES)

    def rows(self) -> list[tuple[str, int]]:
        return [("weights", self.weights), ("gradients", self.gradients), ("optimizer state", self.optimizer_state),
                (f"activations kept (remat {self.remat})", self.activations),
                ("backward working set (one layer)", self.working), ("fsdp-gathered layer", self.gathered),
                ("total to train", self.total), (f"inference weights ({self.precision})", self.inference)]

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["total"] = self.total
        out["bytes_per_param"] = {name: value / self.params for name, value in self.rows()}
        return out

    def table(self) -> str:
        """Readable rows; bytes per parameter only on one device (sharded bytes per total parameters mislead)."""
        width = max(len(name) for name, _ in self.rows())
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
        single = math.prod(self.mesh.values()) == 1
        lines = [f"{self.params:,} parameters; precision {self.precision}, optimizer {self.optimizer}, mesh {mesh} "
                 f"({self.rows_per_device} rows per device)",
                 f"{'per device':<{width}}  {'GB':>9}  {'GiB':>9}" + ("  bytes/param" if single else "")]
        for name, value in self.rows():
            per_param = f"  {value / self.params:>11.2f}" if single else ""
            lines.append(f"{name:<{width}}  {value / GB:>9.3f}  {value / GIB:>9.3f}{per_param}")
        lines.append("activations (kept + working set) by remat policy: " + ", ".join(
            f"{policy} {value / GIB:.3f} GiB" for policy, value in self.by_policy.items()))
        return "\n".join(lines)


def _gathered_layer(specs, mesh: dict[str, int], item_bytes: int) -> int:
    """fsdp all-gathers one layer's weights (still split over tensor) and reduce-scatters their gradient:
    twice the largest layer's weights per device without the fsdp split (0 without fsdp)."""
    if mesh["fsdp"] == 1:
        return 0
    unsplit = dict(mesh, fsdp=1)
    stacks: dict[tuple, int] = {}
    for spec in specs:
        if "layers" in spec.path:  # scanned: [depth, ...] under .../layers
            stack, depth = spec.path[:spec.path.index("layers")], spec.shape[0]
        elif any(key.startswith("layers_") for key in spec.path):  # unscanned: one entry per layer
            stack, depth = spec.path[:[k.startswith("layers_") for k in spec.path].index(True) + 1], 1
        else:
            continue
        stacks[stack] = stacks.get(stack, 0) + math.prod(spec.shard_shape(unsplit)) // depth
    return 2 * item_bytes * max(stacks.values(), default=0)


def plan_memory(config, *, batch: int, length: int, encoder_length: int | None = None,
                mesh: dict[str, int] | None = None, precision: str = "bf16", optimizer: str = "adamw",
                remat: str | None = None, momentum: bool = False) -> MemoryPlan:
    """Per-device memory of training ``config``'s model on ``batch`` sequences of ``length`` tokens.

    ``encoder_length``: T5's input length (``length`` is then the target length); ignored by
    decoder-only models. ``mesh``: ``{"data", "fsdp", "tensor"}`` sizes (missing axes 1). ``remat``: a
    remat policy (default: the config's own). ``momentum``: Adafactor with a first moment (``optim.b1``).
    """
    mesh = check_mesh(mesh or {})
    if precision not in PRECISIONS:
        raise PlanError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
    if optimizer not in OPTIMIZERS:
        raise PlanError(f"optimizer {optimizer!r} is not one llmjax trains with; use one of {list(OPTIMIZERS)}")
    remat = remat or config.remat_policy
    data_parallel = mesh["data"] * mesh["fsdp"]
    if batch < 1 or length < 1:
        raise PlanError(f"batch and length must be positive, got batch={batch}, length={length}")
    if batch % data_parallel:
        raise PlanError(f"global batch {batch} does not split over data*fsdp = {data_parallel} devices; "
                        f"make the batch a multiple of {data_parallel}")
    seq2seq = family_of(config) == "t5"
    if seq2seq and encoder_length is None:
        raise PlanError("a T5 model reads an input and a target: give the input length too (encoder_length)")
    specs = param_specs(config)
    trains = precision != "int8"
    shapes = Shapes(rows=batch // data_parallel, length=length, encoder_length=encoder_length if seq2seq else 0,
                    tensor=mesh["tensor"], compute_bytes=PRECISIONS[precision])
    acts: ActivationBytes = activation_bytes(config, shapes, remat)  # checks the policy name
    by_policy = {p: activation_bytes(config, shapes, p) for p in REMAT_POLICY_NAMES}
    master = weight_bytes(specs, mesh, "fp32")
    return MemoryPlan(
        params=count_params(config), precision=precision, optimizer=optimizer if trains else "none (frozen base)",
        remat=remat, mesh=mesh, rows_per_device=shapes.rows,
        weights=master if trains else weight_bytes(specs, mesh, "int8"),
        gradients=master if trains else 0,
        optimizer_state=optimizer_bytes(specs, mesh, optimizer, momentum) if trains else 0,
        activations=acts.kept, working=acts.working,
        gathered=_gathered_layer(specs, mesh, 4 if trains else 1),
        inference=weight_bytes(specs, mesh, precision),
        by_policy={p: a.total for p, a in by_policy.items()},
    )
