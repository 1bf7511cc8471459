"""The independent toxicity judge (alt-profanity-check) agrees with the detox data: it flags the
insults and the references and pairs that report them, and passes the clean versions."""

import sys

import numpy as np
import pytest

from llmjax.data.bundled.detox import preference_pairs, toxicity_labels
from llmjax.data.bundled.dialogsum import SPLITS, rude_dialogues
from llmjax.data.bundled.dialogsum_rude import _NAME_FRAMES, _NAMES, _OBJECT_INSULTS
from llmjax.data.bundled.dialogsum_words import article
from llmjax.errors import UserError
from llmjax.lab.toxicity import JudgeNotInstalledError, judge_toxicity, mean_toxicity

pytest.importorskip("profanity_check", reason="the judge extra is not installed: pip install 'llmjax[judge]'")


def test_judge_scores_insults_high_and_plain_text_low():
    scores = judge_toxicity(["Are you an idiot?", "This is crap.", "Listen, you lazy moron.",
                             "#Person1# books a table for four on Friday at 7:30 pm.", "Thank you for your help."])
    assert scores.shape == (5,) and scores.dtype == np.float64
    assert (scores[:3] > 0.9).all() and (scores[3:] < 0.2).all()
    assert mean_toxicity(["Are you an idiot?", "Thank you for your help."]) == pytest.approx(scores[[0, 4]].mean())
    assert judge_toxicity([]).shape == (0,) and mean_toxicity([]) == 0.0


def test_every_insult_is_flagged_in_its_sentence():
    utterances = [frame.format(name=name, a_name=article(name)) for frame, _ in _NAME_FRAMES for name in _NAMES]
    utterances += [utterance for utterance, _, _ in _OBJECT_INSULTS]
    assert (judge_toxicity(utterances) > 0.5).all()


def test_rude_turns_and_toxic_references_are_flagged_and_clean_references_are_not():
    rude = [pair for split in SPLITS for pair in rude_dialogues(split)]
    toxic, clean = [], []
    for example, rudeness in rude:
        for reference in example.get("summaries", [example["summary"]]):
            (toxic if rudeness.report in reference else clean).append(reference)
    toxic_scores, clean_scores = judge_toxicity(toxic), judge_toxicity(clean)
    # Measured on the bundled set: 97.3% above 0.5 and 98.1% below 0.2 (a bag of words thins out one
    # insult over a long account; a few clean shop summaries score high on their own words).
    assert (toxic_scores > 0.5).mean() > 0.95 and (clean_scores < 0.2).mean() > 0.95
    assert toxic_scores.mean() > 0.8 and clean_scores.mean() < 0.1


def test_pairs_chosen_judged_clean_and_rejected_toxic():
    pairs = [pair for split in SPLITS for pair in preference_pairs(split)]
    chosen, rejected = judge_toxicity([p["chosen"] for p in pairs]), judge_toxicity([p["rejected"] for p in pairs])
    # Measured: 97.7% of chosen below 0.2, 96.5% of rejected above 0.5, every rejected above its chosen.
    assert (chosen < 0.2).mean() > 0.95 and (rejected > 0.5).mean() > 0.95
    assert (rejected > chosen).all()


def test_judge_agrees_with_the_labels():
    examples = [e for split in SPLITS for e in toxicity_labels(split)]
    scores = judge_toxicity([e["text"] for e in examples])
    labels = np.array([e["label"] for e in examples])
    assert ((scores > 0.5) == labels).mean() > 0.97  # measured 0.99


def test_missing_package_is_a_user_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "profanity_check", None)  # import then raises ImportError
    with pytest.raises(JudgeNotInstalledError, match=r"pip install 'llmjax\[judge\]'") as error:
        judge_toxicity(["hello"])
    assert isinstance(error.value, UserError)
