"""``llmjax lab summarize``: a shrunken run produces every output, consistently (the LoRA and prompt-tuning
rows training only their adapters); the saved full run (``labs/summarize``) meets the lab's targets and
rescoring its predictions reproduces its numbers."""

import json
from pathlib import Path

import pytest

from llmjax import text_metrics
from llmjax.cli import main
from llmjax.lab.instruction_base_rows import BASE_ROW, FULL_ROW, ROW_PREFIX, row_share_interval
from llmjax.lab.report import (PEFT_FRACTION, PEFT_QUALITY, RANDOM_SAME_TOPIC, SCORE_KEYS, adapter_row_names,
                               read_predictions)

ROWS = ("zero_shot", "one_shot", "few_shot", "full_ft", "full_ft_mixed")
METRIC_KEYS = set(SCORE_KEYS) | {"trainable_params", "trainable_fraction", "train_seconds"}
COST_KEYS = {"optimizer_state_bytes", "step_seconds"}  # trained rows also measure what a step costs
TINY_ADAPTER_ROWS = ("lora_r1", "qlora_r1", "prompt_tuning")
DETOX_ROWS = ("reward_model", "ppo", "dpo", "grpo", "rlaif")
SAVED = Path(__file__).resolve().parents[2] / "labs" / "summarize"


def _rescore(predictions_file: Path) -> dict:
    rows = [json.loads(line) for line in predictions_file.read_text(encoding="utf-8").splitlines()]
    predictions, references = [r["prediction"] for r in rows], [r["references"] for r in rows]
    return {**text_metrics.rouge(predictions, references), "bleu": text_metrics.bleu(predictions, references),
            "rougeL_first_ref": text_metrics.rouge(predictions, text_metrics.first_reference(references),
                                                   ("rougeL",))["rougeL"],
            "count": len(rows)}


def _share_interval(out: Path, lora_row: str) -> tuple[float, float]:
    """The bootstrap interval of ``lora_row``'s share of ``instruct_full_ft``'s ROUGE-L, from the saved predictions."""
    return row_share_interval(*(read_predictions(out / "predictions" / f"{row}.jsonl")
                                for row in (lora_row, FULL_ROW)))


def _check_outputs(out: Path, examples: int) -> dict:
    """Every row's fields, predictions and report lines; the adapter rows present train only their part."""
    results = json.loads((out / "results.json").read_text())
    assert set(ROWS) <= set(results)
    adapter_rows = adapter_row_names(results)
    instruct_rows = [row for row in results if row.startswith(ROW_PREFIX)]
    for row in (*ROWS, *adapter_rows, *instruct_rows):
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
        if COST_KEYS <= set(results[row]):  # a run saved before the costs were measured has none
            assert results[row]["optimizer_state_bytes"] >= 8 * total  # AdamW: two fp32 moments per parameter
    full = results["full_ft"]
    for row in adapter_rows:
        entry = results[row]
        assert COST_KEYS <= set(entry) and entry["train_seconds"] > 0 and entry["step_seconds"] > 0, row
        trainable = entry["trainable_params"]
        assert entry["trainable_fraction"] == pytest.approx(trainable / (total + trainable))
        assert 8 * trainable <= entry["optimizer_state_bytes"] < full["optimizer_state_bytes"] / 10, row
    if instruct_rows:  # from the instruction-tuned base: full fine-tuning and LoRA beside it, costs measured
        assert set(instruct_rows) == {BASE_ROW, FULL_ROW, results["_lab"]["instruction_base"]["lora_row"]}
        lora = results[results["_lab"]["instruction_base"]["lora_row"]]
        assert all(COST_KEYS <= set(results[row]) for row in instruct_rows)
        assert lora["trainable_fraction"] == pytest.approx(lora["trainable_params"] / (total + lora["trainable_params"]))
        assert lora["optimizer_state_bytes"] < results[FULL_ROW]["optimizer_state_bytes"] / 10
        facts = results["_lab"]["instruction_base"]
        if "lora_share_interval" in facts:  # a lab saved before the interval was computed has none
            interval = _share_interval(out, facts["lora_row"])  # None on a handful of examples (the tiny lab's)
            assert facts["lora_share_interval"] == (list(interval) if interval else None)
            assert ("paired bootstrap" in (out / "report.md").read_text()) == bool(interval)
    forgetting = results["_lab"]["forgetting"]
    assert forgetting["after_sft"] == results["full_ft"]["heldout_loss"]
    assert forgetting["after_mixed_sft"] == results["full_ft_mixed"]["heldout_loss"]
    report = (out / "report.md").read_text()
    assert "## Forgetting" in report and f"{forgetting['before_sft']:.4f}" in report
    assert all(f"| {row} |" in report for row in (*ROWS, *adapter_rows))
    pngs = ["loss.png", "rouge.png", "forgetting.png"]
    if adapter_rows:
        assert "## Parameter-efficient fine-tuning" in report
        pngs.append("lora_sweep.png")
    if DETOX_ROWS[0] in results:
        _check_detox(out, results, examples)
        pngs.append("detox.png")
    for png in pngs:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return results


def _check_detox(out: Path, results: dict, examples: int) -> None:
    """The detox rows: ROUGE rescored from their predictions, the judge's toxicity rescored from the same greedy
    summaries of the rude test dialogues, sampled summaries saved with their scores, each RL row naming its base."""
    from llmjax.data.bundled.detox import rude_prompts
    from llmjax.lab.toxicity import judge_toxicity

    detox = results["_lab"]["detox"]
    rude = {e["id"] for e in rude_prompts("test")}
    assert 0.0 <= results["reward_model"]["accuracy"] <= 1.0 and results["reward_model"]["train_seconds"] > 0
    for row in ("full_ft", *[r for r in DETOX_ROWS[1:] if r in results]):
        entry = results[row]
        if row != "full_ft":
            assert entry["base"] == "full_ft" and METRIC_KEYS <= set(entry), row
            rescored = _rescore(out / "predictions" / f"{row}.jsonl")
            assert rescored["count"] == examples
            assert all(entry[key] == pytest.approx(rescored[key], abs=1e-9) for key in SCORE_KEYS), row
        greedy = [json.loads(line) for line in (out / "predictions" / f"{row}.jsonl").read_text().splitlines()]
        scores = judge_toxicity([r["prediction"] for r in greedy if r["id"] in rude])
        assert entry["toxicity"] == pytest.approx(float(scores.mean()), abs=1e-9), row
        sampled = [json.loads(line) for line in (out / "predictions" / f"{row}_toxicity.jsonl").read_text().splitlines()]
        assert len(sampled) == detox["toxicity_prompts"] * detox["toxicity_samples"], row
        assert entry["toxicity_sampled"] == pytest.approx(sum(r["toxicity"] for r in sampled) / len(sampled), abs=1e-5)
    assert "## Detoxification" in (out / "report.md").read_text()


@pytest.mark.slow
def test_tiny_lab_writes_consistent_outputs_and_reuses_its_pretraining(tmp_path, capsys):
    out = tmp_path / "lab"
    assert main(["lab", "summarize", "--out", str(out), "--tiny", "--no-progress"]) == 0
    first = _check_outputs(out, examples=8)
    assert first["_lab"]["pretrain_seconds"] > 0
    printed = capsys.readouterr().out
    assert "pre-training a T5" in printed and "[3/3] prompt_tuning: ROUGE-L" in printed
    # Only the adapters train, by hand count: r=1 on q and v (32x32) of the 1+1-layer T5's encoder
    # self-attention and decoder self- and cross-attention; 4 soft-prompt rows of width 32.
    assert adapter_row_names(first) == list(TINY_ADAPTER_ROWS)
    assert all(COST_KEYS <= set(first[row]) for row in ("full_ft", "full_ft_mixed"))
    assert first["lora_r1"]["trainable_params"] == 1 * (32 + 32) * 6
    assert first["prompt_tuning"]["trainable_params"] == 4 * 32
    assert all(first[row]["trainable_fraction"] < 0.02 for row in TINY_ADAPTER_ROWS)
    assert all(row in first for row in DETOX_ROWS)
    # PPO's prompts: exactly the rude training dialogues, phrased by the dialogsum task's wordings.
    from llmjax.config import load_config
    from llmjax.data.bundled.detox import rude_prompts

    ppo_prompts = [json.loads(line) for line in (out / "ppo_prompts.jsonl").read_text().splitlines()]
    assert [e["id"] for e in ppo_prompts] == [e["id"] for e in rude_prompts("train")] and len(ppo_prompts) > 0
    assert load_config(out / "ppo" / "config.yaml").data.tasks == (f"dialogsum@jsonl:{out / 'ppo_prompts.jsonl'}",)
    assert 0 < first["_lab"]["first_rows_seconds"] <= first["_lab"]["lab_seconds"]
    assert first["distill"]["teacher"] == "full_ft" and first["distill"]["student_params"] < first["full_ft"]["trainable_params"]
    assert first["_lab"]["distill"]["rougeL_gain"] == pytest.approx(first["distill"]["rougeL"] - first["distill_labels"]["rougeL"])
    assert "## Distillation" in (out / "report.md").read_text()
    q = first["int8"]  # full_ft quantized: a quarter of the bytes or so, decoded at both batch sizes
    assert q["base"] == "full_ft" and q["memory_bytes"] < 0.4 * q["float_memory_bytes"]
    assert set(q["decode_tokens_per_sec"]) == {"1", "8"} and all(v["int8"] > 0 for v in q["decode_tokens_per_sec"].values())
    assert first["qlora_r1"]["trainable_params"] == first["lora_r1"]["trainable_params"]
    assert 3.0 < first["lora_r1"]["frozen_base_bytes"] / first["qlora_r1"]["frozen_base_bytes"] < 4.0
    assert "## int8 post-training quantization" in (out / "report.md").read_text()
    assert BASE_ROW in first and FULL_ROW in first  # the instruction-base rows (tests/lab/test_instruction_base_rows.py)
    assert main(["lab", "summarize", "--out", str(out), "--tiny", "--no-progress", "--lora-ranks", "none",
                 "--no-prompt-tuning", "--no-detox", "--no-distill", "--qlora-ranks", "none", "--no-int8",
                 "--no-instruction-base"]) == 0
    second = _check_outputs(out, examples=8)
    assert second["_lab"]["pretrain_seconds"] == 0 and "reusing the pre-trained model" in capsys.readouterr().out
    assert adapter_row_names(second) == []  # the flags chose no adapter rows
    # The report repeats the command line that made the run, flags included, so the run can be repeated.
    assert f"Command: `llmjax lab summarize --out {out} --tiny --no-progress --lora-ranks none --no-prompt-tuning" \
        in (out / "report.md").read_text()
    assert "distill" not in second and "distill" not in second["_lab"] and "int8" not in second
    assert BASE_ROW not in second
    # The same pre-trained model and greedy decoding: the in-context rows repeat exactly.
    assert all(second[row]["rougeL"] == first[row]["rougeL"] for row in ("zero_shot", "one_shot", "few_shot"))
    # --detox-only reruns the detox rows from that lab's full_ft; its report repeats its own command line too.
    assert main(["lab", "summarize", "--out", str(out), "--tiny", "--no-progress", "--detox-only"]) == 0
    detox = json.loads((out / "results.json").read_text())
    assert all(row in detox for row in DETOX_ROWS)
    assert f"Command: `llmjax lab summarize --out {out} --tiny --no-progress --detox-only`" in (out / "report.md").read_text()


needs_saved_run = pytest.mark.skipif(not (SAVED / "results.json").is_file(), reason="no saved lab run")


@needs_saved_run
def test_saved_lab_run_rescores_and_shows_forgetting():
    results = _check_outputs(SAVED, examples=400)
    assert results["full_ft"]["rougeL"] >= 2 * results["zero_shot"]["rougeL"]
    forgetting = results["_lab"]["forgetting"]
    assert forgetting["after_sft"] > forgetting["before_sft"]  # SFT forgets the pre-training objective
    assert forgetting["after_mixed_sft"] < forgetting["after_sft"]  # the mixture forgets less


@needs_saved_run
def test_saved_lab_run_trained_its_first_rows_within_15_minutes():
    """The instruction-tuning issue's budget: pre-training (from scratch in the saved run), the prompted rows and
    the two full fine-tuning rows, as the run measured them."""
    lab = json.loads((SAVED / "results.json").read_text())["_lab"]
    assert lab["pretrain_seconds"] > 0 and lab["first_rows_seconds"] <= 15 * 60


@needs_saved_run
def test_saved_lab_run_beats_the_random_same_topic_baseline():
    full = json.loads((SAVED / "results.json").read_text())["full_ft"]
    assert full["rougeL_first_ref"] > RANDOM_SAME_TOPIC["first"]  # the facts, not only the frames
    assert full["rougeL"] > RANDOM_SAME_TOPIC["all"]


def test_lab_refuses_bad_lora_ranks_before_running(tmp_path, capsys):
    assert main(["lab", "summarize", "--out", str(tmp_path / "lab"), "--tiny", "--lora-ranks", "4,x"]) == 2
    assert "--lora-ranks '4,x'" in capsys.readouterr().err
    assert not (tmp_path / "lab").exists()


@needs_saved_run
@pytest.mark.xfail(strict=True, reason="in the saved run the best LoRA row at <= 2% from the span-corruption base "
                                       "(r=4, 1.16%) reaches 24% of full_ft's ROUGE-L, and from the instruction-tuned "
                                       "base instruct_lora_r2 (1.72%) 96.1% of instruct_full_ft's (0.758 against "
                                       "0.789), and the same rows built on an AMD EPYC machine 96.6% "
                                       "(labs/experiments/instruction_base_lab_epyc; 97.8% in the mean of three "
                                       "seeds there: instruction_base_lab_epyc_seeds; a third base, XLA capped "
                                       "at AVX, 97.9% at one seed, the three bases' mean 96.85%: "
                                       "instruction_base_lab_epyc_avx); the experiments' best is "
                                       "95-96% (README: Lab; labs/experiments); "
                                       "remove this mark with a run that passes")
def test_saved_lab_run_lora_with_few_parameters_nears_full_fine_tuning():
    """Issue 11's target, in either setting: a LoRA row training <= 2% of the parameters reaches >= 97% of the
    ROUGE-L of full fine-tuning from the same base."""
    results = json.loads((SAVED / "results.json").read_text())
    pairs = [(row, "full_ft") for row in adapter_row_names(results) if row.startswith("lora_r")]
    if "instruction_base" in results["_lab"]:
        pairs.append((results["_lab"]["instruction_base"]["lora_row"], FULL_ROW))
    small = [(row, full) for row, full in pairs if results[row]["trainable_fraction"] <= PEFT_FRACTION]
    assert small, "no LoRA row trains <= 2% of the parameters"
    assert max(results[row]["rougeL"] / results[full]["rougeL"] for row, full in small) >= PEFT_QUALITY


@needs_saved_run
def test_saved_lab_runs_test_set_cannot_tell_its_adapters_share_from_the_target():
    """The saved lab's adapter reads 96.1% of full fine-tuning's ROUGE-L. Resampling its 400 test dialogues (the
    paired bootstrap interval that a lab run now reports) gives 93.9% to 98.1%: the test set alone moves the share
    about two points either way, so this run shows neither that the adapter reaches 97% nor that it falls short."""
    results = json.loads((SAVED / "results.json").read_text())
    facts = results["_lab"]["instruction_base"]
    low, high = _share_interval(SAVED, facts["lora_row"])
    assert low < facts["lora_share_of_full_ft"] < PEFT_QUALITY < high
    assert (round(low, 3), round(high, 3)) == (0.939, 0.981)


@needs_saved_run
def test_saved_lab_run_from_an_instruction_tuned_base_has_the_courses_shape():
    """The course's Lab 2 shape, which the span-corruption base does not show: the instruction-tuned base summarizes
    zero-shot far above prompting the pre-trained model, full fine-tuning from it beats the lab's ``full_ft``, and the
    small adapter lifts the base most of the way to full fine-tuning, far above the span-corruption adapters."""
    results = json.loads((SAVED / "results.json").read_text())
    facts = results["_lab"]["instruction_base"]
    base, full, lora = results[BASE_ROW], results[FULL_ROW], results[facts["lora_row"]]
    assert base["rougeL"] > 10 * results["few_shot"]["rougeL"] and full["rougeL"] > results["full_ft"]["rougeL"]
    assert base["rougeL"] < lora["rougeL"] < full["rougeL"] and lora["trainable_fraction"] <= PEFT_FRACTION
    assert lora["rougeL"] > 0.9 * full["rougeL"] > 3 * results["lora_r4"]["rougeL"]
    assert facts["lora_share_of_full_ft"] == pytest.approx(lora["rougeL"] / full["rougeL"])


def _saved_detox_rows() -> bool:
    return (SAVED / "results.json").is_file() and DETOX_ROWS[0] in json.loads((SAVED / "results.json").read_text())


needs_saved_detox = pytest.mark.skipif(not _saved_detox_rows(), reason="the saved lab run has no detox rows")


@needs_saved_detox
def test_saved_detox_rows_are_all_there_with_their_plot():
    results = json.loads((SAVED / "results.json").read_text())  # rescored by the saved-run test (_check_outputs)
    assert all(row in results for row in DETOX_ROWS)
    assert (SAVED / "detox.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_saved_detox
def test_saved_detox_run_reward_model_is_accurate_on_held_out_labels():
    assert json.loads((SAVED / "results.json").read_text())["reward_model"]["accuracy"] >= 0.95


def _ppo_meets_the_detox_target(results: dict) -> bool:
    from llmjax.lab.detox_report import ROUGE_DROP, TOXICITY_CUT

    base, ppo = results["full_ft"], results["ppo"]
    return (ppo["toxicity"] <= (1 - TOXICITY_CUT) * base["toxicity"]
            and base["rougeL"] - ppo["rougeL"] <= ROUGE_DROP)


@needs_saved_detox
def test_saved_detox_run_ppo_cuts_toxicity_by_30_percent_within_2_rouge_points():
    assert _ppo_meets_the_detox_target(json.loads((SAVED / "results.json").read_text()))


def test_pretraining_is_reused_only_when_its_saved_config_trains_the_same_run(tmp_path):
    import dataclasses

    from llmjax.config import dump_config
    from llmjax.lab.summarize import LabSettings, pretrain_config, same_run

    settings = LabSettings.tiny()
    config = pretrain_config(tmp_path, settings, tmp_path / "tokenizer")
    saved = tmp_path / "pretrain"
    assert not same_run(saved, config)  # nothing saved yet
    dump_config(config, saved / "config.yaml")
    assert same_run(saved, config)
    # The same directory named another way (here relative to another working directory) is the same run.
    relative = pretrain_config(tmp_path, settings, Path(tmp_path.name) / "tokenizer")
    assert relative.data.tokenizer != config.data.tokenizer and same_run(saved, relative)
    for changed in ({"d_model": 48}, {"pretrain_steps": 5}, {"pretrain_learning_rate": 1e-3}, {"seed": 1}):
        other = pretrain_config(tmp_path, dataclasses.replace(settings, **changed), tmp_path / "tokenizer")
        assert not same_run(saved, other), changed


def test_a_signal_that_stops_a_training_run_stops_the_lab(tmp_path, monkeypatch):
    """The loop answers SIGTERM/Ctrl-C by saving and returning early; the lab must stop there, not go on to score
    (and save) rows from a half-trained model."""
    from llmjax.lab import summarize
    from llmjax.lab.adapter_rows import LabInterrupted

    calls = []

    def stopped_run(config, progress=True):  # what the loop returns when SIGTERM arrives after step 2
        calls.append(config.train.output_dir)
        return {"interrupted": "SIGTERM", "step": 2}

    monkeypatch.setattr(summarize, "run_stage", stopped_run)
    with pytest.raises(LabInterrupted, match=r"SIGTERM stopped the run in .*pretrain at step 2 of 4; the lab stops"):
        summarize.run_lab(tmp_path / "lab", summarize.LabSettings.tiny(), progress=False)
    assert len(calls) == 1  # nothing ran after the interrupted pre-training
    assert not (tmp_path / "lab" / "results.json").exists()
    assert main(["lab", "summarize", "--out", str(tmp_path / "lab2"), "--tiny", "--no-progress"]) == 2
