"""The lab's ``int8`` row: a trained row's model after int8 post-training quantization (``llmjax.quantize``).

The source row's model (``full_ft`` in the lab, the PPO policy in ``llmjax lifecycle``) is quantized with the
default form (per-output-channel int8 kernels and embeddings, int8 activations), saved to ``out/int8`` (a
directory ``llmjax generate --model`` reads), and measured against the float model in the same run:

* ROUGE/BLEU of its greedy test summaries (the lab's ``evaluate_row``), and the share of them identical to the
  source row's saved ones (``summaries_identical_to_base``);
* weight bytes in memory and on disk (``memory_bytes``, ``disk_bytes``, ``float_memory_bytes``);
* greedy decoding speed of both at batch 1 and batch 8 on test prompts (``decode_tokens_per_sec``: ``{"1":
  {"float", "int8"}, "8": {...}}``), a fixed number of new tokens, median of a few timed calls after a warm-up.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import jax

from llmjax import quantize as int8
from llmjax.evaluate import build_prompts, default_max_input_tokens, encode_prompts
from llmjax.generate import GenerationConfig, generate
from llmjax.loading import TOKENIZER_FILES

INT8_ROW = "int8"
SPEED_BATCHES = (1, 8)


def decode_tokens_per_sec(model, params, input_ids, attention_mask, new_tokens: int, repeats: int = 3) -> float:
    """Greedy tokens per second of ``generate`` on ``input_ids [b, t]``: exactly ``new_tokens`` per row (eos
    ignored), the median of ``repeats`` timed calls after one that compiles."""
    def run():
        return jax.block_until_ready(generate(model, params, input_ids, attention_mask, max_new_tokens=new_tokens,
                                              min_new_tokens=new_tokens))

    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return input_ids.shape[0] * new_tokens / statistics.median(times)


def int8_row(out: Path, source_row: str, model, params, tokenizer, test: list[dict], template: str,
             evaluate_row, base_predictions: list[str], new_tokens: int = 32) -> tuple[dict, object]:
    """Quantize ``(model, params)`` (``source_row``'s model) into ``out/int8`` and measure it (module docstring).
    ``evaluate_row(model, params) -> EvalResult`` scores the test split; ``base_predictions``: the source row's
    test summaries. Returns ``(extra entry fields, EvalResult)``."""
    qmodel, qparams = int8.quantize(model, params)
    tokenizer_files = [out / "tokenizer" / name for name in TOKENIZER_FILES if (out / "tokenizer" / name).is_file()]
    int8.save(qmodel, qparams, out / INT8_ROW, tokenizer_files)
    result = evaluate_row(qmodel, qparams)
    identical = sum(a == b for a, b in zip(result.predictions, base_predictions)) / len(base_predictions)
    speed = {}
    max_input = default_max_input_tokens(model, GenerationConfig(max_new_tokens=new_tokens))
    for batch in SPEED_BATCHES:
        prompts, _ = build_prompts(model, tokenizer, test[:batch], template, max_input_tokens=max_input)
        ids, mask = encode_prompts(model, tokenizer, prompts)
        speed[str(batch)] = {"float": decode_tokens_per_sec(model, params, ids, mask, new_tokens),
                             "int8": decode_tokens_per_sec(qmodel, qparams, ids, mask, new_tokens)}
    footprint = int8.footprint(qparams, out / INT8_ROW)
    extra = {"base": source_row, "memory_bytes": footprint["memory_bytes"], "disk_bytes": footprint["disk_bytes"],
             "float_memory_bytes": int8.param_bytes(params), "summaries_identical_to_base": identical,
             "decode_tokens_per_sec": speed, "decode_new_tokens": new_tokens}
    return extra, result


def int8_section(results: dict) -> list[str]:
    """``report.md``'s int8 section (empty without the row)."""
    if INT8_ROW not in results:
        return []
    q = results[INT8_ROW]
    f = results[q["base"]]
    lines = ["## int8 post-training quantization", "",
             f"`{q['base']}` quantized to int8 (per-output-channel symmetric scales on kernels and embeddings, int8 "
             "activations; `llmjax quantize`), measured in the same run as the float model:", "",
             "| model | ROUGE-L | weight bytes in memory | on disk | summaries identical to the float model's |",
             "|---|---:|---:|---:|---:|",
             f"| {q['base']} (float32) | {f['rougeL']:.4f} | {q['float_memory_bytes']:,} | - | - |",
             f"| {INT8_ROW} | {q['rougeL']:.4f} | {q['memory_bytes']:,} | {q['disk_bytes']:,} | "
             f"{q['summaries_identical_to_base']:.0%} |", "",
             f"Greedy decoding, {q['decode_new_tokens']} new tokens per row on test prompts (median of 3 after a "
             "warm-up; a shared machine's numbers move, compare within the row):", "",
             "| batch | float32 tokens/s | int8 tokens/s | int8 / float32 |", "|---:|---:|---:|---:|"]
    for batch, speed in q["decode_tokens_per_sec"].items():
        lines.append(f"| {batch} | {speed['float']:.1f} | {speed['int8']:.1f} | {speed['int8'] / speed['float']:.2f}x |")
    return lines + [""]
