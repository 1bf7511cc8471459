"""Dialogue summarization data: a bundled DialogSum-shaped generator and a loader for the real DialogSum files.

Examples are dicts `{"id", "dialogue", "summary", "topic"}`; a dialogue is newline-separated turns
"#Person1#: ...\\n#Person2#: ...", a summary is a short third-person account of what happened.
Generated examples also carry `"rude": bool` (a speaker insults the other; see `dialogsum_rude.py`).

- `generate_dialogsum(num_examples, seed)` -> `{"train", "validation", "test"}` lists, deterministic
  for a seed, split 80/10/10, no dialogue repeated anywhere (so no split leaks into another). Test
  examples also carry `summaries`: three references (the `summary` first), as DialogSum's test set has
  three annotators' summaries; they state the same facts in different words.
- `bundled_dialogsum(split)`: the default generated set, built once per process.
- `write_dialogsum(directory, ...)` writes `{split}.jsonl`; `load_dialogsum(path)` reads those and the
  real releases (JSONL from the DialogSum GitHub repo with `fname`, `summary1..3` in its test file;
  the CSV/JSON files on the Hugging Face hub with `id`).
- `dialogsum_stats(splits)`: sizes, lengths, vocabulary and how abstractive the summaries are.
"""

from __future__ import annotations

import csv
import functools
import json
import random
import re
from pathlib import Path

from llmjax.data.bundled import dialogsum_errands, dialogsum_scenarios
from llmjax.data.bundled.dialogsum_rude import RUDE_FRACTION, Rudeness, make_rude, rude_references
from llmjax.data.bundled.dialogsum_words import Draw, Turns, maybe_close, person1_speaks_first
from llmjax.errors import DataError, InputError, InputNotFoundError

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
DEFAULT_NUM_EXAMPLES = 4000
TEST_REFERENCES = 3  # references per test dialogue, as in DialogSum's test set
SCENARIOS = {**dialogsum_scenarios.SCENARIOS, **dialogsum_errands.SCENARIOS}
# The real releases name the validation split "dev" and the id "fname"; accept either spelling.
_SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "dev", "val"), "test": ("test",)}
_FIELD_ALIASES = {"id": ("id", "fname"), "dialogue": ("dialogue",), "summary": ("summary", "summary1")}
_FORMATS = (".jsonl", ".json", ".csv")


def generate_dialogsum(num_examples: int = DEFAULT_NUM_EXAMPLES, seed: int = 0) -> dict[str, list[dict]]:
    """`num_examples` unique dialogues split train/validation/test 80/10/10, the same for the same seed.

    Topics cycle through every scenario so each appears about equally often; the order is then
    shuffled with the seed before splitting, and ids are `"{split}_{index}"`. In each split a fraction
    `RUDE_FRACTION` of the dialogues (`"rude": True`) has a rude speaker (see `dialogsum_rude.py`);
    the rudeness is drawn from its own random stream, so the other dialogues, the facts of the rude
    ones and the split of every dialogue are those the seed gave before rudeness existed.
    """
    return {split: [_public(example) for example in examples] for split, examples in _generate(num_examples, seed).items()}


def rude_dialogues(split: str, num_examples: int = DEFAULT_NUM_EXAMPLES, seed: int = 0) -> list[tuple[dict, Rudeness]]:
    """The rude dialogues of a generated split with who is rude and how (for the detox lab's
    preference pairs); the default arguments give the bundled set's."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return [(_public(example), example["_rudeness"]) for example in _generate(num_examples, seed)[split] if example["rude"]]


@functools.lru_cache(maxsize=4)
def _generate(num_examples: int, seed: int) -> dict[str, list[dict]]:
    """The splits with each rude example's `Rudeness` under the private key "_rudeness"; cached, so
    callers copy through `_public`."""
    if num_examples < len(SPLITS):
        raise InputError(f"num_examples must be at least {len(SPLITS)} (one per split), got {num_examples}")
    rng = random.Random(seed)
    draw = Draw(rng)
    topics = sorted(SCENARIOS)
    seen: set[str] = set()
    drawn: list[tuple[str, Turns, list[str]]] = []
    attempts = 0
    while len(drawn) < num_examples:
        attempts += 1
        if attempts > 20 * num_examples:
            raise RuntimeError(f"could only draw {len(drawn)} distinct dialogues of {num_examples}; ask for fewer")
        topic = topics[len(drawn) % len(topics)]
        draw.references = []
        turns, summary = SCENARIOS[topic](draw)
        if draw.references[:1] != [summary]:
            raise RuntimeError(f"scenario {topic!r} must choose its summary with Draw.summarize")
        turns, references = person1_speaks_first(maybe_close(draw, turns), draw.references[:TEST_REFERENCES])
        dialogue = turns.render()
        if dialogue in seen:  # a repeat would leak between splits; draw again
            continue
        seen.add(dialogue)
        drawn.append((topic, turns, references))
    rng.shuffle(drawn)
    n_validation = n_test = max(1, round(num_examples * SPLIT_FRACTIONS["test"]))
    bounds = {"train": (0, num_examples - n_validation - n_test),
              "validation": (num_examples - n_validation - n_test, num_examples - n_test),
              "test": (num_examples - n_test, num_examples)}
    # Rudeness has its own stream (a string seed hashes the same in every process) so that the clean
    # dialogues do not change with it.
    rude_rng = random.Random(f"dialogsum-rude-{seed}")
    splits = {}
    for split, (lo, hi) in bounds.items():
        rude = set(rude_rng.sample(range(hi - lo), round(RUDE_FRACTION * (hi - lo))))
        splits[split] = []
        for i, (topic, turns, references) in enumerate(drawn[lo:hi]):
            example = {"id": f"{split}_{i}"}
            if i in rude:
                turns, rudeness = make_rude(rude_rng, turns, references[0])
                references = rude_references(rude_rng, references, rudeness)
                example["_rudeness"] = rudeness
            example.update(dialogue=turns.render(), summary=references[0], topic=topic, rude=i in rude)
            if split == "test":
                example["summaries"] = references
            splits[split].append(example)
    return splits


def _public(example: dict) -> dict:
    """A copy without the private keys; lists copied so callers cannot change the cache."""
    return {key: list(value) if isinstance(value, list) else value for key, value in example.items() if not key.startswith("_")}


def bundled_dialogsum(split: str) -> list[dict]:
    """The default generated split (4000 examples in all, seed 0; test examples with three references in
    `summaries`); generated once per process, copied per call."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return [_public(example) for example in _generate(DEFAULT_NUM_EXAMPLES, 0)[split]]


def write_dialogsum(directory: str | Path, num_examples: int = DEFAULT_NUM_EXAMPLES, seed: int = 0) -> dict[str, Path]:
    """Write `{directory}/{split}.jsonl` for each split; returns the paths by split."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, examples in generate_dialogsum(num_examples, seed).items():
        paths[split] = directory / f"{split}.jsonl"
        with open(paths[split], "w", encoding="utf-8") as f:
            for example in examples:
                f.write(json.dumps(example, ensure_ascii=False) + "\n")
    return paths


def load_dialogsum(path_or_dir: str | Path, split: str | None = None) -> list[dict] | dict[str, list[dict]]:
    """Read DialogSum examples from a file (.jsonl, .json list, .csv) or a directory of split files.

    A file gives its list of examples (`split` must then be None). A directory with `split` gives that
    split's list, found as `{split}.{jsonl,json,csv}` or `dialogsum.{split}.*` ("dev" is accepted for
    "validation"); without `split` it gives `{split: examples}` for every split present.
    Each example is `{"id", "dialogue", "summary", "topic"}`; the real test file's three references
    `summary1..3` become `summary` (the first) plus `summaries` (all). `topic` is "" when absent.
    """
    path = Path(path_or_dir)
    if not path.exists():
        raise InputNotFoundError(f"DialogSum path {path} does not exist; pass a .jsonl/.json/.csv file or a directory of them")
    if path.is_file():
        if split is not None:
            raise InputError(f"{path} is a single file; drop split={split!r} or pass the directory that holds the split files")
        return _read_file(path)
    if split is not None:
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        found = _split_file(path, split)
        if found is None:
            expected = ", ".join(f"{stem}{ext}" for stem in _split_stems(split) for ext in _FORMATS)
            raise InputNotFoundError(f"no {split} file in {path}; expected one of: {expected}")
        return _read_file(found)
    splits = {name: _read_file(found) for name in SPLITS if (found := _split_file(path, name)) is not None}
    if not splits:
        raise InputNotFoundError(f"no DialogSum split files in {path}; expected e.g. train.jsonl, validation.jsonl, test.jsonl")
    return splits


def _split_stems(split: str) -> list[str]:
    return [prefix + alias for alias in _SPLIT_ALIASES[split] for prefix in ("", "dialogsum.")]


def _split_file(directory: Path, split: str) -> Path | None:
    for stem in _split_stems(split):
        for ext in _FORMATS:
            if (candidate := directory / f"{stem}{ext}").is_file():
                return candidate
    return None


def _read_file(path: Path) -> list[dict]:
    """Rows of one file with where each came from ("line 3", "row 2", "item 0") for error messages."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            rows = [(f"line {n}", _parse_json(line, path, f"line {n}")) for n, line in enumerate(f, 1) if line.strip()]
    elif path.suffix == ".json":
        data = _parse_json(path.read_text(encoding="utf-8"), path, "the file")
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of examples, got {type(data).__name__}")
        rows = [(f"item {i}", row) for i, row in enumerate(data)]
    elif path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            # Row 1 is the header, so the first example is row 2 as a spreadsheet shows it.
            rows = [(f"row {n}", row) for n, row in enumerate(csv.DictReader(f), 2)]
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or .csv")
    return [_to_example(row, path, where) for where, row in rows]


def _parse_json(text: str, path: Path, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}, {where}: not valid JSON ({error.msg})") from None


def _to_example(row, path: Path, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{path}, {where}: expected an object with id, dialogue, summary; got {type(row).__name__}")
    example = {}
    for field, names in _FIELD_ALIASES.items():
        value = next((row[name] for name in names if row.get(name) not in (None, "")), None)
        if value is None:
            raise DataError(f"{path}, {where}: missing field {field!r} (accepted names: {', '.join(names)})")
        example[field] = str(value).replace("\r\n", "\n")
    example["topic"] = str(row.get("topic") or row.get("topic1") or "")
    if row.get("rude") not in (None, ""):  # written by write_dialogsum (a bool; "True"/"False" in a CSV)
        example["rude"] = _flag(row["rude"], path, where)
    references = row.get("summaries") or [row[k] for k in ("summary1", "summary2", "summary3") if row.get(k)]
    if len(references) > 1:
        example["summaries"] = [str(text).replace("\r\n", "\n") for text in references]
    return example


def _flag(value, path: Path, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "1", "false", "0"):
        return str(value).strip().lower() in ("true", "1")
    raise DataError(f"{path}, {where}: field 'rude' must be true or false, got {value!r}")


_WORD = re.compile(r"#Person\d#|[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lowercased words with "#Person1#" kept whole; the unit of the length and overlap statistics."""
    return _WORD.findall(text.lower().replace("#person", "#Person"))


def dialogsum_stats(splits: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Per split and for "all": examples, mean dialogue/summary words, vocabulary size (dialogues and
    summaries), and `summary_bigrams_in_dialogue`: the fraction of summary bigrams found verbatim in
    their own dialogue (low means the summaries are rewritten, not copied)."""
    stats = {}
    for name, examples in {**splits, "all": [e for split in splits.values() for e in split]}.items():
        vocabulary: set[str] = set()
        dialogue_words = summary_words = copied = bigrams = 0
        for example in examples:
            dialogue, summary = words(example["dialogue"]), words(example["summary"])
            vocabulary.update(dialogue, summary)
            dialogue_words += len(dialogue)
            summary_words += len(summary)
            dialogue_bigrams = set(zip(dialogue, dialogue[1:]))
            summary_bigrams = list(zip(summary, summary[1:]))
            copied += sum(bigram in dialogue_bigrams for bigram in summary_bigrams)
            bigrams += len(summary_bigrams)
        count = max(len(examples), 1)
        stats[name] = {"examples": len(examples), "dialogue_words": dialogue_words / count,
                       "summary_words": summary_words / count, "vocabulary": len(vocabulary),
                       "summary_bigrams_in_dialogue": copied / max(bigrams, 1)}
    return stats
