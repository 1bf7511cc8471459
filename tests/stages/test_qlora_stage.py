"""A LoRA run with ``quantize:`` (QLoRA-style, ``llmjax.stages.adapters``): the frozen base is int8 in the tree,
step 0 is the int8 model's loss, adapters train and resume from adapters-only checkpoints, the frozen base takes
about a quarter of the bytes, and the loader merges the adapters into the dequantized base."""

import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llmjax import lora, quantize
from llmjax.config import ConfigError
from llmjax.loading import load_model, open_manager, read_checkpoint_params
from llmjax.stages import run_stage, stage_module
from llmjax.stages.adapters import tree_bytes
from tests.stages.test_lora_stage import LORA, base_dir  # noqa: F401  (base_dir is a fixture)
from tests.stages.test_sft import _bitwise_equal, _metrics, _sft

QUANTIZE = ["quantize.weights=int8"]
STEPS = 4


@pytest.fixture(scope="module")
def qlora_run(base_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("qlora") / "run"
    summary = run_stage(_sft(base_dir, out, *LORA, *QUANTIZE, f"train.steps={STEPS}", "optim.learning_rate=1e-2",
                             f"train.rouge_every_steps={STEPS}", "train.rouge_examples=2"), progress=False)
    return out, summary


def test_step0_loss_is_the_int8_models_and_training_lowers_it(base_dir, qlora_run, tmp_path):  # noqa: F811
    out, summary = qlora_run
    stage = stage_module("sft").build_stage(_sft(base_dir, tmp_path / "full"))  # no lora: the fp32 base alone
    qmodel, qparams = quantize.quantize(stage.model, stage.base.params, "int8")
    batch = next(stage.train_data)
    _, int8_sums = jax.jit(stage.loss_for(qmodel))(qparams, batch, None)
    _, fp32_sums = jax.jit(stage.loss_fn)(stage.base.params, batch, None)
    int8_loss, fp32_loss = (float(s["loss"] / s["weights"]) for s in (int8_sums, fp32_sums))
    losses = [r["loss"] for r in _metrics(out) if r["split"] == "train"]
    assert abs(losses[0] - int8_loss) <= 1e-5, (losses[0], int8_loss, fp32_loss)
    assert abs(int8_loss - fp32_loss) > 1e-6  # the run did read the int8 weights, which round the fp32 ones
    assert len(losses) == STEPS and losses[-1] < losses[0], losses
    assert 0.0 <= summary["generate"]["rougeL"] <= 1.0  # the ROUGE hook ran on the dequantized merged model


def test_checkpoints_hold_adapters_only_and_resume_bitwise(base_dir, qlora_run, tmp_path):  # noqa: F811
    out, _ = qlora_run
    manager = open_manager(out / "checkpoints", read_only=True)
    saved = manager.item_metadata(STEPS)["state"]
    meta = manager.restore(STEPS, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    manager.close()
    assert not saved.get("frozen_params") and set(saved["params"]) == {"lora"}
    assert meta["quantize"] == {"weights": "int8"} and meta["lora"]["r"] == 4

    # Stop at step 2, resume to 4: the adapters equal the uninterrupted run's bitwise.
    shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
    shutil.rmtree(tmp_path / "checkpoints" / str(STEPS))
    resumed = run_stage(_sft(base_dir, tmp_path / "run", *LORA, *QUANTIZE, f"train.steps={STEPS}",
                             "optim.learning_rate=1e-2", f"checkpoint.dir={tmp_path / 'checkpoints'}"), progress=False)
    assert resumed["start_step"] == 2 and resumed["step"] == STEPS
    (_, a, _), (_, b, _) = (read_checkpoint_params(d) for d in (out / "checkpoints", tmp_path / "checkpoints"))
    assert _bitwise_equal(a["lora"], b["lora"])

    # The loader merges the adapters into the base as the run saw it: int8, dequantized.
    cfg = lora.LoraConfig(r=4, lora_alpha=8, target_modules=("q", "v"))
    base = load_model(base_dir)
    expected = lora.merge(quantize.round_trip(base.model, base.params), a["lora"], cfg)
    merged = load_model(out).params
    for x, y in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(x, np.asarray(y), atol=1e-6)


def test_frozen_base_bytes_about_a_quarter_of_lora(base_dir, tmp_path):  # noqa: F811
    build = stage_module("sft").build_stage
    plain = tree_bytes(build(_sft(base_dir, tmp_path / "lora", *LORA)))
    int8 = tree_bytes(build(_sft(base_dir, tmp_path / "qlora", *LORA, *QUANTIZE)))
    assert int8["trainable_bytes"] == plain["trainable_bytes"]  # the same fp32 adapters
    # d_model 32: fp32 scales, norms and position tables are a larger share than in real models
    assert 3.0 < plain["frozen_bytes"] / int8["frozen_bytes"] < 4.0, (plain, int8)


def test_config_errors(base_dir, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="add a lora: section"):
        _sft(base_dir, tmp_path / "x", *QUANTIZE)
    with pytest.raises(ConfigError, match="int4"):
        _sft(base_dir, tmp_path / "x", *LORA, "quantize.weights=int4")
    qdir = tmp_path / "int8"
    loaded = load_model(base_dir)
    quantize.save(*quantize.quantize(loaded.model, loaded.params), qdir,
                  tokenizer_files=[base_dir / "spiece.model"])
    with pytest.raises(ConfigError, match="is a quantized model .* training starts from float weights"):
        stage_module("sft").build_stage(_sft(qdir, tmp_path / "y", *LORA))
    with pytest.raises(ConfigError, match="training needs float weights"):
        _sft(base_dir, tmp_path / "z", "model.family=t5", "model.quantization=int8")


@pytest.mark.slow  # two SFT runs (~70 s on the shared 2-core CPU under load)
def test_lab_compare_qlora_measures_both_rows(base_dir, tmp_path):  # noqa: F811
    from llmjax.lab.adapter_rows import AdapterRows
    from llmjax.lab.qlora import compare_qlora

    full_ft = _sft(base_dir, tmp_path / "full_ft", "train.steps=2")
    seen = []

    def measure(model, params, soft_prompt):  # the lab's measure scores ROUGE; here: which model it got
        seen.append(model.config.quantization)
        return "result", 1.0

    entries = compare_qlora(tmp_path, 4, AdapterRows(lora_target_modules=("q", "v")), full_ft, measure,
                            say=lambda message: None)
    assert set(entries) == {"lora_r4", "qlora_r4"} and seen == [None, None]  # both merged into a float model
    lora_entry, qlora_entry = entries["lora_r4"], entries["qlora_r4"]
    assert lora_entry["trainable_params"] == qlora_entry["trainable_params"] > 0
    assert 3.0 < lora_entry["frozen_base_bytes"] / qlora_entry["frozen_base_bytes"] < 4.0


def test_dora_on_the_int8_base_starts_at_the_int8_models_loss(base_dir, tmp_path):  # noqa: F811
    """QLoRA with DoRA: the magnitudes start as the norms of the dequantized int8 kernels, so step 0 is the int8
    model's loss (as without DoRA), and the loader merges into the dequantized base."""
    out = tmp_path / "run"
    run_stage(_sft(base_dir, out, *LORA, *QUANTIZE, "lora.use_dora=true", "train.steps=2",
                   "optim.learning_rate=1e-2"), progress=False)
    stage = stage_module("sft").build_stage(_sft(base_dir, tmp_path / "full"))
    qmodel, qparams = quantize.quantize(stage.model, stage.base.params, "int8")
    _, sums = jax.jit(stage.loss_for(qmodel))(qparams, next(stage.train_data), None)
    losses = [r["loss"] for r in _metrics(out) if r["split"] == "train"]
    assert abs(losses[0] - float(sums["loss"] / sums["weights"])) <= 1e-5, losses
    adapters = read_checkpoint_params(out / "checkpoints")[1]["lora"]
    cfg = lora.LoraConfig(r=4, lora_alpha=8, target_modules=("q", "v"), use_dora=True)
    base = load_model(base_dir)
    expected = lora.merge(quantize.round_trip(base.model, base.params), adapters, cfg)
    for x, y in zip(jax.tree_util.tree_leaves(load_model(out).params), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(x, np.asarray(y), atol=1e-6)
