"""Text metrics for generated summaries: ROUGE (rouge_score), BLEU (sacrebleu) and exact match.

Each takes `predictions` and `references`, two equally long lists of strings, one reference per
prediction. Scales follow the libraries people compare against: ROUGE F-measures in [0, 1] (like
Hugging Face `evaluate`), BLEU in [0, 100] (like sacrebleu), exact match in [0, 1].
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import sacrebleu
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _check_pair(predictions: Sequence[str], references: Sequence[str]) -> None:
    for name, texts in (("predictions", predictions), ("references", references)):
        if isinstance(texts, str):
            raise TypeError(f"{name} must be a list of strings, got a single string; wrap it in a list")
        if not all(isinstance(text, str) for text in texts):
            raise TypeError(f"{name} must contain only strings; decode token ids to text first")
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references; "
                         "pass exactly one reference per prediction")
    if not predictions:
        raise ValueError("no predictions to score; pass at least one prediction/reference pair")


def sentences_per_line(text: str) -> str:
    """One sentence per line, which rougeLsum needs (it scores the union of sentence-level LCSs
    and finds sentences only at newlines). Sentences end at . ! or ? followed by space; existing
    newlines are kept. ROUGE-1/2/L ignore newlines, so they are unchanged by this."""
    lines = (line.strip() for line in text.splitlines())
    return "\n".join(sentence for line in lines if line for sentence in _SENTENCE_END.split(line))


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures over the pairs, in [0, 1].

    Porter stemming is on (use_stemmer=True) and texts go one sentence per line, as in Hugging Face's
    summarization example (`evaluate.load("rouge").compute(..., use_stemmer=True)` after nltk sentence
    splitting); `evaluate` alone defaults to no stemming, so its numbers differ slightly.
    """
    _check_pair(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(target=sentences_per_line(reference), prediction=sentences_per_line(prediction))
        for rouge_type in ROUGE_TYPES:
            totals[rouge_type] += scores[rouge_type].fmeasure
    return {rouge_type: total / len(predictions) for rouge_type, total in totals.items()}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU in [0, 100] (sacrebleu defaults: 13a tokenization, up to 4-grams, exponential smoothing)."""
    _check_pair(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and collapse whitespace, so "The end." matches "the end"."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str], normalize: bool = True) -> float:
    """Fraction of predictions equal to their reference, after `normalize_answer` unless normalize=False."""
    _check_pair(predictions, references)
    prepare = normalize_answer if normalize else (lambda text: text)
    return sum(prepare(p) == prepare(r) for p, r in zip(predictions, references)) / len(predictions)
