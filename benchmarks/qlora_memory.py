"""QLoRA vs LoRA memory: XLA's memory analysis of the compiled adapter-gradient step, fp32 base vs int8 base.

Run from the repository root (compiles only; about a minute on a 2-core CPU)::

    .venv/bin/python benchmarks/qlora_memory.py
    .venv/bin/python benchmarks/qlora_memory.py --family decoder --batch 4 --length 256

For the T5-small shape (or the ~60M decoder of ``benchmarks/decode.py``), random weights, LoRA r=8 on q and
v: the gradient of the token cross-entropy with respect to the adapters, computed as
``llmjax.stages.adapters`` does (LoRA: the adapters merged into the fp32 kernels, ``llmjax.lora.merge``,
``form="merged"``, and the fp32 model with the adapters factored, ``llmjax.lora.apply_factored``, the default;
QLoRA: the int8 model with the adapters factored, as under ``quantize:``),
is compiled and XLA's ``memory_analysis()`` printed: argument bytes (the frozen base and the adapters) and
temporary bytes (activations kept for the backward pass, and any dequantized weight copy XLA makes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: llmjax, benchmarks

from benchmarks.decode import DECODER_SMALL, T5_SMALL, argument_parser, print_run_header  # noqa: E402
from llmjax import lora, quantize  # noqa: E402
from llmjax.losses import cross_entropy_with_z_loss  # noqa: E402
from llmjax.models import DecoderConfig, T5Config, build_model, init_params  # noqa: E402

TARGETS = {"t5": ("q", "v"), "decoder": ("q_proj", "v_proj")}


def loss_of(apply, family: str, ids):
    """Mean next-token cross-entropy of ``apply(*inputs) -> logits`` on ``ids [b, l]``."""
    if family == "t5":
        logits = apply(ids, ids)
        targets = ids
    else:
        logits = apply(ids[:, :-1])
        targets = ids[:, 1:]
    return cross_entropy_with_z_loss(logits, targets, jnp.ones(targets.shape, jnp.float32))[0] / targets.size


def analyse(family: str, batch: int, length: int) -> dict:
    config = T5Config(**T5_SMALL, dropout_rate=0.0) if family == "t5" else DecoderConfig(**DECODER_SMALL)
    model = build_model(config)
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    cfg = lora.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS[family])
    adapters = jax.eval_shape(lambda: lora.init(model, params, cfg, jax.random.key(1)))
    qmodel = quantize.quantized_model(model, "int8")
    qparams = jax.eval_shape(lambda p: quantize.quantize(model, p, "int8")[1], params)
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def lora_loss(adapters, base, ids):
        merged = lora.merge(base, adapters, cfg)
        return loss_of(lambda *a: model.apply({"params": merged}, *a), family, ids)

    def factored_loss(adapters, base, ids):
        return loss_of(lambda *a: lora.apply_factored(model, base, adapters, cfg, *a), family, ids)

    def qlora_loss(adapters, base, ids):
        return loss_of(lambda *a: lora.apply_factored(qmodel, base, adapters, cfg, *a), family, ids)

    rows = {}
    for name, fn, base in (("LoRA factored, fp32 base", factored_loss, params),
                           ("LoRA merged, fp32 base", lora_loss, params), ("QLoRA, int8 base", qlora_loss, qparams)):
        stats = jax.jit(jax.grad(fn)).lower(adapters, base, ids).compile().memory_analysis()
        rows[name] = (quantize.param_bytes(base), stats.argument_size_in_bytes, stats.temp_size_in_bytes)
    return rows


def main(argv=None):
    parser = argument_parser(__doc__.split("\n")[0], repeats=1)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args(argv)
    print_run_header()
    families = ["t5", "decoder"] if args.family == "both" else [args.family]
    print("| model | batch x length | run | frozen base | arguments (XLA) | temporaries (XLA) | base + temporaries |")
    print("|---|---|---|---|---|---|---|")
    for family in families:
        for batch in args.batch:
            for name, (base, arguments, temp) in analyse(family, batch, args.length).items():
                print(f"| {family} | {batch} x {args.length} | {name} | {base / 2**20:.1f} MiB | "
                      f"{arguments / 2**20:.1f} MiB | {temp / 2**20:.1f} MiB | {(base + temp) / 2**20:.1f} MiB |",
                      flush=True)


if __name__ == "__main__":
    main()
