"""LoRA forward: merge ``W + s·A@B`` inside the loss, or run it factored ``x@W + s·(x@A)@B``? Timed here.

    .venv/bin/python benchmarks/lora_forward.py                 # ~3-6 min on 2 shared cores
    .venv/bin/python benchmarks/lora_forward.py --tokens 2048 --ranks 8 --repeats 3   # quick look

For every projection of one layer (T5 v1.1 small's encoder layer: q, k, v 512->384, o 384->512, gated
FFN 512->1024 x2, 1024->512; the LLaMA-style 60M decoder's layer: q, k, v, o 512->512, gate/up
512->1536, down 1536->512), one jitted function computes the projections' outputs from their inputs
``x [tokens, in]`` and frozen kernels ``W [in, out]`` (fp32, as the CPU runs train), contracts them with
a fixed random cotangent, and takes the gradient with respect to the adapters *and* the inputs (a
layer in a network must pass the gradient down). The two ways:

  merged:    W' = W + s·A@B; y = x@W'            backward needs dW' = xᵀ@dy (a full weight gradient),
                                                 then dA, dB from dW' (small)
  factored:  y = x@W + s·(x@A)@B                 backward needs no gradient of W, only thin matmuls

Per step, merged adds ``2·in·out·r`` (A@B) + ``2·tokens·in·out`` (dW') FLOPs per kernel; factored adds
``~6·tokens·r·(in + out)``. The two runs alternate, repeat by repeat, so other processes' load hits both;
the median wall time and the CPU time of this process are printed, with the ratio merged / factored.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.train_throughput import DECODER_SMALL, cpu_seconds, machine_lines  # noqa: E402
from llmjax import hf, lora  # noqa: E402
from llmjax.model_config import T5Config  # noqa: E402
from llmjax.models import build_model, init_params  # noqa: E402


def t5_small() -> T5Config:
    fields = yaml.safe_load((REPO / "configs" / "model" / "t5_small.yaml").read_text())
    fields.pop("family")
    return T5Config(**fields)


def layer_projections(config) -> list[tuple[str, int, int]]:
    """``(HF module, in, out)`` of every projection of the model's first (encoder) layer."""
    targets = lora.FAMILY_TARGETS[hf.weight_map(config).family]
    cfg = lora.LoraConfig(r=1, lora_alpha=1, target_modules=tuple(t for t in targets if t != "wi"))
    shapes = hf.weight_map(config).shapes
    out = []
    for site in lora.sites(config, cfg):
        module, path = site.hf_modules[0], site.unscanned[0]
        if module.startswith(("encoder.block.0.", "model.layers.0.")):
            out.append((module.rsplit(".", 1)[1], *shapes[path + ("kernel",)]))
    return out


def merged(adapters, xs, kernels, cotangents, scale):
    total = 0.0
    for (a, b), x, w, g in zip(adapters, xs, kernels, cotangents):
        total += jnp.vdot(x @ (w + scale * (a @ b)), g)
    return total


def factored(adapters, xs, kernels, cotangents, scale):
    total = 0.0
    for (a, b), x, w, g in zip(adapters, xs, kernels, cotangents):
        total += jnp.vdot(x @ w + scale * ((x @ a) @ b), g)
    return total


def time_pair(projections, tokens: int, r: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    adapters = [(normal(i, r) / np.sqrt(i), normal(r, o)) for _, i, o in projections]
    xs = [normal(tokens, i) for _, i, _ in projections]
    kernels = [normal(i, o) / np.sqrt(i) for _, i, o in projections]
    cotangents = [normal(tokens, o) for _, _, o in projections]
    steps = {name: jax.jit(jax.value_and_grad(fn, argnums=(0, 1)), static_argnums=4)
             for name, fn in (("merged", merged), ("factored", factored))}
    results = {name: {"wall": [], "cpu": []} for name in steps}
    values = {}
    for name, step in steps.items():  # compile + warm up
        values[name] = jax.block_until_ready(step(adapters, xs, kernels, cotangents, 2.0))[0]
    assert abs(float(values["merged"]) - float(values["factored"])) <= 1e-3 * abs(float(values["factored"])) + 1e-2
    for _ in range(repeats):
        for name, step in steps.items():
            wall, cpu = time.perf_counter(), cpu_seconds()
            jax.block_until_ready(step(adapters, xs, kernels, cotangents, 2.0))
            results[name]["wall"].append(time.perf_counter() - wall)
            results[name]["cpu"].append(cpu_seconds() - cpu)
    return {name: {clock: statistics.median(v) for clock, v in times.items()} for name, times in results.items()}


def model_step_pair(config, targets: tuple[str, ...], r: int, batch: int, length: int, repeats: int) -> dict:
    """Whole-model fwd+bwd (grads w.r.t. the adapters only, cross-entropy on random targets), merged vs factored."""
    model = build_model(dataclasses.replace(config, dropout_rate=0.0) if isinstance(config, T5Config) else config)
    params = init_params(model, jax.random.key(0))
    cfg = lora.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)
    adapters = lora.init(model, params, cfg, jax.random.key(1))
    rng = np.random.default_rng(0)
    vocab = config.vocab_size
    ids = jnp.asarray(rng.integers(2, vocab, (batch, length)), jnp.int32)
    inputs = (ids, ids[:, : max(length // 4, 1)]) if isinstance(config, T5Config) else (ids,)
    labels = jnp.asarray(rng.integers(2, vocab, inputs[-1].shape), jnp.int32)

    def loss(adapters, params, factored):
        if factored:
            logits = lora.apply_factored(model, params, adapters, cfg, *inputs)
        else:
            logits = model.apply({"params": lora.merge(params, adapters, cfg)}, *inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    step = jax.jit(jax.value_and_grad(loss), static_argnums=2)
    results = {name: {"wall": [], "cpu": []} for name in ("merged", "factored")}
    values = {name: float(jax.block_until_ready(step(adapters, params, name == "factored"))[0]) for name in results}
    assert abs(values["merged"] - values["factored"]) < 1e-4, values
    for _ in range(repeats):
        for name in results:
            wall, cpu = time.perf_counter(), cpu_seconds()
            jax.block_until_ready(step(adapters, params, name == "factored"))
            results[name]["wall"].append(time.perf_counter() - wall)
            results[name]["cpu"].append(cpu_seconds() - cpu)
    return {name: {clock: statistics.median(v) for clock, v in times.items()} for name, times in results.items()}


def _line(label: str, t: dict) -> str:
    return (f"  {label}:  merged {1e3 * t['merged']['wall']:8.1f} ms wall {1e3 * t['merged']['cpu']:8.1f} ms cpu | "
            f"factored {1e3 * t['factored']['wall']:8.1f} ms wall {1e3 * t['factored']['cpu']:8.1f} ms cpu | ratio "
            f"wall {t['merged']['wall'] / t['factored']['wall']:.2f}x cpu {t['merged']['cpu'] / t['factored']['cpu']:.2f}x")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--part", choices=("layer", "model", "both"), default="both")
    args = parser.parse_args(argv)
    print("\n".join(machine_lines()))
    if args.part in ("model", "both"):
        print("whole-model fwd+bwd, grads w.r.t. adapters only, fp32, batch 4 x 512 tokens (T5: encoder 512, "
              f"decoder 128); median of {args.repeats} alternating runs; ratio = merged / factored")
        for name, config, qv, every in (("T5 v1.1 small", t5_small(), ("q", "v"), ("q", "k", "v", "o", "wi_0", "wi_1", "wo")),
                                        ("LLaMA-style 60M decoder", DECODER_SMALL, ("q_proj", "v_proj"),
                                         lora.FAMILY_TARGETS["llama"])):
            for targets, r in ((qv, 32), (every, 8)):
                t = model_step_pair(config, tuple(targets), r, 4, 512, args.repeats)
                print(_line(f"{name}, r {r} on {'/'.join(targets)}", t), flush=True)
    if args.part == "model":
        return
    print("fwd+bwd of one layer's projections, grads w.r.t. adapters and inputs, fp32; median of "
          f"{args.repeats} alternating runs (ms); ratio = merged / factored")
    for name, config in (("T5 v1.1 small", t5_small()), ("LLaMA-style 60M decoder", DECODER_SMALL)):
        projections = layer_projections(config)
        print(f"== {name}: {', '.join(f'{m} {i}->{o}' for m, i, o in projections)} ==")
        for tokens in args.tokens:
            for r in args.ranks:
                print(_line(f"tokens {tokens:5d} r {r:3d}", time_pair(projections, tokens, r, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
