"""The pre-training stage from the bundled default config: loss falls, outputs exist, the export loads in transformers."""

import json

import numpy as np
import pytest
import yaml

from llmjax.config import DEFAULT_CONFIG_PATH, load_config
from llmjax.data.tokenizer import Tokenizer
from llmjax.stages import run_stage
from llmjax.stages.pretrain import build_stage
from llmjax.train.checkpoint import Checkpointer
from tests.train.helpers import tensorboard_scalars

SHARDED = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]  # tests see 8 fake devices


def _read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_default_config_pretrains_t5_and_exports_to_transformers(tmp_path):
    import torch
    import transformers

    out = tmp_path / "run"
    config = load_config(DEFAULT_CONFIG_PATH, [
        "train.steps=60", f"train.output_dir={out}", "train.log_every_steps=10", "train.eval_every_steps=30",
        "data.eval_source=corpus_heldout", "checkpoint.every_steps=30", f"train.export_hf={out / 'hf'}", *SHARDED,
    ])
    summary = run_stage(config, progress=False)

    losses = [m["loss"] for m in _read_metrics(out) if m["split"] == "train"]
    assert len(losses) == 6 and losses[-1] < losses[0] - 1.0, losses
    evals = [m for m in _read_metrics(out) if m["split"] == "eval"]
    assert [m["step"] for m in evals] == [30, 60] and evals[1]["loss"] < evals[0]["loss"]
    assert summary["step"] == 60 and summary["eval_loss"] == pytest.approx(evals[1]["loss"])
    assert Checkpointer(out / "checkpoints").all_steps() == [30, 60]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "tokenizer" / "spiece.model").is_file()
    # config.yaml is the resolved config (defaults, includes and overrides): it loads back to the same run.
    assert load_config(out / "config.yaml") == config
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 60
    # TensorBoard holds the scalars the README names, at the logged steps, with the values of metrics.jsonl.
    scalars = tensorboard_scalars(out / "tensorboard")
    logged = [m for m in _read_metrics(out) if m["split"] == "train"]
    for name in ("loss", "learning_rate", "grad_norm", "tokens_per_sec", "mfu"):
        expected = [(m["step"], m[name]) for m in logged if name in m]
        assert len(expected) >= 5, name
        steps, values = zip(*scalars[f"train/{name}"])
        assert list(steps) == [step for step, _ in expected], name
        np.testing.assert_allclose(values, [value for _, value in expected], rtol=1e-6, err_msg=name)
    assert [step for step, _ in scalars["eval/loss"]] == [30, 60]

    # The exported directory: transformers gives our logits, and its tokenizer our ids.
    hf_model = transformers.AutoModelForSeq2SeqLM.from_pretrained(summary["export"])
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(summary["export"])
    tokenizer = Tokenizer.load(out / "tokenizer")
    text = "Anna walked to the bakery in Paris."
    assert hf_tokenizer(text).input_ids == tokenizer.encode(text)
    stage = build_stage(config)
    params = Checkpointer(out / "checkpoints").restore_params().state
    ids = np.array([tokenizer.encode(text)], np.int32)
    decoder_ids = np.array([[0, 5, 9, 14]], np.int32)
    ours = stage.model.apply({"params": params}, ids, decoder_ids)
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.tensor(ids, dtype=torch.long),
                          decoder_input_ids=torch.tensor(decoder_ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


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
