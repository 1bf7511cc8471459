"""Text metrics for generated summaries: ROUGE (rouge_score), BLEU (sacrebleu) and exact match.

Each takes `predictions` (strings) and `references`, equally long: per prediction either one reference
string or a list of references (the real DialogSum test set has three summaries per dialogue, written by
different annotators). Several references: ROUGE takes, per example and per ROUGE type, the reference
with the best F-measure (`rouge_score`'s `score_multi`); BLEU is sacrebleu's multi-reference corpus BLEU
(n-gram matches clipped by the most of any one reference, brevity against the closest reference
length); exact match counts a match with any reference. `first_reference` keeps only the first.
Scales follow the libraries people compare against: ROUGE F-measures in [0, 1] (like Hugging Face
`evaluate`), BLEU in [0, 100] (like sacrebleu), exact match in [0, 1].
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Sequence
from typing import Union

import sacrebleu
from nltk.stem import porter
from rouge_score import rouge_scorer, tokenize, tokenizers

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

References = Sequence[Union[str, Sequence[str]]]  # per prediction: one reference or a list of them


def _check_pair(predictions: Sequence[str], references: References) -> list[list[str]]:
    """The references as one non-empty list per prediction; type and length errors say what to pass."""
    for name, texts in (("predictions", predictions), ("references", references)):
        if isinstance(texts, str):
            raise TypeError(f"{name} must be a list of strings, got a single string; wrap it in a list")
    if not all(isinstance(text, str) for text in predictions):
        raise TypeError("predictions must contain only strings; decode token ids to text first")
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references; "
                         "pass exactly one reference (or one list of references) per prediction")
    if not predictions:
        raise ValueError("no predictions to score; pass at least one prediction/reference pair")
    sets = [[item] if isinstance(item, str) else list(item) for item in references]
    for index, texts in enumerate(sets):
        if not texts or not all(isinstance(text, str) for text in texts):
            raise TypeError(f"references[{index}] must be a string or a non-empty list of strings, got {references[index]!r}")
    return sets


def first_reference(references: References) -> list[str]:
    """Only the first reference of each prediction (how single-reference scores are computed)."""
    return [item if isinstance(item, str) else item[0] for item in references]


def sentences_per_line(text: str) -> str:
    """One sentence per line, which rougeLsum needs (it scores the union of sentence-level LCSs
    and finds sentences only at newlines). Sentences end at . ! or ? followed by space; existing
    newlines are kept. ROUGE-1/2/L ignore newlines, so they are unchanged by this."""
    lines = (line.strip() for line in text.splitlines())
    return "\n".join(sentence for line in lines if line for sentence in _SENTENCE_END.split(line))


class _StemmingTokenizer(tokenizers.Tokenizer):
    """rouge-score's own tokenizer with Porter stemming (``DefaultTokenizer(use_stemmer=True)``: the same tokens),
    remembering what it did: each word is stemmed once and each text tokenized once per process. Stemming is about
    70% of ROUGE's time on summaries, whose words repeat, and a lab scores the same references for every row."""

    def __init__(self):
        self.stem = functools.lru_cache(maxsize=1 << 16)(porter.PorterStemmer().stem)  # tokenize calls .stem
        self._tokens = functools.lru_cache(maxsize=1 << 14)(lambda text: tuple(tokenize.tokenize(text, self)))

    def tokenize(self, text: str) -> list[str]:
        return list(self._tokens(text))


_TOKENIZER = _StemmingTokenizer()


def rouge(predictions: Sequence[str], references: References,
          rouge_types: Sequence[str] = ROUGE_TYPES) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures over the predictions, in [0, 1]
    (``rouge_types``: some of them only, which is quicker; each type's score does not depend on the others).

    With several references, each example scores its best reference per ROUGE type (max F-measure).

    Porter stemming is on (use_stemmer=True) and texts go one sentence per line, as in Hugging Face's
    summarization example (`evaluate.load("rouge").compute(..., use_stemmer=True)` after nltk sentence
    splitting); `evaluate` alone defaults to no stemming, so its numbers differ slightly.
    """
    scores = rouge_per_example(predictions, references, rouge_types)
    means = {}
    for rouge_type, column in scores.items():
        total = 0.0
        for value in column:  # summed in order, as rouge-score's own aggregation would (same bits)
            total += value
        means[rouge_type] = total / len(column)
    return means


def rouge_per_example(predictions: Sequence[str], references: References,
                      rouge_types: Sequence[str] = ROUGE_TYPES) -> dict[str, list[float]]:
    """Each prediction's ROUGE F-measures, one list per type in the predictions' order: what :func:`rouge`
    averages (same references, stemming and sentence split), for statistics over examples such as a paired
    bootstrap (``llmjax.lab.instruction_base_rows.share_interval``)."""
    reference_sets = _check_pair(predictions, references)
    unknown = [t for t in rouge_types if t not in ROUGE_TYPES]
    if unknown or not rouge_types:
        raise ValueError(f"rouge_types {list(rouge_types)}: choose from {list(ROUGE_TYPES)}")
    scorer = rouge_scorer.RougeScorer(list(rouge_types), tokenizer=_TOKENIZER)
    columns: dict[str, list[float]] = {rouge_type: [] for rouge_type in rouge_types}
    for prediction, reference_set in zip(predictions, reference_sets):
        scores = scorer.score_multi([sentences_per_line(r) for r in reference_set], sentences_per_line(prediction))
        for rouge_type in rouge_types:
            columns[rouge_type].append(scores[rouge_type].fmeasure)
    return columns


def bleu(predictions: Sequence[str], references: References) -> float:
    """Corpus BLEU in [0, 100] (sacrebleu defaults: 13a tokenization, up to 4-grams, exponential smoothing).

    Several references per prediction become sacrebleu's reference streams (stream k holds every
    prediction's k-th reference; None where a prediction has fewer).
    """
    reference_sets = _check_pair(predictions, references)
    streams = [[texts[k] if k < len(texts) else None for texts in reference_sets]
               for k in range(max(len(texts) for texts in reference_sets))]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and collapse whitespace, so "The end." matches "the end"."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: References, normalize: bool = True) -> float:
    """Fraction of predictions equal to one of their references, after `normalize_answer` unless normalize=False."""
    reference_sets = _check_pair(predictions, references)
    prepare = normalize_answer if normalize else (lambda text: text)
    return sum(prepare(p) in {prepare(r) for r in texts} for p, texts in zip(predictions, reference_sets)) / len(predictions)
