"""Supervised fine-tuning (``stage: sft``): instruction data, loss on responses, from ``init_from``.

The stage is data + loss + trainable filter + init source; the shared loop does the rest:

* data:      ``data.tasks`` / ``data.task_rates`` through ``instruction_batches`` (train split; the
             validation split for the held-out loss when ``train.eval_every_steps`` > 0), packed with
             segment ids when ``data.packing``
* loss:      token cross-entropy (+ z-loss) of the family on the response tokens only
* trainable: everything (full fine-tuning), unless ``train.trainable`` / ``train.frozen`` say otherwise
             (or, with a ``lora:`` section, LoRA adapters alone: ``llmjax.stages.adapters``)
* init:      ``init_from`` (Hugging Face dir, llmjax checkpoint or run dir); None: random from ``train.seed``
* eval hook: every ``train.rouge_every_steps`` steps, greedy generations (as many new tokens as a
             training row leaves a response: ``generation_budget``) for the first ``train.rouge_examples`` validation examples, scored with
             ROUGE-1/2/L/Lsum against their responses; written as split ``generate`` (TensorBoard
             ``generate/rougeL``, ``metrics.jsonl`` rows ``{"split": "generate", "rougeL": ...}``)

Tokenizer: ``data.tokenizer``, else the init source's (the HF dir's ``spiece.model`` or the one a
checkpoint records).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from llmjax import text_metrics
from llmjax.config import ConfigError, RunConfig, dump_config
from llmjax.data.instruction_pipeline import build_tasks, instruction_batches, mixed_source
from llmjax.loading import LoadedModel, model_params
from llmjax.models import build_model, model_family
from llmjax.stages.init_source import init_tokenizer, lm_stage, resolve_init
from llmjax.stages.pretrain import check_vocab
from llmjax.train.loop import Stage

EVAL_SPLIT = "validation"
GENERATION_BATCH = 8



def build_stage(config: RunConfig, loaded: LoadedModel | None = None) -> Stage:
    """The SFT stage of ``config``. ``loaded``: its ``init_from`` already read by ``resolve_init``
    (``config`` then resolved too); None: read it here."""
    if loaded is None:
        config, loaded = resolve_init(config)
    return instruction_stage(config, loaded, name="sft")


def instruction_stage(config: RunConfig, loaded: LoadedModel | None, *, name: str, loss_for=None,
                      frozen_models: tuple = (), meta: dict | None = None) -> Stage:
    """The Stage of a run on instruction data (module docstring): SFT's, or another stage's that trains on the
    same data with its own loss (``loss_for(model) -> LossFn``; None: the token cross-entropy), frozen models
    the loss reads (``llmjax.train.loop.FrozenModel``) and ``meta`` for its checkpoints. ``config``: resolved
    against ``loaded`` (``resolve_init``)."""
    dc, tc = config.data, config.train
    if dc.objective != "instruction":
        raise ConfigError(f"stage: {name} trains on instruction data; set data.objective=instruction (got "
                          f"{dc.objective!r}) and data.tasks (e.g. [dialogsum])")
    family = model_family(config.model)
    tokenizer, tokenizer_dir = init_tokenizer(config, loaded)
    check_vocab(tokenizer, config.model)
    model = build_model(config.model)

    def batches(split: str, **kwargs):
        return instruction_batches(
            dc, tokenizer, batch_format=family.batch_format, batch_size=tc.batch_size, seed=tc.seed, split=split,
            bos_id=None if family.seq2seq else config.model.bos_token_id,
            decoder_start_id=getattr(config.model, "decoder_start_token_id", 0),
            process_index=jax.process_index(), process_count=jax.process_count(), **kwargs,
        )

    train_data = batches("train")  # reads and checks every task before the run writes anything
    eval_data = None
    if tc.eval_every_steps:
        batches(EVAL_SPLIT, shuffle=False, num_epochs=1)  # the eval split exists: fail now, not at the first eval
        eval_data = lambda: batches(EVAL_SPLIT, shuffle=False, num_epochs=1)  # noqa: E731
    eval_hook = None
    if tc.rouge_every_steps:
        prompts, references = rouge_sample(config)
        eval_hook = rouge_hook(model, tokenizer, prompts, references,
                               max_new_tokens=generation_budget(model, tokenizer, prompts, dc.decoder_length))

    output_dir = Path(tc.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        dump_config(config, output_dir / "config.yaml")
    return lm_stage(
        config, loaded,
        loss_for=loss_for,
        name=name,
        model=model,
        train_data=train_data,
        eval_data=eval_data,
        eval_hook=eval_hook,
        eval_hook_every_steps=tc.rouge_every_steps,
        eval_hook_split="generate",
        tokenizer=tokenizer,
        frozen_models=frozen_models,
        meta={"tokenizer_dir": str(tokenizer_dir), **(meta or {})},
    )


def rouge_sample(config: RunConfig) -> tuple[list[str], list[str]]:
    """The fixed generation sample: prompts and reference responses of the first ``train.rouge_examples``
    validation examples of the task mixture (see :func:`task_prompts`)."""
    return task_prompts(config, EVAL_SPLIT, config.train.rouge_examples)


def task_prompts(config: RunConfig, split: str, count: int | None = None) -> tuple[list[str], list[str]]:
    """Prompts and reference responses of the first ``count`` examples (None: all) of ``split`` of the task
    mixture, each phrased with a wording drawn from ``train.seed`` and its index.

    The prompt is the text before the first trained piece, the reference that piece (for chat data: the
    first assistant turn). RL stages sample their responses to these prompts.
    """
    dc, tc = config.data, config.train
    tasks, weights = build_tasks(dc.tasks, dc.task_rates, split)
    source = mixed_source(tasks, weights, tc.seed)
    count = len(source) if count is None else min(count, len(source))
    prompts, references = [], []
    for index in range(count):
        row = source[index]
        pieces = tasks[row["task"]].formatter(row["example"], np.random.default_rng([tc.seed, index]))
        first_trained = next(i for i, (_, trained) in enumerate(pieces) if trained)
        prompts.append("".join(text for text, _ in pieces[:first_trained]))
        references.append(pieces[first_trained][0])
    return prompts, references


def generation_budget(model, tokenizer, prompts: list[str], decoder_length: int) -> int:
    """New tokens the ROUGE generations may take: what a training row gives a response. T5: the whole
    decoder row; a decoder-only model: the row (``data.decoder_length``) less the longest prompt."""
    if model_family(model.config).seq2seq:
        return decoder_length
    from llmjax.evaluate import prompt_ids

    longest = max(len(prompt_ids(model, tokenizer, text)) for text in prompts)
    if longest >= decoder_length:
        raise ConfigError(f"the ROUGE sample's longest prompt has {longest} tokens, which fills data.decoder_length="
                          f"{decoder_length}; raise data.decoder_length so responses fit after the prompt")
    return decoder_length - longest


def rouge_hook(model, tokenizer, prompts: list[str], references: list[str], *, max_new_tokens: int):
    """``(params, step, soft_prompt=None) -> {rouge1, rouge2, rougeL, rougeLsum}`` of greedy generations for
    ``prompts`` (after the soft prompt ``[n, d_model]`` of a prompt-tuning run)."""
    from llmjax.evaluate import generate_texts
    from llmjax.generate import GenerationConfig

    generation = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_id,
                                  pad_token_id=model.config.pad_token_id)

    def hook(params, step: int, soft_prompt=None) -> dict[str, float]:
        del step
        # Host copies of the model's own params (not a stage's frozen teacher): generation compiles its own
        # programs and must not inherit the training shardings.
        host, soft_prompt = jax.device_get((model_params(params), soft_prompt))
        predictions = generate_texts(model, host, tokenizer, prompts, generation_config=generation,
                                     batch_size=min(GENERATION_BATCH, len(prompts)), soft_prompt=soft_prompt)
        return text_metrics.rouge(predictions, references)

    return hook
