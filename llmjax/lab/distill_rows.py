"""The lab's distillation rows (the course's "LLM optimisation: distillation", in miniature): a student T5 smaller
than the lab's, trained from random weights twice on the same instruction data, steps and seed:

* ``distill``:        ``stage: distill`` with ``full_ft`` (the lab's fine-tuned summarizer) as the frozen teacher:
  ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)`` per target token
  (``llmjax.stages.distill``);
* ``distill_labels``: ``stage: sft``: the same student on the labels alone (distillation's ``alpha = 0``, without
  computing the teacher's logits).

Both start from the same random weights (``train.seed``) and read the same batches, so the soft targets are the
only difference. Each row is scored like every lab row (ROUGE/BLEU of greedy summaries of the test split, through
the lab's ``evaluate_row``) and adds ``teacher``, ``temperature``, ``alpha``, ``student_params``,
``teacher_params``, ``heldout_ce`` (the label cross-entropy on validation batches at the last step) and
``step_seconds``. Whether the distilled student beats the label-only one is measured, never assumed: the facts
say by how much it does or does not (``rougeL_gain``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from llmjax.config import RunConfig, config_from_dict
from llmjax.evaluate import load_model_for_inference
from llmjax.lab.adapter_rows import run_measures, train_and_score
from llmjax.lab.report import read_metrics
from llmjax.train.state import count_params

DISTILL_ROW, LABELS_ROW = "distill", "distill_labels"
TEACHER_ROW = "full_ft"


@dataclasses.dataclass(frozen=True)
class DistillRows:
    """Whether the lab runs the distillation rows, and their settings (both rows share all but the loss)."""

    enabled: bool = True
    student_width: float = 0.5     # the student's d_model, d_kv and d_ff as a share of the lab model's
    steps: int = 1000              # as full_ft: the lab's sft_steps
    batch_size: int = 16
    learning_rate: float = 3e-3    # from random weights: the lab's pre-training rate
    temperature: float = 2.0
    alpha: float = 0.5
    eval_batches: int = 8          # validation batches of the held-out label cross-entropy

    @classmethod
    def tiny(cls) -> "DistillRows":
        return cls(steps=2, batch_size=8, eval_batches=1)

    def row_names(self) -> list[str]:
        return [DISTILL_ROW, LABELS_ROW] if self.enabled else []


def student_model(lab_model: dict, width: float) -> dict:
    """The lab's model config (``LabSettings.model()``) with ``d_model``, ``d_kv`` and ``d_ff`` scaled by ``width``
    (at least 1 each): the same vocabulary, layers and heads, so the student reads the teacher's tokens."""
    return {**lab_model, **{key: max(1, round(lab_model[key] * width)) for key in ("d_model", "d_kv", "d_ff")}}


def row_config(out: Path, row: str, settings, rows: DistillRows, student: dict, teacher_dir: Path,
               tokenizer_dir: Path) -> RunConfig:
    """The run config of ``row``: the student from random weights on the ``dialogsum`` instruction task, with the
    lab's row lengths, seed and generation-free evaluation; ``distill`` adds the teacher."""
    steps = rows.steps
    raw = {
        "stage": "distill" if row == DISTILL_ROW else "sft",
        "model": student,
        "data": {"tasks": ["dialogsum"], "objective": "instruction", "tokenizer": str(tokenizer_dir),
                 "encoder_length": settings.sft_encoder_length, "decoder_length": settings.sft_decoder_length},
        "train": {"steps": steps, "batch_size": rows.batch_size, "seed": settings.seed, "eval_every_steps": steps,
                  "eval_steps": rows.eval_batches, "log_every_steps": max(1, steps // 50),
                  "output_dir": str(out / row)},
        "optim": {"learning_rate": rows.learning_rate, "schedule": "cosine", "warmup_steps": max(1, steps // 20),
                  "weight_decay": 0.0},
        "checkpoint": {"every_steps": steps, "keep": 1, "async_save": False},
    }
    if row == DISTILL_ROW:
        raw["distill"] = {"teacher": str(teacher_dir), "temperature": rows.temperature, "alpha": rows.alpha}
    return config_from_dict(raw)


def heldout_ce(run_dir: Path) -> float | None:
    """The label cross-entropy of the run's last validation pass (``ce`` of a distillation run, ``loss`` of SFT)."""
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "eval"]
    return None if not evals else evals[-1].get("ce", evals[-1]["loss"])


def run_distill_rows(out: Path, settings, rows: DistillRows, teacher_dir: Path, student: dict, tokenizer_dir: Path,
                     evaluate_row, row_entry, say, progress: bool) -> tuple[dict, dict, dict]:
    """Train and measure both rows into ``out/<row>``. ``teacher_dir``: the ``full_ft`` run; ``student``: the
    student's model config (a dict, e.g. :func:`student_model`); ``evaluate_row(model, params) -> EvalResult``
    scores the test split; ``row_entry(result, trainable, total, seconds, **extra) -> dict`` makes a results
    entry. Returns ``(results, outputs, facts)``: each row's entry, its test ``EvalResult``, and the comparison."""
    teacher_model, teacher_params, _ = load_model_for_inference(teacher_dir)
    teacher_size = count_params(teacher_params)
    results, outputs = {}, {}
    for row in rows.row_names():
        config = row_config(out, row, settings, rows, student, teacher_dir, tokenizer_dir)
        what = (f"from {TEACHER_ROW} (T={rows.temperature:g}, alpha={rows.alpha:g})" if row == DISTILL_ROW
                else "on the labels alone")
        say(f"{row}: training a d_model={student['d_model']} student {what} for {rows.steps} steps")
        _, params, outputs[row], seconds = train_and_score(config, evaluate_row, progress)
        size = count_params(params)
        extra = {"teacher": TEACHER_ROW, "temperature": rows.temperature if row == DISTILL_ROW else None,
                 "alpha": rows.alpha if row == DISTILL_ROW else 0.0, "student_params": size,
                 "teacher_params": teacher_size, "heldout_ce": heldout_ce(out / row),
                 "step_seconds": run_measures(out / row)["step_seconds"]}
        results[row] = row_entry(outputs[row], size, size, seconds, **extra)
        say(f"{row}: ROUGE-L {results[row]['rougeL']:.4f}, held-out label cross-entropy {extra['heldout_ce']:.4f}")
    facts = {"teacher": TEACHER_ROW, "teacher_d_model": teacher_model.config.d_model,
             "student_d_model": student["d_model"], "steps": rows.steps}
    if DISTILL_ROW in results and LABELS_ROW in results:
        facts["rougeL_gain"] = results[DISTILL_ROW]["rougeL"] - results[LABELS_ROW]["rougeL"]
        facts["heldout_ce_gain"] = results[LABELS_ROW]["heldout_ce"] - results[DISTILL_ROW]["heldout_ce"]
        say(f"distillation vs labels alone: ROUGE-L {facts['rougeL_gain']:+.4f}, "
            f"held-out label cross-entropy {-facts['heldout_ce_gain']:+.4f}")
    return results, outputs, facts
