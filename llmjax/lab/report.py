"""The lab's outputs: ``results.json``, ``predictions/<row>.jsonl``, ``report.md`` and PNG curves.

``results.json`` maps each row name to its scores (ROUGE F-measures in [0, 1] against all references
of an example, the best one counting; corpus BLEU in [0, 100]), ``trainable_params``,
``trainable_fraction`` and ``train_seconds``, and for trained rows ``optimizer_state_bytes`` and
``step_seconds``; the key ``_lab`` holds the run's facts (settings,
forgetting numbers, curves), so one file rescores and replots the run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from llmjax import environment
from llmjax.lab.int8_row import int8_section

SCORE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu")
RANDOM_SAME_TOPIC = {"first": 0.507, "all": 0.669}  # README: ROUGE-L of a random same-topic training summary
EXAMPLES_SHOWN = 4
PEFT_FRACTION = 0.02  # issue 11: a LoRA row training at most this share of the parameters ...
PEFT_QUALITY = 0.97   # ... reaches at least this share of full fine-tuning's ROUGE-L


def write_predictions(path: Path, result) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for id_, prediction, references in zip(result.ids, result.predictions, result.references):
            f.write(json.dumps({"id": id_, "prediction": prediction, "references": references},
                               ensure_ascii=False) + "\n")


@dataclasses.dataclass(frozen=True)
class SavedPredictions:
    """A row's generations read back from ``predictions/<row>.jsonl`` (what the report needs of an ``EvalResult``)."""

    ids: list
    predictions: list[str]
    references: list[list[str]]


def read_predictions(path: Path) -> SavedPredictions:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return SavedPredictions([r["id"] for r in records], [r["prediction"] for r in records],
                            [r["references"] for r in records])


def read_metrics(path: Path) -> list[dict]:
    """The loop's ``metrics.jsonl`` rows (empty when the file is missing)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_curves(out: Path, results: dict, facts: dict) -> list[Path]:
    """``loss.png`` (pre-training and SFT losses), ``rouge.png`` (validation ROUGE-L over SFT steps, the
    in-context rows as lines) and ``forgetting.png`` (pre-training held-out loss over SFT steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for split in ("train", "eval"):
        rows = [r for r in read_metrics(out / "pretrain" / "metrics.jsonl") if r["split"] == split]
        axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], "-o" if split == "eval" else "-",
                     label=f"span corruption ({split})")
    axes[0].set(title="pre-training", xlabel="step", ylabel="cross-entropy per token")
    for row in facts["curves"]:
        for split in ("train", "eval"):
            rows = [r for r in read_metrics(out / row / "metrics.jsonl") if r["split"] == split]
            axes[1].plot([r["step"] for r in rows], [r["loss"] for r in rows], "-o" if split == "eval" else "-",
                         label=f"{row} ({split})")
    axes[1].set(title="fine-tuning (eval: validation mixture)", xlabel="step", ylabel="cross-entropy per token")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "loss.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for row, curve in facts["curves"].items():
        ax.plot([p["step"] for p in curve], [p["val_rougeL"] for p in curve], "-o", label=f"{row} (validation)")
    for row in ("zero_shot", "one_shot", "few_shot"):
        ax.axhline(results[row]["rougeL"], linestyle=":", color="gray")
        ax.annotate(f"{row} (test)", (0.01, results[row]["rougeL"]), xycoords=("axes fraction", "data"),
                    fontsize=8, va="bottom")
    ax.axhline(RANDOM_SAME_TOPIC["all"], linestyle="--", color="red")
    ax.annotate("random same-topic summary (test)", (0.01, RANDOM_SAME_TOPIC["all"]),
                xycoords=("axes fraction", "data"), fontsize=8, va="bottom")
    ax.set(title="ROUGE-L (all references)", xlabel="fine-tuning step", ylabel="ROUGE-L", ylim=(0, 1))
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "rouge.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    before = facts["forgetting"]["before_sft"]
    for row, curve in facts["curves"].items():
        ax.plot([0] + [p["step"] for p in curve], [before] + [p["heldout_loss"] for p in curve], "-o", label=row)
    ax.set(title="forgetting: span-corruption loss on held-out corpus", xlabel="fine-tuning step",
           ylabel="cross-entropy per token")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "forgetting.png"))
    return paths


def adapter_row_names(results: dict) -> list[str]:
    """The parameter-efficient rows present: ``lora_r<r>`` by rank, ``qlora_r<r>`` by rank, then ``prompt_tuning``."""
    def by_rank(prefix):
        return sorted((row for row in results if row.startswith(prefix)), key=lambda row: int(row.removeprefix(prefix)))

    return by_rank("lora_r") + by_rank("qlora_r") + [row for row in ("prompt_tuning",) if row in results]


def plot_lora_sweep(out: Path, results: dict) -> Path | None:
    """``lora_sweep.png``: test ROUGE-L against trainable fraction (log scale) of the LoRA rows, with full
    fine-tuning and prompt tuning marked and the 2% / 97% target drawn; None without adapter rows."""
    rows = adapter_row_names(results)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    lora = [row for row in rows if row.startswith("lora_r")]
    if lora:
        xs, ys = [results[row]["trainable_fraction"] for row in lora], [results[row]["rougeL"] for row in lora]
        ax.plot(xs, ys, "-o", label="LoRA on " + ", ".join(results[lora[0]].get("target_modules", [])))
        for row, x, y in zip(lora, xs, ys):
            ax.annotate(f"r={row.removeprefix('lora_r')}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
    if "prompt_tuning" in results:
        r = results["prompt_tuning"]
        ax.plot([r["trainable_fraction"]], [r["rougeL"]], "D", label=f"prompt tuning ({r['num_virtual_tokens']} tokens)")
    full = results["full_ft"]
    ax.plot([full["trainable_fraction"]], [full["rougeL"]], "*", markersize=14, color="tab:red",
            label="full fine-tuning")
    from llmjax.lab.instruction_base_rows import FULL_ROW, ROW_PREFIX

    instruct = [row for row in results if row.startswith(f"{ROW_PREFIX}lora_r")]
    if FULL_ROW in results and instruct:  # the same comparison from the instruction-tuned base
        r, f = results[instruct[0]], results[FULL_ROW]
        ax.plot([r["trainable_fraction"]], [r["rougeL"]], "s", color="tab:purple",
                label=f"LoRA r={r['lora']['r']} on {'+'.join(r['lora']['target_modules'])}, instruction-tuned base")
        ax.plot([f["trainable_fraction"]], [f["rougeL"]], "*", markersize=14, color="tab:purple",
                label="full fine-tuning, instruction-tuned base")
        ax.axhline(PEFT_QUALITY * f["rougeL"], linestyle=":", color="tab:purple")
        ax.annotate(f"{PEFT_QUALITY:.0%} of full fine-tuning (instruction-tuned base)",
                    (0.01, PEFT_QUALITY * f["rougeL"]), xycoords=("axes fraction", "data"), fontsize=8, va="bottom")
    ax.axhline(PEFT_QUALITY * full["rougeL"], linestyle=":", color="gray")
    ax.annotate(f"{PEFT_QUALITY:.0%} of full fine-tuning", (0.01, PEFT_QUALITY * full["rougeL"]),
                xycoords=("axes fraction", "data"), fontsize=8, va="bottom")
    ax.axvline(PEFT_FRACTION, linestyle="--", color="gray")
    ax.annotate(f"{PEFT_FRACTION:.0%} trained", (PEFT_FRACTION, 0.62), xycoords=("data", "axes fraction"), fontsize=8,
                va="center", ha="right", rotation=90)
    ax.set_xscale("log")
    ax.set(title="test ROUGE-L against the share of parameters trained", xlabel="trainable fraction (log scale)",
           ylabel="ROUGE-L (all references)")
    ax.legend(loc="center right", bbox_to_anchor=(1, 0.4), fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out / "lora_sweep.png")


def _share(row: dict, full: dict, key: str) -> str:
    return f"{row[key] / full[key]:.1%}" if row.get(key) is not None and full.get(key) else "-"


def adapter_section(results: dict, facts: dict, png: Path | None) -> list[str]:
    """``report.md``'s section on the parameter-efficient rows (empty without them): their settings, a table
    against full fine-tuning, and which LoRA row trains <= 2% of the parameters and how close it comes."""
    rows = adapter_row_names(results)
    if not rows:
        return []
    s, full = facts["adapter_rows"], results["full_ft"]
    text = [
        "## Parameter-efficient fine-tuning", "",
        f"Every row below trains as `full_ft` does (same task, steps, batch and schedule, from the same pre-trained "
        f"model), only part of the model: LoRA on {', '.join(s['lora_target_modules'])} with lora_alpha = "
        f"{s['lora_alpha_per_rank']:g} r (scale {s['lora_alpha_per_rank']:g} at every rank) at learning rate "
        f"{s['lora_learning_rate']:g}; prompt tuning with {s['num_virtual_tokens']} virtual tokens initialised from "
        f"\"{s['prompt_tuning_init_text']}\" at learning rate {s['prompt_learning_rate']:g}, on unpacked rows "
        f"(full fine-tuning: {facts['settings']['sft_learning_rate']:g}). Trainable fraction as PEFT's trainable%: "
        "trainable / (base + trainable). Optimizer state: what the run's checkpoint holds; step time: the median "
        "of the loop's logged step times; held-out loss: the pre-training objective's, as under Forgetting.", "",
        "| row | trainable params | trainable fraction | ROUGE-L | of full_ft's | optimizer state (MiB) | of full_ft's "
        "| frozen base (MiB) | step seconds | of full_ft's | held-out pre-training loss |", "|---|" + "---:|" * 10,
    ]
    for row in ["full_ft", *rows]:
        r = results[row]
        text.append(f"| {row} | {r['trainable_params']:,} | {r['trainable_fraction']:.2%} | {r['rougeL']:.4f} | "
                    f"{_share(r, full, 'rougeL')} | {_megabytes(r)} | {_share(r, full, 'optimizer_state_bytes')} | "
                    f"{_megabytes(r, 'frozen_base_bytes')} | {_step_seconds(r)} | {_share(r, full, 'step_seconds')} | "
                    f"{r['heldout_loss']:.4f} |")
    small = [row for row in rows if row.startswith("lora_r") and results[row]["trainable_fraction"] <= PEFT_FRACTION]
    text.append("")
    if small:
        best = max(small, key=lambda row: results[row]["rougeL"])
        ratio = results[best]["rougeL"] / full["rougeL"] if full["rougeL"] else float("nan")
        text.append(f"LoRA rows training at most {PEFT_FRACTION:.0%} of the parameters: "
                    + ", ".join(f"`{row}` ({results[row]['trainable_fraction']:.2%})" for row in small)
                    + f". The best of them, `{best}`, reaches {ratio:.1%} of full fine-tuning's ROUGE-L "
                    f"({results[best]['rougeL']:.4f} against {full['rougeL']:.4f}); the target, at least "
                    f"{PEFT_QUALITY:.0%}, is {'met' if ratio >= PEFT_QUALITY else 'not met'}.")
    else:
        text.append(f"No LoRA row trains at most {PEFT_FRACTION:.0%} of the parameters of this model.")
    for row in (row for row in rows if row.startswith("qlora_r") and row[1:] in results):
        q, f = results[row], results[row[1:]]
        text += ["", f"`{row}` trains `{row[1:]}`'s adapters over the int8 base (QLoRA-style): frozen base "
                     f"{_megabytes(q, 'frozen_base_bytes')} MiB against {_megabytes(f, 'frozen_base_bytes')} MiB "
                     f"({f['frozen_base_bytes'] / q['frozen_base_bytes']:.1f}x smaller), ROUGE-L {q['rougeL']:.4f} "
                     f"against {f['rougeL']:.4f}."]
    if png is not None:
        text += ["", f"![{png.stem}]({png.name})"]
    return text + [""]


def instruction_base_section(results: dict, facts: dict, lab_before: float) -> list[str]:
    """``report.md``'s section on the instruction-base rows (``llmjax.lab.instruction_base_rows``): how the base was
    made, a table against its full fine-tuning, and whether the LoRA row meets the 2% / 97% target.
    ``lab_before``: the lab's pre-trained model's held-out loss (``forgetting.before_sft``)."""
    from llmjax.lab.instruction_base_rows import BASE_ROW, FULL_ROW

    lora_row, full = facts["lora_row"], results[FULL_ROW]
    text = [
        "## Parameter-efficient fine-tuning from an instruction-tuned base", "",
        "The course's LoRA adapts FLAN-T5, a model already instruction-tuned on chat summaries; the rows above adapt "
        "one that has only seen span corruption. Here the lab's pre-trained model is first tuned for "
        f"{facts['base_steps']} steps of the lab's schedule on a SAMSum-shaped sibling set (the bundled generator "
        f"with seed {facts['sibling_seed']}, first names for the speakers, none of the lab's dialogues; "
        f"{facts['sibling_share']:.0%} of the examples, the rest span corruption): `{BASE_ROW}` is that base, "
        f"scored zero-shot. `{FULL_ROW}` fine-tunes all of it as `full_ft` does; `{lora_row}` trains LoRA "
        f"r={facts['lora_rank']} (lora_alpha {2 * facts['lora_rank']}) on {', '.join(facts['lora_target_modules'])} "
        f"at learning rate {facts['lora_learning_rate']:g} for {facts['lora_steps']} steps."
        + (f" These rows were added to the finished lab by `{facts['command']}` ({facts['seconds']:.0f} s"
           + (f" on {machine(facts)}" if "environment" in facts else "") + "), from "
           + _same_start(facts["pretrained_heldout_loss"], lab_before, facts.get("pretrain_reused", False))
           if facts.get("command") else ""), "",
        f"| row | trainable params | trainable fraction | steps | learning rate | ROUGE-L | of {FULL_ROW}'s "
        "| optimizer state (MiB) | step seconds |", "|---|" + "---:|" * 8,
    ]
    for row in (BASE_ROW, FULL_ROW, lora_row):
        r = results[row]
        trains = "-" if row == BASE_ROW else f"{r['trainable_params']:,}"
        fraction = "-" if row == BASE_ROW else f"{r['trainable_fraction']:.2%}"
        text.append(f"| {row} | {trains} | {fraction} | {r['steps']} | {r['learning_rate']:g} | {r['rougeL']:.4f} | "
                    f"{_share(r, full, 'rougeL')} | {_megabytes(r)} | {_step_seconds(r)} |")
    lora = results[lora_row]
    ratio = lora["rougeL"] / full["rougeL"] if full["rougeL"] else float("nan")
    small = lora["trainable_fraction"] <= PEFT_FRACTION
    met = small and ratio >= PEFT_QUALITY
    text += ["", f"`{lora_row}` trains {lora['trainable_fraction']:.2%} of the parameters and reaches {ratio:.1%} of "
                 f"`{FULL_ROW}`'s ROUGE-L ({lora['rougeL']:.4f} against {full['rougeL']:.4f}); the target, at most "
                 f"{PEFT_FRACTION:.0%} of the parameters at at least {PEFT_QUALITY:.0%}, is "
                 f"{'met' if met else 'not met'}."]
    interval = facts.get("lora_share_interval")
    if interval:  # a lab from before the interval was computed has none
        low, high = interval
        if low <= PEFT_QUALITY <= high:
            verdict = f"holds {PEFT_QUALITY:.0%}: at this test size the run cannot tell the share from the target"
        else:
            verdict = f"lies {'above' if low > PEFT_QUALITY else 'below'} {PEFT_QUALITY:.0%}"
        text += ["", f"How much of that the test set decides: over {facts['lora_share_resamples']:,} paired bootstrap "
                     f"resamples of the test dialogues, the share's {facts['lora_share_confidence']:.0%} interval is "
                     f"{low:.1%} to {high:.1%}, which {verdict}. The interval leaves out the training seed, which "
                     "moves the share too."]
    return text + [""]


def _same_start(loss: float, lab_loss: float, reused: bool) -> str:
    """Whether the pre-trained model that rows added to a finished lab started from (``reused`` from the lab's
    directory, or run again there) is the lab's model, by held-out loss."""
    how = "reused" if reused else "run again"
    if abs(loss - lab_loss) <= 1e-6 * abs(lab_loss):
        return f"its pre-training {how}, the same model (held-out pre-training loss {loss:.6f}, as the lab's)."
    return (f"its pre-training {how} with the same settings, which is not the lab's model to the bit "
            f"(held-out pre-training loss {loss:.6f} against the lab's {lab_loss:.6f}; the machine or the code "
            "differed): these rows compare with each other, the lab's others with theirs.")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _megabytes(r: dict, key: str = "optimizer_state_bytes") -> str:
    return f"{r[key] / 2**20:.3f}" if r.get(key) is not None else "-"


def _step_seconds(r: dict) -> str:
    return f"{r['step_seconds']:.3f}" if r.get("step_seconds") is not None else "-"


def results_table(results: dict) -> str:
    lines = ["| row | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | BLEU | ROUGE-L (first ref) | trainable params | "
             "trainable fraction | train seconds | optimizer state (MiB) | step seconds (median) |", "|---|" + "---:|" * 11]
    for row, r in results.items():
        if "rouge1" not in r:  # the reward model: no summaries (the detox section reports it)
            continue
        lines.append(f"| {row} | " + " | ".join(f"{r[k]:.4f}" if k != "bleu" else f"{r[k]:.1f}" for k in SCORE_KEYS)
                     + f" | {r['rougeL_first_ref']:.4f} | {r['trainable_params']:,} | {r['trainable_fraction']:.4f} "
                     f"| {r['train_seconds']:.0f} | {_megabytes(r)} | {_step_seconds(r)} |")
    lines.append(f"| random same-topic summary (README baseline) | 0.684 | 0.530 | {RANDOM_SAME_TOPIC['all']} | 0.673 "
                 f"| 57.2 | {RANDOM_SAME_TOPIC['first']} | - | - | - | - | - |")
    return "\n".join(lines)


def distill_section(results: dict, facts: dict) -> list[str]:
    """``report.md``'s distillation section: the student distilled from the teacher against the same student on the
    labels alone (same random init, batches and steps)."""
    lines = ["## Distillation", "",
             f"A d_model={facts['student_d_model']} student (the teacher `{facts['teacher']}` has d_model="
             f"{facts['teacher_d_model']}) trained from random weights for {facts['steps']} steps, twice: with "
             "`stage: distill` (loss = alpha T^2 KL(teacher_T || student_T) + (1 - alpha) CE) and on the labels alone.",
             "", "| row | student params | alpha | T | ROUGE-L | held-out label CE |", "|---|---:|---:|---:|---:|---:|"]
    for row in ("distill", "distill_labels"):
        if row in results:
            r = results[row]
            lines.append(f"| {row} | {r['student_params']:,} | {r['alpha']:g} | {r['temperature'] or '-'} | "
                         f"{r['rougeL']:.4f} | {r['heldout_ce']:.4f} |")
    if "rougeL_gain" in facts:
        verdict = "beats" if facts["rougeL_gain"] > 0 else "does not beat"
        lines += ["", f"The distilled student {verdict} the label-only one: ROUGE-L {facts['rougeL_gain']:+.4f}, "
                      f"held-out label cross-entropy {-facts['heldout_ce_gain']:+.4f}."]
    return lines + [""]


def _cell(text: str) -> str:
    return text.strip().replace("|", "\\|").replace("\n", "<br>") or " "


def examples_table(examples: list[dict], outputs: dict) -> str:
    rows = list(outputs)
    lines = ["| id | reference | " + " | ".join(rows) + " |", "|---" * (2 + len(rows)) + "|"]
    for i, example in enumerate(examples[:EXAMPLES_SHOWN]):
        lines.append(f"| {example['id']} | {_cell(example['summary'])} | "
                     + " | ".join(_cell(outputs[row].predictions[i]) for row in rows) + " |")
    return "\n".join(lines)


def machine(facts: dict) -> str:
    """Where the run whose ``facts`` these are ran (``facts["environment"]``, :func:`llmjax.environment.describe`)."""
    if "environment" not in facts:
        return "not recorded (the run predates llmjax's environment record)"
    return environment.one_line(facts["environment"])


def write_outputs(out: Path, examples: list[dict], outputs: dict, results: dict, facts: dict,
                  plots: bool = True) -> None:
    """Write every output of the lab into ``out`` (see the module docstring). ``plots=False`` (rows added to a
    finished lab whose training runs may be gone) keeps the curves' PNGs already there and redraws only
    ``lora_sweep.png``, which needs nothing but ``results``."""
    predictions = out / "predictions"
    predictions.mkdir(parents=True, exist_ok=True)
    for row, result in outputs.items():
        write_predictions(predictions / f"{row}.jsonl", result)
    (out / "results.json").write_text(json.dumps({**results, "_lab": facts}, indent=2) + "\n", encoding="utf-8")
    from llmjax.lab.detox_report import detox_section, plot_detox

    if plots:
        pngs = plot_curves(out, results, facts)
        detox_png = plot_detox(out, results) if "detox" in facts else None
    else:
        pngs = [out / f"{name}.png" for name in ("loss", "rouge", "forgetting") if (out / f"{name}.png").is_file()]
        detox_png = out / "detox.png" if "detox" in facts and (out / "detox.png").is_file() else None
    sweep = plot_lora_sweep(out, results)
    forgetting, settings = facts["forgetting"], facts["settings"]
    share = forgetting["mixture_share"]
    text = [
        f"# {facts.get('title', 'Lab: dialogue summarization with a small T5')}", "",
        f"Command: `{facts.get('command', f'llmjax lab summarize --out {out}')}`; machine: {machine(facts)}; "
        f"the whole lab took {facts['lab_seconds']:.0f} s "
        f"(pre-training {facts['pretrain_seconds']:.0f} s, 0 when reused; pre-training, the prompted rows and "
        f"full fine-tuning {facts['first_rows_seconds']:.0f} s).", "",
        f"Model: T5 v1.1-style, d_model={settings['d_model']}, {settings['num_layers']}+{settings['num_layers']} "
        f"layers, {facts['total_params']:,} parameters, pre-trained {settings['pretrain_steps']} steps of span "
        f"corruption on the bundled corpus; fine-tuned {settings['sft_steps']} steps of "
        f"{settings['sft_batch_size']} packed rows. Test split: {len(examples)} examples, 3 references each.", "",
        "## Results", "",
        "ROUGE F-measures against all references (best per example) unless marked; BLEU on 0-100.", "",
        results_table(results), "",
        "## Forgetting", "",
        "Span-corruption cross-entropy per target token on held-out corpus documents (the pre-training "
        "objective), lower is better:", "",
        "| model | held-out pre-training loss |", "|---|---:|",
        f"| pre-trained, before SFT | {forgetting['before_sft']:.4f} |",
        f"| after SFT on DialogSum only (`full_ft`) | {forgetting['after_sft']:.4f} |",
        *([f"| after SFT with {share:.0%} span corruption in the mixture (`full_ft_mixed`) | "
           f"{forgetting['after_mixed_sft']:.4f} |"] if forgetting["after_mixed_sft"] is not None else []), "",
        *adapter_section(results, facts, sweep),
        *(instruction_base_section(results, facts["instruction_base"], forgetting["before_sft"])
          if "instruction_base" in facts else []),
        *(detox_section(results, facts, detox_png) if "detox" in facts else []),
        *(distill_section(results, facts["distill"]) if "distill" in facts else []),
        *int8_section(results),
        f"## Examples (first {min(EXAMPLES_SHOWN, len(examples))} test dialogues)", "",
        examples_table(examples, outputs), "",
        "## Curves", "", *[f"![{p.stem}]({p.name})" for p in pngs], "",
    ]
    (out / "report.md").write_text("\n".join(text), encoding="utf-8")


def write_detox_outputs(out: Path, outputs: dict, results: dict, facts: dict) -> None:
    """What ``llmjax lab summarize --detox-only`` writes: the rows' predictions, ``results.json``, ``detox.png`` and
    a ``report.md`` with the detox section."""
    from llmjax.lab.detox_report import detox_section, plot_detox

    predictions = out / "predictions"
    predictions.mkdir(parents=True, exist_ok=True)
    for row, result in outputs.items():
        write_predictions(predictions / f"{row}.jsonl", result)
    (out / "results.json").write_text(json.dumps({**results, "_lab": facts}, indent=2) + "\n", encoding="utf-8")
    png = plot_detox(out, results)
    text = ["# Lab: detoxification of a small T5 summarizer", "",
            f"Command: `{facts.get('command', f'llmjax lab summarize --out {out} --detox-only')}` "
            f"(after `llmjax lab summarize --out {out}`); "
            f"machine: {machine(facts)}; "
            f"{facts['lab_seconds']:.0f} s.", "", *detox_section(results, facts, png)]
    (out / "report.md").write_text("\n".join(text), encoding="utf-8")
