"""The pre-training stage from the bundled default config: loss falls, outputs exist, the export loads in transformers."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from llmjax.config import DEFAULT_CONFIG_PATH, load_config
from llmjax.data.tokenizer import Tokenizer
from llmjax.models import build_model
from llmjax.stages import run_stage
from llmjax.stages.pretrain import build_stage
from llmjax.train.checkpoint import Checkpointer
from tests.train.helpers import tensorboard_scalars

REPO = Path(__file__).resolve().parents[2]
SHARDED = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]  # tests see 8 fake devices


def _read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_llmjax_train_with_no_arguments_uses_every_device_pretrains_and_exports(tmp_path):
    """The quickstart, exactly: ``llmjax train`` with no config and no overrides, here on 8 devices."""
    import torch
    import transformers

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    assert "xla_force_host_platform_device_count=8" in env["XLA_FLAGS"]  # tests/conftest.py
    result = subprocess.run([sys.executable, "-m", "llmjax.cli", "train"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    out = tmp_path / "runs" / "pretrain_t5_tiny"
    assert summary["start_step"] == 0 and summary["step"] == 300
    assert summary["export"] == str(out / "hf")  # train.export_hf is relative to train.output_dir
    assert yaml.safe_load((out / "config.yaml").read_text())["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}

    losses = [m["loss"] for m in _read_metrics(out) if m["split"] == "train"]
    assert len(losses) == 15 and losses[-1] < losses[0] - 1.0, losses
    evals = [m for m in _read_metrics(out) if m["split"] == "eval"]
    assert [m["step"] for m in evals] == [100, 200, 300] and evals[2]["loss"] < evals[0]["loss"]
    assert summary["eval_loss"] == pytest.approx(evals[2]["loss"])
    assert Checkpointer(out / "checkpoints").all_steps() == [200, 300]  # checkpoint.keep: 2
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "tokenizer" / "spiece.model").is_file()
    # config.yaml is the resolved config: the default's defaults and includes, the mesh filled in for 8 devices.
    default = load_config()
    assert load_config(out / "config.yaml") == dataclasses.replace(default, mesh=default.mesh.resolve(8))
    # TensorBoard holds the scalars the README names, at the logged steps, with the values of metrics.jsonl.
    scalars = tensorboard_scalars(out / "tensorboard")
    logged = [m for m in _read_metrics(out) if m["split"] == "train"]
    for name in ("loss", "learning_rate", "grad_norm", "tokens_per_sec", "mfu"):
        expected = [(m["step"], m[name]) for m in logged if name in m]
        assert len(expected) >= 10, name
        steps, values = zip(*scalars[f"train/{name}"])
        assert list(steps) == [step for step, _ in expected], name
        np.testing.assert_allclose(values, [value for _, value in expected], rtol=1e-6, err_msg=name)
    assert [step for step, _ in scalars["eval/loss"]] == [100, 200, 300]

    # The exported directory: transformers gives our logits, and its tokenizer our ids.
    hf_model = transformers.AutoModelForSeq2SeqLM.from_pretrained(summary["export"])
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(summary["export"])
    tokenizer = Tokenizer.load(out / "tokenizer")
    text = "Anna walked to the bakery in Paris."
    assert hf_tokenizer(text).input_ids == tokenizer.encode(text)
    model = build_model(load_config().model)
    params = Checkpointer(out / "checkpoints").restore_params().state
    ids = np.array([tokenizer.encode(text)], np.int32)
    decoder_ids = np.array([[0, 5, 9, 14]], np.int32)
    ours = model.apply({"params": params}, ids, decoder_ids)
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.tensor(ids, dtype=torch.long),
                          decoder_input_ids=torch.tensor(decoder_ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


@pytest.mark.slow
def test_decoder_pretrains_with_causal_lm(tmp_path):
    out = tmp_path / "run"
    config = load_config(DEFAULT_CONFIG_PATH, [
        "model.include=model/decoder_tiny.yaml", "data.objective=causal_lm", "data.decoder_length=64",
        "train.steps=30", f"train.output_dir={out}", "train.log_every_steps=10", "train.eval_every_steps=0",
        "checkpoint.every_steps=30", *SHARDED,
    ])
    summary = run_stage(config, progress=False)
    losses = [m["loss"] for m in _read_metrics(out)]
    assert summary["step"] == 30 and losses[-1] < losses[0] - 1.0, losses
    assert summary["export"] == str(out / "hf")  # the default config's export_hf follows train.output_dir
    assert Checkpointer(out / "checkpoints").restore_params().meta["family"] == "decoder"


def test_bad_configs_give_clear_errors(tmp_path):
    base = [f"train.output_dir={tmp_path}", *SHARDED]
    with pytest.raises(ValueError, match="data.objective='causal_lm' does not pre-train a t5 model; use 'span_corruption'"):
        build_stage(load_config(DEFAULT_CONFIG_PATH, [*base, "data.objective=causal_lm"]))
    with pytest.raises(ValueError, match=r"makes targets of \d+ tokens but data.decoder_length=8; set data.decoder_length >= \d+"):
        build_stage(load_config(DEFAULT_CONFIG_PATH, [*base, "data.decoder_length=8"]))
    with pytest.raises(ValueError, match="data.source='nope' is not a bundled dataset"):
        build_stage(load_config(DEFAULT_CONFIG_PATH, [*base, "data.source=nope"]))


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    from llmjax.data.bundled.corpus import generate_corpus
    from llmjax.data.tokenizer import train_tokenizer

    train_tokenizer(generate_corpus(2000, 0), tmp_path / "tok", vocab_size=600)
    config = load_config(DEFAULT_CONFIG_PATH, [f"train.output_dir={tmp_path}", f"data.tokenizer={tmp_path / 'tok'}", *SHARDED])
    with pytest.raises(ValueError, match="tokenizer has 600 ids but model.vocab_size=512; set model.vocab_size >= 600"):
        build_stage(config)
