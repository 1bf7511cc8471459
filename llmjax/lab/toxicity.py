"""The detox lab's independent toxicity judge: `alt-profanity-check`, a classifier the project neither
wrote nor trained (a linear SVM on TF-IDF features, calibrated, trained on real toxic comments).

As in the course, a text's toxicity is the judge's probability of the toxic class and a model's
toxicity the mean over its generations. The judge is a bag of words whose TF-IDF vector is normalized
per text, so one insult weighs less in a long text than in a short one: score summaries, not whole
dialogues. Optional extra: `pip install 'llmjax[judge]'` (pulls scikit-learn).
"""

from __future__ import annotations

import numpy as np

from llmjax.errors import UserError


class JudgeNotInstalledError(UserError, ImportError):
    """The toxicity judge's package is missing."""


def _predict_prob():
    try:  # lazily: the package loads its model from disk on import and pulls in scikit-learn
        from profanity_check import predict_prob
    except ImportError as error:
        raise JudgeNotInstalledError(f"the toxicity judge needs alt-profanity-check ({error}); "
                                     "install it with: pip install 'llmjax[judge]'") from None
    return predict_prob


def judge_toxicity(texts: list[str]) -> np.ndarray:
    """The judge's probability that each text is toxic: `[len(texts)]` float64 in [0, 1]."""
    texts = list(texts)
    if not texts:
        return np.zeros((0,), np.float64)
    return np.asarray(_predict_prob()(texts), dtype=np.float64)


def mean_toxicity(texts: list[str]) -> float:
    """The mean toxic-class probability over `texts` (the course's toxicity score); 0.0 for none."""
    scores = judge_toxicity(texts)
    return float(scores.mean()) if scores.size else 0.0
