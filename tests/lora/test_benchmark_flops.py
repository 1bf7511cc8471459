"""The LoRA benchmark's matmul-FLOP floor (``benchmarks/lora_train.py``), against a count done by hand.

The benchmark prints it beside the measured step-time ratio, so a wrong count would misstate how far
from the floor the measurement is."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from llmjax.models import step_flops

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from lora_train import matmul_flops_ratio  # noqa: E402
from train_throughput import decoder_workload, t5_workload  # noqa: E402


def test_decoder_floor_is_the_hand_count():
    # 8 layers of q, k, v, o (512 x 512 each) and a SwiGLU MLP (3 x 512 x 1536); an untied 512 x 32000 head;
    # 4 x 256 tokens; r=8 on q_proj and v_proj: 8 layers x 2 x 8 x (512 + 512) adapter parameters.
    layers, head, tokens = 8 * (4 * 512 * 512 + 3 * 512 * 1536), 512 * 32000, 4 * 256
    attention = 12 * 8 * 512 * 256 * tokens
    adapters = 8 * 2 * 8 * (512 + 512)
    full = 6 * (layers + head) * tokens + attention
    lora = 4 * (layers + head) * tokens + attention + 6 * adapters * tokens
    assert adapters == 131_072
    assert matmul_flops_ratio(decoder_workload(4, 256), adapters) == pytest.approx(lora / full, rel=1e-12)
    assert lora / full == pytest.approx(0.6848, abs=1e-4)


def test_t5_floor_counts_the_adapters_at_the_encoder_length():
    work = t5_workload(4, 512, 114)
    without = matmul_flops_ratio(work, 0)
    # 6 FLOPs per adapter parameter and token, at the longer (encoder) sequence
    total = step_flops(work.config, 4, 114, 512).total
    assert matmul_flops_ratio(work, 1000) - without == pytest.approx(6 * 1000 * 4 * 512 / total, rel=1e-9)
    assert 2 / 3 < without < 1
