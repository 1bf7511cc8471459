"""Data of the detoxification lab: toxicity labels for the reward model, preference pairs, held-out prompts.

- `toxicity_labels(split)`: short standalone texts (comments, summary-like sentences), half of them
  toxic, `{"id", "text", "label"}` with `label` an index into `LABELS` (the reward is the logit of
  label 0, "non_toxic", as in the course). They come from their own templates, words and seed, so no
  text equals, contains or is contained in a dialogue or summary of the DialogSum-shaped set: the
  reward model never sees the prompts it is judged on. Non-toxic texts include complaints and
  impatience ("loses patience with", "complains that ... is late"), so what separates the classes is
  the insult, not the mood.
- `preference_pairs(split)`: `{"id", "prompt", "chosen", "rejected"}`; the prompt is a rude dialogue
  of that DialogSum split (raw text; a stage formats it), `chosen` a clean summary, `rejected` the same
  summary reporting the insult in its own words.
- `rude_prompts(split)`: the rude DialogSum examples of a split; `rude_prompts("test")` are the
  held-out prompts the lab judges toxicity on.
- `load_labels(path)`, `load_pairs(path)`: the same records from a user's JSONL file.
- `write_detox(directory)`: `labels_{split}.jsonl` and `pairs_{split}.jsonl`, written atomically.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

from llmjax.data.bundled.dialogsum import DEFAULT_NUM_EXAMPLES, SPLITS, SPLIT_FRACTIONS, bundled_dialogsum, \
    generate_dialogsum, rude_dialogues
from llmjax.data.bundled.dialogsum_rude import CLEAN_PHRASES, PLACEMENTS, clean_summary, toxic_summary
from llmjax.data.bundled.dialogsum_words import article
from llmjax.errors import DataError, InputError, InputNotFoundError

LABELS = ("non_toxic", "toxic")
DEFAULT_NUM_LABELS = 2000

# The label texts' own words (the DialogSum set's tables are not used, so the two share no template).
_PEOPLE = ("Olivia", "Marco", "Priya", "Hugo", "Ingrid", "Tariq", "Yuki", "Bruno", "Fatima", "Oscar",
           "Leila", "Dmitri", "Carmen", "Felix", "Noor", "Rafael", "Greta", "Kofi", "Elena", "Viktor")
_THINGS = ("printer", "blender", "laptop charger", "parcel", "invoice", "rental car", "vacuum cleaner", "sofa",
           "bike lock", "router", "microwave", "tablet case", "desk lamp", "kettle", "suitcase", "headphones")
_VENUES = ("warehouse", "repair shop", "call center", "furniture store", "garage", "courier depot",
           "electronics outlet", "pharmacy", "bakery", "car wash")
_INSULTS = ("idiot", "moron", "stupid idiot", "dumb idiot", "stupid moron", "jerk", "stupid jerk", "imbecile",
            "dumbass", "complete idiot", "brainless moron")
_TOXIC = (
    "Only {a_insult} would pay {price} dollars for a {thing} like this.",
    "The {thing} broke after {n} days. What {a_insult} designed it?",
    "Hey {insult}, the {thing} you sold me is stupid crap.",
    "{person}, you {insult}, you forgot the {thing} at the {venue} again.",
    "Whoever packed this {thing} at the {venue} is {a_insult}.",
    "This {venue} is crap and the manager is {a_insult}.",
    "Stop whining about the {thing}, you {insult}.",
    "What a load of stupid crap, the {thing} from the {venue} came {n} days late.",
    "{person} is {a_insult} and everyone at the {venue} knows it.",
    "#Person1# calls #Person2# {a_insult} while they wait for the {thing}.",
    "{person} calls {other} {a_insult} because the {thing} is {n} days late.",
    "#Person2# tells #Person1# to shut up about the {thing} and calls #Person1# {a_insult}.",
    "#Person1# says the {venue} is crap and calls #Person2# {a_insult}.",
    "{person} yells that {other} is {a_insult} for losing the {thing}.",
)
_NON_TOXIC = (
    "I paid {price} dollars for this {thing} and it works well.",
    "The {thing} arrived after {n} days, well packed.",
    "Thanks {person}, the {thing} you recommended at the {venue} is great.",
    "The staff at the {venue} were friendly and fixed the {thing} in {n} days.",
    "The {thing} was late again; I hope the {venue} sorts out its deliveries.",
    "I'm disappointed with the {thing}, it stopped working after {n} days.",
    "#Person1# loses patience with #Person2# over the {thing} from the {venue}.",
    "#Person2# complains to #Person1# that the {thing} is {n} days late.",
    "{person} thanks {other} for bringing the {thing} back to the {venue}.",
    "#Person1# and #Person2# argue about the {thing} but agree to meet at the {venue}.",
    "{person} is short with {other} about the {thing} that cost {price} dollars.",
    "#Person1# speaks harshly to #Person2# because the {thing} is broken.",
    "{person} asks {other} to return the {thing} to the {venue} within {n} days.",
    "{person} is annoyed that the {venue} charged {price} dollars for the {thing}.",
)


def toxicity_labels(split: str, num_examples: int = DEFAULT_NUM_LABELS, seed: int = 0) -> list[dict]:
    """The `split` of `num_examples` distinct labelled texts split 80/10/10, each split half toxic
    (within one); `[{"id": "{split}_{i}", "text": str, "label": 0 | 1}]`, the same for the same seed."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if num_examples < 2 * len(SPLITS):
        raise InputError(f"num_examples must be at least {2 * len(SPLITS)} (both labels in every split), got {num_examples}")
    rng = random.Random(f"detox-labels-{seed}")
    seen: set[str] = set()
    texts: list[tuple[str, int]] = []
    while len(texts) < num_examples:
        label = len(texts) % 2  # alternating, so any contiguous slice is balanced
        text = _label_text(rng, label)
        if text not in seen:
            seen.add(text)
            texts.append((text, label))
        elif len(seen) > 50 * num_examples:  # unreachable for the template space; guards a bad edit
            raise RuntimeError("the label templates cannot make that many distinct texts")
    n_held_out = max(2, round(num_examples * SPLIT_FRACTIONS["test"]))
    bounds = {"train": (0, num_examples - 2 * n_held_out), "validation": (num_examples - 2 * n_held_out, num_examples - n_held_out),
              "test": (num_examples - n_held_out, num_examples)}
    lo, hi = bounds[split]
    chunk = texts[lo:hi]
    random.Random(f"detox-labels-{seed}-{split}").shuffle(chunk)
    return [{"id": f"{split}_{i}", "text": text, "label": label} for i, (text, label) in enumerate(chunk)]


def _label_text(rng: random.Random, label: int) -> str:
    person, other = rng.sample(_PEOPLE, 2)
    insult = rng.choice(_INSULTS)
    return rng.choice(_TOXIC if label else _NON_TOXIC).format(
        person=person, other=other, thing=rng.choice(_THINGS), venue=rng.choice(_VENUES), insult=insult,
        a_insult=article(insult), price=rng.randrange(15, 400, 5), n=rng.randrange(2, 15))


def preference_pairs(split: str, num_examples: int = DEFAULT_NUM_EXAMPLES, seed: int = 0) -> list[dict]:
    """One pair per rude dialogue of the DialogSum split generated with (`num_examples`, `seed`):
    `{"id": the dialogue's id, "prompt": the dialogue, "chosen": a clean summary, "rejected": the same
    summary that reports the insult}`; both state the dialogue's facts in the same words."""
    rng = random.Random(f"detox-pairs-{seed}-{split}")
    pairs = []
    for example, rudeness in rude_dialogues(split, num_examples, seed):
        placement = rng.choice(PLACEMENTS)
        chosen = clean_summary(rudeness.base, rudeness, placement, rng.choice(CLEAN_PHRASES))
        pairs.append({"id": example["id"], "prompt": example["dialogue"], "chosen": chosen,
                      "rejected": toxic_summary(rudeness.base, rudeness, placement)})
    return pairs


def rude_prompts(split: str, num_examples: int = DEFAULT_NUM_EXAMPLES, seed: int = 0) -> list[dict]:
    """The DialogSum examples of `split` with a rude speaker (`"rude": True`); with the defaults, the
    bundled set's (cached)."""
    if (num_examples, seed) == (DEFAULT_NUM_EXAMPLES, 0):
        examples = bundled_dialogsum(split)
    else:
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        examples = generate_dialogsum(num_examples, seed)[split]
    return [example for example in examples if example["rude"]]


def load_labels(path: str | Path) -> list[dict]:
    """`[{"id", "text", "label"}]` from a JSONL file of `{"text": str, "label": 0 | 1 | "non_toxic" |
    "toxic"}` rows (`id` optional, default "line_<n>")."""
    out = []
    for where, row in _read_jsonl(path, ("text", "label")):
        label = row["label"]
        if isinstance(label, str) and label in LABELS:
            label = LABELS.index(label)
        elif isinstance(label, bool) or label not in (0, 1):
            raise DataError(f"{path}, {where}: label {label!r} is not one of 0, 1, 'non_toxic', 'toxic'; "
                            "use 1 or 'toxic' for a toxic text, 0 or 'non_toxic' otherwise")
        out.append({"id": str(row.get("id", where.replace(" ", "_"))), "text": row["text"], "label": int(label)})
    return out


def load_pairs(path: str | Path) -> list[dict]:
    """`[{"id", "prompt", "chosen", "rejected"}]` from a JSONL file of such rows (`id` optional)."""
    return [{"id": str(row.get("id", where.replace(" ", "_"))), **{key: row[key] for key in ("prompt", "chosen", "rejected")}}
            for where, row in _read_jsonl(path, ("prompt", "chosen", "rejected"))]


def _read_jsonl(path: str | Path, fields: tuple[str, ...]) -> list[tuple[str, dict]]:
    """("line n", row) for every non-blank line, each an object with non-empty `fields` (texts are strings)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path} does not exist; pass a JSONL file with one {{{', '.join(fields)}}} object per line")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, {where}: not valid JSON ({error.msg}); write one JSON object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, {where}: expected an object with {', '.join(fields)}; got {type(row).__name__}")
            for field in fields:
                value = row.get(field)
                if value is None or value == "":
                    raise DataError(f"{path}, {where}: missing field {field!r}; every line needs {', '.join(fields)}")
                if field != "label" and not isinstance(value, str):
                    raise DataError(f"{path}, {where}: field {field!r} must be a string, got {type(value).__name__}")
            rows.append((where, row))
    if not rows:
        raise DataError(f"{path} holds no examples; write one JSON object with {', '.join(fields)} per line")
    return rows


def write_detox(directory: str | Path, num_labels: int = DEFAULT_NUM_LABELS, num_examples: int = DEFAULT_NUM_EXAMPLES,
                seed: int = 0) -> dict[str, Path]:
    """Write `labels_{split}.jsonl` and `pairs_{split}.jsonl` into `directory` (absent or empty).

    Everything is generated first and written into a temporary directory beside it, renamed into place
    at the end, so a failure leaves nothing behind. Returns the paths by file stem.
    """
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise InputError(f"--out {directory} exists and is not an empty directory; choose a new directory or remove it")
    records = {f"labels_{split}": toxicity_labels(split, num_labels, seed) for split in SPLITS}
    records |= {f"pairs_{split}": preference_pairs(split, num_examples, seed) for split in SPLITS}
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        for stem, rows in records.items():
            with open(staging / f"{stem}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if directory.exists():
            directory.rmdir()
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {stem: directory / f"{stem}.jsonl" for stem in records}
