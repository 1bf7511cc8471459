"""The lab's distillation rows: a half-width student trained twice from the same random weights on the same
batches, once against the ``full_ft`` teacher and once on the labels alone, each scored as a lab row."""

import json
from pathlib import Path

import jax
import pytest

from llmjax import hf
from llmjax.data.bundled.dialogsum import bundled_dialogsum
from llmjax.data.tokenizer import train_tokenizer
from llmjax.lab.distill_rows import DISTILL_ROW, LABELS_ROW, DistillRows, run_distill_rows, student_model
from llmjax.lab.summarize import LabSettings, evaluate_row, row_entry
from llmjax.loading import load_model
from llmjax.model_config import T5Config
from llmjax.models import build_model, init_params


def _train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def test_student_model_halves_the_width_and_keeps_the_vocabulary():
    lab = LabSettings().model()  # d_model 128, d_kv 32, d_ff 256
    student = student_model(lab, 0.5)
    assert (student["d_model"], student["d_kv"], student["d_ff"]) == (64, 16, 128)
    assert student_model({**lab, "d_model": 3, "d_kv": 1, "d_ff": 5}, 0.5)["d_kv"] == 1  # never below 1
    assert {k: v for k, v in student.items() if k not in ("d_model", "d_kv", "d_ff")} == \
        {k: v for k, v in lab.items() if k not in ("d_model", "d_kv", "d_ff")}


@pytest.mark.slow  # two short trainings and their test generations: ~70 s on the shared 2-core CPU
def test_both_rows_train_the_same_student_on_the_same_batches_and_are_scored(tmp_path):
    settings = LabSettings.tiny()
    rows = DistillRows.tiny()
    texts = [f"{e['dialogue']}\n{e['summary']}" for e in bundled_dialogsum("train")[:300]]
    tokenizer = train_tokenizer(texts, tmp_path / "tokenizer", vocab_size=settings.vocab_size)
    # The teacher: any T5 of the lab's vocabulary (here random weights), as the full_ft run would be.
    teacher_dir = tmp_path / "full_ft"
    teacher = build_model(T5Config(**{k: v for k, v in settings.model().items() if k != "family"}))
    hf.save_pretrained(teacher, init_params(teacher, jax.random.key(0)), teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    test = bundled_dialogsum("test")[:2]
    said = []
    results, outputs, facts = run_distill_rows(
        tmp_path, settings, rows, teacher_dir, student_model(settings.model(), rows.student_width),
        tmp_path / "tokenizer", lambda m, p: evaluate_row(m, p, tokenizer, test, settings), row_entry, said.append,
        progress=False)

    assert set(results) == set(outputs) == {DISTILL_ROW, LABELS_ROW}
    for row in (DISTILL_ROW, LABELS_ROW):
        entry = results[row]
        assert entry["student_params"] == entry["trainable_params"] < entry["teacher_params"]
        assert 0.0 <= entry["rougeL"] <= 1.0 and entry["heldout_ce"] > 0 and entry["teacher"] == "full_ft"
        assert load_model(tmp_path / row).config.d_model == settings.d_model // 2
    assert results[DISTILL_ROW]["alpha"] == rows.alpha and results[LABELS_ROW]["alpha"] == 0.0
    assert facts["rougeL_gain"] == pytest.approx(results[DISTILL_ROW]["rougeL"] - results[LABELS_ROW]["rougeL"])
    # Same random start, same first batch: the first step's label cross-entropy is the same in both runs.
    distilled, labels = _train_rows(tmp_path / DISTILL_ROW), _train_rows(tmp_path / LABELS_ROW)
    assert [r["step"] for r in distilled] == [r["step"] for r in labels] == [1, 2]
    assert distilled[0]["ce"] == pytest.approx(labels[0]["loss"], rel=1e-5)
    assert distilled[0]["kl"] > 0 and load_model(tmp_path / DISTILL_ROW).meta["stage"] == "distill"
    assert any("distillation vs labels alone" in line for line in said)
