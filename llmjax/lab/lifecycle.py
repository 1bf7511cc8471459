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

from llmjax.lab.adapter_rows import AdapterRows
from llmjax.lab.detox import DetoxRows
from llmjax.lab.distill_rows import DistillRows
from llmjax.lab.instruction_base_rows import InstructionBaseRows
from llmjax.lab.int8_row import INT8_ROW
from llmjax.lab.summarize import LabSettings, run_lab, say
from llmjax.train.checkpoint import export_checkpoint_to_hf

POLICY_ROW = "ppo"


@dataclasses.dataclass(frozen=True)
class LifecycleSettings:
    """The lab's model (``LabSettings``: a d_model=128 T5) with shorter runs (300 SFT steps at 256/64 tokens, a few
    hundred per stage) scored on 48 test dialogues."""

    lab: LabSettings = LabSettings(sft_steps=300, sft_encoder_length=256, sft_decoder_length=64, curve_points=1,
                                   mixture_share=0.0, test_limit=48, validation_limit=16, heldout_batches=2,
                                   max_new_tokens=64)
    adapter_rows: AdapterRows = AdapterRows(lora_ranks=(8,), qlora_ranks=(), prompt_tuning=False)
    detox_rows: DetoxRows = DetoxRows(reward_steps=100, ppo_steps=10, ppo_batch_size=16, policy_rows=("ppo",),
                                      rlaif=False, toxicity_limit=24, toxicity_samples=2)

    @classmethod
    def tiny(cls) -> "LifecycleSettings":
        return cls(lab=dataclasses.replace(LabSettings.tiny(), mixture_share=0.0),
                   adapter_rows=AdapterRows(lora_ranks=(1,), qlora_ranks=(), prompt_tuning=False),
                   detox_rows=dataclasses.replace(DetoxRows.tiny(), policy_rows=("ppo",), rlaif=False))


def run_lifecycle(out: str | Path, settings: LifecycleSettings = LifecycleSettings(), progress: bool = True) -> dict:
    """Run every stage into ``out`` and write its report; returns ``results.json``'s mapping."""
    out = Path(out)
    started = time.perf_counter()
    results = run_lab(out, settings.lab, progress, adapter_rows=settings.adapter_rows,
                      detox_rows=settings.detox_rows, distill_rows=DistillRows(enabled=False),
                      instruction_base_rows=InstructionBaseRows(enabled=False),
                      report_header={"title": "llmjax lifecycle: pretrain, SFT, LoRA, reward model, PPO, int8, export",
                                     "command": f"llmjax lifecycle --out {out}"}, int8_from=POLICY_ROW)
    facts = json.loads((out / "results.json").read_text())["_lab"]

    say(f"exporting the {POLICY_ROW} policy as a Hugging Face directory")
    export_checkpoint_to_hf(out / POLICY_ROW, out / "hf")  # what `llmjax export` does: model and tokenizer

    facts["lifecycle_seconds"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps({**results, "_lab": facts}, indent=2) + "\n", encoding="utf-8")
    _append_report(out, results, facts)
    say(f"lifecycle done in {facts['lifecycle_seconds']:.0f} s: {out / 'report.md'}")
    return results


def _append_report(out: Path, results: dict, facts: dict) -> None:
    """Add the lifecycle's time and where each artifact is to the lab's ``report.md``."""
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
        "", "## Lifecycle", "",
        f"`llmjax lifecycle --out {out}` took {facts['lifecycle_seconds']:.0f} s in all; the `{INT8_ROW}` row above "
        f"is the `{POLICY_ROW}` policy quantized, and `hf/` is the `{POLICY_ROW}` policy exported.", "",
        "## Where everything is", "", "| what | path (under the output directory) |", "|---|---|",
        *[f"| {what} | `{path}` |" for what, path in artifacts.items()], "",
    ]
    with open(out / "report.md", "a", encoding="utf-8") as handle:
        handle.write("\n".join(text))
