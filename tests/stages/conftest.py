"""Fixtures shared by the stage tests."""

import pytest

from llmjax.config import DEFAULT_CONFIG_PATH, load_config
from llmjax.stages import run_stage
from tests.stages.test_sft import SMALL_T5


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """A 2-step pre-training run of the small T5 (its run dir: checkpoints, tokenizer, HF export)."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    run_stage(load_config(DEFAULT_CONFIG_PATH, [
        *SMALL_T5, "train.steps=2", "train.batch_size=8", f"train.output_dir={out}", "train.eval_every_steps=0",
        "data.encoder_length=64", "data.decoder_length=16", "optim.warmup_steps=0", "checkpoint.every_steps=2",
    ]), progress=False)
    return out
