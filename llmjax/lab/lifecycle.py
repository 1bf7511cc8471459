"""``llmjax lifecycle --out DIR``: a model's whole life on the bundled data in one command (the README's first).

pre-training (span corruption) -> full SFT on the DialogSum-shaped task -> LoRA SFT -> reward model (toxicity
classifier) -> PPO from the SFT model against it -> int8 post-training quantization of the PPO policy ->
Hugging Face export, then one ``DIR/report.md`` with the rows' table, PNG curves, examples side by side and where
every artifact is. It is the lab (``llmjax.lab.summarize.run_lab``) at a size that finishes in minutes on a laptop
CPU (``LifecycleSettings``), with the in-context rows, one LoRA rank, the reward model and PPO, plus the int8
row (``int8``: greedy summaries of the quantized PPO policy, its bytes and its agreement with the float policy).
Quality is what a few hundred CPU steps buy; the full lab (``llmjax lab summarize``) is the measurement.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from llmjax import hf
from llmjax import quantize as int8
from llmjax.data.bundled.dialogsum import bundled_dialogsum
from llmjax.evaluate import load_model_for_inference
from llmjax.lab import report
from llmjax.lab.adapter_rows import AdapterRows
from llmjax.lab.detox import DetoxRows
from llmjax.lab.distill_rows import DistillRows
from llmjax.lab.summarize import LabSettings, evaluate_row, row_entry, run_lab, say

POLICY_ROW, INT8_ROW = "ppo", "int8"


@dataclasses.dataclass(frozen=True)
class LifecycleSettings:
    """The lab's pieces at the lifecycle's size (a d_model=128 T5; a few hundred steps per stage)."""

    lab: LabSettings = LabSettings(d_model=128, d_kv=32, d_ff=256, num_heads=4, num_layers=2, pretrain_steps=200,
                                   sft_steps=300, sft_learning_rate=3e-3, sft_schedule="cosine", curve_points=1,
                                   mixture_share=0.0, test_limit=48, validation_limit=16, heldout_batches=2,
                                   max_new_tokens=64)
    adapter_rows: AdapterRows = AdapterRows(lora_ranks=(8,), prompt_tuning=False)
    detox_rows: DetoxRows = DetoxRows(reward_steps=100, ppo_steps=10, ppo_batch_size=16, policy_rows=("ppo",),
                                      rlaif=False, toxicity_limit=24, toxicity_samples=2)

    @classmethod
    def tiny(cls) -> "LifecycleSettings":
        return cls(lab=dataclasses.replace(LabSettings.tiny(), mixture_share=0.0),
                   adapter_rows=AdapterRows(lora_ranks=(1,), prompt_tuning=False),
                   detox_rows=dataclasses.replace(DetoxRows.tiny(), policy_rows=("ppo",), rlaif=False))


def run_lifecycle(out: str | Path, settings: LifecycleSettings = LifecycleSettings(), progress: bool = True) -> dict:
    """Run every stage into ``out`` and write its report; returns ``results.json``'s mapping."""
    out = Path(out)
    started = time.perf_counter()
    results = run_lab(out, settings.lab, progress, adapter_rows=settings.adapter_rows,
                      detox_rows=settings.detox_rows, distill_rows=DistillRows(enabled=False),
                      report_header={"title": "llmjax lifecycle: pretrain, SFT, LoRA, reward model, PPO, int8, export",
                                     "command": f"llmjax lifecycle --out {out}"})
    facts = results.pop("_lab", None) or json.loads((out / "results.json").read_text())["_lab"]

    say(f"{INT8_ROW}: quantizing the {POLICY_ROW} policy to int8 (per-output-channel int8 weights, int8 activations)")
    model, params, tokenizer = load_model_for_inference(out / POLICY_ROW)
    qmodel, qparams = int8.quantize(model, params)
    tokenizer_files = sorted(p for p in (out / "tokenizer").iterdir() if p.is_file())
    int8.save(qmodel, qparams, out / INT8_ROW, tokenizer_files)
    test = bundled_dialogsum("test")[: settings.lab.test_limit]
    result = evaluate_row(qmodel, qparams, tokenizer, test, settings.lab)
    float_predictions = [json.loads(line)["prediction"] for line in
                         (out / "predictions" / f"{POLICY_ROW}.jsonl").read_text(encoding="utf-8").splitlines()]
    agreement = sum(a == b for a, b in zip(result.predictions, float_predictions)) / len(float_predictions)
    float_bytes, int8_bytes = int8.param_bytes(params), int8.footprint(qparams, out / INT8_ROW)
    results[INT8_ROW] = row_entry(result, 0, results[POLICY_ROW]["trainable_params"], 0.0, base=POLICY_ROW,
                                  memory_bytes=int8_bytes["memory_bytes"], disk_bytes=int8_bytes["disk_bytes"],
                                  float_memory_bytes=float_bytes, summaries_identical_to_base=agreement)
    report.write_predictions(out / "predictions" / f"{INT8_ROW}.jsonl", result)
    say(f"{INT8_ROW}: ROUGE-L {results[INT8_ROW]['rougeL']:.4f} ({POLICY_ROW} {results[POLICY_ROW]['rougeL']:.4f}), "
        f"{float_bytes / int8_bytes['memory_bytes']:.1f}x fewer weight bytes, {agreement:.0%} of summaries identical")

    say(f"exporting the {POLICY_ROW} policy as a Hugging Face directory")
    hf.save_pretrained(model, params, out / "hf")
    tokenizer.save_pretrained(out / "hf")

    facts["lifecycle_seconds"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps({**results, "_lab": facts}, indent=2) + "\n", encoding="utf-8")
    _append_report(out, results, facts)
    say(f"lifecycle done in {facts['lifecycle_seconds']:.0f} s: {out / 'report.md'}")
    return results


def _append_report(out: Path, results: dict, facts: dict) -> None:
    """Add the int8 row and the artifacts to the lab's ``report.md``."""
    q, p = results[INT8_ROW], results[POLICY_ROW]
    artifacts = {
        "pre-trained T5 (checkpoints, metrics.jsonl, TensorBoard)": "pretrain/",
        "tokenizer (SentencePiece)": "tokenizer/",
        "full fine-tuning (SFT)": "full_ft/",
        **{f"LoRA SFT ({row}: adapter-only checkpoints; `llmjax export` writes the merged model)":
           f"{row}/" for row in results if row.startswith("lora_r")},
        "reward model (checkpoints with the score head; `RewardModel.load` reads the run)": "reward_model/",
        "PPO policy (checkpoints, metrics)": f"{POLICY_ROW}/",
        "int8 PPO policy (`llmjax generate --model` reads it)": f"{INT8_ROW}/",
        "Hugging Face export of the PPO policy (`transformers` loads it)": "hf/",
        "every row's test summaries": "predictions/<row>.jsonl",
        "all numbers": "results.json",
    }
    text = [
        "", "## Lifecycle: int8 and export", "",
        f"`llmjax lifecycle --out {out}` took {facts['lifecycle_seconds']:.0f} s. The `{POLICY_ROW}` policy "
        "quantized to int8 (per-output-channel symmetric scales; kernels and embeddings):", "",
        "| row | ROUGE-L | weight bytes in memory | on disk | summaries identical to the float policy's |",
        "|---|---:|---:|---:|---:|",
        f"| {POLICY_ROW} (float32) | {p['rougeL']:.4f} | {q['float_memory_bytes']:,} | - | - |",
        f"| {INT8_ROW} | {q['rougeL']:.4f} | {q['memory_bytes']:,} | {q['disk_bytes']:,} | "
        f"{q['summaries_identical_to_base']:.0%} |", "",
        "## Where everything is", "", "| what | path (under the output directory) |", "|---|---|",
        *[f"| {what} | `{path}` |" for what, path in artifacts.items()], "",
    ]
    with open(out / "report.md", "a", encoding="utf-8") as handle:
        handle.write("\n".join(text))
