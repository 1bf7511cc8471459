"""The saved lab experiments (``labs/experiments``): rescoring their predictions reproduces their numbers, and
the numbers say what the README says of them."""

import json
from pathlib import Path

import pytest

from llmjax import text_metrics
from llmjax.data.bundled.dialogsum import bundled_dialogsum
from llmjax.lab.report import PEFT_FRACTION, PEFT_QUALITY

INSTRUCTION_BASE = Path(__file__).resolve().parents[2] / "labs" / "experiments" / "lora_from_instruction_base"


@pytest.mark.skipif(not (INSTRUCTION_BASE / "results.json").is_file(), reason="no saved instruction-base experiment")
def test_lora_from_an_instruction_tuned_base_rescores_and_stays_short_of_full_fine_tuning():
    results = json.loads((INSTRUCTION_BASE / "results.json").read_text())
    settings = results.pop("_settings")
    topics = {e["id"]: e["topic"] for e in bundled_dialogsum("test")}
    seen = set(settings["seen_topics"])
    assert 0 < settings["test_seen"] < settings["test_limit"]
    for row, entry in results.items():
        lines = (INSTRUCTION_BASE / "predictions" / f"{row}.jsonl").read_text(encoding="utf-8").splitlines()
        saved = [json.loads(line) for line in lines]
        assert len(saved) == settings["test_limit"], row
        parts = {"": saved, "_seen_topics": [r for r in saved if topics[r["id"]] in seen],
                 "_unseen_topics": [r for r in saved if topics[r["id"]] not in seen]}
        for suffix, part in parts.items():
            rescored = text_metrics.rouge([r["prediction"] for r in part], [r["references"] for r in part])
            assert entry[f"rougeL{suffix}"] == pytest.approx(rescored["rougeL"], abs=1e-9), (row, suffix)
    full = results["full_ft"]["rougeL"]
    small = [row for row, entry in results.items() if entry.get("lora") and entry["trainable_fraction"] <= PEFT_FRACTION]
    assert small, "no LoRA row at <= 2% of the parameters"
    # The README's reading: the base already summarizes the topics it saw, and still no small LoRA row comes
    # within 3% of full fine-tuning from the same base.
    assert results["base_zero_shot"]["rougeL_seen_topics"] > 2 * results["base_zero_shot"]["rougeL_unseen_topics"]
    assert max(results[row]["rougeL"] for row in small) < PEFT_QUALITY * full


DENOISING_BASE = Path(__file__).resolve().parents[2] / "labs" / "experiments" / "lora_from_denoising_base"


@pytest.mark.skipif(not (DENOISING_BASE / "results.json").is_file(), reason="no saved denoising-base experiment")
def test_lora_from_a_denoising_base_rescores_and_stays_short_of_full_fine_tuning():
    results = json.loads((DENOISING_BASE / "results.json").read_text())
    settings = results.pop("_settings")
    for row, entry in results.items():
        lines = (DENOISING_BASE / "predictions" / f"{row}.jsonl").read_text(encoding="utf-8").splitlines()
        saved = [json.loads(line) for line in lines]
        assert len(saved) == settings["test_limit"], row
        rescored = text_metrics.rouge([r["prediction"] for r in saved], [r["references"] for r in saved])
        assert entry["rougeL"] == pytest.approx(rescored["rougeL"], abs=1e-9), row
    full = results["full_ft"]["rougeL"]
    small = [row for row, entry in results.items() if entry.get("lora") and entry["trainable_fraction"] <= PEFT_FRACTION]
    assert small, "no LoRA row at <= 2% of the parameters"
    # The README's reading: the denoising base cannot summarize by itself, full fine-tuning from it beats the
    # lab's, and the small adapters learn more from it than from span corruption alone, still far short.
    assert results["base_zero_shot"]["rougeL"] < 0.25 * full
    assert max(results[row]["rougeL"] for row in small) < PEFT_QUALITY * full
