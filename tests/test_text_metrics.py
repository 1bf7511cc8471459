"""ROUGE/BLEU/exact match against values worked out by hand from n-gram counts and LCS lengths."""

import math

import pytest
import sacrebleu

from llmjax.text_metrics import (ROUGE_TYPES, bleu, exact_match, first_reference, normalize_answer, rouge,
                                 rouge_per_example, sentences_per_line)


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


def test_rouge_of_some_types_scores_them_as_the_whole_does():
    predictions, references = ["The cat sat. The dog ran.", "a b c"], [["The dog ran. The cat sat.", "x"], ["a c"]]
    every = rouge(predictions, references)
    assert rouge(predictions, references, ("rougeL", "rouge2")) == {"rougeL": every["rougeL"], "rouge2": every["rouge2"]}
    with pytest.raises(ValueError, match=r"rouge_types \['rougeX'\]: choose from"):
        rouge(predictions, references, ("rougeX",))


def test_rouge_per_example_gives_each_pairs_hand_count_and_rouge_is_their_mean():
    predictions = ["the cat sat on the mat", "a b c", "x y"]
    references = ["the cat lay on the red mat", ["a c", "q"], "z"]
    each = rouge_per_example(predictions, references, ("rouge1", "rougeL"))
    assert each["rouge1"] == pytest.approx([f1(5, 6, 7), f1(2, 3, 2), 0.0])  # the best reference of the second
    assert each["rougeL"] == pytest.approx([f1(5, 6, 7), f1(2, 3, 2), 0.0])
    means = rouge(predictions, references, ("rouge1", "rougeL"))
    assert means == {t: (each[t][0] + each[t][1] + each[t][2]) / 3 for t in ("rouge1", "rougeL")}  # the same bits
    with pytest.raises(ValueError, match="got 3 predictions but 2 references"):
        rouge_per_example(predictions, references[:2])


def test_rouge_stems_words():
    # Porter stems: cats -> cat, running/runs -> run; "are" has no match. Overlap 3 of 4 predicted, 3 of 3 reference.
    assert rouge(["The cats are running."], ["the cat runs"])["rouge1"] == pytest.approx(f1(3, 4, 3))


def test_rouge_equals_rouge_scores_own_stemming_scorer_on_the_bundled_summaries():
    """The remembering tokenizer changes nothing: every score equals rouge-score's ``use_stemmer=True`` scorer's."""
    from rouge_score import rouge_scorer

    from llmjax.data.bundled.dialogsum import bundled_dialogsum

    examples = bundled_dialogsum("test")[:60]
    predictions = [e["summaries"][-1] + " Running, relational, generously." for e in examples]
    references = [e["summaries"][:2] for e in examples]
    theirs = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    for _ in range(2):  # the second pass reads the remembered tokens
        ours = rouge(predictions, references)
        for rouge_type in ROUGE_TYPES:
            expected = sum(theirs.score_multi([sentences_per_line(r) for r in refs], sentences_per_line(p))[
                rouge_type].fmeasure for p, refs in zip(predictions, references)) / len(predictions)
            assert ours[rouge_type] == expected, rouge_type


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
    with pytest.raises(ValueError, match=r"got 2 predictions but 1 references; pass exactly one reference \(or one list of references\) per prediction"):
        metric(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="got a single string; wrap it in a list"):
        metric("a b", ["a b"])
    with pytest.raises(ValueError, match="no predictions to score"):
        metric([], [])


def test_rouge_with_several_references_takes_the_best_per_type():
    # "a b c d" vs "d c b a": all unigrams match (R1 = 1), no bigram does; vs "a b x y": 2 of 4
    # unigrams (R1 = 0.5) and 1 of 3 bigrams ("a b", R2 = 1/3). Each type keeps its best reference.
    scores = rouge(["a b c d"], [["d c b a", "a b x y"]])
    assert scores["rouge1"] == pytest.approx(1.0) and scores["rouge2"] == pytest.approx(1 / 3)
    # One matching reference among unrelated ones scores as if it were alone: 5 of 6 unigrams.
    scores = rouge(["the cat sat on the mat"], [["a dog ran", "the cat sat on a mat"]])
    assert scores["rouge1"] == pytest.approx(5 / 6)
    assert rouge(["the cat sat on the mat"], [["the cat sat on a mat"]]) == rouge(["the cat sat on the mat"], ["the cat sat on a mat"])


def test_bleu_with_several_references():
    prediction = "the cat sat on the mat"
    references = ["the cat sat on a mat", "a cat sat on the mat"]
    # Clipped n-gram matches against either reference: 5/6 unigrams ("the" twice, at most once in each),
    # 5/5 bigrams, 4/4 trigrams, 3/3 4-grams; lengths equal, so no brevity penalty.
    assert bleu([prediction], [references]) == pytest.approx(100 * (5 / 6) ** 0.25, abs=1e-9)
    # A second prediction with a single reference: the corpus has 7/8, 6/6, 4/4, 3/3 matches.
    assert bleu([prediction, "a dog"], [references, ["a dog"]]) == pytest.approx(100 * (7 / 8) ** 0.25, abs=1e-9)


def test_exact_match_with_several_references_and_first_reference():
    assert exact_match(["x", "y"], [["a", "X."], "b"]) == pytest.approx(0.5)
    assert first_reference([["a", "b"], "c"]) == ["a", "c"]
    with pytest.raises(TypeError, match=r"references\[0\] must be a string or a non-empty list of strings"):
        rouge(["a"], [[]])
