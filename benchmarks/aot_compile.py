"""Pod-size compile check: the train step of LLaMA-7B and T5 v1.1 XXL compiled ahead of time for 256 devices.

    .venv/bin/python benchmarks/aot_compile.py                       # all rows (~30-60 min on 2 cores)
    .venv/bin/python benchmarks/aot_compile.py --model decoder_7b --mesh fsdp=256 --scan on

Nothing is allocated: the train state is built with ``jax.eval_shape`` (shapes and shardings only),
the batch is ``ShapeDtypeStruct``s, and ``jit(...).lower(...).compile()`` runs XLA's SPMD partitioner
for a mesh of 256 simulated CPU devices (``--xla_force_host_platform_device_count=256``, set by this
script before JAX starts). For each row it prints:

* compile time (lower + compile, wall seconds on this machine);
* per-device parameter and AdamW-state bytes from the shardings (``llmjax.sharding.state_bytes_per_device``)
  and their ratio to ``total / devices`` (1.00 = perfectly sharded; the replicated RMSNorm scales and
  relative-position tables are the excess);
* XLA's memory analysis of the compiled step per device: argument bytes (state + batch shard) and
  temporary bytes (activations kept for the backward pass, gradients, collectives' buffers);
* whether arguments + temporaries fit a 16 GiB and an 80 GiB accelerator.

Temporaries come from the CPU compiler's buffer assignment; a TPU/GPU compiler fuses differently, so
treat them as an estimate of the order of magnitude, not a guarantee. Compute is bf16 with fp32
master weights and fp32 AdamW moments, as a real run at this size would be.
"""

from __future__ import annotations

import os
import sys

# The device count is fixed when JAX starts: set it before importing jax.
DEVICES = 256
if "--help" not in sys.argv and "-h" not in sys.argv:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={DEVICES}").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llmjax import environment, sharding  # noqa: E402
from llmjax.config import OptimConfig, load_section  # noqa: E402
from llmjax.models import build_model  # noqa: E402
from llmjax.train.lm_loss import lm_loss_fn  # noqa: E402
from llmjax.train.optim import make_optimizer  # noqa: E402
from llmjax.train.state import abstract_train_state, count_params, train_everything  # noqa: E402
from llmjax.train.step import compile_step, make_train_step  # noqa: E402

GIB = 2**30
ACCELERATORS_GIB = (16, 80)
OPTIM = OptimConfig(name="adamw", learning_rate=1e-4, schedule="constant", weight_decay=0.1, clip_grad_norm=1.0)

# Realistic global batches for a 256-chip slice, one row per device at least:
# LLaMA-7B: 512 sequences x 2048 tokens (1M tokens per step; LLaMA used 4M with gradient accumulation).
# T5 v1.1 XXL: 2048 sequences x 512/114 tokens (T5's pre-training batch, 2 x 2^20 tokens).
MODELS = {
    "decoder_7b": dict(config="configs/model/decoder_7b.yaml", batch=512, lengths={"decoder": 2048}),
    "t5_xxl": dict(config="configs/model/t5_xxl.yaml", batch=2048, lengths={"encoder": 512, "decoder": 114}),
}
MESHES = {"fsdp=256": dict(data=1, fsdp=256, tensor=1), "fsdp=32,tensor=8": dict(data=1, fsdp=32, tensor=8)}


@dataclasses.dataclass
class Row:
    model: str
    mesh: str
    scan: bool
    remat: str
    compile_s: float
    state_bytes: int
    ideal_bytes: float
    argument_bytes: int
    temp_bytes: int
    params: int

    @property
    def needed_gib(self) -> float:
        return (self.argument_bytes + self.temp_bytes) / GIB

    def cells(self) -> list[str]:
        fits = ["yes" if self.needed_gib <= cap else "no" for cap in ACCELERATORS_GIB]
        return [self.model, self.mesh, "on" if self.scan else "off", self.remat, f"{self.compile_s:.0f}",
                f"{self.state_bytes / GIB:.2f}", f"{self.state_bytes / self.ideal_bytes:.3f}",
                f"{self.argument_bytes / GIB:.2f}", f"{self.temp_bytes / GIB:.2f}", f"{self.needed_gib:.2f}",
                *fits]


HEADER = ["model", "mesh", "scan", "remat", "compile s", "state GiB/dev", "state / ideal", "args GiB/dev",
          "temp GiB/dev", "args+temp GiB", "fits 16 GiB", "fits 80 GiB"]


def model_config(name: str, scan: bool, remat: str | None):
    """The shipped model config with bf16 compute, this row's scan choice and (if given) remat policy."""
    config = load_section(REPO / MODELS[name]["config"], "model")
    return dataclasses.replace(config, dtype="bfloat16", scan_layers=scan,
                               remat_policy=remat or config.remat_policy)


def batch_specs(name: str, batch_sharding) -> dict:
    spec = MODELS[name]
    batch, lengths = spec["batch"], spec["lengths"]
    struct = lambda length: jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=batch_sharding)  # noqa: E731
    out = {"decoder_input_tokens": struct(lengths["decoder"]), "decoder_target_tokens": struct(lengths["decoder"]),
           "decoder_loss_weights": struct(lengths["decoder"])}
    if "encoder" in lengths:
        out["encoder_input_tokens"] = struct(lengths["encoder"])
    return out


def compile_row(name: str, mesh_name: str, scan: bool, remat: str | None) -> Row:
    config = model_config(name, scan, remat)
    model = build_model(config)
    tx, _ = make_optimizer(OPTIM, total_steps=1000)
    step = make_train_step(lm_loss_fn(model), tx)
    mesh = sharding.make_mesh(**MESHES[mesh_name])
    with sharding.activate(mesh):
        abstract = abstract_train_state(model, tx, train_everything, mesh)
        shardings = jax.tree_util.tree_map(lambda s: s.sharding, abstract)
        batch_sh = sharding.batch_sharding(mesh)
        start = time.perf_counter()
        compiled = compile_step(step, updates_state=True, state_shardings=shardings,
                                batch_sharding=batch_sh).lower(abstract, batch_specs(name, batch_sh)).compile()
        seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    state_bytes = (sharding.state_bytes_per_device(abstract.params, shardings.params)
                   + sharding.state_bytes_per_device(abstract.opt_state, shardings.opt_state))
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((abstract.params, abstract.opt_state)))
    return Row(name, mesh_name, scan, config.remat_policy, seconds, state_bytes, total / DEVICES,
               memory.argument_size_in_bytes, memory.temp_size_in_bytes, count_params(abstract.params))


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), action="append", help="default: both")
    parser.add_argument("--mesh", choices=sorted(MESHES), action="append", help="default: both")
    parser.add_argument("--scan", choices=("on", "off"), action="append", help="default: both")
    parser.add_argument("--remat", default=None,
                        help="remat policy of every row (default: the model config's own, save_dots_no_batch)")
    args = parser.parse_args()

    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {environment.cpu_model()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, jax {jax.__version__}; {len(jax.devices())} simulated "
          f"{jax.devices()[0].platform} devices; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name in args.model or sorted(MODELS):
        spec = MODELS[name]
        print(f"{name}: {spec['config']}, global batch {spec['batch']} x {spec['lengths']} tokens, bf16 compute, "
              f"fp32 params + AdamW")
    rows = []
    for name in args.model or sorted(MODELS):
        for mesh_name in args.mesh or list(MESHES):
            for scan in [s == "on" for s in (args.scan or ["on", "off"])]:
                row = compile_row(name, mesh_name, scan, args.remat)
                rows.append(row)
                print(" | ".join(row.cells()) + f"  ({row.params / 1e9:.2f}B params)", flush=True)
    print()
    print(markdown(rows))
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
