"""``stage: reward``: short runs for T5 and the decoder on the bundled detox data (held-out loss and accuracy
logged), the export read back by ``RewardModel.load`` with identical scores, exact resume, LoRA training only the
adapters and the head, and clear errors for bad settings, data and paths."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from llmjax import hf
from llmjax.config import CONFIGS_DIR, ConfigError, load_config
from llmjax.data.bundled import detox
from llmjax.errors import DataError
from llmjax.loading import HEADS_KEY, load_model, read_checkpoint_params
from llmjax.models.heads import SCORE
from llmjax.rl.reward import CONFIG_FILE, HEAD_FILE, NotARewardModelError, RewardModel
from llmjax.stages import run_stage, stage_module
from llmjax.stages.adapters import ADAPTER_SUBDIR
from tests.stages.test_sft import _bitwise_equal, _metrics

REWARD_CONFIG = CONFIGS_DIR / "reward_t5_tiny.yaml"
# Short steps with a constant learning rate (so a run of 2 steps continued to 4 computes what one of 4 does).
QUICK = ["train.batch_size=8", "train.log_every_steps=1", "train.eval_every_steps=0", "optim.warmup_steps=0",
         "optim.schedule=constant", "checkpoint.every_steps=2", "checkpoint.keep=null", "checkpoint.async_save=false",
         "train.export_hf=null"]
PAIRWISE = ["reward.kind=pairwise", "reward.num_labels=1", "data.source=detox_pairs", "reward.prompt_length=512",
            "reward.response_length=192"]
TEXTS = ["Thanks Olivia, the kettle you recommended is great.", "Hey idiot, the router you sold me is stupid crap.",
         "#Person1# calls #Person2# a stupid moron.", "#Person1# loses patience with #Person2#."]
STEPS = 4


def _reward(out, *overrides, init_from=None):
    return load_config(REWARD_CONFIG, ["model={}", *QUICK, f"train.output_dir={out}", f"train.steps={STEPS}",
                                       f"init_from={init_from or 'null'}", *overrides])


@pytest.fixture(scope="module")
def t5_run(pretrained, tmp_path_factory):
    """A 4-step classifier run of the small pre-trained T5 (held-out eval at 2 and 4, export): (run dir, summary)."""
    out = tmp_path_factory.mktemp("reward_t5") / "run"
    summary = run_stage(_reward(out, "train.eval_every_steps=2", "train.eval_steps=2", "train.export_hf=hf",
                                init_from=pretrained), progress=False)
    return out, summary


@pytest.mark.slow
def test_t5_classifier_run_logs_held_out_accuracy_and_exports_what_reward_model_load_reads(t5_run):
    out, summary = t5_run
    rows = _metrics(out)
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4] and all(0.0 <= r["accuracy"] <= 1.0 for r in evals)
    assert all(r["tokens"] == 16 for r in evals)  # eval_steps=2 batches of 8 rows: each row counts once
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == STEPS and all(0.0 <= r["accuracy"] <= 1.0 for r in train)

    export = Path(summary["export"])
    assert (export / "config.json").is_file() and (export / "spiece.model").is_file() and (export / HEAD_FILE).is_file()
    saved = json.loads((export / CONFIG_FILE).read_text())
    assert saved["kind"] == "classifier" and saved["labels"] == list(detox.LABELS) and saved["wanted_label"] == 0

    from_export, from_run = RewardModel.load(export), RewardModel.load(out)
    assert from_run.labels == from_export.labels == tuple(detox.LABELS)
    scores = from_export.score(None, TEXTS, batch_size=3)  # a padded last batch too
    assert scores.dtype == np.float32 and scores.shape == (4,)
    # Same weights; batches of 3 and of 32 compile to different programs, so equal up to float rounding.
    np.testing.assert_allclose(scores, from_run.score(None, TEXTS), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(from_export.head["kernel"], load_model(out).heads[SCORE]["kernel"])
    # The loop's last evaluation read the first 16 validation rows with the step-4 model, as load reads it.
    assert from_run.accuracy(detox.toxicity_labels("validation")[:16], batch_size=8) == evals[-1]["accuracy"]


@pytest.mark.slow
def test_reward_run_resumes_exactly(pretrained, t5_run, tmp_path):
    out, _ = t5_run
    run_stage(_reward(tmp_path / "split", "train.steps=2", init_from=pretrained), progress=False)
    resumed = run_stage(_reward(tmp_path / "split", init_from=pretrained), progress=False)
    assert resumed["start_step"] == 2 and resumed["step"] == STEPS
    whole, split = load_model(out), load_model(tmp_path / "split")
    assert _bitwise_equal(whole.params, split.params) and _bitwise_equal(whole.heads, split.heads)


@pytest.mark.slow
def test_decoder_pairwise_run_from_random_init(pretrained, tmp_path):
    out = tmp_path / "decoder"
    config = _reward(out, *PAIRWISE, "model.include=model/decoder_tiny.yaml", "model.hidden_size=32",
                     "model.intermediate_size=64", "model.num_hidden_layers=1", "model.max_position_embeddings=1024",
                     f"data.tokenizer={pretrained / 'tokenizer'}", "train.steps=2", "train.eval_every_steps=2",
                     "train.eval_steps=1")
    summary = run_stage(config, progress=False)
    evals = [r for r in _metrics(out) if r["split"] == "eval"]
    assert summary["step"] == 2 and len(evals) == 1 and 0.0 <= evals[0]["accuracy"] <= 1.0
    assert np.isfinite(evals[0]["loss"])
    model = RewardModel.load(out)
    assert model.config.kind == "pairwise" and model.labels is None
    assert model.accuracy(detox.preference_pairs("validation")[:8]) == evals[0]["accuracy"]  # the eval's 8 pairs


@pytest.mark.slow
def test_lora_reward_run_trains_adapters_and_head_only(pretrained, tmp_path):
    loaded = load_model(pretrained)
    base_dir = tmp_path / "base"
    hf.save_pretrained(loaded.model, loaded.params, base_dir)
    shutil.copy(Path(loaded.tokenizer_dir) / "spiece.model", base_dir)
    out = tmp_path / "lora"
    summary = run_stage(_reward(out, "lora.r=4", "lora.lora_alpha=8", "lora.target_modules=[q, v]",
                                "optim.learning_rate=1e-2", "train.export_hf=hf", init_from=base_dir), progress=False)
    # Checkpoints hold the adapters and the head only; the head moved between steps 2 and 4.
    _, at_2, _ = read_checkpoint_params(out / "checkpoints", 2)
    _, at_4, meta = read_checkpoint_params(out / "checkpoints", STEPS)
    assert set(at_4) == {"lora", HEADS_KEY} and meta["reward"]["kind"] == "classifier"
    assert not np.array_equal(at_2[HEADS_KEY][SCORE]["kernel"], at_4[HEADS_KEY][SCORE]["kernel"])
    # B starts at zero: the adapters trained, but for the queries of attention over the encoder's one token (eos),
    # where a softmax over one key makes the query moot.
    still_zero = sorted("/".join(k.key for k in path[:-1]) for path, leaf in jax.tree_util.tree_leaves_with_path(
        at_4["lora"]) if path[-1].key == "lora_B" and not np.abs(leaf).any())
    assert still_zero == ["decoder/layers/cross_attention/q", "encoder/layers/self_attention/q"]
    # The base directory is bitwise what it was; the export is the merged model, the PEFT adapter and the head.
    assert _bitwise_equal(hf.from_pretrained(base_dir)[1], loaded.params)
    export = Path(summary["export"])
    assert (export / ADAPTER_SUBDIR / "adapter_config.json").is_file() and (export / HEAD_FILE).is_file()
    from_export, from_run = RewardModel.load(export), RewardModel.load(out)
    np.testing.assert_array_equal(from_export.score(None, TEXTS), from_run.score(None, TEXTS))
    assert not _bitwise_equal(from_export.params, loaded.params)  # the adapters are merged in


def test_bad_settings_data_and_paths_are_clear_errors(pretrained, tmp_path):
    build = stage_module("reward").build_stage
    with pytest.raises(ConfigError, match="reward.kind=pairwise scores with one output; set reward.num_labels=1"):
        _reward(tmp_path / "a", "reward.kind=pairwise", init_from=pretrained)
    with pytest.raises(ConfigError, match="data.source=detox_pairs trains a pairwise reward model but "
                                          "reward.kind=classifier; set reward.kind=pairwise"):
        build(_reward(tmp_path / "b", "data.source=detox_pairs", init_from=pretrained))
    with pytest.raises(ConfigError, match=r"the toxicity labels are \['non_toxic', 'toxic'\] but reward.num_labels=3"):
        build(_reward(tmp_path / "c", "reward.num_labels=3", init_from=pretrained))
    with pytest.raises(ConfigError, match="data.source='corpus' is not a bundled reward data set"):
        build(_reward(tmp_path / "d", "data.source=corpus", init_from=pretrained))
    with pytest.raises(ConfigError, match="stage: reward does not train a soft prompt"):
        build(_reward(tmp_path / "e", "prompt_tuning.num_virtual_tokens=4", "data.packing=false", init_from=pretrained))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n")
    with pytest.raises(DataError, match="label"):
        build(_reward(tmp_path / "f", "data.kind=jsonl", f"data.source={bad}", init_from=pretrained))
    with pytest.raises(ConfigError, match="needs held-out rows: set data.eval_source"):
        build(_reward(tmp_path / "g", "data.kind=jsonl", f"data.source={bad}", "train.eval_every_steps=2",
                      init_from=pretrained))
    # Paths that hold no reward model.
    with pytest.raises(NotARewardModelError, match="is not a reward model .*checkpoint of stage 'pretrain'"):
        RewardModel.load(pretrained)
    with pytest.raises(NotARewardModelError, match="is not a reward model .*Hugging Face directory without"):
        RewardModel.load(pretrained / "hf")
    with pytest.raises(NotARewardModelError, match="is not a reward model: model directory .* does not exist"):
        RewardModel.load(tmp_path / "nowhere")


def test_classifier_reaches_95_percent_held_out_accuracy_on_the_bundled_labels(pretrained, tmp_path):
    """The lab's target on a small budget: a 1-layer decoder of width 64 from random init, 60 steps of 32 texts."""
    out = tmp_path / "accuracy"
    run_stage(_reward(out, "model.include=model/decoder_tiny.yaml", "model.num_hidden_layers=1",
                      f"data.tokenizer={pretrained / 'tokenizer'}", "train.steps=60", "train.batch_size=32",
                      "train.eval_every_steps=60", "train.eval_steps=0", "optim.learning_rate=3e-3",
                      "optim.schedule=cosine", "optim.warmup_steps=10", "checkpoint.every_steps=60",
                      "train.log_every_steps=20"), progress=False)
    held_out = [r for r in _metrics(out) if r["split"] == "eval"][-1]
    assert held_out["tokens"] == len(detox.toxicity_labels("validation"))  # the whole split, padding not counted
    assert held_out["accuracy"] >= 0.95, held_out
    assert RewardModel.load(out).accuracy(detox.toxicity_labels("test"), batch_size=64) >= 0.95


def test_lora_dropout_drops_the_adapter_input_and_evaluation_is_the_merged_model(pretrained, tmp_path):
    from llmjax import lora
    from llmjax.loading import model_params
    from llmjax.rl.reward import reward_loss_fn

    config = _reward(tmp_path / "d", "lora.r=4", "lora.lora_alpha=8", "lora.target_modules=[v]", "lora.lora_dropout=0.5",
                     init_from=pretrained)
    stage = stage_module("reward").build_stage(config)
    tree = stage.init_tree(jax.random.key(0), stage.base.params)
    # Nonzero B, so the adapters change the output (they start at zero, which dropout cannot show).
    tree["lora"] = jax.tree_util.tree_map(lambda x: x + 0.5, tree["lora"])
    batch = next(stage.train_data)
    loss = jax.jit(lambda t, r: stage.loss_fn(t, batch, r)[0])
    a, b = float(loss(tree, jax.random.key(1))), float(loss(tree, jax.random.key(2)))
    assert a != b
    # Without an rng (evaluation) the factored loss is the loss of the merged weights.
    merged = {**lora.merge(model_params(tree), tree["lora"], config.lora), HEADS_KEY: tree[HEADS_KEY]}
    expected = float(jax.jit(lambda t: reward_loss_fn(stage.model, config.reward)(t, batch, None)[0])(merged))
    np.testing.assert_allclose(float(loss(tree, None)), expected, rtol=1e-5)
