"""Instruction tasks, their mixture, and the packed batches an SFT stage trains on.

A *task* is a source plus a template set (``llmjax.data.instructions``). The run config names tasks
in ``data.tasks`` with ``data.task_rates`` (default: proportional to task sizes, T5's
examples-proportional mixing). A task is written ``TEMPLATES`` (a built-in task) or
``TEMPLATES@KIND:SOURCE``:

* built-in: ``dialogsum`` (the bundled DialogSum-shaped set, summarization wordings),
  ``dialogsum_topic`` (the same dialogues, name-the-topic wordings), ``span_corruption`` (T5's
  pre-training objective on the bundled corpus, held-out documents for other splits: mixed into SFT,
  it keeps the pre-training skill from being forgotten; seq2seq models only);
* ``span_corruption@KIND:SOURCE``: span corruption of any documents with a ``text`` field, cut to
  ``data.encoder_length`` inputs (``data.noise_density``, ``data.mean_noise_span_length``);
* ``TEMPLATES``: a registered template set (``dialogsum``, ``alpaca``, ``chat``, ``inputs_targets``,
  ...) or a ``.yaml``/``.json`` file of ``{prompt, response}`` wordings;
* ``KIND:SOURCE``: ``jsonl:PATH``, ``parquet:PATH``, ``hf:PATH`` (``datasets`` on a local json/parquet
  file or a ``save_to_disk`` directory), ``bundled:dialogsum`` or ``seqio:NAME`` (a registered seqio Task,
  or a Mixture, which is expanded into its tasks at their seqio rates). A path holding ``{split}`` serves
  every split (``data/{split}.jsonl``); a path without it serves the train split only.

``instruction_batches`` is the one entry point: data config + tokenizer + batch format -> a ``DataIterator`` of
packed ``[batch, length]`` batches with segment ids, positions and loss weights on responses only;
its ``state()``/``restore()`` resume exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmjax.config import DataConfig
from llmjax.data.objectives import document_span_corruption_fn
from llmjax.data.instructions import InstructionDataError, PieceFormatter, encode_pieces, make_formatter
from llmjax.data.sources import (
    DataIterator, JsonlSource, MappedSource, Mixture, ParquetSource, Source, hf_dataset_source, seqio_source,
)

SPAN_CORRUPTION = "span_corruption"  # the TEMPLATES part that means "no wording: T5's pre-training objective"
BUILTIN_TASKS = {"dialogsum": "dialogsum@bundled:dialogsum", "dialogsum_topic": "dialogsum_topic@bundled:dialogsum",
                 SPAN_CORRUPTION: f"{SPAN_CORRUPTION}@bundled:corpus"}
BUNDLED_DOCUMENT_SPLITS = {"corpus": "corpus_heldout"}  # bundled documents: train split -> the other splits
SOURCE_KINDS = ("bundled", "jsonl", "parquet", "hf", "seqio")
SPLIT_SLOT = "{split}"


@dataclass(frozen=True)
class TaskSpec:
    """A parsed ``TEMPLATES@KIND:SOURCE`` entry of ``data.tasks``."""

    spec: str
    templates: str
    kind: str
    source: str


def parse_task(spec: str) -> TaskSpec:
    """``"alpaca@jsonl:data/a.jsonl"`` -> ``TaskSpec``; a built-in name expands first; errors say the syntax."""
    full = BUILTIN_TASKS.get(spec, spec)
    templates, at, location = full.partition("@")
    kind, colon, source = location.partition(":")
    if not at:
        raise InstructionDataError(
            f"data.tasks entry {spec!r} is not a built-in task ({', '.join(BUILTIN_TASKS)}); write it as "
            "TEMPLATES@KIND:SOURCE, e.g. 'alpaca@jsonl:data/alpaca.jsonl'")
    if not colon or kind not in SOURCE_KINDS or not source or not templates:
        raise InstructionDataError(f"data.tasks entry {spec!r}: expected TEMPLATES@KIND:SOURCE with KIND one of "
                                   f"{list(SOURCE_KINDS)}, e.g. 'chat@jsonl:data/{{split}}.jsonl'")
    return TaskSpec(spec, templates, kind, source)


def task_source(task: TaskSpec, split: str) -> Source:
    """The rows of ``task`` for ``split`` (random access)."""
    if task.kind == "bundled":
        if task.source in BUNDLED_DOCUMENT_SPLITS:
            from llmjax.data.bundled.corpus import bundled_documents

            return bundled_documents(task.source if split == "train" else BUNDLED_DOCUMENT_SPLITS[task.source])
        if task.source != "dialogsum":
            raise InstructionDataError(f"task {task.spec!r}: the bundled sets are 'dialogsum' and "
                                       f"{sorted(BUNDLED_DOCUMENT_SPLITS)}, not {task.source!r}")
        from llmjax.data.bundled.dialogsum import bundled_dialogsum

        return bundled_dialogsum(split)
    if task.kind == "seqio":
        return MappedSource(seqio_source(task.source, split), _seqio_text)
    if SPLIT_SLOT in task.source:
        path = task.source.replace(SPLIT_SLOT, split)
    elif split == "train":
        path = task.source
    else:
        raise InstructionDataError(f"task {task.spec!r} has one file, used for training; to give it a {split!r} "
                                   f"split put {SPLIT_SLOT} in its path (e.g. data/{SPLIT_SLOT}.jsonl)")
    if task.kind == "jsonl":
        return JsonlSource(path)
    if task.kind == "parquet":
        return ParquetSource(path)
    if Path(path).is_dir():
        return hf_dataset_source(path, format="disk", split=split)
    return hf_dataset_source(path, format="parquet" if path.endswith(".parquet") else "json")


def _seqio_text(row: dict[str, Any]) -> dict[str, Any]:
    """seqio's tokenize preprocessor keeps the text as ``<feature>_pretokenized``: we tokenize that text."""
    text = {key[: -len("_pretokenized")]: value for key, value in row.items() if key.endswith("_pretokenized")}
    return {**row, **text}


def _seqio_expand(task: TaskSpec) -> list[tuple[TaskSpec, float]]:
    """A seqio Mixture becomes its tasks at its rates (normalized); a Task stays itself at rate 1."""
    import seqio

    provider = seqio.get_mixture_or_task(task.source)
    if not isinstance(provider, seqio.Mixture):
        return [(task, 1.0)]
    rates = {sub.name: float(provider.get_rate(sub)) for sub in provider.tasks}
    total = sum(rates.values())
    return [(TaskSpec(f"{task.spec}/{name}", task.templates, "seqio", name), rate / total)
            for name, rate in rates.items()]


@dataclass
class InstructionTask:
    """One task ready to sample: its source rows for a split and the formatter that phrases them."""

    name: str
    source: Source
    formatter: PieceFormatter | None  # None: a span-corruption task (documents, no wording)


def build_tasks(specs: Sequence[str], rates: Sequence[float], split: str) -> tuple[list[InstructionTask], list[float]]:
    """Tasks of ``data.tasks`` for ``split`` with their mixing rates (seqio mixtures expanded).

    Empty ``rates``: each task weighs its number of examples.
    """
    if not specs:
        raise InstructionDataError("no instruction tasks: set data.tasks, e.g. [dialogsum]")
    if rates and len(rates) != len(specs):
        raise InstructionDataError(f"data.task_rates has {len(rates)} rates for {len(specs)} data.tasks")
    tasks, weights = [], []
    for index, spec in enumerate(specs):
        parsed = parse_task(spec)
        for task, share in _seqio_expand(parsed) if parsed.kind == "seqio" else [(parsed, 1.0)]:
            source = task_source(task, split)
            if len(source) == 0:
                raise InstructionDataError(f"task {task.spec!r} has no {split!r} examples")
            if task.templates == SPAN_CORRUPTION:
                formatter, fields = None, {"text"}
            else:
                formatter, fields = make_formatter(task.templates, f"task {task.spec!r}")
            missing = sorted(fields - set(source[0]))
            if missing:
                raise InstructionDataError(f"task {task.spec!r}: its templates need field(s) {missing}, but row 0 "
                                           f"of the {split!r} data has {sorted(source[0])}")
            tasks.append(InstructionTask(task.spec, source, formatter))
            weights.append((rates[index] if rates else len(source)) * share)
    return tasks, weights


def mixed_source(tasks: Sequence[InstructionTask], weights: Sequence[float], seed: int) -> Source:
    """Rows ``{"task": index, "example": row}``; several tasks are sampled at ``weights`` (``sources.Mixture``)."""
    tagged = [MappedSource(task.source, lambda row, i=i: {"task": i, "example": row}) for i, task in enumerate(tasks)]
    if len(tagged) == 1:
        return tagged[0]
    return Mixture(tagged, weights, seed=seed)


def instruction_batches(
    data: DataConfig,
    tokenizer,
    *,
    batch_format: str,
    batch_size: int,
    seed: int,
    split: str = "train",
    bos_id: int | None = None,
    decoder_start_id: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> DataIterator:
    """Instruction batches in ``batch_format`` ("seq2seq" for T5, "causal" for decoder-only models; a
    model family's ``batch_format``) from ``data.tasks`` / ``data.task_rates``.

    Rows are ``data.encoder_length`` / ``data.decoder_length`` long (``data.packing`` packs several
    examples per row with segment ids; off, one per row). Examples longer than a row are truncated.
    ``bos_id`` starts decoder sequences (pass the model's, as ``evaluate.prompt_ids`` does); the
    wording and the mixture order follow ``seed``. The iterator's ``state()`` is the resume point.
    """
    tasks, weights = build_tasks(data.tasks, data.task_rates, split)
    span_corruption = None
    if any(task.formatter is None for task in tasks):
        if batch_format != "seq2seq":
            raise InstructionDataError(f"a {SPAN_CORRUPTION!r} task trains encoder-decoder (T5) models only; "
                                       "drop it from data.tasks for a decoder-only model")
        try:
            span_corruption = document_span_corruption_fn(
                tokenizer, data.encoder_length, data.decoder_length, decoder_start_id, data.noise_density,
                data.mean_noise_span_length)
        except ValueError as error:
            raise InstructionDataError(f"the {SPAN_CORRUPTION!r} task: {error}; raise data.decoder_length") from None

    def example_fn(row: dict[str, Any], rng: np.random.Generator):
        task = tasks[row["task"]]
        if task.formatter is None:
            return span_corruption(row["example"], rng)
        pieces = task.formatter(row["example"], rng)
        encode = lambda text: tokenizer.encode(text, add_eos=False)  # noqa: E731
        return encode_pieces(pieces, encode, batch_format=batch_format, eos_id=tokenizer.eos_id, bos_id=bos_id,
                             decoder_start_id=decoder_start_id)

    return DataIterator(
        mixed_source(tasks, weights, seed), example_fn, batch_size=batch_size, decoder_length=data.decoder_length,
        encoder_length=data.encoder_length if batch_format == "seq2seq" else None, pack=data.packing, truncate=True,
        seed=seed, shuffle=shuffle, num_epochs=num_epochs, process_index=process_index, process_count=process_count,
    )
