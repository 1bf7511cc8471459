"""int8 post-training quantization: bytes and greedy decoding speed, int8 llmjax vs fp32 llmjax vs transformers fp32.

Run from the repository root (about 5-10 minutes on a 2-core CPU)::

    .venv/bin/python benchmarks/quantize.py                       # T5-small shape and the ~60M decoder, batch 1 and 8
    .venv/bin/python benchmarks/quantize.py --family t5 --batch 1 --new-tokens 32

The models, prompts and settings are ``benchmarks/decode.py``'s (its helpers are reused): random
weights written by transformers and read through ``llmjax.hf``, greedy decoding of exactly
``--new-tokens`` tokens after a warm-up. One run times, on the same weights: transformers fp32,
llmjax fp32, llmjax int8 with int8 activations (``int8_dynamic``, W8A8, the default of ``llmjax
quantize``) and llmjax int8 weight-only (``int8``, activations fp32); the llmjax variants are timed
in turn within each of ``--repeats`` rounds, so a burst of load from other jobs on the shared machine
hits all of them; the median and the best round are reported. The fp32 llmjax tokens are asserted
identical to transformers'. Agreement of the int8 models with fp32: "next token", the share of new
positions where the int8 model's argmax equals fp32's when both read fp32's greedy sequence (teacher
forced: one flip does not decide the rest); "free", the share of the int8 model's own greedy tokens
equal to fp32's position by position (after a first flip the rows differ; random models with 32k
vocabularies have top-1/top-2 logit gaps of a few tenths, so flips come early). Bytes: parameters in
memory (``llmjax.quantize.param_bytes``) and weight files on disk (the fp32 Hugging Face safetensors
vs the quantized directory).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: llmjax, benchmarks

from benchmarks.decode import (  # noqa: E402
    DECODER_SMALL, T5_SMALL, argument_parser, print_run_header, prompts, time_hf,
)
from llmjax import quantize  # noqa: E402
from llmjax.generate import generate  # noqa: E402
from llmjax.generation.config import GenerationConfig  # noqa: E402
from llmjax.models.int8 import matmul as int8_matmul, quantize_channels  # noqa: E402
from llmjax.testing import to_llmjax, torch_llama, torch_t5  # noqa: E402

VARIANTS = ("int8_dynamic", "int8")


def next_token_predictions(model, params, ids, mask, sequences: np.ndarray, new: int) -> np.ndarray:
    """Argmax ``[batch, new]`` of the model reading ``sequences`` (greedy output: T5 start token + new tokens,
    decoder prompt + new tokens) teacher-forced: the prediction of each new token from its true prefix."""
    if model.config.__class__.__name__ == "T5Config":
        logits = jax.jit(lambda p: model.apply({"params": p}, ids, sequences[:, :-1], attention_mask=mask))(params)
    else:
        full_mask = np.concatenate([mask, np.ones((mask.shape[0], new), mask.dtype)], axis=1)
        logits = jax.jit(lambda p: model.apply({"params": p}, sequences[:, :-1], full_mask[:, :-1]))(params)
    return np.asarray(jnp.argmax(logits[:, -new:], axis=-1))


def decode_temp_bytes(model, params, ids, mask, new_tokens: int) -> int:
    """Bytes of XLA's temporary buffers in the compiled greedy decoding loop (beyond the params, inputs and
    outputs): where a dequantized copy of a weight would live if XLA made one."""
    from llmjax.generate import _decode_loop, resolve_config  # the loop generate runs, compiled alone here

    config = resolve_config(model, GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                    do_sample=False))
    lowered = _decode_loop.lower(params, ids, mask, jax.random.key(0), None, model=model, config=config,
                                 max_new_tokens=new_tokens)
    return int(lowered.compile().memory_analysis().temp_size_in_bytes)


def bench_family(family: str, args, workdir: Path) -> list[dict]:
    torch_model = torch_t5(args.seed, **T5_SMALL) if family == "t5" else torch_llama(args.seed, **DECODER_SMALL)
    model, params = to_llmjax(torch_model, workdir / family)
    params = jax.device_put(params)
    models = {"fp32": (model, params)}
    disk = {"fp32": quantize.directory_bytes(workdir / family)}
    for variant in VARIANTS:
        qmodel, qparams = quantize.quantize(model, params, variant)
        out = quantize.save(qmodel, qparams, workdir / f"{family}_{variant}")
        qmodel, qparams = quantize.load(out)  # decode from what was written
        models[variant] = (qmodel, jax.device_put(qparams))
        disk[variant] = quantize.directory_bytes(out)
    memory = {name: quantize.param_bytes(p) for name, (_, p) in models.items()}
    ids, mask = prompts(family, 1, args.prompt_len, torch_model.config.vocab_size, args.seed)
    temp = {name: decode_temp_bytes(m, p, ids, mask, args.new_tokens) for name, (m, p) in models.items()}

    rows = []
    for batch in args.batch:
        ids, mask = prompts(family, batch, args.prompt_len, torch_model.config.vocab_size, args.seed)
        settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                        num_beams=1)
        hf = time_hf(torch_model, ids, mask, settings, args.repeats)
        new = batch * args.new_tokens
        row = dict(family=family, batch=batch, hf=new / hf["seconds"], hf_threads=hf["threads"])
        start = 1 if family == "t5" else args.prompt_len

        def run(name):
            m, p = models[name]
            begin = time.perf_counter()
            out = np.asarray(jax.block_until_ready(generate(m, p, ids, mask, **settings)))
            return time.perf_counter() - begin, out

        outputs = {name: run(name)[1] for name in models}  # warm-up: compiles each variant's loop
        seconds = {name: [] for name in models}
        for _ in range(args.repeats):
            for name in models:
                seconds[name].append(run(name)[0])
        reference = outputs["fp32"]
        assert (reference == hf["tokens"]).all(), f"{family} batch {batch}: llmjax fp32 tokens differ from HF"
        forced = {name: next_token_predictions(m, p, ids, mask, reference, args.new_tokens)
                  for name, (m, p) in models.items()}
        for name in models:
            row[name] = new / float(np.median(seconds[name]))
            row[f"{name}_best"] = new / min(seconds[name])
            if name != "fp32":
                row[f"{name}_agree"] = (float((forced[name] == forced["fp32"]).mean()),
                                        float((outputs[name][:, start:] == reference[:, start:]).mean()))
        rows.append(row)
        print(f"  {family:8s} batch {batch}: done", flush=True)
    return [dict(r, memory=memory, disk=disk, temp=temp) for r in rows]


def matmul_forms(rows: int, k: int, n: int, repeats: int = 30) -> list[tuple[str, float, str]]:
    """One ``[rows, k] @ [k, n]`` (an LM head) in each form tried: ``(form, median ms, what XLA compiled)``.

    What XLA compiled (read off ``compiled.as_text()``): whether the program first writes a kernel-sized wider
    array (the int8 kernel converted, or scaled, to f32/bf16/s32 in memory), and whether the dot went to a YNNPACK
    fusion or XLA's own dot.
    """
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32)
    q, scale = quantize_channels(w, -2)
    x = jnp.asarray(rng.standard_normal((rows, k)).astype(np.float32))
    w = jnp.asarray(w)

    def without_row_padding(x, q, scale):  # int8.matmul's W8A8 minus its one-row duplication
        x_scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127
        xq = jnp.round(x / x_scale).astype(jnp.int8)
        return jax.lax.dot_general(xq, q, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32) * x_scale * scale

    forms = {
        "fp32 x @ w": (lambda x, w, s: x @ w, w),
        "weight-only fp32: (x @ q.astype(f32)) * scale": (
            lambda x, q, s: int8_matmul(x, q, s, contract=0, dynamic=False, dtype=jnp.float32), q),
        "weight-only bf16: (x.bf16 @ q.astype(bf16)) * scale": (
            lambda x, q, s: int8_matmul(x, q, s, contract=0, dynamic=False, dtype=jnp.bfloat16), q),
        "weight-only, scale on the kernel: x @ (q * scale)": (lambda x, q, s: x @ (q.astype(jnp.float32) * s), q),
        "W8A8 int8 x int8 -> int32 (llmjax int8_dynamic)": (
            lambda x, q, s: int8_matmul(x, q, s, contract=0, dynamic=True, dtype=jnp.float32), q),
        "W8A8 without the one-row duplication": (without_row_padding, q),
    }
    out = []
    for name, (fn, weights) in forms.items():
        compiled = jax.jit(fn).lower(x, weights, scale).compile()
        text = compiled.as_text()
        entry = text[text.index("\nENTRY"):].splitlines()
        widened = any(re.search(rf"= (f32|bf16|s32)\[{k},{n}\]", line) and "parameter(" not in line for line in entry)
        how = ("kernel widened in memory, then " if widened else "") + (
            "YNNPACK dot" if "kind=kCustom" in text else "XLA dot")
        jax.block_until_ready(compiled(x, weights, scale))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(x, weights, scale))
            times.append(time.perf_counter() - start)
        out.append((name, 1e3 * float(np.median(times)), how))
    return out


def main(argv=None):
    args = argument_parser(__doc__.split("\n")[0], repeats=5).parse_args(argv)
    print_run_header()
    print("the machine is shared with other jobs: compare rows of one run, and mind the load average")
    print(f"greedy, prompt {args.prompt_len} tokens (batch rows padded to different lengths), {args.new_tokens} new "
          f"tokens; llmjax: {args.repeats} interleaved rounds after warm-up, median (best) tokens/s")
    print()
    print("One LM-head matmul [rows, 512] @ [512, 32128] in each form tried (median of 30 calls):")
    print("| rows | form | ms | what XLA compiled |")
    print("|---|---|---|---|")
    for rows in args.batch:
        for name, ms, how in matmul_forms(rows, 512, 32128):
            print(f"| {rows} | {name} | {ms:.2f} | {how} |", flush=True)
    print()
    families = ["t5", "decoder"] if args.family == "both" else [args.family]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            rows += bench_family(family, args, Path(tmp))
    print()
    print("Bytes (parameters in memory; weight files on disk; XLA temporaries of the compiled batch-1 decoding loop,"
          " decode_temp_bytes):")
    print("| model | fp32 memory | int8 memory | fp32 / int8 | fp32 disk (HF safetensors) | int8 disk | fp32 / int8 | "
          "loop temporaries fp32 / W8A8 / weight-only |")
    print("|---|---|---|---|---|---|---|---|")
    for r in {r["family"]: r for r in rows}.values():
        m, d, t = r["memory"], r["disk"], r["temp"]
        print(f"| {r['family']} | {m['fp32'] / 2**20:.1f} MiB | {m['int8_dynamic'] / 2**20:.1f} MiB | "
              f"{m['fp32'] / m['int8_dynamic']:.2f}x | {d['fp32'] / 2**20:.1f} MiB | {d['int8_dynamic'] / 2**20:.1f} MiB | "
              f"{d['fp32'] / d['int8_dynamic']:.2f}x | {t['fp32'] / 2**20:.1f} / {t['int8_dynamic'] / 2**20:.1f} / "
              f"{t['int8'] / 2**20:.1f} MiB |")
    print()
    print("Greedy decode tokens/s, median (best round), same run, same weights:")
    print("| model | batch | HF fp32 | llmjax fp32 | llmjax int8_dynamic (W8A8) | W8A8 / fp32 llmjax | W8A8 / HF | "
          "llmjax int8 weight-only | weight-only / fp32 llmjax | agreement W8A8: next token, free | "
          "agreement weight-only: next token, free | torch threads |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a8, a16 = r["int8_dynamic_agree"], r["int8_agree"]
        print(f"| {r['family']} | {r['batch']} | {r['hf']:.1f} | {r['fp32']:.1f} ({r['fp32_best']:.1f}) | "
              f"{r['int8_dynamic']:.1f} ({r['int8_dynamic_best']:.1f}) | {r['int8_dynamic'] / r['fp32']:.2f}x "
              f"({r['int8_dynamic_best'] / r['fp32_best']:.2f}x) | {r['int8_dynamic'] / r['hf']:.2f}x | "
              f"{r['int8']:.1f} ({r['int8_best']:.1f}) | {r['int8'] / r['fp32']:.2f}x ({r['int8_best'] / r['fp32_best']:.2f}x) | "
              f"{100 * a8[0]:.0f}%, {100 * a8[1]:.0f}% | {100 * a16[0]:.0f}%, {100 * a16[1]:.0f}% | {r['hf_threads']} |")
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")
    print("fp32 llmjax tokens identical to transformers in every row (asserted)")


if __name__ == "__main__":
    main()
