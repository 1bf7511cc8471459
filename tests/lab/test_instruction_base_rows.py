"""The lab's instruction-base rows (``llmjax.lab.instruction_base_rows``): the sibling set it tunes the base on,
the rows a whole lab writes, and ``--instruction-base-only`` adding the same rows to a lab that has finished."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from llmjax.cli import main
from llmjax.data.bundled.dialogsum import bundled_dialogsum
from llmjax.lab.instruction_base_rows import (BASE_ROW, FULL_ROW, InstructionBaseRows, row_share_interval,
                                              share_interval, sibling_set)
from llmjax.lab.report import instruction_base_section

OTHER_ROWS_OFF = ["--lora-ranks", "none", "--no-prompt-tuning", "--qlora-ranks", "none", "--no-int8", "--no-distill",
                  "--no-detox"]


def test_sibling_set_names_its_speakers_and_holds_none_of_the_labs_dialogues(tmp_path):
    task, topics = sibling_set(tmp_path, seed=1)
    assert task == f"dialogsum@jsonl:{tmp_path / 'instruct_sibling'}/{{split}}.jsonl"
    lab = {e["dialogue"] for split in ("train", "validation", "test") for e in bundled_dialogsum(split)}
    train = [json.loads(line) for line in (tmp_path / "instruct_sibling" / "train.jsonl").read_text().splitlines()]
    assert len(train) > 3000 and {e["topic"] for e in train} == topics
    assert not any("#Person" in e["dialogue"] or "#Person" in e["summary"] for e in train)
    assert not any(e["dialogue"] in lab for e in train)
    _, half = sibling_set(tmp_path / "half", seed=1, topic_share="half")
    assert half < topics and len(half) == (len(topics) + 1) // 2


def _scores(n=400, seed=0):
    """Per-example ROUGE-L-like scores of two rows: full fine-tuning's, and an adapter's a little below, noisily."""
    rng = np.random.default_rng(seed)
    full = rng.uniform(0.4, 1.0, n)
    return np.clip(full - 0.03 + rng.normal(0, 0.08, n), 0, 1), full


def test_share_interval_agrees_with_a_paired_bootstrap_written_out_by_hand():
    lora, full = _scores()
    low, high = share_interval(lora, full)
    draws = np.random.default_rng(123).integers(0, len(full), (20_000, len(full)))  # another generator
    shares = lora[draws].mean(axis=1) / full[draws].mean(axis=1)
    assert (low, high) == pytest.approx(tuple(np.percentile(shares, [2.5, 97.5])), abs=2e-3)
    assert low < lora.mean() / full.mean() < high
    half = share_interval(lora, full, confidence=0.5)
    assert low < half[0] < half[1] < high
    assert share_interval(lora, full) == (low, high)  # seeded: the same interval every time


def test_share_interval_keeps_each_examples_two_scores_together():
    _, full = _scores()
    assert share_interval(0.9 * full, full) == pytest.approx((0.9, 0.9), abs=1e-12)  # every resample: 0.9
    shuffled = np.random.default_rng(1).permutation(0.9 * full)  # the same scores, paired with other examples
    low, high = share_interval(shuffled, full)
    assert low < 0.9 - 0.01 and high > 0.9 + 0.01


def test_share_interval_refuses_what_it_cannot_resample():
    with pytest.raises(ValueError, match="two equally long lists"):
        share_interval([0.5, 0.6, 0.7], [0.5, 0.6])
    with pytest.raises(ValueError, match="two equally long lists of at least 2"):
        share_interval([0.5], [0.6])
    with pytest.raises(ValueError, match="average 0"):
        share_interval([0.5, 0.6], [0.0, 0.0])
    same = SimpleNamespace(predictions=["a b", "c"], references=[["a b"], ["c d"]])
    other = SimpleNamespace(predictions=["a b", "c"], references=[["a b"], ["e"]])
    with pytest.raises(ValueError, match="scored on different test examples"):
        row_share_interval(same, other)
    assert row_share_interval(same, same) == pytest.approx((1.0, 1.0))
    # Two examples, one that full fine-tuning scores 0 on: a quarter of the resamples draw it twice, 0 / 0.
    assert share_interval([0.5, 0.0], [0.6, 0.0]) is None


def test_report_gives_the_interval_and_whether_it_holds_the_target():
    results = {BASE_ROW: {"trainable_params": 0, "trainable_fraction": 0.0, "steps": 20, "learning_rate": 3e-3,
                          "rougeL": 0.6},
               FULL_ROW: {"trainable_params": 1000, "trainable_fraction": 1.0, "steps": 10, "learning_rate": 3e-3,
                          "rougeL": 0.8, "optimizer_state_bytes": 8000, "step_seconds": 0.5},
               "instruct_lora_r2": {"trainable_params": 15, "trainable_fraction": 0.015, "steps": 10,
                                    "learning_rate": 6e-3, "rougeL": 0.77, "optimizer_state_bytes": 120,
                                    "step_seconds": 0.4}}
    facts = {"lora_row": "instruct_lora_r2", "base_steps": 20, "sibling_seed": 1, "sibling_share": 0.75,
             "lora_rank": 2, "lora_target_modules": ["q", "v"], "lora_learning_rate": 6e-3, "lora_steps": 10,
             "lora_share_confidence": 0.95, "lora_share_resamples": 10_000}

    def section(interval):
        return "\n".join(instruction_base_section(results, {**facts, "lora_share_interval": interval}, 2.9))

    assert "reaches 96.2% of" in section(None) and "bootstrap" not in section(None)  # a lab saved before it
    assert ("the share's 95% interval is 94.0% to 98.3%, which holds 97%: at this test size the run cannot tell "
            "the share from the target") in section([0.94, 0.983])
    assert "interval is 97.1% to 99.0%, which lies above 97%." in section([0.971, 0.99])
    assert "interval is 93.0% to 96.9%, which lies below 97%." in section([0.93, 0.969])


def test_instruction_base_only_refuses_a_directory_without_a_finished_lab(tmp_path, capsys):
    out = tmp_path / "lab"
    out.mkdir()
    assert main(["lab", "summarize", "--out", str(out), "--tiny", "--instruction-base-only"]) == 2
    assert "holds no finished lab" in capsys.readouterr().err
    assert list(out.iterdir()) == []  # nothing written


@pytest.mark.slow
def test_lab_rows_from_an_instruction_tuned_base_and_adding_them_to_a_finished_lab(tmp_path, capsys):
    out = tmp_path / "lab"
    assert main(["lab", "summarize", "--out", str(out), "--tiny", "--no-progress", *OTHER_ROWS_OFF]) == 0
    first = json.loads((out / "results.json").read_text())
    lora_row = InstructionBaseRows.tiny().lora_row()
    total = first["_lab"]["total_params"]
    assert first[BASE_ROW]["trainable_params"] == first[FULL_ROW]["trainable_params"] == total
    assert first[FULL_ROW]["base"] == first[lora_row]["base"] == BASE_ROW
    # r=1 on q, v, o (32x32) of the 1+1-layer T5's three attentions and on wi_0, wi_1 (32->64), wo (64->32) of
    # its two feed-forward blocks, by hand.
    assert first[lora_row]["trainable_params"] == 3 * 3 * (32 + 32) + 2 * 3 * (32 + 64)
    assert first[lora_row]["steps"] == first[FULL_ROW]["steps"] == 4 and first[BASE_ROW]["steps"] == 4
    facts = first["_lab"]["instruction_base"]
    assert facts["lora_share_of_full_ft"] == pytest.approx(first[lora_row]["rougeL"] / first[FULL_ROW]["rougeL"])
    assert "## Parameter-efficient fine-tuning from an instruction-tuned base" in (out / "report.md").read_text()
    # Where the lab ran: its first phase line, results.json and the report's header say it.
    cpu = first["_lab"]["environment"]["cpu"]
    assert f"running on {cpu}" in capsys.readouterr().out and f"machine: {cpu} (" in (out / "report.md").read_text()
    # A lab whose training runs are gone (as the saved one): --instruction-base-only runs the pre-training again,
    # then the same three rows, and keeps every other row and curve as it was.
    for run in [path for path in out.iterdir() if path.is_dir() and path.name != "predictions"]:
        shutil.rmtree(run)
    loss_png = (out / "loss.png").read_bytes()
    assert main(["lab", "summarize", "--out", str(out), "--tiny", "--no-progress", "--instruction-base-only"]) == 0
    second = json.loads((out / "results.json").read_text())
    assert list(second) == list(first) and (out / "loss.png").read_bytes() == loss_png
    for row in (BASE_ROW, FULL_ROW, lora_row):  # the same model from the same start: the same summaries
        assert second[row]["rougeL"] == first[row]["rougeL"], row
    assert all(second[row] == first[row] for row in ("zero_shot", "full_ft", "full_ft_mixed"))
    added = second["_lab"]["instruction_base"]
    assert added["pretrained_heldout_loss"] == pytest.approx(first["_lab"]["forgetting"]["before_sft"], rel=1e-6)
    report = (out / "report.md").read_text()
    assert f"added to the finished lab by `llmjax lab summarize --out {out} --tiny" in report
    assert added["environment"]["versions"] == first["_lab"]["environment"]["versions"]  # the add-on's own record
    assert f"s on {cpu} (" in report
    assert "| zero_shot |" in report and "| full_ft_mixed |" in report  # the lab's other rows are still reported
    # Again, with every run there: the finished base (same settings, same pre-trained model) is scored, not trained.
    assert main(["lab", "summarize", "--out", str(out), "--tiny", "--no-progress", "--instruction-base-only"]) == 0
    assert f"{BASE_ROW}: reusing the finished base" in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert again[BASE_ROW] == second[BASE_ROW] and again[lora_row]["rougeL"] == second[lora_row]["rougeL"]
    # --no-instruction-base leaves them out.
    assert main(["lab", "summarize", "--out", str(out), "--tiny", "--no-progress", "--no-instruction-base",
                 *OTHER_ROWS_OFF]) == 0
    third = json.loads((out / "results.json").read_text())
    assert BASE_ROW not in third and "instruction_base" not in third["_lab"]
