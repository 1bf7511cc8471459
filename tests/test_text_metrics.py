"""ROUGE/BLEU/exact match against values worked out by hand from n-gram counts and LCS lengths."""

import math

import pytest
import sacrebleu

from llmjax.text_metrics import bleu, exact_match, normalize_answer, rouge, sentences_per_line


def f1(hits: int, predicted: int, reference: int) -> float:
    precision, recall = hits / predicted, hits / reference
    return 2 * precision * recall / (precision + recall)


def test_rouge_matches_hand_counts():
    prediction = "the cat sat on the mat"  # 6 tokens, 5 bigrams
    reference = "the cat lay on the red mat"  # 7 tokens, 6 bigrams
    # unigram overlap (clipped counts): the x2, cat, on, mat = 5
    # bigram overlap: "the cat", "on the" = 2
    # LCS: "the cat on the mat" = 5
    scores = rouge([prediction], [reference])
    assert scores["rouge1"] == pytest.approx(f1(5, 6, 7))  # 10/13
    assert scores["rouge2"] == pytest.approx(f1(2, 5, 6))  # 4/11
    assert scores["rougeL"] == pytest.approx(f1(5, 6, 7))
    assert scores["rougeLsum"] == pytest.approx(f1(5, 6, 7))  # one sentence: same as rougeL


def test_rouge_stems_words():
    # Porter stems: cats -> cat, running/runs -> run; "are" has no match. Overlap 3 of 4 predicted, 3 of 3 reference.
    assert rouge(["The cats are running."], ["the cat runs"])["rouge1"] == pytest.approx(f1(3, 4, 3))


def test_rouge_lsum_scores_sentence_by_sentence():
    prediction, reference = "The cat sat. The dog ran.", "The dog ran. The cat sat."
    scores = rouge([prediction], [reference])
    # Over the whole text the LCS is one 3-word sentence of 6 tokens; rougeLsum takes the union of
    # per-sentence LCSs, and each reference sentence is matched whole by a predicted sentence.
    assert scores["rougeL"] == pytest.approx(f1(3, 6, 6))
    assert scores["rougeLsum"] == pytest.approx(1.0)
    assert sentences_per_line(prediction) == "The cat sat.\nThe dog ran."


def test_rouge_averages_pairs_and_scores_identity_as_one():
    scores = rouge(["a b c d", "x y"], ["a b c d", "p q"])
    assert scores == {"rouge1": 0.5, "rouge2": 0.5, "rougeL": 0.5, "rougeLsum": 0.5}


def test_bleu_matches_hand_computation_and_sacrebleu():
    prediction, reference = "the cat sat on the mat", "the cat sat on the red mat"
    # modified n-gram precisions 6/6, 4/5, 3/4, 2/3; brevity penalty exp(1 - 7/6)
    expected = 100 * math.exp(1 - 7 / 6) * (1 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    assert bleu([prediction], [reference]) == pytest.approx(expected, abs=1e-9)
    predictions = [prediction, "a quick brown fox jumps"]
    references = [reference, "the quick brown fox jumped"]
    assert bleu(predictions, references) == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)


def test_bleu_identical_is_100():
    texts = ["#Person1# buys two red hats for $40.", "They meet at 7:30 pm on Friday."]
    assert bleu(texts, texts) == pytest.approx(100.0)


def test_exact_match_normalizes_case_punctuation_and_spaces():
    assert normalize_answer("  The  END. ") == "the end"
    assert exact_match(["The end.", "yes", "no"], ["the  end", "Yes!", "maybe"]) == pytest.approx(2 / 3)
    assert exact_match(["The end."], ["the end"], normalize=False) == 0.0


@pytest.mark.parametrize("metric", [rouge, bleu, exact_match])
def test_length_mismatch_and_bad_types_are_clear_errors(metric):
    with pytest.raises(ValueError, match="got 2 predictions but 1 references; pass exactly one reference per prediction"):
        metric(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="got a single string; wrap it in a list"):
        metric("a b", ["a b"])
    with pytest.raises(ValueError, match="no predictions to score"):
        metric([], [])
