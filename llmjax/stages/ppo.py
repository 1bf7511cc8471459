"""PPO from a fine-tuned model against a reward model (``stage: ppo``): the course's RLHF step.

The stage is data + loss + trainable filter + init source, like SFT; what is new is the rollout the loop
runs before each step (``Stage.rollout``) and the several updates per step (``Stage.epochs`` /
``Stage.minibatches``):

* data:      the prompts of ``data.tasks``' train split (the text before each response, as SFT's ROUGE
             sample phrases them), ``train.batch_size`` per rollout, encoded to ``ppo.prompt_length`` tokens
* rollout:   sample a response per prompt from the current policy (``ppo.max_new_tokens``, temperature,
             top-k/p; the key depends on the seed and the step only) on the training mesh, the prompts' rows
             over its data axes and the policy as the step left it, score it with ``ppo.reward_model``,
             then ``llmjax.rl.ppo.experience`` (KL-penalised rewards, GAE, whitening); the adaptive KL
             coefficient rides in the data state, so a resume continues it exactly
* loss:      ``llmjax.rl.ppo.ppo_loss_fn``; ``ppo.epochs`` x ``ppo.minibatches`` updates per rollout
* tree:      the init model's params, ``heads["value"]`` (a fresh value head on the policy) and, for full
             fine-tuning, ``reference``: a frozen copy of the init params (never saved: a resume rebuilds it
             from the base). With a ``lora:`` section the adapters and the value head train and the
             reference is the base with adapters off (``llmjax.stages.adapters``): no second copy.
* metrics:   every logged step: reward, kl, kl_coef, non_score_reward, entropy, response_length,
             explained_variance (rollout), and policy_loss, value_loss, clipfrac, approx_kl, vf_clipfrac
             (updates)
* export:    the policy as a Hugging Face directory with the tokenizer (under LoRA merged, plus the PEFT
             adapter); the value head and the reference are not part of it.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from llmjax import sharding
from llmjax.config import ConfigError, RunConfig, dump_config
from llmjax.data.rows import RowBatches
from llmjax.loading import HEADS_KEY, LoadedModel, REFERENCE_KEY
from llmjax.models import build_model
from llmjax.models.heads import VALUE, head_width, init_head
from llmjax.rl import ppo
from llmjax.rl.reward import RewardModel, reward_scores
from llmjax.rl.rollout import PromptData, RewardInputs, rollout_key, sample_responses, sampling_config
from llmjax.rl.sequences import encode_prompts
from llmjax.stages.adapters import with_run_adapters
from llmjax.stages.init_source import base_of, init_tokenizer, resolve_init, run_trainable_filter
from llmjax.stages.pretrain import check_vocab
from llmjax.stages.sft import task_prompts
from llmjax.train.loop import Stage
from llmjax.train.state import model_init_tree

KL_COEF_STATE = "kl_coef"



def build_stage(config: RunConfig, loaded: LoadedModel | None = None) -> Stage:
    """The PPO stage of ``config`` (``loaded``: its ``init_from`` already read by ``resolve_init``)."""
    cfg = config.ppo

    def make_experience(model, tree, batch, scores, data):
        kl_coef = data.extra[KL_COEF_STATE]
        features, stats = jax.device_get(ppo.experience(model, cfg, tree, batch, scores, np.float32(kl_coef)))
        stats = {name: float(value) for name, value in stats.items()}
        stats[KL_COEF_STATE] = kl_coef
        data.extra[KL_COEF_STATE] = ppo.next_kl_coef(cfg, kl_coef, stats["kl"], len(batch["response_ids"]))
        return {k: np.asarray(features[k]) for k in ppo.EXPERIENCE_FEATURES}, stats

    return rollout_stage(config, loaded, loss_fn=ppo.ppo_loss_fn, make_experience=make_experience,
                         value_head=True, copies=1, data_state={KL_COEF_STATE: cfg.kl_coef})


def rollout_stage(config: RunConfig, loaded: LoadedModel | None, *, loss_fn, make_experience, value_head: bool,
                  copies: int, data_state: dict | None = None) -> Stage:
    """The Stage of a rollout method (PPO, GRPO) from its section ``config.<stage>``.

    ``loss_fn(model, cfg) -> LossFn``; ``make_experience(model, host tree, batch, scores, data) -> (host
    features, {name: float})`` turns sampled, scored responses into the step's batch; ``value_head``: the
    tree gains ``heads["value"]``; ``copies``: responses sampled per prompt (rows of one prompt consecutive);
    ``data_state``: what the method keeps between rollouts (saved with the data position).
    """
    if loaded is None:
        config, loaded = resolve_init(config)
    check_rl_run(config, loaded)
    cfg, tc = getattr(config, config.stage), config.train
    tokenizer, tokenizer_dir = init_tokenizer(config, loaded)
    check_vocab(tokenizer, config.model)
    model = build_model(config.model)
    reward = RewardModel.load(cfg.reward_model)
    reward_inputs = RewardInputs(reward, model, tokenizer, cfg.reward_sees_prompt)
    data = PromptData(prompt_batches(config, model, tokenizer, cfg.prompt_length), **(data_state or {}))
    generation = sampling_config(model, tokenizer, cfg, copies)
    rows = tc.batch_size * copies
    if rows % cfg.minibatches:
        raise ConfigError(f"{rows} responses per rollout (train.batch_size x {copies}) do not split into "
                          f"{config.stage}.minibatches={cfg.minibatches}; pick sizes that divide")
    reward_params = jax.device_put(reward.params)

    @jax.jit
    def score(batch):
        return reward_scores(reward.model, reward_params, reward.head, reward.config, batch,
                             probability=cfg.reward_score == "probability")

    def rollout(tree, prompts: dict, step: int):
        # Sharded like training: the policy is sampled where its parameters live (the training mesh the loop
        # makes current, as the step left them: no host copy), with the prompts' rows split over the mesh's
        # data axes as a training batch is; the experience then reads the same sharded tree.
        mesh = jax.sharding.get_mesh()
        policy = {k: v for k, v in tree.items() if k not in (HEADS_KEY, REFERENCE_KEY)}
        placed = prompts if mesh.empty else sharding.shard_batch(prompts, mesh)
        response_ids, response_mask = sample_responses(model, policy, placed["prompt_ids"], placed["prompt_mask"],
                                                       rollout_key(tc.seed, step), generation)
        repeated = {name: np.repeat(value, copies, axis=0) for name, value in prompts.items()}
        batch = {**repeated, "response_ids": response_ids, "response_mask": response_mask}
        scores = jax.device_get(score(reward_inputs.batch(batch)))  # host, as the rest of the batch
        return make_experience(model, tree, batch, scores, data)

    base_tree = model_init_tree(model)
    full = config.lora is None

    def init_tree(key, base):
        params = base_tree(key, base)
        tree = dict(params)
        if value_head:
            tree[HEADS_KEY] = {VALUE: init_head(jax.random.fold_in(key, 1), head_width(model), 1)}
        if full:  # the frozen reference: a copy of the init params (under LoRA, the base itself)
            tree[REFERENCE_KEY] = jax.tree_util.tree_map(lambda x: x, params)
        return tree

    user_filter = run_trainable_filter(config)
    output_dir = Path(tc.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        dump_config(config, output_dir / "config.yaml")
    stage = Stage(
        name=config.stage, model=model, loss_fn=loss_fn(model, cfg), train_data=data, base=base_of(loaded),
        init_tree=init_tree, is_trainable=lambda path: path[0] != REFERENCE_KEY and user_filter(path),
        rollout=rollout, epochs=cfg.epochs, minibatches=cfg.minibatches, tokenizer=tokenizer,
        meta={"tokenizer_dir": str(tokenizer_dir), "reward_model": str(Path(cfg.reward_model).absolute())},
    )
    return with_run_adapters(config, stage)


def check_rl_run(config: RunConfig, loaded: LoadedModel | None) -> None:
    """What every rollout stage (PPO, GRPO) needs: a model to start from, instruction prompts, one process."""
    if loaded is None:
        raise ConfigError(f"stage: {config.stage} tunes a trained model: set init_from to the SFT run (or its export)")
    if config.data.objective != "instruction":
        raise ConfigError(f"stage: {config.stage} samples responses to instruction prompts: set "
                          "data.objective=instruction and data.tasks (e.g. [dialogsum])")
    if jax.process_count() > 1:
        raise ConfigError(f"stage: {config.stage} runs its rollouts in one process for now; launch it on one host "
                          "(any number of local devices)")
    if config.lora is not None and config.lora.lora_dropout:
        raise ConfigError(f"stage: {config.stage} compares rollout and update probabilities, which dropout would "
                          "make differ; set lora.lora_dropout=0")


def prompt_batches(config: RunConfig, model, tokenizer, prompt_length: int) -> RowBatches:
    """The train split's prompts of ``data.tasks``, ``train.batch_size`` at a time, encoded for ``model``
    (every prompt is checked against ``prompt_length`` here, before the run writes anything)."""
    prompts, _ = task_prompts(config, "train")
    encode_prompts(model, tokenizer, prompts, prompt_length)  # a prompt over budget fails now, not mid-run

    def to_arrays(rows):
        ids, mask = encode_prompts(model, tokenizer, rows, prompt_length, bucket=True)
        return {"prompt_ids": ids, "prompt_mask": mask}

    return RowBatches(prompts, to_arrays, batch_size=config.train.batch_size, seed=config.train.seed,
                      name=f"the prompts of data.tasks={list(config.data.tasks)}")
