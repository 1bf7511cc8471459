"""Run a model over prompts or a dataset: load it, build the prompts, generate, score, report.

- ``load_model_for_inference(path)`` -> ``(model, params, tokenizer)`` from a Hugging Face
  directory, an llmjax checkpoint directory (``checkpoint.dir`` of a run) or a run directory
  (``train.output_dir``, holding ``checkpoints/``); ``with_adapters(model, params, dirs)`` gives the
  params and soft prompt of each PEFT adapter in turn (LoRA merged, prompt tuning's soft prompt), the base
  loaded once.
- ``generate_texts(...)``: prompts in, texts out, in batches (left padding for decoder-only
  models, right padding for T5), each output cut at its eos and stripped of its prefix.
- ``evaluate_dataset(...)``: zero/one/few-shot prompts from a template (``llmjax.prompts``),
  generation, and ``score_predictions`` (ROUGE-1/2/L/Lsum, BLEU, exact match from ``llmjax.text_metrics``)
  against all of an example's references (DialogSum's test set has three) and against the first only.
- ``compare_shots(...)``: the same examples at several shot counts, one result per setting
  (the course's first lab: zero-, one- and few-shot side by side).
- ``write_report(out_dir, results, settings)``: ``scores.json``, ``predictions.jsonl`` and a
  ``report.md`` with a table of scores and some examples (input, reference, outputs).

Prompt tokens follow each family's convention: a T5 encoder reads ``prompt + eos``; a decoder
reads ``bos + prompt`` (no eos: it must continue the text) and stops at the model's eos.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from llmjax import text_metrics
from llmjax.data.tokenizer import Tokenizer
from llmjax.errors import InputError, InputNotFoundError
from llmjax.generate import GenerationConfig, generate, resolve_config
from llmjax.hf.io import ADAPTER_CONFIG_NAME, read_adapter_config
from llmjax.loading import ModelPathError, load_model
from llmjax.models import model_family
from llmjax.prompts import TEMPLATES, PromptTemplate, fit_prompt, select_shots

DEFAULT_T5_MAX_INPUT_TOKENS = 512  # FLAN-T5's training input length; T5's relative positions have no hard limit
MIN_PROMPT_BUCKET = 16  # prompts are padded to a power of two at least this long, so few shapes compile
INPUT_PREVIEW_CHARS = 240


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

def load_model_for_inference(path: str | Path):
    """``(model, params, tokenizer)`` from a Hugging Face directory or an llmjax checkpoint/run directory
    (``llmjax.loading.load_model``); the tokenizer is the HF directory's ``spiece.model`` or the one the
    checkpoint's metadata records. Params are host fp32 arrays. A prompt-tuning run is refused (its soft
    prompt would be lost): read it with :func:`load_for_inference`."""
    model, params, tokenizer, soft_prompt = load_for_inference(path)
    if soft_prompt is not None:
        raise ModelPathError(f"{path} is a prompt-tuning run: its model needs its soft prompt; read it with "
                             "llmjax.evaluate.load_for_inference (as `llmjax generate/evaluate --model` do) or use "
                             "the run's exported hf/ directory with its PEFT prompt in hf/adapter")
    return model, params, tokenizer


def load_for_inference(path: str | Path):
    """``(model, params, tokenizer, soft_prompt)``: :func:`load_model_for_inference` plus the soft prompt of a
    prompt-tuning run (fp32 ``[n, d_model]``), None for any other model."""
    loaded = load_model(path)
    if loaded.kind == "hf":
        tokenizer = _load_tokenizer(loaded.path, f"Hugging Face directory {loaded.path}")
    elif loaded.tokenizer_dir is None:
        raise ModelPathError(f"checkpoint {loaded.path} records no tokenizer directory; export it with "
                             "`llmjax export` and add spiece.model to the exported directory")
    else:
        tokenizer = _load_tokenizer(loaded.tokenizer_dir, f"the tokenizer directory of {loaded.path}")
    return loaded.model, loaded.params, tokenizer, loaded.soft_prompt


def with_adapters(model, params, adapter_dirs: Sequence[str | Path] = (), soft_prompt=None):
    """``(name, directory, params, soft_prompt)`` for each PEFT adapter directory in turn, on ``params`` (the
    base, loaded once and never changed, so never reloaded). The kind is the directory's ``peft_type``
    (:data:`ADAPTER_KINDS`): a LoRA adapter gives the base with it merged into a fresh copy of the adapted kernels
    and ``soft_prompt`` (the base's own, e.g. a prompt-tuning run's, or None); a prompt-tuning one gives the base
    itself and the adapter's soft prompt, fp32 ``[n, d_model]``, in place of the base's.
    Every adapter is read and checked against the model before the first is yielded. No adapters:
    ``(None, None, params, soft_prompt)`` alone. Names are the directories' names, with parents as needed to tell
    them apart (``a/adapter`` and ``b/adapter`` -> ``a_adapter``, ``b_adapter``)."""
    if not adapter_dirs:
        yield None, None, params, soft_prompt
        return
    names = adapter_names(adapter_dirs)
    appliers = [read_adapter(model, path, params) for path in adapter_dirs]
    for name, path, apply in zip(names, adapter_dirs, appliers):
        variant, adapter_prompt = apply(params)
        yield name, Path(path), variant, soft_prompt if adapter_prompt is None else adapter_prompt


def _read_lora(model, path, base):
    from llmjax import lora

    adapters, cfg = lora.from_pretrained(model, path, base)
    return lambda params: (jax.tree_util.tree_map(np.asarray, lora.merge(params, adapters, cfg)), None)


def _read_prompt_tuning(model, path, base):
    from llmjax import prompt_tuning

    soft_prompt, _ = prompt_tuning.from_pretrained(model, path)
    return lambda params: (params, soft_prompt)


ADAPTER_KINDS: dict[str, Callable] = {"LORA": _read_lora, "PROMPT_TUNING": _read_prompt_tuning}
"""PEFT ``peft_type`` -> ``(model, directory) -> (base params -> (params, soft_prompt or None))``."""


def read_adapter(model, path: str | Path, base=None) -> Callable:
    """Read and check the PEFT adapter directory ``path`` for ``model``, of the kind its ``peft_type`` names ->
    a function ``base params -> (params, soft_prompt or None)`` giving the model with the adapter. ``base``: the
    base's params, which a LoRA adapter may need to be read (:func:`llmjax.lora.from_pretrained`)."""
    peft_type = read_adapter_config(path).get("peft_type")
    if peft_type not in ADAPTER_KINDS:
        raise InputError(f"{Path(path) / ADAPTER_CONFIG_NAME}: peft_type={peft_type!r} is not supported; "
                         f"--adapter takes PEFT adapters of peft_type {' or '.join(map(repr, ADAPTER_KINDS))}")
    return ADAPTER_KINDS[peft_type](model, path, base)


def adapter_names(adapter_dirs: Sequence[str | Path]) -> list[str]:
    """Distinct names of adapter directories: each one's last path parts, as few as set it apart."""
    paths = [Path(path).absolute().parts[1:] for path in adapter_dirs]  # without the root "/"
    if len(set(paths)) < len(paths):
        raise InputError(f"the same adapter directory is given twice in {[str(p) for p in adapter_dirs]}; "
                         "give each --adapter once")

    def name(parts, others, depth=1):
        clash = any(other[-depth:] == parts[-depth:] for other in others)
        return "_".join(parts[-depth:]) if not clash else name(parts, others, depth + 1)

    names = [name(parts, paths[:i] + paths[i + 1:]) for i, parts in enumerate(paths)]
    if len(set(names)) < len(names):  # e.g. "a_b" from a/b beside "a_b" from a_b: fall back to full paths
        names = ["_".join(parts) for parts in paths]
    return names


def load_generation_config(path: str | Path) -> GenerationConfig:
    """The model directory's ``generation_config.json`` (Hugging Face defaults for it), else defaults."""
    file = Path(path) / "generation_config.json"
    return GenerationConfig.from_hf(file) if file.is_file() else GenerationConfig()


def _load_tokenizer(directory: Path, where: str) -> Tokenizer:
    if not (directory / "spiece.model").is_file():
        raise ModelPathError(f"{where} has no spiece.model; save the tokenizer there "
                             "(Tokenizer.save_pretrained or `llmjax tokenizer train --out`)")
    return Tokenizer.load(directory)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

BUNDLED_DATA_NAMES = ("bundled", "bundled-dialogsum")


def load_examples(data: str | Path, split: str | None = "test", limit: int | None = None) -> list[dict]:
    """Examples of ``data``: "bundled" (the generated DialogSum-shaped set) or a DialogSum file/directory.

    A directory gives its ``split`` file; a single file is read whole (``split`` ignored).
    ``limit`` keeps the first examples.
    """
    from llmjax.data.bundled.dialogsum import bundled_dialogsum, load_dialogsum

    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}")
    if str(data) in BUNDLED_DATA_NAMES:
        examples = bundled_dialogsum(split or "test")
    else:
        path = Path(data)
        examples = load_dialogsum(path, None if path.is_file() else (split or "test"))
    return examples[:limit] if limit is not None else examples


def shot_pool_for(data: str | Path, split: str | None = "test") -> list[dict] | None:
    """Where shots come from: the train split beside ``data`` when there is one, else None (the
    evaluated examples themselves, each query excluded from its own shots)."""
    if str(data) in BUNDLED_DATA_NAMES:
        return load_examples(data, "train")
    path = Path(data)
    if path.is_dir() and split != "train":
        try:
            return load_examples(path, "train")
        except FileNotFoundError:
            return None
    return None


# ---------------------------------------------------------------------------
# Prompts to token ids, generated ids to text
# ---------------------------------------------------------------------------

def prompt_ids(model, tokenizer: Tokenizer, text: str) -> list[int]:
    """The token ids one prompt gives the model: encoder-decoder (T5) ``prompt + eos``; decoder ``bos + prompt``."""
    return model_family(model.config).prompt_ids(model.config, tokenizer, text)


def encode_prompts(model, tokenizer: Tokenizer, texts: Sequence[str], bucket: bool = False):
    """Token ids and mask of a batch, int32 ``[batch, length]``: ``length`` is the longest prompt's,
    or with ``bucket`` the next power of two (at least ``MIN_PROMPT_BUCKET``).

    Decoder prompts are left-padded (new tokens then follow every prompt at the same column);
    T5 prompts are right-padded, as the encoder expects.
    """
    sequences = [prompt_ids(model, tokenizer, text) for text in texts]
    longest = max(len(ids) for ids in sequences)
    length = max(MIN_PROMPT_BUCKET, 1 << (longest - 1).bit_length()) if bucket else longest
    left = not model_family(model.config).seq2seq
    ids = np.full((len(sequences), length), model.config.pad_token_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for row, sequence in enumerate(sequences):
        columns = slice(length - len(sequence), length) if left else slice(0, len(sequence))
        ids[row, columns] = sequence
        mask[row, columns] = 1
    return ids, mask


def new_tokens(sequences: np.ndarray, prefix_length: int, eos_token_id: Sequence[int] | None) -> list[list[int]]:
    """The generated part of each row of ``generate``'s output, cut before its first eos."""
    rows = []
    for row in np.asarray(sequences)[:, prefix_length:].tolist():
        if eos_token_id:
            row = row[: next((i for i, token in enumerate(row) if token in eos_token_id), len(row))]
        rows.append(row)
    return rows


def generate_texts(model, params, tokenizer: Tokenizer, prompts: Sequence[str], *,
                   generation_config: GenerationConfig | None = None, batch_size: int = 8,
                   rng: jax.Array | None = None, soft_prompt=None) -> list[str]:
    """Generate a continuation of every prompt; returns the decoded new text (special tokens dropped).

    Prompts run ``batch_size`` at a time; a short last batch is filled up with copies of its first
    prompt (their outputs are dropped) so every batch compiles to the same program. ``rng`` is
    folded with the batch number, so a seed gives the same outputs for the same batches.
    ``soft_prompt`` ``[n, d_model]``: a prompt-tuning run's soft prompt, put before every prompt.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    config = resolve_config(model, generation_config)
    if config.num_return_sequences != 1:
        raise InputError("generate_texts returns one text per prompt; set num_return_sequences=1")
    rng = jax.random.key(0) if rng is None else rng
    seq2seq = model_family(model.config).seq2seq
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        filled = batch + [batch[0]] * (batch_size - len(batch))
        ids, mask = encode_prompts(model, tokenizer, filled, bucket=True)
        sequences = generate(model, params, ids, mask, generation_config=config,
                             rng=jax.random.fold_in(rng, start // batch_size), soft_prompt=soft_prompt)
        prefix_length = 1 if seq2seq else ids.shape[1]  # T5: the decoder start token; decoder: the prompt
        tokens = new_tokens(np.asarray(jax.device_get(sequences)), prefix_length, config.eos_token_id)
        outputs.extend(tokenizer.decode(row).strip() for row in tokens[: len(batch)])
    return outputs


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class EvalResult:
    """One setting's run: prompts, outputs, references (all of each example's), shots kept, scores."""

    shots: int
    ids: list[str]
    prompts: list[str]
    predictions: list[str]
    references: list[list[str]]
    shots_kept: list[int]
    scores: dict[str, float]


FIRST_REFERENCE_SUFFIX = "_first_ref"


def score_predictions(predictions: Sequence[str], references: text_metrics.References) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F-measures in [0, 1], corpus BLEU in [0, 100], exact match in [0, 1].

    ``references``: per prediction a string or a list of references. The plain keys score against all
    references (ROUGE: best reference per example; BLEU: multi-reference); the ``_first_ref`` keys
    against the first reference only (equal to the plain keys when every example has one).
    """
    def scores(refs):
        return {**text_metrics.rouge(predictions, refs), "bleu": text_metrics.bleu(predictions, refs),
                "exact_match": text_metrics.exact_match(predictions, refs)}

    first = scores(text_metrics.first_reference(references))
    return {**scores(references), **{key + FIRST_REFERENCE_SUFFIX: value for key, value in first.items()}}


def example_references(example: dict, template: PromptTemplate) -> list[str]:
    """All references of an example: ``references_field`` when present, else the one ``target_field``."""
    several = example.get(template.references_field)
    return [str(text) for text in several] if several else [str(example[template.target_field])]


def get_template(template: PromptTemplate | str) -> PromptTemplate:
    """A template by name from ``llmjax.prompts.TEMPLATES`` (or the template itself)."""
    if isinstance(template, PromptTemplate):
        return template
    if template not in TEMPLATES:
        raise InputError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[template]


def default_max_input_tokens(model, generation_config: GenerationConfig | None) -> int:
    """Prompt budget: T5 512 tokens; a decoder its context length minus the tokens it will generate."""
    if model_family(model.config).seq2seq:
        return DEFAULT_T5_MAX_INPUT_TOKENS
    config = resolve_config(model, generation_config)
    room = model.config.max_position_embeddings - (config.max_new_tokens or 0)
    if config.max_new_tokens is None or room < 1:
        context = model.config.max_position_embeddings
        raise InputError(f"set max_new_tokens below the decoder's context length {context} "
                         f"(got {config.max_new_tokens}) so the prompt has room")
    return room


def build_prompts(model, tokenizer: Tokenizer, examples: Sequence[dict], template: PromptTemplate | str, *,
                  shots: int = 0, shot_pool: Sequence[dict] | None = None, shot_seed: int = 0,
                  max_input_tokens: int) -> tuple[list[str], list[int]]:
    """Prompt text per example and the shots each kept within ``max_input_tokens`` tokens.

    Shots are drawn with ``select_shots`` from ``shot_pool`` (default: ``examples``), never the query
    itself; with one seed every query gets the same shots wherever the pool allows.
    """
    template = get_template(template)
    pool = list(examples if shot_pool is None else shot_pool)
    count = lambda text: len(prompt_ids(model, tokenizer, text))  # noqa: E731
    prompts, kept = [], []
    for example in examples:
        chosen = select_shots(pool, shots, shot_seed, exclude_id=example.get("id")) if shots else []
        fitted = fit_prompt(template, example, chosen, count_tokens=count, max_tokens=max_input_tokens)
        prompts.append(fitted.text)
        kept.append(fitted.num_shots)
    return prompts, kept


def evaluate_dataset(model, params, tokenizer: Tokenizer, examples: Sequence[dict], template: PromptTemplate | str, *,
                     shots: int = 0, shot_pool: Sequence[dict] | None = None, shot_seed: int = 0,
                     max_input_tokens: int | None = None, generation_config: GenerationConfig | None = None,
                     batch_size: int = 8, rng: jax.Array | None = None, soft_prompt=None) -> EvalResult:
    """Prompt, generate and score every example (each needs the template's fields and ``summary``);
    ``soft_prompt`` as in :func:`generate_texts`."""
    if not examples:
        raise InputError("no examples to evaluate; check the data path, split and --limit")
    template = get_template(template)
    if max_input_tokens is None:
        max_input_tokens = default_max_input_tokens(model, generation_config)
    prompts, kept = build_prompts(model, tokenizer, examples, template, shots=shots, shot_pool=shot_pool,
                                  shot_seed=shot_seed, max_input_tokens=max_input_tokens)
    predictions = generate_texts(model, params, tokenizer, prompts, generation_config=generation_config,
                                 batch_size=batch_size, rng=rng, soft_prompt=soft_prompt)
    references = [example_references(example, template) for example in examples]
    return EvalResult(shots, [str(e.get("id", i)) for i, e in enumerate(examples)], prompts, predictions,
                      references, kept, score_predictions(predictions, references))


def compare_shots(model, params, tokenizer: Tokenizer, examples: Sequence[dict], template: PromptTemplate | str,
                  shot_counts: Sequence[int] = (0, 1, 2), **options) -> dict[str, EvalResult]:
    """``evaluate_dataset`` once per shot count -> ``{"0-shot": result, "1-shot": ...}``."""
    if len(set(shot_counts)) != len(shot_counts) or not shot_counts:
        raise InputError(f"shot counts must be distinct and non-empty, got {list(shot_counts)}")
    return {f"{k}-shot": evaluate_dataset(model, params, tokenizer, examples, template, shots=k, **options)
            for k in shot_counts}


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

SCORE_COLUMNS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum",
                 "bleu": "BLEU", "exact_match": "Exact match"}


def scores_table(results: dict[str, EvalResult]) -> str:
    """A Markdown table, two rows per setting (all references, first reference only): ROUGE and exact
    match as fractions, BLEU on 0-100."""
    lines = ["| setting | references | " + " | ".join(SCORE_COLUMNS.values()) + " |",
             "|---|---|" + "---:|" * len(SCORE_COLUMNS)]
    for name, result in results.items():
        for label, suffix in (("all", ""), ("first", FIRST_REFERENCE_SUFFIX)):
            cells = [f"{result.scores[key + suffix]:{'.2f' if key == 'bleu' else '.4f'}}" for key in SCORE_COLUMNS]
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(text: str, limit: int | None = None) -> str:
    """Text fit for one Markdown table cell: shortened, pipes escaped, newlines as <br>."""
    text = text.strip()
    if limit is not None and len(text) > limit:
        text = text[:limit].rstrip() + " ..."
    return text.replace("|", "\\|").replace("\n", "<br>") or " "


def examples_table(examples: Sequence[dict], results: dict[str, EvalResult], template: PromptTemplate,
                   count: int) -> str:
    """Markdown table of the first ``count`` examples: input (shortened), reference, each setting's output."""
    names = list(results)
    lines = ["| id | input | reference | " + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]
    for row, example in enumerate(examples[:count]):
        first = results[names[0]]
        cells = [first.ids[row], _cell(str(example[template.truncate_field]), INPUT_PREVIEW_CHARS),
                 _cell(first.references[row][0])] + [_cell(results[name].predictions[row]) for name in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out_dir: str | Path, examples: Sequence[dict], results: dict[str, EvalResult],
                 template: PromptTemplate | str, settings: dict, num_examples_shown: int = 5) -> dict[str, Path]:
    """Write ``scores.json`` (settings + scores per setting), ``predictions.jsonl`` and ``report.md``.

    ``settings``: JSON-able facts of the run (model path, data, split, generation config, ...);
    the template name, the example count and each setting's shot count are added here.
    """
    template = get_template(template)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {**settings, "template": template.name, "template_text": template.template,
                "num_examples": len(examples)}
    summary = {"settings": settings, "results": {
        name: {"shots": result.shots, "mean_shots_kept": float(np.mean(result.shots_kept)), "scores": result.scores}
        for name, result in results.items()}}
    paths = {"scores": out_dir / "scores.json", "predictions": out_dir / "predictions.jsonl",
             "report": out_dir / "report.md"}
    paths["scores"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    with open(paths["predictions"], "w", encoding="utf-8") as f:
        for name, result in results.items():
            for id_, prompt, references, prediction in zip(result.ids, result.prompts, result.references,
                                                           result.predictions):
                row = {"id": id_, "prompt": prompt, "reference": references[0], "references": references,
                       "prediction": prediction, "setting": name}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    settings_lines = [f"- **{key}**: `{json.dumps(value)}`"
                      for key, value in settings.items() if key != "template_text"]
    report = ["# Evaluation report", "", *settings_lines, "", "## Scores", "",
              "ROUGE F-measures and exact match in [0, 1]; BLEU in [0, 100]. \"all\": against every reference of "
              "an example (ROUGE: the best one per example; BLEU: multi-reference corpus BLEU); \"first\": the "
              "first reference only.", "", scores_table(results), "",
              f"## Examples (first {min(num_examples_shown, len(examples))})", "",
              examples_table(examples, results, template, num_examples_shown), ""]
    paths["report"].write_text("\n".join(report), encoding="utf-8")
    return paths
