"""The memory calculator (``llmjax calc memory``) against XLA's memory analysis of the compiled train step.

    .venv/bin/python benchmarks/calc_memory.py          # ~5 min on 2 shared cores

Part 1 compiles the real train step (AdamW, fp32) of the tiny T5 and decoder for every remat policy on
1 device, fsdp=8 and data=2,fsdp=2,tensor=2 (8 simulated CPU devices) and prints, per device, XLA's
argument bytes beside the calculator's train state + batch shard (expected equal), and XLA's temporary
bytes beside the calculator's gradients + activations + backward working set + fsdp-gathered layer,
with the ratio. Part 2 compares the calculator with the 256-device ahead-of-time compile of
``benchmarks/aot_compile.py`` as saved in ``results/aot_compile_cpu256.txt`` (no compile here), with
activations counted in bf16 (what the step computes in) and in fp32 (what XLA:CPU's buffers hold).
Memory is counted, not timed: the numbers do not depend on load.
"""

from __future__ import annotations

import os
import sys

if "--help" not in sys.argv and "-h" not in sys.argv:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llmjax import environment  # noqa: E402
from llmjax.config import load_section  # noqa: E402
from llmjax.planning import plan_memory  # noqa: E402
from tests.test_calc import compiled_memory  # noqa: E402 (the test's compile: one definition of "the step")

GIB = 2**30
POLICIES = ("none", "full", "save_dots", "save_dots_no_batch")
MESHES = {"1": dict(data=1, fsdp=1, tensor=1), "fsdp=8": dict(data=1, fsdp=8, tensor=1),
          "2x2x2": dict(data=2, fsdp=2, tensor=2)}
TINY = {"decoder_tiny": dict(batch=16, length=128, encoder_length=None),
        "t5_tiny": dict(batch=16, length=32, encoder_length=128)}
# Rows of results/aot_compile_cpu256.txt: model | mesh | scan | remat | compile s | state | ratio | args | temp | ...
AOT_SHAPES = {"decoder_7b": dict(batch=512, length=2048), "t5_xxl": dict(batch=2048, length=114, encoder_length=512)}


def model(name: str, **changes):
    return dataclasses.replace(load_section(REPO / f"configs/model/{name}.yaml", "model"), **changes)


def tiny_rows() -> None:
    print("| model | mesh | remat | XLA args | calc args | XLA temp | calc temp | calc / XLA |")
    print("|---|---|---|---|---|---|---|---|")
    for name, shape in TINY.items():
        for mesh_name, mesh in MESHES.items():
            for policy in POLICIES:
                config = model(name, remat_policy=policy, dtype="float32")
                memory = compiled_memory(config, mesh, shape["batch"], shape["length"], shape["encoder_length"])
                plan = plan_memory(config, mesh=mesh, precision="fp32", **shape)
                rows = shape["batch"] // (mesh["data"] * mesh["fsdp"])
                args = plan.weights + plan.optimizer_state + 16 + 4 * rows * (3 * shape["length"]
                                                                              + (shape["encoder_length"] or 0))
                temp = plan.gradients + plan.activations + plan.working + plan.gathered
                print(f"| {name} | {mesh_name} | {policy} | {memory.argument_size_in_bytes:,} | {args:,} | "
                      f"{memory.temp_size_in_bytes:,} | {temp:,} | {temp / memory.temp_size_in_bytes:.2f} |",
                      flush=True)


def aot_rows(results: Path) -> None:
    print(f"\nagainst {results.relative_to(REPO)} (scan on):")
    print("| model | mesh | remat | XLA:CPU args GiB | calc state GiB | XLA:CPU temp GiB | calc bf16 | calc fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    seen = set()
    for line in results.read_text().splitlines():
        cells = [c.strip() for c in line.strip("| ").split("|")]
        if len(cells) < 9 or cells[0] not in AOT_SHAPES or cells[2] != "on" or re.search(r"\(", line):
            continue
        name, mesh_name, remat, args, temp = cells[0], cells[1], cells[3], float(cells[7]), float(cells[8])
        if (name, mesh_name, remat) in seen:
            continue
        seen.add((name, mesh_name, remat))
        mesh = {k: int(v) for k, v in (part.split("=") for part in mesh_name.split(","))}
        out = []
        for precision in ("bf16", "fp32"):
            plan = plan_memory(model(name), mesh=mesh, precision=precision, remat=remat, **AOT_SHAPES[name])
            planned = (plan.gradients + plan.activations + plan.working + plan.gathered) / GIB
            out.append(f"{planned:.2f} ({planned / temp:.2f}x)")
        state = (plan.weights + plan.optimizer_state) / GIB
        print(f"| {name} | {mesh_name} | {remat} | {args:.2f} | {state:.2f} | {temp:.2f} | {out[0]} | {out[1]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-compile", action="store_true", help="part 2 only (no compile)")
    args = parser.parse_args()
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {environment.cpu_model()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}, jax {jax.__version__}; {len(jax.devices())} simulated "
          f"{jax.devices()[0].platform} devices; bytes per device, AdamW, fp32 compute in part 1")
    if not args.skip_compile:
        tiny_rows()
    aot_rows(REPO / "benchmarks/results/aot_compile_cpu256.txt")


if __name__ == "__main__":
    main()
