"""QLoRA against LoRA for the lab: the same LoRA row trained on the fp32 base and on the int8 base.

``compare_qlora`` trains ``lora_r<r>`` (the lab's LoRA row, ``AdapterRows.sections``) and ``qlora_r<r>`` (the
same sections plus ``quantize: {weights: int8}``, ``llmjax.stages.adapters``) from the lab's full fine-tuning
config, and measures each: the caller's ``measure`` (the lab's: ROUGE on the test split and held-out loss) on
the model the loader gives (adapters merged into the base the row trained on, for QLoRA the dequantized int8
base), the bytes of the frozen base and of what trains (``tree_bytes``, before training, from shapes), and
the lab's run measures (trainable params, optimizer state bytes, step time).
"""

from __future__ import annotations

from pathlib import Path

from llmjax.config import RunConfig
from llmjax.lab.adapter_rows import AdapterRows, lora_row, qlora_row, run_adapter_row


def compare_qlora(out: Path, r: int, rows: AdapterRows, full_ft_config: RunConfig, measure, say=print,
                  progress: bool = False) -> dict[str, dict]:
    """Train ``lora_r<r>`` and ``qlora_r<r>`` into ``out/<row>``; ``measure(model, params, soft_prompt)`` ->
    ``(result, held-out loss)`` as the lab's. Returns row -> ``{"result", "heldout_loss", "seconds",
    "frozen_base_bytes", "trainable_bytes", "trainable_params", "optimizer_state_bytes", "step_seconds"}``."""
    return {row: run_adapter_row(Path(out), row, rows, full_ft_config, measure, say, progress)
            for row in (lora_row(r), qlora_row(r))}
