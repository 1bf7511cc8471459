"""``llmjax lab summarize``: a shrunken run produces every output, consistently; the saved full run
(``labs/summarize``) meets the lab's targets and rescoring its predictions reproduces its numbers."""

import json
from pathlib import Path

import pytest

from llmjax import text_metrics
from llmjax.cli import main
from llmjax.lab.report import RANDOM_SAME_TOPIC, SCORE_KEYS

ROWS = ("zero_shot", "one_shot", "few_shot", "full_ft", "full_ft_mixed")
METRIC_KEYS = set(SCORE_KEYS) | {"trainable_params", "trainable_fraction", "train_seconds"}
SAVED = Path(__file__).resolve().parents[2] / "labs" / "summarize"


def _rescore(predictions_file: Path) -> dict:
    rows = [json.loads(line) for line in predictions_file.read_text(encoding="utf-8").splitlines()]
    predictions, references = [r["prediction"] for r in rows], [r["references"] for r in rows]
    return {**text_metrics.rouge(predictions, references), "bleu": text_metrics.bleu(predictions, references),
            "rougeL_first_ref": text_metrics.rouge(predictions, text_metrics.first_reference(references))["rougeL"],
            "count": len(rows)}


def _check_outputs(out: Path, examples: int) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert set(ROWS) <= set(results)
    for row in ROWS:
        entry = results[row]
        assert METRIC_KEYS <= set(entry), row
        rescored = _rescore(out / "predictions" / f"{row}.jsonl")
        assert rescored["count"] == examples
        for key in (*SCORE_KEYS, "rougeL_first_ref"):
            assert entry[key] == pytest.approx(rescored[key], abs=1e-9), (row, key)
    total = results["_lab"]["total_params"]
    for row in ("zero_shot", "one_shot", "few_shot"):
        assert results[row]["trainable_params"] == 0 and results[row]["train_seconds"] == 0
    for row in ("full_ft", "full_ft_mixed"):
        assert results[row]["trainable_params"] == total and results[row]["trainable_fraction"] == 1.0
        assert results[row]["train_seconds"] > 0
    forgetting = results["_lab"]["forgetting"]
    assert forgetting["after_sft"] == results["full_ft"]["heldout_loss"]
    assert forgetting["after_mixed_sft"] == results["full_ft_mixed"]["heldout_loss"]
    report = (out / "report.md").read_text()
    assert "## Forgetting" in report and f"{forgetting['before_sft']:.4f}" in report
    assert all(f"| {row} |" in report for row in ROWS)
    for png in ("loss.png", "rouge.png", "forgetting.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return results


@pytest.mark.slow
def test_tiny_lab_writes_consistent_outputs_and_reuses_its_pretraining(tmp_path, capsys):
    out = tmp_path / "lab"
    assert main(["lab", "summarize", "--out", str(out), "--tiny", "--no-progress"]) == 0
    first = _check_outputs(out, examples=8)
    assert first["_lab"]["pretrain_seconds"] > 0
    assert "pre-training a T5" in capsys.readouterr().out
    assert main(["lab", "summarize", "--out", str(out), "--tiny", "--no-progress"]) == 0
    second = _check_outputs(out, examples=8)
    assert second["_lab"]["pretrain_seconds"] == 0 and "reusing the pre-trained model" in capsys.readouterr().out
    # The same pre-trained model and greedy decoding: the in-context rows repeat exactly.
    assert all(second[row]["rougeL"] == first[row]["rougeL"] for row in ("zero_shot", "one_shot", "few_shot"))


needs_saved_run = pytest.mark.skipif(not (SAVED / "results.json").is_file(), reason="no saved lab run")


@needs_saved_run
def test_saved_lab_run_rescores_and_shows_forgetting():
    results = _check_outputs(SAVED, examples=400)
    assert results["full_ft"]["rougeL"] >= 2 * results["zero_shot"]["rougeL"]
    forgetting = results["_lab"]["forgetting"]
    assert forgetting["after_sft"] > forgetting["before_sft"]  # SFT forgets the pre-training objective
    assert forgetting["after_mixed_sft"] < forgetting["after_sft"]  # the mixture forgets less


@needs_saved_run
@pytest.mark.xfail(strict=True, reason="the saved run's 300 SFT steps (4,800 examples) leave the model a language "
                                       "model of the summaries that barely reads the dialogue (full_ft ROUGE-L 0.18; "
                                       "README: Lab); remove this mark with a run that passes")
def test_saved_lab_run_beats_the_random_same_topic_baseline():
    full = json.loads((SAVED / "results.json").read_text())["full_ft"]
    assert full["rougeL_first_ref"] > RANDOM_SAME_TOPIC["first"]  # the facts, not only the frames
    assert full["rougeL"] > RANDOM_SAME_TOPIC["all"]
