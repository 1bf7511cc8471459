"""QLoRA against LoRA for the lab: the same LoRA row trained on the fp32 base and on the int8 base.

``compare_qlora`` trains ``lora_r<r>`` (the lab's LoRA row, ``AdapterRows.sections``) and ``qlora_r<r>`` (the
same sections plus ``quantize: {weights: int8}``, ``llmjax.stages.adapters``) from the lab's full fine-tuning
config, and measures each: the caller's ``measure`` (the lab's: ROUGE on the test split and held-out loss) on
the model the loader gives (adapters merged into the base the row trained on, for QLoRA the dequantized int8
base), the bytes of the frozen base and of what trains (``tree_bytes``, before training, from shapes), and
the lab's run measures (trainable params, optimizer state bytes, step time).
"""

from __future__ import annotations

import time
from pathlib import Path

from llmjax.config import RunConfig
from llmjax.lab.adapter_rows import AdapterRows, lora_row, row_config, run_measures
from llmjax.loading import load_model
from llmjax.stages.adapters import tree_bytes
from llmjax.stages.sft import build_stage as build_sft_stage
from llmjax.train.loop import train

QUANTIZE_SECTION = {"quantize": {"weights": "int8"}}


def qlora_row(r: int) -> str:
    return f"q{lora_row(r)}"


def compare_qlora(out: Path, r: int, rows: AdapterRows, full_ft_config: RunConfig, measure, say=print,
                  progress: bool = False) -> dict[str, dict]:
    """Train ``lora_r<r>`` and ``qlora_r<r>`` into ``out/<row>``; ``measure(model, params, soft_prompt)`` ->
    ``(result, held-out loss)`` as the lab's. Returns row -> ``{"result", "heldout_loss", "seconds",
    "frozen_base_bytes", "trainable_bytes", "trainable_params", "optimizer_state_bytes", "step_seconds"}``."""
    entries = {}
    for row, extra in ((lora_row(r), {}), (qlora_row(r), QUANTIZE_SECTION)):
        run_dir = Path(out) / row
        config = row_config(full_ft_config, {**rows.sections(lora_row(r)), **extra}, run_dir)
        stage = build_sft_stage(config)
        memory = tree_bytes(stage)
        say(f"{row}: training LoRA r={r} on the {'int8' if extra else 'fp32'} base for {config.train.steps} steps "
            f"(frozen base {memory['frozen_bytes'] / 2**20:.1f} MiB)")
        start = time.perf_counter()
        train(stage, config, progress=progress)
        seconds = time.perf_counter() - start
        loaded = load_model(run_dir)
        result, held_out = measure(loaded.model, loaded.params, loaded.soft_prompt)
        entries[row] = {"result": result, "heldout_loss": held_out, "seconds": seconds,
                        "frozen_base_bytes": memory["frozen_bytes"], "trainable_bytes": memory["trainable_bytes"],
                        **run_measures(run_dir)}
    return entries
