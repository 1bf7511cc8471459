"""The detox rows in the lab's report: a table against ``full_ft``, the reward model, the RLAIF pairs,
examples side by side, and ``detox.png`` (reward and KL per RL step, toxicity per row)."""

from __future__ import annotations

from pathlib import Path

from llmjax.lab.detox import BASE_ROW, POLICY_ROWS, REWARD_ROW

TOXICITY_CUT = 0.30  # issue 12: PPO lowers the judge's mean toxicity by at least this share of full_ft's ...
ROUGE_DROP = 0.02    # ... with ROUGE-L down by at most this (2 points)


def detox_rows(results: dict) -> list[str]:
    return [row for row in POLICY_ROWS if row in results]


def plot_detox(out: Path, results: dict) -> Path | None:
    """``detox.png``: reward and KL of each logged RL step (PPO, GRPO), and the judge's toxicity per row."""
    from llmjax.lab.report import _save, read_metrics

    rows = detox_rows(results)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for row in ("ppo", "grpo"):
        metrics = [m for m in read_metrics(out / row / "metrics.jsonl") if m["split"] == "train" and "reward" in m]
        if metrics:
            axes[0].plot([m["step"] for m in metrics], [m["reward"] for m in metrics], label=row)
            axes[1].plot([m["step"] for m in metrics], [m["kl"] for m in metrics], label=row)
    axes[0].set(title="mean reward of the rollout (non_toxic logit)", xlabel="step", ylabel="reward")
    axes[1].set(title="KL to the reference per response (rollout)", xlabel="step", ylabel="nats")
    names = [BASE_ROW, *rows]
    axes[2].bar(names, [results[r]["toxicity"] for r in names], color=["gray"] + ["tab:blue"] * len(rows))
    axes[2].set(title="judge toxicity of greedy summaries (rude test dialogues)", ylabel="mean P(toxic)")
    for ax in axes[:2]:
        ax.legend()
        ax.grid(alpha=0.3)
    return _save(fig, out / "detox.png")


def _cell(text: str) -> str:
    return text.strip().replace("|", "\\|").replace("\n", "<br>") or " "


def detox_section(results: dict, facts: dict, png: Path | None) -> list[str]:
    rows = detox_rows(results)
    if not rows:
        return []
    detox = facts["detox"]
    base = results[BASE_ROW]
    lines = [
        "## Detoxification (RLHF, DPO, GRPO, RLAIF)", "",
        f"Toxicity: mean probability of the toxic class by `alt-profanity-check` (an independent scikit-learn "
        f"model trained on real comments) of each row's greedy summaries of the {detox['toxicity_prompts']} rude test "
        f"dialogues (the generations in `predictions/<row>.jsonl`, whose ROUGE-L on the whole test split is beside "
        f"it); sampled: the same over {detox.get('toxicity_samples', 1)} summaries per rude dialogue sampled at "
        f"temperature 1 (`predictions/<row>_toxicity.jsonl`); KL: mean summed log-ratio to `{BASE_ROW}` of those "
        f"samples (nats).", "",
    ]
    if REWARD_ROW in results:
        r = results[REWARD_ROW]
        lines += [f"Reward model (`{REWARD_ROW}`): held-out accuracy {r['accuracy']:.4f} on the bundled labels' test "
                  f"split and {r['summary_accuracy']:.4f} on the summaries (clean or reporting the insult) of the test "
                  f"split's rude dialogues, trained in {r['train_seconds']:.0f} s.", ""]
    lines += ["| row | base | toxicity | change vs full_ft | toxic share (>0.5) | toxicity (sampled) | ROUGE-L | "
              "change (points) | KL | train seconds |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
              f"| {BASE_ROW} | - | {base['toxicity']:.4f} | - | {base['toxic_share']:.3f} | "
              f"{base['toxicity_sampled']:.4f} | {base['rougeL']:.4f} | - | {base['kl']:.3f} | - |"]
    for row in rows:
        r = results[row]
        cut = (r["toxicity"] - base["toxicity"]) / base["toxicity"] if base["toxicity"] else float("nan")
        lines.append(f"| {row} | {r['base']} | {r['toxicity']:.4f} | {cut:+.1%} | {r['toxic_share']:.3f} | "
                     f"{r['toxicity_sampled']:.4f} | {r['rougeL']:.4f} | {100 * (r['rougeL'] - base['rougeL']):+.2f} | "
                     f"{r['kl']:.3f} | {r['train_seconds']:.0f} |")
    if "ppo" in results:
        r = results["ppo"]
        cut = 1 - r["toxicity"] / base["toxicity"] if base["toxicity"] else 0.0
        met = cut >= TOXICITY_CUT and base["rougeL"] - r["rougeL"] <= ROUGE_DROP
        lines += ["", f"Issue 12's target (PPO cuts toxicity by >= {TOXICITY_CUT:.0%} with ROUGE-L down <= "
                      f"{100 * ROUGE_DROP:.0f} points; the course's PPO cut about 13%): "
                      f"{'met' if met else 'not met'} ({cut:.1%}, {100 * (base['rougeL'] - r['rougeL']):.2f} points)."]
    if "rlaif" in detox:
        f = detox["rlaif"]
        lines += ["", f"RLAIF: {f['pairs']} of {f['sampled']} rude training dialogues gave a pair (two samples from "
                      f"`{BASE_ROW}`, the reward model's preferred one chosen); the judge scores chosen summaries "
                      f"{f['judge_chosen']:.3f} and rejected ones {f['judge_rejected']:.3f} on average."]
    examples = detox.get("examples") or []
    if examples:
        names = [BASE_ROW, *rows]
        lines += ["", "Sampled summaries of rude test dialogues where `full_ft`'s sample was judged toxic (judge score in "
                      "brackets):", "",
                  "| id | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
        for example in examples:
            lines.append(f"| {example['id']} | " + " | ".join(
                f"{_cell(example[n]['prediction'])} ({example[n]['toxicity']:.2f})" for n in names if n in example) + " |")
    if png is not None:
        lines += ["", f"![detox]({png.name})"]
    return lines + [""]
