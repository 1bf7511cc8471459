"""The PPO and GRPO stages: a run for T5 (full fine-tuning) and for a decoder (LoRA, reference = adapters off),
KL 0 at the first step and a reference left bitwise unchanged, the same update on 8 devices as on one for a
fixed rollout, rollouts sampled on the training mesh as on one device, exact resume after SIGKILL (rollout
randomness and the adaptive KL coefficient included)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from llmjax import sharding
from llmjax.config import CONFIGS_DIR, load_config
from llmjax.loading import HEADS_KEY, REFERENCE_KEY, model_params, read_checkpoint_params
from llmjax.stages import run_stage, stage_module
from llmjax.train.optim import make_optimizer
from llmjax.train.state import init_train_state
from llmjax.train.step import compile_step, make_train_step
from tests.stages.test_sft import _bitwise_equal, kill_and_resume

PPO_CONFIG = CONFIGS_DIR / "ppo_t5_tiny.yaml"
REWARD_CONFIG = CONFIGS_DIR / "reward_t5_tiny.yaml"
PPO_QUICK = ["ppo.max_new_tokens=6", "ppo.prompt_length=1024", "ppo.epochs=2", "ppo.minibatches=2",
             "train.batch_size=8", "checkpoint.async_save=false", "train.export_hf=null", "optim.learning_rate=1e-3"]
SMALL_DECODER = ["model.hidden_size=32", "model.intermediate_size=64",
                 "model.num_hidden_layers=1", "model.num_attention_heads=4", "model.num_key_value_heads=2",
                 "model.max_position_embeddings=2048"]


@pytest.fixture(scope="module")
def reward_model(pretrained, tmp_path_factory):
    """A 2-step toxicity classifier on the small T5 (what it scores matters less than that it is one)."""
    out = tmp_path_factory.mktemp("reward") / "run"
    run_stage(load_config(REWARD_CONFIG, [
        "model={}", f"init_from={pretrained}", "train.steps=2", "train.batch_size=8", f"train.output_dir={out}",
        "train.eval_every_steps=0", "optim.warmup_steps=0", "checkpoint.every_steps=2", "train.export_hf=null",
        "reward.response_length=256"]), progress=False)
    return out


@pytest.fixture(scope="module")
def decoder_base(pretrained, tmp_path_factory):
    """A 1-step decoder pre-training run with the small T5's tokenizer (so the T5 reward model reads its tokens)."""
    out = tmp_path_factory.mktemp("decoder") / "run"
    run_stage(load_config(CONFIGS_DIR / "pretrain_decoder_tiny.yaml", [
        *SMALL_DECODER, f"data.tokenizer={pretrained / 'tokenizer'}", "train.steps=1",
        "train.batch_size=8", f"train.output_dir={out}", "train.eval_every_steps=0", "data.decoder_length=64",
        "optim.warmup_steps=0", "checkpoint.every_steps=1", "train.export_hf=null"]), progress=False)
    return out


def _ppo(init_from, reward, out, *overrides, stage="ppo"):
    extra = ([f"ppo.reward_model={reward}"] if stage == "ppo" else
             ["stage=grpo", "ppo=null", f"grpo.reward_model={reward}", "grpo.max_new_tokens=6", "grpo.group_size=2",
              "grpo.prompt_length=1024", "train.batch_size=8", "checkpoint.async_save=false", "train.export_hf=null",
              "optim.learning_rate=1e-3"])
    quick = PPO_QUICK if stage == "ppo" else []
    return load_config(PPO_CONFIG, ["model={}", f"init_from={init_from}", f"train.output_dir={out}", *quick, *extra,
                                    *overrides])


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _steps(stage, config, mesh, count, batches=None):
    """``count`` loop steps by hand (rollout + train step) on ``mesh``; returns the state, the batches and the
    rollout statistics. ``batches``: fixed experience batches to train on instead of rolling out."""
    tx, schedule = make_optimizer(config.optim, config.train.steps * stage.updates_per_step)
    with sharding.activate(mesh):
        state, shardings = init_train_state(stage.model, tx, stage.is_trainable, config.train.seed, mesh,
                                            params=stage.base.params, init_tree=stage.init_tree)
        step_fn = compile_step(make_train_step(stage.loss_fn, tx, learning_rate_fn=schedule, epochs=stage.epochs,
                                               minibatches=stage.minibatches),
                               updates_state=True, state_shardings=shardings,
                               batch_sharding=sharding.batch_sharding(mesh))
        used, stats = [], []
        for step in range(count):
            if batches is None:
                batch, stat = stage.rollout(state.full_params(), next(stage.train_data), step)
            else:
                batch, stat = batches[step], {}
            used.append(batch)
            stats.append(stat)
            state, _ = step_fn(state, sharding.shard_batch(batch, mesh))
        return jax.device_get(state), used, stats


@pytest.mark.slow
def test_ppo_t5_starts_at_kl_0_keeps_its_reference_and_logs_every_metric(pretrained, reward_model, tmp_path):
    config = _ppo(pretrained, reward_model, tmp_path / "out", "train.steps=2")
    stage = stage_module("ppo").build_stage(config)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    state, _, stats = _steps(stage, config, mesh, 2)
    assert stats[0]["kl"] == 0.0  # the policy is its reference at the first rollout
    base = stage.base.params
    assert _bitwise_equal(state.frozen_params[REFERENCE_KEY], base)
    assert not _bitwise_equal(model_params(state.params), base)  # the policy moved
    assert set(state.params[HEADS_KEY]) == {"value"}

    summary = run_stage(config, progress=False)  # the loop: metrics every step, checkpoints without the reference
    rows = [r for r in _metrics(tmp_path / "out") if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["kl"] == 0.0
    for key in ("reward", "kl", "kl_coef", "entropy", "clipfrac", "approx_kl", "value_loss", "explained_variance",
                "response_length", "policy_loss"):
        assert all(np.isfinite(r[key]) for r in rows), key
    _, saved, meta = read_checkpoint_params(Path(summary["checkpoint"]).parent)
    assert REFERENCE_KEY not in saved and HEADS_KEY in saved and meta["stage"] == "ppo"


@pytest.mark.slow
def test_lora_ppo_of_a_decoder_uses_the_base_as_reference_and_trains_adapters_and_value_head(
        decoder_base, reward_model, tmp_path):
    config = _ppo(decoder_base, reward_model, tmp_path / "out", "train.steps=2", "model={}",
                  "lora.r=2", "lora.lora_alpha=4", "lora.target_modules=[q_proj,v_proj]")
    stage = stage_module("ppo").build_stage(config)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    state, _, stats = _steps(stage, config, mesh, 2)
    assert stats[0]["kl"] == 0.0 and stats[1]["kl"] != 0.0
    assert REFERENCE_KEY not in state.frozen_params and REFERENCE_KEY not in state.params  # no second copy
    assert set(state.params) == {"lora", HEADS_KEY}
    assert _bitwise_equal(state.frozen_params, stage.base.params)


@pytest.mark.parametrize("family", ["t5", pytest.param("decoder", marks=pytest.mark.slow)])
def test_a_fixed_rollout_trains_the_same_on_8_devices_as_on_one(family, pretrained, decoder_base, reward_model,
                                                                tmp_path):
    init_from, extra = (pretrained, []) if family == "t5" else (decoder_base, ["model={}"])
    config = _ppo(init_from, reward_model, tmp_path / "out", "train.steps=2", *extra)
    stage = stage_module("ppo").build_stage(config)
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    single, batches, _ = _steps(stage, config, one, 2)
    eight = sharding.make_mesh(2, 2, 2)
    sharded, _, _ = _steps(stage, config, eight, 2, batches=batches)
    for a, b in zip(jax.tree_util.tree_leaves(single.params), jax.tree_util.tree_leaves(sharded.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_rollouts_sample_on_the_training_mesh_and_match_one_device(family, pretrained, decoder_base, reward_model,
                                                                    tmp_path, monkeypatch):
    import llmjax.stages.ppo as ppo_stage

    init_from, extra = (pretrained, []) if family == "t5" else (decoder_base, ["model={}"])
    config = _ppo(init_from, reward_model, tmp_path / "out", "train.steps=1", *extra)
    stage = stage_module("ppo").build_stage(config)
    prompts = next(stage.train_data)
    kl_coef = dict(stage.train_data.extra)
    sampled_on = []

    def recording(model, params, prompt_ids, prompt_mask, key, generation):
        leaf = jax.tree_util.tree_leaves(params)[0]
        sampled_on.append((len(prompt_ids.sharding.device_set), len(leaf.sharding.device_set)))
        return real(model, params, prompt_ids, prompt_mask, key, generation)

    real = ppo_stage.sample_responses
    monkeypatch.setattr(ppo_stage, "sample_responses", recording)
    tx, _ = make_optimizer(config.optim, 1)
    rollouts = []
    for mesh in (sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]), sharding.make_mesh(2, 2, 2)):
        stage.train_data.extra.update(kl_coef)  # each rollout starts from the same controller state
        with sharding.activate(mesh):
            state, _ = init_train_state(stage.model, tx, stage.is_trainable, config.train.seed, mesh,
                                        params=stage.base.params, init_tree=stage.init_tree)
            rollouts.append(stage.rollout(state.full_params(), prompts, 0))
    assert sampled_on == [(1, 1), (8, 8)]  # prompts and policy on the mesh's 8 devices, no host copy
    (one, one_stats), (eight, eight_stats) = rollouts
    np.testing.assert_array_equal(one["response_ids"], eight["response_ids"])
    for name in one:
        np.testing.assert_allclose(one[name], eight[name], atol=1e-5, err_msg=name)
    for name in one_stats:
        np.testing.assert_allclose(one_stats[name], eight_stats[name], atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_grpo_runs_groups_without_a_value_head(pretrained, reward_model, tmp_path):
    out = tmp_path / "grpo"
    summary = run_stage(_ppo(pretrained, reward_model, out, "train.steps=2", stage="grpo"), progress=False)
    rows = [r for r in _metrics(out) if r["split"] == "train"]
    assert summary["step"] == 2 and rows[0]["kl"] == 0.0
    assert all(np.isfinite(r["reward_std"]) and np.isfinite(r["clipfrac"]) for r in rows)
    _, saved, _ = read_checkpoint_params(out / "checkpoints")
    assert HEADS_KEY not in saved and REFERENCE_KEY not in saved


def test_ppo_config_errors(pretrained, reward_model, tmp_path):
    from llmjax.config import ConfigError
    from llmjax.rl.reward import NotARewardModelError

    with pytest.raises(NotARewardModelError):
        stage_module("ppo").build_stage(_ppo(pretrained, pretrained, tmp_path / "a"))
    with pytest.raises(ConfigError, match="init_from"):
        stage_module("ppo").build_stage(_ppo(pretrained, reward_model, tmp_path / "b", "init_from=null",
                                             "model.family=t5"))
    with pytest.raises(ConfigError, match="minibatches"):
        stage_module("ppo").build_stage(_ppo(pretrained, reward_model, tmp_path / "c", "ppo.minibatches=3"))


@pytest.mark.slow
def test_sigkill_during_ppo_then_resume_gives_bitwise_equal_params(pretrained, reward_model, tmp_path):
    overrides = ["model={}", f"init_from={pretrained}", f"ppo.reward_model={reward_model}", *PPO_QUICK,
                 "optim.learning_rate=1e-3"]
    kill_after = kill_and_resume(tmp_path, overrides, steps=8, every=2, config=PPO_CONFIG)
    (_, a, _), (_, b, _) = (read_checkpoint_params(tmp_path / run / "checkpoints") for run in ("whole", "killed"))
    assert _bitwise_equal(a, b), f"killed after checkpoint {kill_after}"
    kl = [[r["kl_coef"] for r in _metrics(tmp_path / run) if r["split"] == "train"] for run in ("whole", "killed")]
    assert kl[0][-1] == kl[1][-1] and kl[0][-1] != kl[0][0]  # the controller moved and resumed exactly
