"""The lab's outputs: ``results.json``, ``predictions/<row>.jsonl``, ``report.md`` and PNG curves.

``results.json`` maps each row name to its scores (ROUGE F-measures in [0, 1] against all references
of an example, the best one counting; corpus BLEU in [0, 100]), ``trainable_params``,
``trainable_fraction`` and ``train_seconds``; the key ``_lab`` holds the run's facts (settings,
forgetting numbers, curves), so one file rescores and replots the run.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

SCORE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu")
RANDOM_SAME_TOPIC = {"first": 0.534, "all": 0.714}  # README: ROUGE-L of a random same-topic training summary
EXAMPLES_SHOWN = 4


def write_predictions(path: Path, result) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for id_, prediction, references in zip(result.ids, result.predictions, result.references):
            f.write(json.dumps({"id": id_, "prediction": prediction, "references": references},
                               ensure_ascii=False) + "\n")


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


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def results_table(results: dict) -> str:
    lines = ["| row | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | BLEU | ROUGE-L (first ref) | trainable params | "
             "trainable fraction | train seconds |", "|---|" + "---:|" * 9]
    for row, r in results.items():
        lines.append(f"| {row} | " + " | ".join(f"{r[k]:.4f}" if k != "bleu" else f"{r[k]:.1f}" for k in SCORE_KEYS)
                     + f" | {r['rougeL_first_ref']:.4f} | {r['trainable_params']:,} | {r['trainable_fraction']:.4f} "
                     f"| {r['train_seconds']:.0f} |")
    lines.append(f"| random same-topic summary (README baseline) | 0.725 | 0.569 | {RANDOM_SAME_TOPIC['all']} | 0.715 "
                 f"| 61.7 | {RANDOM_SAME_TOPIC['first']} | - | - | - |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.strip().replace("|", "\\|").replace("\n", "<br>") or " "


def examples_table(examples: list[dict], outputs: dict) -> str:
    rows = list(outputs)
    lines = ["| id | reference | " + " | ".join(rows) + " |", "|---" * (2 + len(rows)) + "|"]
    for i, example in enumerate(examples[:EXAMPLES_SHOWN]):
        lines.append(f"| {example['id']} | {_cell(example['summary'])} | "
                     + " | ".join(_cell(outputs[row].predictions[i]) for row in rows) + " |")
    return "\n".join(lines)


def write_outputs(out: Path, examples: list[dict], outputs: dict, results: dict, facts: dict) -> None:
    """Write every output of the lab into ``out`` (see the module docstring)."""
    predictions = out / "predictions"
    predictions.mkdir(parents=True, exist_ok=True)
    for row, result in outputs.items():
        write_predictions(predictions / f"{row}.jsonl", result)
    (out / "results.json").write_text(json.dumps({**results, "_lab": facts}, indent=2) + "\n", encoding="utf-8")
    pngs = plot_curves(out, results, facts)
    forgetting, settings = facts["forgetting"], facts["settings"]
    share = forgetting["mixture_share"]
    text = [
        "# Lab: dialogue summarization with a small T5", "",
        f"Command: `llmjax lab summarize --out {out}`; machine: {platform.machine()} {platform.system()}, "
        f"Python {sys.version.split()[0]}; the whole lab took {facts['lab_seconds']:.0f} s "
        f"(pre-training {facts['pretrain_seconds']:.0f} s, 0 when reused).", "",
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
        f"| after SFT with {share:.0%} span corruption in the mixture (`full_ft_mixed`) | "
        f"{forgetting['after_mixed_sft']:.4f} |", "",
        f"## Examples (first {min(EXAMPLES_SHOWN, len(examples))} test dialogues)", "",
        examples_table(examples, outputs), "",
        "## Curves", "", *[f"![{p.stem}]({p.name})" for p in pngs], "",
    ]
    (out / "report.md").write_text("\n".join(text), encoding="utf-8")
