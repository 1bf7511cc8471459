"""Reward-model training (``stage: reward``): a model plus a ``score`` head, from ``init_from`` or random.

The stage is data + loss + tree + export; the shared loop does the rest (``llmjax.rl.reward`` holds the
batches, the loss and the reader of a trained reward model):

* data:      ``reward.kind: classifier`` reads labelled texts ``{"text", "label"}``, ``pairwise`` preference
             pairs ``{"prompt", "chosen", "rejected"}``: ``data.kind: bundled`` with ``data.source: detox_labels``
             / ``detox_pairs`` (the detox lab's data, ``llmjax.data.bundled.detox``; train split, and the
             validation split as held-out data), or ``data.kind: jsonl`` with ``data.source`` (training) and
             ``data.eval_source`` (held-out) files. Every text is encoded before the run starts, so a row
             that is malformed or over ``reward.prompt_length``/``response_length`` fails at once. Batches are
             whole rows (``llmjax.data.rows.RowBatches``: seeded, exactly resumable).
* loss:      cross-entropy of the head's ``num_labels`` logits (classifier), or Bradley-Terry on the chosen and
             rejected scores (pairwise); ``accuracy`` beside it. With ``train.eval_every_steps`` the loop logs
             the held-out loss and accuracy (split ``eval``); an evaluation batch is padded with rows of weight 0.
* tree:      the model's params plus ``{HEADS_KEY: {"score": head}}`` (``init_head``, built in ``init_tree``, so a
             resume restores it exactly); full fine-tuning trains everything (``train.trainable``/``frozen``
             choose among the model's params; the head always trains), a ``lora:`` section the adapters and
             the head (``llmjax.stages.adapters``; ``lora_dropout`` works: the loss is rebuilt on the model that
             computes the adapters factored).
* export:    the model as a Hugging Face directory with the tokenizer beside it (under LoRA: the merged model
             and the PEFT adapter in ``adapter/``), plus ``reward_head.safetensors`` and ``reward_config.json``;
             ``llmjax.rl.reward.RewardModel.load`` reads it, the run directory or a checkpoint.
* meta:      ``meta["reward"]`` (the reward config, label names, prompt template) and ``tokenizer_dir``.
"""

from __future__ import annotations

from pathlib import Path

import jax

from llmjax.config import ConfigError, DataConfig, RunConfig, dump_config
from llmjax.data.rows import train_and_eval_rows
from llmjax.loading import HEADS_KEY, LoadedModel, model_params
from llmjax.models import build_model
from llmjax.models.heads import SCORE, head_width, init_head
from llmjax.rl.reward import reward_loss_fn, reward_meta, rows_batch, save_head
from llmjax.rl_configs import RewardConfig
from llmjax.stages.init_source import base_of, init_tokenizer, resolve_init, run_trainable_filter
from llmjax.stages.pretrain import check_vocab
from llmjax.train.loop import Stage
from llmjax.train.state import model_init_tree

TRAIN_SPLIT, EVAL_SPLIT = "train", "validation"
BUNDLED = {"detox_labels": "classifier", "detox_pairs": "pairwise"}  # bundled source -> the reward kind it trains



def build_stage(config: RunConfig, loaded: LoadedModel | None = None) -> Stage:
    """The reward stage of ``config``. ``loaded``: its ``init_from`` already read by ``resolve_init``
    (``config`` then resolved too); None: read it here."""
    from llmjax.stages.adapters import with_run_adapters

    if loaded is None:
        config, loaded = resolve_init(config)
    cfg, tc = config.reward, config.train
    if config.prompt_tuning is not None:
        raise ConfigError("stage: reward does not train a soft prompt; drop the prompt_tuning section "
                          "(use lora: or full fine-tuning)")
    tokenizer, tokenizer_dir = init_tokenizer(config, loaded)
    check_vocab(tokenizer, config.model)
    model = build_model(config.model)

    train_rows, eval_rows, labels = reward_rows(config.data, cfg, need_eval=bool(tc.eval_every_steps))
    train_batch = rows_batch(model, tokenizer, train_rows, cfg, labels, f"{config.data.source} (training rows)")
    eval_batch = None if eval_rows is None else rows_batch(
        model, tokenizer, eval_rows, cfg, labels, f"{config.data.eval_source or EVAL_SPLIT} (held-out rows)")
    train_data, eval_data = train_and_eval_rows(train_batch, eval_batch, batch_size=tc.batch_size, seed=tc.seed,
                                                process_index=jax.process_index(),
                                                process_count=jax.process_count(), name="reward data")

    output_dir = Path(tc.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        dump_config(config, output_dir / "config.yaml")
    meta = reward_meta(cfg, labels)
    trainable = run_trainable_filter(config)
    stage = Stage(
        name="reward", model=model, loss_fn=reward_loss_fn(model, cfg), loss_for=lambda m: reward_loss_fn(m, cfg),
        train_data=train_data, eval_data=eval_data, base=base_of(loaded), init_tree=_init_tree(model, cfg),
        is_trainable=lambda path: path[0] == HEADS_KEY or trainable(path),  # a new head has nothing to start from
        tokenizer=tokenizer, meta={"tokenizer_dir": str(tokenizer_dir), "reward": meta},
    )
    stage = with_run_adapters(config, stage)
    stage.export = _exporter(stage, meta)
    return stage


def reward_rows(dc: DataConfig, cfg: RewardConfig, *, need_eval: bool) -> tuple[list, list | None, tuple | None]:
    """``(training rows, held-out rows or None, label names or None)`` of the run's data section."""
    from llmjax.data.bundled import detox

    labels = tuple(detox.LABELS) if cfg.kind == "classifier" else None  # the detox readers' labels, also of JSONL
    if labels is not None and len(labels) != cfg.num_labels:
        raise ConfigError(f"the toxicity labels are {list(labels)} but reward.num_labels={cfg.num_labels}; set "
                          f"reward.num_labels={len(labels)}")
    if dc.kind == "bundled":
        if dc.source not in BUNDLED:
            raise ConfigError(f"data.source={dc.source!r} is not a bundled reward data set; stage: reward reads "
                              f"{sorted(BUNDLED)} (or data.kind: jsonl with a file)")
        if BUNDLED[dc.source] != cfg.kind:
            raise ConfigError(f"data.source={dc.source} trains a {BUNDLED[dc.source]} reward model but reward.kind="
                              f"{cfg.kind}; set reward.kind={BUNDLED[dc.source]} (pairwise also needs "
                              "reward.num_labels=1) or use the other data set")
        read = detox.toxicity_labels if cfg.kind == "classifier" else detox.preference_pairs
        return read(TRAIN_SPLIT), read(EVAL_SPLIT) if need_eval else None, labels
    if dc.kind == "jsonl":
        read = detox.load_labels if cfg.kind == "classifier" else detox.load_pairs
        if need_eval and not dc.eval_source:
            raise ConfigError("train.eval_every_steps > 0 needs held-out rows: set data.eval_source to a jsonl file "
                              "(or train.eval_every_steps=0)")
        return read(dc.source), read(dc.eval_source) if need_eval else None, labels
    raise ConfigError(f"data.kind={dc.kind!r}: stage: reward reads data.kind bundled (data.source "
                      f"{sorted(BUNDLED)}) or jsonl (data.source and data.eval_source files)")


def _init_tree(model, cfg: RewardConfig):
    """``(key, boxed base or None) -> {**model params, HEADS_KEY: {"score": head}}``."""
    model_tree = model_init_tree(model)
    width = head_width(model)

    def init_tree(key, base):
        model_key, head_key = jax.random.split(key)
        return {**model_tree(model_key, base), HEADS_KEY: {SCORE: init_head(head_key, width, cfg.num_labels)}}

    return init_tree


def _exporter(stage: Stage, meta: dict):
    """``export(state, out)``: the stage's model export (the adapters' under LoRA, else the model's params as a
    Hugging Face directory with the tokenizer), then the head and the reward config beside it."""
    model_export = stage.export

    def export(state, out: Path) -> str:
        from llmjax import hf

        out = Path(out)
        tree = jax.device_get(state.full_params())
        if model_export is not None:
            model_export(state, out)
        elif jax.process_index() == 0:
            hf.save_pretrained(stage.model, model_params(tree), out)
            stage.tokenizer.save_pretrained(out)
        if jax.process_index() == 0:
            save_head(out, tree[HEADS_KEY][SCORE], meta)
        return str(out.absolute())

    return export
