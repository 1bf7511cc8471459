"""Direct preference optimisation (``stage: dpo``, Rafailov et al. 2023): the policy learns from
``(prompt, chosen, rejected)`` pairs against a frozen reference, with no reward model and no sampling.

The stage is data + loss + tree + export; the shared loop does the rest:

* data:      preference pairs ``{"prompt", "chosen", "rejected"}``: ``data.kind: bundled`` with
             ``data.source: detox_pairs`` (the detox lab's pairs, ``llmjax.data.bundled.detox``; train split, and
             the validation split as held-out pairs), or ``data.kind: jsonl`` with ``data.source`` (training) and
             ``data.eval_source`` (held-out) files. Prompts are phrased with the summarization instruction the
             SFT model was trained with, and the rows are encoded once, before the run starts, by the reward
             stage's pairwise encoding (``llmjax.rl.reward.pairwise_batch``: ``prompt_ids``/``prompt_mask``
             ``[B, P]``, ``chosen_*``/``rejected_*`` ``[B, T]``, ``weight`` ``[B]``), so a malformed row or a
             text over ``dpo.prompt_length``/``response_length`` fails at once. Batches are whole rows
             (``llmjax.data.rows.RowBatches``: seeded, exactly resumable); a held-out batch is padded with
             rows of weight 0.
* loss:      ``dpo_loss`` (``llmjax.rl.losses``) of the sequence log-prob sums of the chosen and rejected
             responses under the policy and under the reference (``dpo.beta``); summed over pairs, with
             ``accuracy`` (implicit chosen reward above the rejected one), ``chosen_reward``,
             ``rejected_reward`` and ``margin`` (their difference) beside it: the loop logs their means per
             pair, on training batches and (``train.eval_every_steps``) on the held-out pairs, split ``eval``.
* tree:      full fine-tuning: the model's params plus ``{REFERENCE_KEY: a copy of the initial params}``
             (``llmjax.loading.REFERENCE_KEY``), built by ``init_tree``. The copy never trains, so a run with
             ``init_from`` leaves it out of its checkpoints like any frozen part of the base and a resume
             rebuilds it from the base; a run from random weights checkpoints it with the rest.
             ``train.trainable``/``frozen`` choose among the model's params. With a ``lora:`` section the
             adapters alone train and the reference is the model with adapters off (``llmjax.stages.adapters``):
             the base's own arrays, no copy.
* export:    the model (under LoRA: merged) as a Hugging Face directory with the tokenizer beside it (and the
             PEFT adapter in ``adapter/`` under LoRA); nothing of the reference.

The policy's forward pass uses the model's dropout as configured (``model.dropout_rate``; TRL turns it off by
default, which a run gets with ``model.dropout_rate: 0``); the reference's is always deterministic.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from llmjax.config import ConfigError, DataConfig, RunConfig, dump_config
from llmjax.data.rows import train_and_eval_rows
from llmjax.loading import REFERENCE_KEY, LoadedModel, model_params
from llmjax.models import build_model
from llmjax.rl.losses import dpo_loss, masked_sum, token_logprobs
from llmjax.rl.reward import check_rows, pair_prompt, pairwise_batch
from llmjax.rl.sequences import response_outputs
from llmjax.stages.init_source import base_of, init_tokenizer, resolve_init, run_trainable_filter
from llmjax.stages.pretrain import check_vocab
from llmjax.train.loop import Stage
from llmjax.train.state import model_init_tree

TRAIN_SPLIT, EVAL_SPLIT = "train", "validation"
BUNDLED_PAIRS = "detox_pairs"



def build_stage(config: RunConfig, loaded: LoadedModel | None = None) -> Stage:
    """The DPO stage of ``config``. ``loaded``: its ``init_from`` already read by ``resolve_init`` (``config``
    then resolved too); None: read it here."""
    from llmjax.stages.adapters import with_run_adapters

    if loaded is None:
        config, loaded = resolve_init(config)
    cfg, tc = config.dpo, config.train
    if config.prompt_tuning is not None:
        raise ConfigError("stage: dpo does not train a soft prompt; drop the prompt_tuning section "
                          "(use lora: or full fine-tuning)")
    tokenizer, tokenizer_dir = init_tokenizer(config, loaded)
    check_vocab(tokenizer, config.model)
    model = build_model(config.model)

    train_rows, eval_rows = preference_rows(config.data, need_eval=bool(tc.eval_every_steps))
    train_batch = pairs_batch(model, tokenizer, train_rows, cfg, f"{config.data.source} (training pairs)")
    eval_batch = None if eval_rows is None else pairs_batch(
        model, tokenizer, eval_rows, cfg, f"{config.data.eval_source or EVAL_SPLIT} (held-out pairs)")
    train_data, eval_data = train_and_eval_rows(train_batch, eval_batch, batch_size=tc.batch_size, seed=tc.seed,
                                                process_index=jax.process_index(),
                                                process_count=jax.process_count(), name="preference pairs")

    output_dir = Path(tc.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        dump_config(config, output_dir / "config.yaml")
    trainable = run_trainable_filter(config)
    stage = Stage(
        name="dpo", model=model, loss_fn=dpo_loss_fn(model, cfg.beta), train_data=train_data, eval_data=eval_data,
        base=base_of(loaded),
        # Under LoRA the reference is the base with adapters off: no copy in the tree.
        init_tree=None if config.lora is not None else with_reference(model_init_tree(model)),
        is_trainable=lambda path: path[0] != REFERENCE_KEY and trainable(path),
        tokenizer=tokenizer, meta={"tokenizer_dir": str(tokenizer_dir), "dpo": dataclasses.asdict(cfg)},
    )
    # Export: the loop's (the model's own params, no reference), or with_lora's (merged model and adapter).
    return with_run_adapters(config, stage)


def preference_rows(dc: DataConfig, *, need_eval: bool) -> tuple[list[dict], list[dict] | None]:
    """``(training pairs, held-out pairs or None)`` of the run's data section (module docstring)."""
    from llmjax.data.bundled import detox

    if dc.kind == "bundled":
        if dc.source != BUNDLED_PAIRS:
            raise ConfigError(f"data.source={dc.source!r} is not a bundled preference-pair set; stage: dpo reads "
                              f"data.source: {BUNDLED_PAIRS} (or data.kind: jsonl with a file of pairs)")
        return detox.preference_pairs(TRAIN_SPLIT), detox.preference_pairs(EVAL_SPLIT) if need_eval else None
    if dc.kind == "jsonl":
        if need_eval and not dc.eval_source:
            raise ConfigError("train.eval_every_steps > 0 needs held-out pairs: set data.eval_source to a jsonl file "
                              "(or train.eval_every_steps=0)")
        return detox.load_pairs(dc.source), detox.load_pairs(dc.eval_source) if need_eval else None
    raise ConfigError(f"data.kind={dc.kind!r}: stage: dpo reads data.kind bundled (data.source: {BUNDLED_PAIRS}) "
                      "or jsonl (data.source and data.eval_source files of prompt/chosen/rejected rows)")


def pairs_batch(model, tokenizer, rows: list[dict], cfg, where: str) -> dict:
    """Checked pairs -> one batch of all of them, prompts phrased as the policy reads them (the reward stage's
    encoding; ``cfg``: ``prompt_length`` and ``response_length``)."""
    check_rows(rows, "pairwise", where)
    return pairwise_batch(model, tokenizer, [pair_prompt(r["prompt"]) for r in rows], [r["chosen"] for r in rows],
                          [r["rejected"] for r in rows], cfg, where=f"{where}:")


def with_reference(model_tree):
    """``init_tree`` of full-fine-tuning DPO: ``(key, boxed base or None) -> {**params, REFERENCE_KEY: copy}``.
    The copy is a distinct array per leaf (same logical axes, so the same sharding), so donating the trained
    params in a step never touches the reference."""

    def init_tree(key, base):
        params = model_tree(key, base)
        return {**params, REFERENCE_KEY: jax.tree_util.tree_map(jnp.copy, params)}

    return init_tree


def sequence_logprobs(model, params: dict, batch: dict, *, rng=None) -> tuple[jax.Array, jax.Array]:
    """``(chosen [B], rejected [B])`` fp32: the summed log-probabilities of each response's tokens (eos included)
    after its prompt; both responses in one model call of ``2B`` rows."""
    both = {
        "prompt_ids": jnp.concatenate([batch["prompt_ids"]] * 2),
        "prompt_mask": jnp.concatenate([batch["prompt_mask"]] * 2),
        "response_ids": jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]]),
        "response_mask": jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]]),
    }
    logits, _ = response_outputs(model, params, both, rng=rng)
    sums = masked_sum(token_logprobs(logits, both["response_ids"]), both["response_mask"], axis=1)
    return jnp.split(sums, 2)


def dpo_loss_fn(model, beta: float):
    """The stage's ``LossFn`` (``llmjax.train.step``) on a tree of model params plus ``REFERENCE_KEY``: sums over
    the pairs of ``weight`` (module docstring); ``weights`` = the pairs that count."""

    def loss_fn(tree, batch, rng):
        reference = jax.lax.stop_gradient(tree[REFERENCE_KEY])
        policy_chosen, policy_rejected = sequence_logprobs(model, model_params(tree), batch, rng=rng)
        ref_chosen, ref_rejected = sequence_logprobs(model, reference, batch)
        losses, chosen_reward, rejected_reward = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                          beta)
        weight = batch["weight"].astype(jnp.float32)
        loss = jnp.sum(losses * weight)
        return loss, {
            "loss": loss, "accuracy": jnp.sum((chosen_reward > rejected_reward) * weight),
            "chosen_reward": jnp.sum(chosen_reward * weight), "rejected_reward": jnp.sum(rejected_reward * weight),
            "margin": jnp.sum((chosen_reward - rejected_reward) * weight), "weights": jnp.sum(weight),
        }

    return loss_fn

