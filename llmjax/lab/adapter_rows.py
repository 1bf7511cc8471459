"""The lab's parameter-efficient rows: ``lora_r<r>`` for each rank of a sweep, and ``prompt_tuning``.

Each row is the lab's full fine-tuning run (``summarize.sft_config``: same task, steps, batch, warmup and
schedule, from the same pre-trained model) with one section added, so the SFT stage trains only
what the section adds (``llmjax.stages.adapters``):

* ``lora_r<r>``: ``lora: {r, lora_alpha: 2r, target_modules: [q, v]}``. ``lora_alpha = 2r`` keeps the scale
  ``lora_alpha / r`` at 2 for every rank, so the sweep varies the rank alone (PEFT's course lab used r=32,
  alpha=32, i.e. scale 1, at one rank only). Learning rate 3e-3: the adapters start at B = 0 and need a
  larger step than full fine-tuning (the course: 1e-3 for LoRA against 1e-5 for full fine-tuning).
* ``qlora_r<r>``: the ``lora_r<r>`` row with ``quantize: {weights: int8}``: the frozen base is kept int8 and
  dequantized on the fly (QLoRA-style); its entry adds ``frozen_base_bytes`` like every adapter row.
* ``prompt_tuning``: 20 virtual tokens initialised from the embeddings of the course's instruction
  ("Summarize the following conversation.", the prompt the test split is generated with), learning rate
  3e-2 as PEFT's prompt-tuning examples use; unpacked rows (the soft prompt goes before each row's one example).

A row's entry has the lab's fields plus ``optimizer_state_bytes`` (the optimizer state the run checkpointed,
summed over its leaves' shapes and dtypes), ``step_seconds`` (median of the loop's logged ``step_time_ms``)
and ``heldout_loss`` (the pre-training objective's held-out loss of the trained model: forgetting).
``trainable_fraction`` is PEFT's ``trainable%``: trainable / (base parameters + trainable).
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from llmjax.config import RunConfig, config_from_dict, config_to_dict
from llmjax.errors import UserError
from llmjax.evaluate import load_model_for_inference
from llmjax.lab import report
from llmjax.loading import complete_steps, load_model, open_manager
from llmjax.stages import run_stage
from llmjax.stages.adapters import tree_bytes
from llmjax.stages.sft import build_stage as build_sft_stage
from llmjax.train.loop import train

PROMPT_TUNING_ROW = "prompt_tuning"
QUANTIZE_SECTION = {"quantize": {"weights": "int8"}}  # a qlora_r<r> row: the frozen base stays int8


@dataclasses.dataclass(frozen=True)
class AdapterRows:
    """Which parameter-efficient rows the lab runs, and their settings (see the module docstring)."""

    lora_ranks: tuple[int, ...] = (1, 4, 8, 16, 32)
    qlora_ranks: tuple[int, ...] = (4,)  # qlora_r<r>: the same LoRA row over the int8 base (issue 13's QLoRA row)
    lora_alpha_per_rank: float = 2.0   # lora_alpha = 2 r: the scale lora_alpha / r is 2 at every rank
    lora_target_modules: tuple[str, ...] = ("q", "v")
    lora_learning_rate: float = 3e-3
    prompt_tuning: bool = True
    num_virtual_tokens: int = 20
    prompt_tuning_init_text: str = "Summarize the following conversation."
    prompt_learning_rate: float = 3e-2

    @classmethod
    def tiny(cls) -> "AdapterRows":
        """The test's rows: one rank, a short soft prompt."""
        return cls(lora_ranks=(1,), qlora_ranks=(1,), num_virtual_tokens=4)

    def row_names(self) -> list[str]:
        return ([lora_row(r) for r in self.lora_ranks] + [qlora_row(r) for r in self.qlora_ranks]
                + ([PROMPT_TUNING_ROW] if self.prompt_tuning else []))

    def sections(self, row: str) -> dict:
        """The run-config sections row ``row`` adds to (or changes in) the full fine-tuning config."""
        if row == PROMPT_TUNING_ROW:
            return {"prompt_tuning": {"num_virtual_tokens": self.num_virtual_tokens, "prompt_tuning_init": "TEXT",
                                      "prompt_tuning_init_text": self.prompt_tuning_init_text},
                    "data": {"packing": False}, "optim": {"learning_rate": self.prompt_learning_rate}}
        r = lora_rank(row)
        return {"lora": {"r": r, "lora_alpha": self.lora_alpha_per_rank * r,
                         "target_modules": list(self.lora_target_modules)},
                "optim": {"learning_rate": self.lora_learning_rate},
                **(QUANTIZE_SECTION if row.startswith("q") else {})}

    def row_settings(self, row: str) -> dict:
        """The settings row ``row``'s results entry records: its section's keys and its learning rate."""
        sections = self.sections(row)
        return {**(sections.get("lora") or sections["prompt_tuning"]), "learning_rate": sections["optim"]["learning_rate"]}


def lora_row(r: int) -> str:
    return f"lora_r{r}"


def qlora_row(r: int) -> str:
    """The LoRA row of rank ``r`` trained on the int8 base (QLoRA-style: ``quantize: {weights: int8}``)."""
    return f"q{lora_row(r)}"


def lora_rank(row: str) -> int:
    return int(row.removeprefix("q").removeprefix("lora_r"))


def parse_ranks(text: str) -> tuple[int, ...]:
    """``"1,4,8"`` -> ``(1, 4, 8)``; ``""`` or ``"none"``: no LoRA rows."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        ranks = tuple(int(part) for part in text.split(","))
    except ValueError:
        ranks = ()
    if not ranks or any(r < 1 for r in ranks):
        raise UserError(f"--lora-ranks {text!r} is not a comma-separated list of positive integers "
                        "(e.g. 1,4,8,16,32; 'none' for no LoRA rows)")
    return tuple(dict.fromkeys(ranks))


def row_config(full_ft_config: RunConfig, sections: dict, run_dir: Path) -> RunConfig:
    """``full_ft_config`` with ``sections`` merged in (one level deep) and its output in ``run_dir``."""
    raw = config_to_dict(full_ft_config)
    for name, values in sections.items():
        raw[name] = {**(raw.get(name) or {}), **values}
    raw["train"]["output_dir"] = str(run_dir)
    return config_from_dict(raw)


def run_measures(run_dir: Path) -> dict:
    """``trainable_params`` and ``optimizer_state_bytes`` of the run's last checkpoint (what it trained and the
    optimizer state it kept, read from the saved shapes and dtypes), and ``step_seconds``, the median of the
    ``step_time_ms`` the loop logged to ``metrics.jsonl`` (compilation, evals and saves excluded by the loop)."""
    directory = run_dir / "checkpoints"
    manager = open_manager(directory, read_only=True)
    try:
        state = manager.item_metadata(max(complete_steps(directory, manager.all_steps())))["state"]
    finally:
        manager.close()
    trainable = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(state["params"]))
    opt_bytes = sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
                    for leaf in jax.tree_util.tree_leaves(state["opt_state"]))
    times = [r["step_time_ms"] for r in report.read_metrics(run_dir / "metrics.jsonl")
             if r["split"] == "train" and "step_time_ms" in r]
    return {"trainable_params": trainable, "optimizer_state_bytes": opt_bytes,
            "step_seconds": round(statistics.median(times) / 1000, 4) if times else None}


class LabInterrupted(UserError):
    """A signal (SIGTERM, Ctrl-C) stopped one of the lab's training runs: the lab stops with it."""


def trained_to_end(summary: dict, config: RunConfig) -> dict:
    """``summary`` (``llmjax.train.loop.train``'s) of a run that reached ``train.steps``. The loop answers SIGTERM or
    Ctrl-C by saving a checkpoint and returning early; the lab must then stop, not score a half-trained row."""
    if summary.get("interrupted"):
        raise LabInterrupted(
            f"{summary['interrupted']} stopped the run in {config.train.output_dir} at step {summary['step']} of "
            f"{config.train.steps}; the lab stops here. Run the same command again: a finished pre-training is "
            "reused (an unfinished one resumes) and every other row trains again")
    return summary


def train_and_score(config: RunConfig, evaluate_row, progress: bool):
    """Run ``config``'s stage into a fresh ``train.output_dir`` (a row always reruns) and score what it trained
    with ``evaluate_row(model, params) -> EvalResult``: ``(model, params, result, train seconds)``."""
    run_dir = Path(config.train.output_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    trained_to_end(run_stage(config, progress=progress), config)
    seconds = time.perf_counter() - start
    model, params, _ = load_model_for_inference(run_dir)
    return model, params, evaluate_row(model, params), seconds


def run_adapter_row(out: Path, row: str, rows: AdapterRows, full_ft_config: RunConfig, measure, say,
                    progress: bool) -> dict:
    """Train row ``row`` into ``out/row`` and measure it: ``measure(model, params, soft_prompt)`` gives
    ``(test EvalResult, held-out loss)``. Returns ``{"result", "seconds", "heldout_loss", **run_measures}``."""
    run_dir = out / row
    shutil.rmtree(run_dir, ignore_errors=True)  # a row always reruns; only the pre-training is reused
    config = row_config(full_ft_config, rows.sections(row), run_dir)
    what = (f"LoRA r={config.lora.r}, lora_alpha={config.lora.lora_alpha:g} on {', '.join(config.lora.target_modules)}"
            + (" over the int8 base" if config.quantize else "")
            if config.lora else f"{config.prompt_tuning.num_virtual_tokens} virtual tokens")
    say(f"{row}: training {what} for {config.train.steps} steps at learning rate {config.optim.learning_rate:g}")
    stage = build_sft_stage(config)
    memory = tree_bytes(stage)  # from shapes: the frozen base (int8 for qlora rows) and what trains
    start = time.perf_counter()
    trained_to_end(train(stage, config, progress=progress), config)
    seconds = time.perf_counter() - start
    say(f"{row}: generating the test summaries")
    loaded = load_model(run_dir)  # a LoRA run's adapters merged in; a prompt-tuning run's soft prompt beside
    result, held_out = measure(loaded.model, loaded.params, loaded.soft_prompt)
    return {"result": result, "seconds": seconds, "heldout_loss": held_out, "frozen_base_bytes": memory["frozen_bytes"],
            "trainable_bytes": memory["trainable_bytes"], **run_measures(run_dir)}
