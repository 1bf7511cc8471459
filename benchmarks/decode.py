"""Greedy decoding speed: llmjax ``generate`` vs ``transformers`` ``generate`` on the same random model.

Run from the repository root (takes about 2-4 minutes on a 2-core CPU)::

    .venv/bin/python benchmarks/decode.py                      # T5-small shape and a decoder, batch 1 and 8
    .venv/bin/python benchmarks/decode.py --family t5 --batch 1 --new-tokens 32

Both libraries decode exactly ``--new-tokens`` tokens (``min_new_tokens`` = ``max_new_tokens``
keeps eos away) in fp32 from the same weights (written by transformers, read through
``llmjax.hf``), and the tokens are asserted identical. Timings are the median of
``--repeats`` runs after a warm-up run (which, for llmjax, compiles the loop once).

Alongside, the bandwidth-bound ceiling: each decoding step must read every decoder weight
and the LM head once, so steps/s <= memory bandwidth / those bytes (bandwidth measured
with a large numpy copy); tokens/s ceiling = batch * that.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: llmjax

from llmjax import environment  # noqa: E402
from llmjax.generate import generate  # noqa: E402
from llmjax.testing import to_llmjax, torch_llama, torch_t5  # noqa: E402

# T5-small (v1.0: ReLU, tied embeddings) and a LLaMA-style decoder of similar size (~60M params).
T5_SMALL = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                feed_forward_proj="relu")
DECODER_SMALL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)


DEFAULT_TORCH_THREADS = torch.get_num_threads()


def machine() -> str:
    return (f"{environment.cpu_model()}, {os.cpu_count()} cores; jax {jax.__version__} ({jax.default_backend()}), "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")


def memory_bandwidth_gb_s(megabytes: int = 512, repeats: int = 5) -> float:
    """Best ``np.copyto`` rate over a buffer far larger than cache: bytes read + written per second."""
    src = np.ones(megabytes * 2**20 // 8, np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def weight_bytes_per_step(torch_model, family: str) -> int:
    """Bytes of the parameters one decoding step reads: the decoder stack and the LM head (fp32).

    For T5 the encoder is excluded (run once per prompt) and so are cross-attention keys and
    values (computed once); the token embedding row lookup is negligible unless tied to the head.
    """
    total = 0
    for name, param in torch_model.named_parameters():
        if family == "t5" and (name.startswith("encoder.") or "EncDecAttention.k" in name
                               or "EncDecAttention.v" in name):
            continue
        if name.endswith(("shared.weight", "embed_tokens.weight")) and not torch_model.config.tie_word_embeddings:
            continue  # embedding lookup only: one row per token
        total += param.numel() * param.element_size()
    return total


def timed(fn, repeats: int):
    fn()  # warm-up (compiles llmjax's loop; fills torch's caches)
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def prompts(family: str, batch: int, prompt_len: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random prompts ``[batch, prompt_len]`` int32 and their mask, rows of different lengths: right padding
    for T5's encoder, left padding for the decoder (row 0 is full length)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, prompt_len)).astype(np.int32)
    lengths = rng.integers(prompt_len // 2, prompt_len + 1, size=batch)
    lengths[0] = prompt_len
    positions = np.arange(prompt_len)[None, :]
    if family == "t5":
        mask = (positions < lengths[:, None]).astype(np.int32)
    else:
        mask = (positions >= prompt_len - lengths[:, None]).astype(np.int32)
    return ids * mask, mask


def time_hf(torch_model, ids: np.ndarray, mask: np.ndarray, settings: dict, repeats: int) -> dict:
    """``transformers`` greedy ``generate`` at its best: probe torch's default thread count and 1 thread on a
    short run, time the faster (OpenMP spin-waits make the default far slower when other processes share the
    cores). -> ``{"seconds", "tokens", "threads", "probe"}`` (median seconds, output ids)."""
    ids_t, mask_t = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    def run_hf(**overrides):
        with torch.inference_mode():
            return torch_model.generate(input_ids=ids_t, attention_mask=mask_t, **{**settings, **overrides}).numpy()

    probe = dict(settings, max_new_tokens=4, min_new_tokens=4)
    probe_s = {}
    for threads in sorted({1, DEFAULT_TORCH_THREADS}):
        torch.set_num_threads(threads)
        probe_s[threads] = timed(lambda: run_hf(**probe), repeats=1)[0]
    hf_threads = min(probe_s, key=probe_s.get)
    torch.set_num_threads(hf_threads)
    seconds, out = timed(run_hf, repeats)
    torch.set_num_threads(DEFAULT_TORCH_THREADS)
    return dict(seconds=seconds, tokens=out, threads=hf_threads,
                probe=", ".join(f"{t} thr {1e3 * s / 4:.0f} ms/step" for t, s in sorted(probe_s.items())))


def bench(family: str, batch: int, args, bandwidth: float, workdir: Path) -> dict:
    if family == "t5":
        torch_model = torch_t5(args.seed, **T5_SMALL)
    else:
        torch_model = torch_llama(args.seed, **DECODER_SMALL)
    model, params = to_llmjax(torch_model, workdir / family)
    params = jax.device_put(params)

    ids, mask = prompts(family, batch, args.prompt_len, torch_model.config.vocab_size, args.seed)
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, num_beams=1)

    def run_llmjax():
        return np.asarray(jax.block_until_ready(generate(model, params, ids, mask, **settings)))

    hf = time_hf(torch_model, ids, mask, settings, args.repeats)
    jx_s, jx_out = timed(run_llmjax, args.repeats)
    assert hf["tokens"].shape == jx_out.shape and (hf["tokens"] == jx_out).all(), (
        f"{family} batch {batch}: llmjax tokens differ from transformers")
    new = batch * args.new_tokens
    step_bytes = weight_bytes_per_step(torch_model, family)
    ceiling = batch * bandwidth * 1e9 / step_bytes
    return dict(family=family, batch=batch, hf=new / hf["seconds"], llmjax=new / jx_s, ratio=hf["seconds"] / jx_s,
                step_mb=step_bytes / 2**20, ceiling=ceiling, hf_threads=hf["threads"], probe=hf["probe"])


def argument_parser(description: str, repeats: int) -> argparse.ArgumentParser:
    """The options of the decoding benchmarks (this one and ``benchmarks/quantize.py``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--family", choices=["t5", "decoder", "both"], default="both")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def print_run_header() -> None:
    """The command, the machine, XLA's flags and the load average: what a reader needs to weigh the timings."""
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print("machine:", machine())
    print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS') or '(none: XLA CPU defaults)'}; "
          f"load average (1, 5, 15 min) at the start: {os.getloadavg()}")


def main(argv=None):
    args = argument_parser(__doc__.split("\n")[0], repeats=3).parse_args(argv)
    print_run_header()
    bandwidth = memory_bandwidth_gb_s()
    print(f"memory bandwidth (numpy copy, read+write): {bandwidth:.1f} GB/s")
    print(f"greedy, fp32, prompt {args.prompt_len} tokens (batch rows padded to different lengths), "
          f"{args.new_tokens} new tokens, median of {args.repeats} after warm-up")
    families = ["t5", "decoder"] if args.family == "both" else [args.family]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            for batch in args.batch:
                rows.append(bench(family, batch, args, bandwidth, Path(tmp)))
                r = rows[-1]
                print(f"  {r['family']:8s} batch {r['batch']}: done", flush=True)
    print()
    print("| model | batch | transformers tok/s | llmjax tok/s | llmjax / HF | weights read per step | "
          "bandwidth ceiling tok/s | llmjax % of ceiling | torch threads (probe) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['batch']} | {r['hf']:.1f} | {r['llmjax']:.1f} | {r['ratio']:.2f}x | "
              f"{r['step_mb']:.0f} MiB | {r['ceiling']:.0f} | {100 * r['llmjax'] / r['ceiling']:.0f}% | "
              f"{r['hf_threads']} ({r['probe']}) |")
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")
    print("output tokens identical in every row (asserted)")


if __name__ == "__main__":
    main()
