"""Pre-training: span corruption for T5, causal LM for decoders, on text documents.

The stage is data + loss + trainable filter + init source; the shared loop does the rest:

* data:      documents from ``data.kind``/``data.source`` -> tokenizer -> objective -> packed batches
             (``DataIterator``: deterministic, the same global batches on any process layout, resumable)
* loss:      token cross-entropy (+ z-loss) of the family (``llmjax.train.lm_loss``)
* trainable: everything, unless ``train.trainable`` / ``train.frozen`` say otherwise
             (or, with a ``lora:`` section, LoRA adapters alone: ``llmjax.stages.adapters``)
* init:      ``init_from`` (continued pre-training) or random from ``train.seed``

Tokenizer: ``data.tokenizer`` (a ``spiece.model`` file or a directory holding one), or, when
unset, the ``init_from`` model's (continued pre-training), or else one trained on the training documents with ``data.tokenizer_vocab_size`` ids and
cached in ``<train.output_dir>/tokenizer`` (a rerun or a resume reuses it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax
import numpy as np

from llmjax.config import ConfigError, RunConfig, dump_config
from llmjax.data.bundled.corpus import BUNDLED_DOCUMENTS, bundled_documents
from llmjax.data.objectives import causal_lm_example, document_span_corruption_fn, span_corruption_budget
from llmjax.data.sources import DataIterator, JsonlSource, ParquetSource, TextSource, hf_dataset_source, tfds_source
from llmjax.data.tokenizer import Tokenizer, train_tokenizer
from llmjax.loading import LoadedModel
from llmjax.models import build_model, model_family
from llmjax.stages.init_source import init_tokenizer, lm_stage, resolve_init
from llmjax.train.loop import Stage

OBJECTIVES = {True: "span_corruption", False: "causal_lm"}  # Family.seq2seq -> the pre-training objective
TOKENIZER_TRAINING_DOCUMENTS = 5_000



def build_stage(config: RunConfig, loaded: LoadedModel | None = None) -> Stage:
    """The pre-training stage of ``config``: model, loss, data iterators, tokenizer. ``loaded``: its
    ``init_from`` already read by ``resolve_init`` (``config`` then resolved too); None: read it here."""
    if loaded is None:
        config, loaded = resolve_init(config)
    family, dc = model_family(config.model), config.data
    if dc.objective == "instruction":
        raise ConfigError("data.objective=instruction trains with stage: sft, not stage: pretrain; set stage=sft")
    if dc.objective != OBJECTIVES[family.seq2seq]:
        raise ConfigError(
            f"data.objective={dc.objective!r} does not pre-train a {family.name} model; "
            f"use {OBJECTIVES[family.seq2seq]!r}"
        )
    # Everything the user named is read and checked before the run writes anything: a run that fails
    # on its config or its data leaves no output directory behind.
    if family.seq2seq:
        _span_corruption_chunk(config)
    train_source = build_source(dc.kind, dc.source, dc.text_field)
    eval_source = build_source(dc.kind, dc.eval_source, dc.text_field) if dc.eval_source else None
    if dc.tokenizer is None and loaded is not None and loaded.tokenizer_dir is not None:
        tokenizer, tokenizer_dir = init_tokenizer(config, loaded)  # continued pre-training keeps its tokenizer
    else:
        tokenizer, tokenizer_dir = load_or_train_tokenizer(config, train_source)
    check_vocab(tokenizer, config.model)
    model = build_model(config.model)
    example_fn = _example_fn(config, tokenizer)
    output_dir = Path(config.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        dump_config(config, output_dir / "config.yaml")

    def iterator(source, **kwargs):
        # The global batch; each process keeps its rows, so the batches match a one-process run.
        return DataIterator(
            source, example_fn, batch_size=config.train.batch_size, decoder_length=dc.decoder_length,
            encoder_length=dc.encoder_length if family.seq2seq else None, pack=dc.packing,
            seed=config.train.seed, process_index=jax.process_index(), process_count=jax.process_count(), **kwargs,
        )

    eval_data = None
    if eval_source is not None:
        eval_data = lambda: iterator(eval_source, shuffle=False, num_epochs=1)  # noqa: E731

    return lm_stage(
        config, loaded,
        name="pretrain",
        model=model,
        train_data=iterator(train_source),
        eval_data=eval_data,
        tokenizer=tokenizer,
        meta={"tokenizer_dir": str(tokenizer_dir)},
    )


# -- data ------------------------------------------------------------------------

def build_source(kind: str, source: str, text_field: str):
    """A random-access source of ``{text_field: str}`` documents."""
    if kind == "bundled":
        if source not in BUNDLED_DOCUMENTS:
            raise ConfigError(f"data.source={source!r} is not a bundled dataset; choose from {sorted(BUNDLED_DOCUMENTS)}")
        return bundled_documents(source, text_field)
    builders: dict[str, Callable] = {
        "text": lambda: TextSource(source, text_field),
        "jsonl": lambda: JsonlSource(source, [text_field]),
        "parquet": lambda: ParquetSource(source, [text_field]),
        "hf": lambda: hf_dataset_source(source, format=Path(source).suffix.lstrip(".") or "json", fields=[text_field]),
        "tfds": lambda: tfds_source(source, split="train", fields=[text_field]),
    }
    return builders[kind]()


def load_or_train_tokenizer(config: RunConfig, train_source) -> tuple[Tokenizer, Path]:
    """``data.tokenizer`` if set; else the cached one in the output dir; else train and cache one."""
    dc = config.data
    if dc.tokenizer:
        path = Path(dc.tokenizer)
        return Tokenizer.load(path), (path if path.is_dir() else path.parent).absolute()
    cache = (Path(config.train.output_dir) / "tokenizer").absolute()
    if (cache / "spiece.model").is_file():
        tokenizer = Tokenizer.load(cache)
        if tokenizer.vocab_size == dc.tokenizer_vocab_size:
            return tokenizer, cache
    if jax.process_index() == 0:
        count = min(len(train_source), TOKENIZER_TRAINING_DOCUMENTS)
        texts = (train_source[i][dc.text_field] for i in range(count))
        train_tokenizer(texts, cache, vocab_size=dc.tokenizer_vocab_size, seed=config.train.seed)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("llmjax_tokenizer")
    return Tokenizer.load(cache), cache


def check_vocab(tokenizer: Tokenizer, model_config) -> None:
    """Every token id must have an embedding row."""
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} ids but model.vocab_size={model_config.vocab_size}; "
            f"set model.vocab_size >= {tokenizer.vocab_size} (or data.tokenizer_vocab_size <= "
            f"{model_config.vocab_size} when llmjax trains the tokenizer)"
        )


def _span_corruption_chunk(config: RunConfig) -> int:
    """Tokens of a document each span-corruption example takes; its targets must fit ``data.decoder_length``."""
    dc = config.data
    chunk, targets_length = span_corruption_budget(dc.encoder_length, dc.noise_density, dc.mean_noise_span_length)
    if targets_length > dc.decoder_length:
        raise ConfigError(
            f"span corruption of {dc.encoder_length}-token inputs makes targets of {targets_length} tokens but "
            f"data.decoder_length={dc.decoder_length}; set data.decoder_length >= {targets_length}"
        )
    return chunk


def _example_fn(config: RunConfig, tokenizer: Tokenizer):
    """Raw document -> list of model examples that each fit the configured lengths."""
    dc, text_field = config.data, config.data.text_field
    if model_family(config.model).seq2seq:
        _span_corruption_chunk(config)  # the user's lengths are checked with a config error first
        return document_span_corruption_fn(tokenizer, dc.encoder_length, dc.decoder_length,
                                           config.model.decoder_start_token_id, dc.noise_density,
                                           dc.mean_noise_span_length, text_field)

    window = dc.decoder_length + 1  # inputs and targets are the window shifted by one

    def causal_lm(raw, rng):
        del rng
        ids = np.asarray(tokenizer.encode(raw[text_field], add_eos=True), np.int32)
        return [causal_lm_example(ids[i:i + window]) for i in range(0, len(ids) - 1, window - 1)] or None

    return causal_lm

