"""The saved lab experiments (``labs/experiments``): rescoring their predictions reproduces their numbers, and
the numbers say what ``labs/experiments/README.md`` says of them."""

import json
from pathlib import Path

import pytest

from llmjax import text_metrics
from llmjax.data.bundled.dialogsum import bundled_dialogsum
from llmjax.lab.instruction_base_rows import FULL_ROW, row_share_interval
from llmjax.lab.report import PEFT_FRACTION, PEFT_QUALITY, read_predictions

EXPERIMENTS = Path(__file__).resolve().parents[2] / "labs" / "experiments"
INSTRUCTION_BASE = EXPERIMENTS / "lora_from_instruction_base"
ALL_TOPICS_BASE = EXPERIMENTS / "lora_from_instruction_base_all_topics"
DENOISING_BASE = EXPERIMENTS / "lora_from_denoising_base"
WIDE_BASE = EXPERIMENTS / "lora_from_instruction_base_wide"
EPYC_BASE = EXPERIMENTS / "lora_from_instruction_base_all_topics_epyc"


def rescored(run: Path) -> tuple[dict, dict]:
    """``(results without _settings, _settings)`` of a saved experiment, after checking that rescoring each row's
    saved predictions gives its ROUGE-L (and, where recorded, its ROUGE-L on the seen and unseen topics)."""
    results = json.loads((run / "results.json").read_text())
    settings = results.pop("_settings")
    seen = set(settings.get("seen_topics", ()))
    topics = {e["id"]: e["topic"] for e in bundled_dialogsum("test")}
    for row, entry in results.items():
        lines = (run / "predictions" / f"{row}.jsonl").read_text(encoding="utf-8").splitlines()
        saved = [json.loads(line) for line in lines]
        assert len(saved) == settings["test_limit"], row
        parts = {"": saved, "_seen_topics": [r for r in saved if topics[r["id"]] in seen],
                 "_unseen_topics": [r for r in saved if topics[r["id"]] not in seen]}
        scores = {}  # by the dialogues a part holds: with every topic seen, the seen part is the whole, scored once
        for suffix, part in parts.items():
            if f"rougeL{suffix}" in entry:
                ids = tuple(r["id"] for r in part)
                if ids not in scores:
                    scores[ids] = text_metrics.rouge([r["prediction"] for r in part],
                                                     [r["references"] for r in part], ("rougeL",))["rougeL"]
                assert entry[f"rougeL{suffix}"] == pytest.approx(scores[ids], abs=1e-9), (row, suffix)
    return results, settings


def small_lora_rows(results: dict) -> list[str]:
    small = [row for row, entry in results.items() if entry.get("lora") and entry["trainable_fraction"] <= PEFT_FRACTION]
    assert small, "no LoRA row at <= 2% of the parameters"
    return small


@pytest.mark.skipif(not (INSTRUCTION_BASE / "results.json").is_file(), reason="no saved instruction-base experiment")
def test_lora_from_an_instruction_tuned_base_rescores_and_stays_short_of_full_fine_tuning():
    results, settings = rescored(INSTRUCTION_BASE)
    assert 0 < settings["test_seen"] < settings["test_limit"]
    full = results["full_ft"]["rougeL"]
    # The reading: the base already summarizes the topics it saw, and still no small LoRA row comes
    # within 3% of full fine-tuning from the same base.
    assert results["base_zero_shot"]["rougeL_seen_topics"] > 2 * results["base_zero_shot"]["rougeL_unseen_topics"]
    assert max(results[row]["rougeL"] for row in small_lora_rows(results)) < PEFT_QUALITY * full


@pytest.mark.skipif(not (ALL_TOPICS_BASE / "results.json").is_file(), reason="no saved all-topics base experiment")
def test_lora_from_a_base_tuned_on_every_topic_rescores_beats_its_base_and_stays_short_of_full_fine_tuning():
    results, settings = rescored(ALL_TOPICS_BASE)
    assert settings["topics"] == "all" and settings["test_seen"] == settings["test_limit"]
    full, base = results["full_ft"]["rougeL"], results["base_zero_shot"]["rougeL"]
    small = {row: results[row]["rougeL"] for row in small_lora_rows(results) if "train_seed" not in results[row]}
    # The reading: this base summarizes zero-shot at about 80% of full fine-tuning; at the lab's learning
    # rate or above every small LoRA row takes it higher, more with more adapter parameters, and none to 97%;
    # at a tenth of the lab's rate the adapters end below the base they started from.
    assert 0.75 * full < base < 0.85 * full
    at_lab_rate = {row: score for row, score in small.items() if results[row]["learning_rate"] >= 3e-3}
    assert len(at_lab_rate) >= 4 and min(at_lab_rate.values()) > base
    assert small["lora_r6_lr6e-3"] > small["lora_r4"] and small["lora_r1all"] > small["lora_r1all_lr1e-3"]
    assert max(small.values()) < PEFT_QUALITY * full
    assert small["lora_r4_lr3e-4"] < base
    # Twice the steps (2000, the cosine decay stretched over them) for the best adapter and for full fine-tuning:
    # both gain, and the adapter stays short of 97% of full fine-tuning at the same steps.
    long_lora, long_full = small["lora_r2_q_v_o_wi_0_wi_1_wo_lr6e-3_steps2000"], results["full_ft_steps2000"]["rougeL"]
    assert long_lora > small["lora_r2_q_v_o_wi_0_wi_1_wo_lr6e-3"] and long_full > full
    assert results["full_ft_steps2000"]["steps"] == 2000 and long_lora < PEFT_QUALITY * long_full
    # LoRA+ (lora_B at a multiple of the rate) and DoRA (a trained magnitude per output channel): no setting tried
    # reaches 97% either.
    plus = {row: score for row, score in small.items() if results[row].get("loraplus_lr_ratio")}
    dora = {row: score for row, score in small.items() if results[row]["lora"].get("use_dora")}
    assert len(plus) == 4 and len(dora) == 3 and max([*plus.values(), *dora.values()]) < PEFT_QUALITY * full
    # The same rows at other train.seeds (data order, adapter init): one run's noise is about a point, as large as
    # the differences between the levers above; over three seeds the best adapter's mean ROUGE-L is 96.15% of full
    # fine-tuning's, one seed's pair at 98.1%. DoRA's lead over plain LoRA on the same kernels is within it.
    seeds = ("", "_seed1", "_seed2")
    adapter = [results[f"lora_r2_q_v_o_wi_0_wi_1_wo_lr6e-3{s}"]["rougeL"] for s in seeds]
    full_ft = [results[f"full_ft{s}"]["rougeL"] for s in seeds]
    assert max(adapter) - min(adapter) > 0.01 and max(full_ft) - min(full_ft) > 0.005
    assert 0.96 < sum(adapter) / sum(full_ft) < PEFT_QUALITY
    assert max(a / f for a, f in zip(adapter, full_ft)) > PEFT_QUALITY
    dora_seeds = [results[f"dora_r2_q_v_wi_0_wi_1_wo_lr6e-3{s}"]["rougeL"] for s in seeds[:2]]
    assert min(dora_seeds) < results["lora_r2_q_v_wi_0_wi_1_wo_lr6e-3"]["rougeL"] < max(dora_seeds)
    # Every norm trained whole beside the same adapters (lora.modules_to_save: [layer_norm], which under peft 0.21's
    # suffix rule took final_layer_norm too; [layer_norm, final_layer_norm] since 0.22; 1.87%): its seed-0 run
    # reads 96.95% of full fine-tuning, but over the three seeds its mean equals plain LoRA's (0.7586 against 0.7587).
    saved = [results[f"lora_r2_q_v_o_wi_0_wi_1_wo_lr6e-3_save_layer_norm{s}"] for s in seeds]
    assert all(e["lora"]["modules_to_save"] == ["layer_norm"] and e["trainable_fraction"] <= PEFT_FRACTION
               for e in saved)
    assert abs(sum(e["rougeL"] for e in saved) - sum(adapter)) < 0.001
    assert sum(e["rougeL"] for e in saved) / sum(full_ft) < PEFT_QUALITY
    # PiSSA (init_lora_weights: pissa) on the same kernels: best at 2e-3 of the three rates, below plain LoRA.
    pissa = {row: score for row, score in small.items() if results[row]["lora"].get("init_lora_weights") == "pissa"}
    assert len(pissa) == 3 and max(pissa, key=pissa.get) == "pissa_r2_q_v_o_wi_0_wi_1_wo_lr2e-3"
    assert max(pissa.values()) < small["lora_r2_q_v_o_wi_0_wi_1_wo_lr6e-3"]


@pytest.mark.skipif(not (WIDE_BASE / "results.json").is_file(), reason="no saved wide-model experiment")
def test_lora_on_a_wider_model_rescores_and_stays_short_of_the_best_full_fine_tuning():
    results, settings = rescored(WIDE_BASE)
    assert settings["d_model"] == 256 and settings["topics"] == "all"
    narrow, _ = rescored(ALL_TOPICS_BASE) if (ALL_TOPICS_BASE / "results.json").is_file() else (None, None)
    full = max(entry["rougeL"] for row, entry in results.items() if row.startswith("full_ft"))
    small = {row: results[row]["rougeL"] for row in small_lora_rows(results)}
    # The reading: full fine-tuning of the wider model is better the lower its rate (3e-3 ends below the
    # base); the 1.97% adapter beats it at 1.5e-3 but stays short of 97% of it at 7.5e-4, the best, which is itself
    # below the 128-wide model's.
    assert results["full_ft"]["rougeL"] < results["base_zero_shot"]["rougeL"] < results["full_ft_lr1.5e-3"]["rougeL"]
    assert results["full_ft_lr1.5e-3"]["rougeL"] < max(small.values()) < PEFT_QUALITY * full
    assert full == results["full_ft_lr7.5e-4"]["rougeL"]
    assert max(entry["trainable_fraction"] for entry in results.values() if entry.get("lora")) <= PEFT_FRACTION
    if narrow:
        assert full < narrow["full_ft"]["rougeL"]


@pytest.mark.skipif(not (DENOISING_BASE / "results.json").is_file(), reason="no saved denoising-base experiment")
def test_lora_from_a_denoising_base_rescores_and_stays_short_of_full_fine_tuning():
    results, _ = rescored(DENOISING_BASE)
    full = results["full_ft"]["rougeL"]
    # The reading: the denoising base cannot summarize by itself, full fine-tuning from it beats the
    # lab's, and the small adapters learn more from it than from span corruption alone, still far short.
    assert results["base_zero_shot"]["rougeL"] < 0.25 * full
    assert max(results[row]["rougeL"] for row in small_lora_rows(results)) < PEFT_QUALITY * full


@pytest.mark.skipif(not (EPYC_BASE / "results.json").is_file(), reason="no saved EPYC all-topics experiment")
def test_lora_from_the_all_topics_base_built_on_another_machine_meets_the_target_in_the_mean_of_three_seeds():
    results, settings = rescored(EPYC_BASE)
    assert settings["topics"] == "all" and settings["base_steps"] == 2000 and settings["test_limit"] == 200
    if (ALL_TOPICS_BASE / "results.json").is_file():  # the same settings gave another base on the Intel Xeon
        intel, _ = rescored(ALL_TOPICS_BASE)
        assert abs(results["base_zero_shot"]["rougeL"] - intel["base_zero_shot"]["rougeL"]) > 0.01
    seeds = ("", "_seed1", "_seed2")
    full = [results[f"full_ft{s}"]["rougeL"] for s in seeds]
    adapter = [results[f"lora_r2_q_v_o_wi_0_wi_1_wo_lr6e-3{s}"] for s in seeds]
    assert all(e["trainable_fraction"] <= PEFT_FRACTION and e["learning_rate"] == 6e-3 for e in adapter)
    # The reading: on this base the lab's adapter reaches 97% of full fine-tuning seed by seed and in the
    # mean of the three seeds (on the Intel base, 96.15%: the draw of the base moves it by more than any lever).
    assert all(e["rougeL"] >= PEFT_QUALITY * f for e, f in zip(adapter, full))
    assert sum(e["rougeL"] for e in adapter) >= PEFT_QUALITY * sum(full)
    # The output layer adapted too (1.94%) reads below plain LoRA at both seeds it ran.
    head = [results[f"lora_r2_q_v_o_wi_0_wi_1_wo_lm_head_lr6e-3{s}"] for s in seeds[:2]]
    assert all("lm_head" in e["lora"]["target_modules"] and e["trainable_fraction"] <= PEFT_FRACTION for e in head)
    assert all(h["rougeL"] < a["rougeL"] for h, a in zip(head, adapter))
    # Full fine-tuning with the embedding and the output layer frozen is no worse than with them.
    frozen = results["full_ft_frozen_shared_lm_head"]
    assert frozen["frozen"] == ["shared", "lm_head"] and 0.7 < frozen["trainable_fraction"] < 0.8
    assert frozen["rougeL"] >= full[0]


EPYC_LAB = EXPERIMENTS / "instruction_base_lab_epyc"


@pytest.mark.skipif(not (EPYC_LAB / "results.json").is_file() or not (EPYC_BASE / "results.json").is_file(),
                    reason="no saved EPYC lab rows")
def test_the_labs_instruction_base_rows_on_the_other_machine_reproduce_its_experiment_and_stay_short_of_the_target():
    """The lab's own instruction-base rows built on the AMD EPYC machine (``--instruction-base-only`` on a copy of
    ``labs/summarize``): the first 200 summaries of each row are, word for word, those of the EPYC experiment's
    seed-0 rows (the same base, built by the lab's code and by the script's), and on all 400 test dialogues the
    adapter stays short of 97%: what crossed it was the 200 dialogues the settings were chosen on."""
    results, settings = rescored(EPYC_LAB)
    assert settings["test_limit"] == 400 and settings["instruction_base"]["lora_row"] == "instruct_lora_r2"
    assert settings["instruction_base"]["pretrained_heldout_loss"] != settings["lab_pretrained_heldout_loss"]
    same = {"instruct_zero_shot": "base_zero_shot", "instruct_full_ft": "full_ft",
            "instruct_lora_r2": "lora_r2_q_v_o_wi_0_wi_1_wo_lr6e-3"}
    halves = {}
    for row, experiment_row in same.items():
        lab = [json.loads(line) for line in (EPYC_LAB / "predictions" / f"{row}.jsonl").read_text().splitlines()]
        experiment = (EPYC_BASE / "predictions" / f"{experiment_row}.jsonl").read_text().splitlines()
        assert [r["prediction"] for r in lab[:200]] == [json.loads(line)["prediction"] for line in experiment]
        halves[row] = [text_metrics.rouge([r["prediction"] for r in part], [r["references"] for r in part],
                                          ("rougeL",))["rougeL"] for part in (lab[:200], lab[200:])]
    adapter, full = results["instruct_lora_r2"], results["instruct_full_ft"]
    assert adapter["trainable_fraction"] <= PEFT_FRACTION
    share = adapter["rougeL"] / full["rougeL"]
    assert share == pytest.approx(settings["instruction_base"]["lora_share_of_full_ft"]) and 0.96 < share < PEFT_QUALITY
    first, second = (a / f for a, f in zip(halves["instruct_lora_r2"], halves["instruct_full_ft"]))
    assert first > PEFT_QUALITY > 0.96 > second  # 97.85% on the dialogues the settings were chosen on, 95.4% on the rest


EPYC_SEEDS = EXPERIMENTS / "instruction_base_lab_epyc_seeds"


@pytest.mark.skipif(not all((d / "results.json").is_file() for d in (EPYC_SEEDS, EPYC_LAB, EPYC_BASE)),
                    reason="no saved EPYC seed rows")
def test_the_labs_adapter_on_the_other_machine_meets_the_target_in_the_mean_of_three_seeds_on_every_test_dialogue():
    """The lab's two compared rows from the base the lab built on the AMD EPYC machine, again at ``train.seed`` 1
    and 2 on all 400 test dialogues (the experiment script on a copy of that lab's base; the lab's own rows are the
    seed-0 pair). The first 200 summaries of each are the EPYC experiment's rows of the same seed word for word (the
    same base, the same runs). Seed by seed the adapter reaches 96.6%, 99.1% and 97.6% of full fine-tuning; over the
    three seeds its mean is 97.8% of full fine-tuning's: the issue's target, on this base (the Intel Xeon's base
    read 96.15% in the mean of three seeds, on 200 dialogues)."""
    results, settings = rescored(EPYC_SEEDS)
    lab, _ = rescored(EPYC_LAB)
    assert settings["test_limit"] == 400 and settings["train_seeds"] == [1, 2]
    for row in results:
        saved = [json.loads(line)["prediction"] for line in (EPYC_SEEDS / "predictions" / f"{row}.jsonl").read_text()
                 .splitlines()]
        experiment = (EPYC_BASE / "predictions" / f"{row}.jsonl").read_text().splitlines()
        assert saved[:200] == [json.loads(line)["prediction"] for line in experiment], row
    adapter = [lab["instruct_lora_r2"], *(results[f"lora_r2_q_v_o_wi_0_wi_1_wo_lr6e-3_seed{s}"] for s in (1, 2))]
    full = [lab["instruct_full_ft"], *(results[f"full_ft_seed{s}"] for s in (1, 2))]
    assert all(e["trainable_fraction"] <= PEFT_FRACTION and e["lora"]["r"] == 2 for e in adapter)
    shares = [a["rougeL"] / f["rougeL"] for a, f in zip(adapter, full)]
    assert shares[0] < PEFT_QUALITY < min(shares[1:])  # the lab's seed alone falls short; the other two cross
    assert sum(a["rougeL"] for a in adapter) >= PEFT_QUALITY * sum(f["rougeL"] for f in full)


EPYC_AVX_LAB = EXPERIMENTS / "instruction_base_lab_epyc_avx"


@pytest.mark.skipif(not (EPYC_AVX_LAB / "results.json").is_file() or not (EPYC_LAB / "results.json").is_file(),
                    reason="no saved AVX-capped lab rows")
def test_the_labs_instruction_base_rows_with_xla_capped_at_avx_start_from_a_third_base():
    """The lab's instruction-base rows on the AMD EPYC machine again, with XLA capped at AVX
    (``XLA_FLAGS=--xla_cpu_max_isa=AVX``, recorded in the rows' environment): the same code and seeds on the same
    machine give another pre-trained model and another base (the instruction set alone changes the bits:
    ``labs/experiments/xla_isa_bits.py``), a third draw beside the Intel Xeon's and the uncapped EPYC's."""
    results, settings = rescored(EPYC_AVX_LAB)
    default, default_settings = rescored(EPYC_LAB)
    facts = settings["instruction_base"]
    assert facts["environment"]["xla_flags"] == "--xla_cpu_max_isa=AVX" and settings["test_limit"] == 400
    assert facts["pretrained_heldout_loss"] != default_settings["instruction_base"]["pretrained_heldout_loss"]
    assert results["instruct_zero_shot"]["rougeL"] != default["instruct_zero_shot"]["rougeL"]
    adapter, full = results["instruct_lora_r2"], results["instruct_full_ft"]
    assert adapter["trainable_fraction"] <= PEFT_FRACTION and adapter["lora"]["r"] == 2
    share = adapter["rougeL"] / full["rougeL"]
    assert share == pytest.approx(facts["lora_share_of_full_ft"])
    # The reading: from this base the lab's adapter crosses 97% at the lab's seed, on all 400 test dialogues (97.9%)
    # and on each half; over the three bases' lab rows (one seed each) the adapter's mean stays just short (96.85%).
    assert share >= PEFT_QUALITY
    saved = EXPERIMENTS.parent / "summarize" / "results.json"
    if saved.is_file():
        bases = [json.loads(saved.read_text()), default, results]
        adapters = sum(b["instruct_lora_r2"]["rougeL"] for b in bases)
        assert 0.965 * sum(b["instruct_full_ft"]["rougeL"] for b in bases) < adapters
        assert adapters < PEFT_QUALITY * sum(b["instruct_full_ft"]["rougeL"] for b in bases)


@pytest.mark.skipif(not all((d / "results.json").is_file() for d in (EPYC_LAB, EPYC_AVX_LAB)),
                    reason="no saved lab rows from the other bases")
def test_on_every_base_the_test_set_alone_cannot_tell_the_adapters_share_from_the_target():
    """The interval a lab run now reports beside the share (a paired bootstrap over the 400 test dialogues), for
    the lab's rows on the other two bases: 96.6% (94.9% to 98.3%) on the EPYC's, 97.9% (96.3% to 99.4%) with XLA
    capped at AVX. Each holds 97%, as the saved lab's does (tests/lab/test_summarize.py): one run's test set moves
    the share about two points either way, more than the gap between any base's share and the target."""
    expected = {EPYC_LAB: (0.949, 0.983), EPYC_AVX_LAB: (0.963, 0.994)}
    for run, bounds in expected.items():
        lora_row = json.loads((run / "results.json").read_text())["_settings"]["instruction_base"]["lora_row"]
        low, high = row_share_interval(*(read_predictions(run / "predictions" / f"{row}.jsonl")
                                         for row in (lora_row, FULL_ROW)))
        assert low < PEFT_QUALITY < high and (round(low, 3), round(high, 3)) == bounds, run.name
