"""LoRA vs full fine-tuning: train-step time and optimizer-state bytes, llmjax and PyTorch/PEFT, one run.

    .venv/bin/python benchmarks/lora_train.py              # both models (~10 min on 2 shared cores)
    .venv/bin/python benchmarks/lora_train.py --only t5 --steps 2
    .venv/bin/python benchmarks/lora_train.py --targets all  # LoRA on every dense projection
    .venv/bin/python benchmarks/lora_train.py --layers unrolled  # llmjax's layers unrolled (default: scanned)
    .venv/bin/python benchmarks/lora_train.py --dora   # two more sides: DoRA (use_dora) in llmjax and in peft

For T5 v1.1 small and the LLaMA-style decoder of T5-small size (the models and batches of
``train_throughput.py``), five sides run the same train step (forward, backward, clip 1.0, AdamW, fp32,
dropout off) from the same weights on the same batch:

* ``llmjax full``: every parameter trains (``train_everything``);
* ``llmjax factored`` and ``llmjax merged``: the path of a run with a ``lora:`` section. The stage is wrapped by
  ``llmjax.stages.adapters.with_lora``: the adapters join the tree and only they train. ``factored``
  (``form="factored"``, the default of every stage that can rebuild its loss): each adapted layer computes
  ``x @ W + scale * (x @ A) @ B`` (``llmjax.lora.adapter_branch``), so the backward pass forms no full-size
  kernel gradient; ``merged`` (``form="merged"``, the RL stages' form): the loss runs on the merged kernels
  ``W + scale * A @ B``;
* ``pytorch full`` and ``peft lora``: Hugging Face ``transformers`` with ``torch.optim.AdamW`` and
  ``peft.get_peft_model`` with the same LoRA config, the reference;
* with ``--dora``, ``llmjax dora`` (factored) and ``peft dora``: the same adapters with ``use_dora``, DoRA's
  magnitude per output channel and its norm computed every step.

The steps are interleaved (one step of each side in turn), so load from other processes hits all alike.
Printed per side: median step time (wall and CPU time of this process), and optimizer-state bytes per
device (llmjax: from the state's shardings; PyTorch: the bytes of ``optimizer.state`` tensors). Then the
ratios LoRA / full for each library. Not run by pytest; results in ``benchmarks/results/lora_train_cpu.txt``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import (  # noqa: E402
    OPTIM, Timing, Workload, add_workload_args, machine_lines, step_runner, torch_model_and_inputs,
    torch_train_step, workloads_of,
)

from llmjax import lora, sharding  # noqa: E402
from llmjax.models import build_model, step_flops  # noqa: E402
from llmjax.train.lm_loss import lm_loss_fn  # noqa: E402
from llmjax.train.loop import Stage  # noqa: E402
from llmjax.train.optim import make_optimizer  # noqa: E402
from llmjax.train.state import count_params, init_train_state  # noqa: E402
from llmjax.train.step import compile_step, make_train_step  # noqa: E402

# The course's targets are q and v (--targets qv); rank 8 and 32 with alpha = 2r would change only the scale.
TARGETS = {"qv": {"t5": ("q", "v"), "decoder": ("q_proj", "v_proj")},
           "all": {"t5": ("q", "k", "v", "o", "wi_0", "wi_1", "wo"),
                   "decoder": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}}


def llmjax_side(work: Workload, lora_cfg: lora.LoraConfig | None, params=None, form: str = "auto",
                scan_layers: bool = True):
    """``(step_fn, model, host params, info)`` for full training (``lora_cfg`` None) or LoRA on the same
    weights, the layers in one ``nn.scan`` or unrolled. ``info``: trainable parameter count and optimizer bytes
    per device."""
    model = build_model(dataclasses.replace(work.config, remat_policy="none", scan_layers=scan_layers))
    tx, _ = make_optimizer(OPTIM, total_steps=1000)
    mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
    stage = Stage(name="benchmark", model=model, loss_fn=lm_loss_fn(model), loss_for=lm_loss_fn, train_data=None)
    if lora_cfg is not None:
        from llmjax.stages.adapters import with_lora

        stage = with_lora(stage, lora_cfg, form=form)
    state, shardings = init_train_state(model, tx, stage.is_trainable, seed=0, mesh=mesh, params=params,
                                        init_tree=stage.init_tree)
    info = {"trainable": count_params(state.params),
            "optimizer_bytes": sharding.state_bytes_per_device(state.opt_state, shardings.opt_state)}
    with sharding.activate(mesh):
        host = jax.device_get(state.full_params() if lora_cfg is None else state.frozen_params)
        step = compile_step(make_train_step(stage.loss_fn, tx), updates_state=True,
                            state_shardings=shardings, batch_sharding=sharding.batch_sharding(mesh))
        batch = sharding.shard_batch(work.batch, mesh)
    return step_runner(step, state, batch, mesh), model, host, info


def torch_side(work: Workload, model, params, lora_cfg: lora.LoraConfig | None):
    """``(step_fn, info)``: one PyTorch train step on the same weights, full or through ``peft``."""
    import torch

    torch_model, inputs = torch_model_and_inputs(work, model, params)
    if lora_cfg is not None:
        import peft

        torch_model = peft.get_peft_model(torch_model, peft.LoraConfig(
            r=lora_cfg.r, lora_alpha=lora_cfg.lora_alpha, lora_dropout=0.0,
            target_modules=list(lora_cfg.target_modules), use_dora=lora_cfg.use_dora))
    run, optimizer = torch_train_step(torch_model, inputs)

    def optimizer_bytes() -> int:
        return sum(t.numel() * t.element_size() for state in optimizer.state.values()
                   for t in state.values() if torch.is_tensor(t) and t.dim() > 0)

    trainable = sum(p.numel() for p in torch_model.parameters() if p.requires_grad)
    return run, {"trainable": trainable, "optimizer_bytes": optimizer_bytes}


def matmul_flops_ratio(work: Workload, adapter_params: int) -> float:
    """LoRA / full matmul FLOPs of one step (``llmjax.models.step_flops``'s count): a floor for the step-time
    ratio where matmuls dominate. A frozen kernel keeps its forward (2 FLOPs per parameter and token) and its
    input gradient (2) but loses its weight gradient (2 of the 6); attention's score and mix matmuls stay whole;
    the adapters add 6 FLOPs per parameter and token, counted at the longer sequence (an upper bound for T5,
    whose decoder's adapters see fewer tokens). The optimizer update and the softmax are not matmuls and are not
    counted: the first is what LoRA saves beyond this floor, the second costs both sides the same."""
    flops = step_flops(work.config, work.batch_size, work.decoder_length, work.encoder_length)
    longest = work.batch_size * max(work.decoder_length, work.encoder_length or 0)
    return (flops.dense * 2 / 3 + flops.attention + 6 * adapter_params * longest) / flops.total


def compare(work: Workload, rank: int, targets: str, warmup: int, steps: int, scan_layers: bool = True,
            dora: bool = False) -> list[str]:
    cfg = lora.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS[targets][work.family])
    full_run, model, params, full_info = llmjax_side(work, None, scan_layers=scan_layers)
    built = {"llmjax full": (full_run, full_info)}  # side -> (one step, info), all from the same weights
    for form in ("factored", "merged"):
        run, _, _, info = llmjax_side(work, cfg, params=params, form=form, scan_layers=scan_layers)
        built[f"llmjax {form}"] = (run, info)
    built["pytorch full"] = torch_side(work, model, params, None)
    built["peft lora"] = torch_side(work, model, params, cfg)
    if dora:
        dora_cfg = dataclasses.replace(cfg, use_dora=True)
        run, _, _, info = llmjax_side(work, dora_cfg, params=params, form="factored", scan_layers=scan_layers)
        built["llmjax dora"] = (run, info)
        built["peft dora"] = torch_side(work, model, params, dora_cfg)
    sides = {name: run for name, (run, _) in built.items()}
    infos = {name: info for name, (_, info) in built.items()}
    first = {}
    for name, run in sides.items():  # first call: compile (llmjax) + a step; losses before any update agree
        start = time.perf_counter()
        first[name] = (run(), time.perf_counter() - start)
    for info in infos.values():  # PyTorch allocates its AdamW moments at the first step
        if callable(info["optimizer_bytes"]):
            info["optimizer_bytes"] = info["optimizer_bytes"]()
    timings = {name: Timing() for name in sides}
    for i in range(warmup + steps):
        for name, run in sides.items():
            timings[name].measure(run) if i >= warmup else run()

    total = count_params(params)
    lines = [f"== {work.name}: {total / 1e6:.1f}M params, batch {work.batch_size}, fp32, AdamW + clip 1.0; "
             f"LoRA r={rank}, alpha={2 * rank}, targets {list(cfg.target_modules)}; llmjax layers "
             f"{'scanned' if scan_layers else 'unrolled'} ==",
             "first call (compile + step) and its loss: " + ", ".join(
                 f"{name} {seconds:.1f} s loss {loss:.6f}" for name, (loss, seconds) in first.items())]
    medians = {}
    for name, timing in timings.items():
        medians[name] = (statistics.median(timing.wall), statistics.median(timing.cpu))
        info = infos[name]
        lines.append(f"  {name:15s} step median wall {medians[name][0]:7.3f} s (min {min(timing.wall):.3f}) "
                     f"cpu {medians[name][1]:7.3f} CPU-s; trainable {info['trainable']:>11,d} "
                     f"({100 * info['trainable'] / total:6.3f}%); optimizer state "
                     f"{info['optimizer_bytes'] / 2**20:9.3f} MiB per device")
    for full, adapted in (("llmjax full", "llmjax factored"), ("llmjax full", "llmjax merged"),
                          ("pytorch full", "peft lora")):
        lines.append(
            f"  {adapted} / {full}: step time wall {medians[adapted][0] / medians[full][0]:.2f}x, "
            f"CPU {medians[adapted][1] / medians[full][1]:.2f}x; optimizer bytes "
            f"{100 * infos[adapted]['optimizer_bytes'] / infos[full]['optimizer_bytes']:.2f}%")
    lines.append(f"  matmul FLOPs LoRA / full: {matmul_flops_ratio(work, infos['llmjax factored']['trainable']):.3f}x "
                 "(frozen kernels lose only their weight gradients: the floor of the step-time ratio but for the "
                 "optimizer update LoRA also drops)")
    pairs = [("llmjax factored", "llmjax merged"), ("llmjax factored", "peft lora")]
    if dora:
        pairs += [("llmjax dora", "llmjax factored"), ("peft dora", "peft lora"), ("llmjax dora", "peft dora"),
                  ("llmjax dora", "llmjax full")]
    for first, second in pairs:
        lines.append(f"  {first} / {second} step time: wall {medians[first][0] / medians[second][0]:.2f}x, "
                     f"CPU {medians[first][1] / medians[second][1]:.2f}x")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(parser)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", choices=sorted(TARGETS), default="qv",
                        help="adapt the attention's q and v (the course's choice) or every dense projection")
    parser.add_argument("--dora", action="store_true", help="also time DoRA (use_dora) in llmjax and in peft")
    parser.add_argument("--layers", choices=("scanned", "unrolled"), default="scanned",
                        help="llmjax's layers in one nn.scan (the models' default) or unrolled (scan_layers: False)")
    args = parser.parse_args()
    for line in machine_lines():
        print(line, flush=True)
    for work in workloads_of(args):
        for line in compare(work, args.rank, args.targets, args.warmup, args.steps, args.layers == "scanned",
                            args.dora):
            print(line, flush=True)
    print("(wall: seconds of wall-clock time per step; cpu: CPU-seconds of this process per step, which other "
          "processes sharing the cores do not inflate)")
    print(f"load average at end (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
