import itertools

import numpy as np
import pytest

from llmjax.data.objectives import (
    apply_noise_mask,
    causal_lm_example,
    decoder_instruction_example,
    document_span_corruption_fn,
    instruction_example,
    random_spans_noise_mask,
    render_template,
    seq2seq_instruction_example,
    span_corruption_budget,
    span_corruption_example,
    span_corruption_lengths,
    span_counts,
)
from tests.stats import chi_square, chi_square_bound

VOCAB = 300
SENTINELS = list(range(VOCAB - 1, VOCAB - 101, -1))  # extra_id_0 = 299, extra_id_1 = 298, ...
EOS = 1


def _spans(mask):
    """(start, length) of each True run, by a plain loop (independent of the code under test)."""
    spans, start = [], None
    for i, noisy in enumerate(list(mask) + [False]):
        if noisy and start is None:
            start = i
        if not noisy and start is not None:
            spans.append((start, i - start))
            start = None
    return spans


def test_fixed_mask_gives_hand_checked_inputs_and_targets():
    tokens = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1, 0, 1], dtype=bool)
    inputs, targets = apply_noise_mask(tokens, mask, SENTINELS, EOS)
    np.testing.assert_array_equal(inputs, [10, 11, 299, 14, 15, 16, 298, 18, 297, 1])
    np.testing.assert_array_equal(targets, [299, 12, 13, 298, 17, 297, 19, 1])
    assert inputs.dtype == targets.dtype == np.int32


def test_too_few_sentinels_is_an_error():
    with pytest.raises(ValueError, match="3 noise spans but only 2 sentinel ids"):
        apply_noise_mask([1, 2, 3, 4, 5, 6], np.array([1, 0, 1, 0, 1, 0], bool), [299, 298], EOS)


def test_span_counts_follow_the_t5_rounding():
    assert span_counts(100) == (15, 5)
    assert span_counts(30) == (4, 1)  # round(4.5) = 4 (half to even), round(4 / 3) = 1
    assert span_counts(2) == (1, 1)  # at least one noise token, at most length - 1
    assert span_counts(10, noise_density=0.99) == (9, 1)


def test_noise_mask_structure():
    rng = np.random.default_rng(0)
    for length in [2, 3, 7, 50, 568]:
        mask = random_spans_noise_mask(length, rng)
        num_noise, num_spans = span_counts(length)
        assert mask.shape == (length,)
        assert mask.sum() == num_noise
        assert len(_spans(mask)) == num_spans
        assert not mask[0] and mask[-1]  # starts with non-noise, ends with noise
    assert not random_spans_noise_mask(1, rng).any()


def test_span_corruption_statistics_and_no_token_lost():
    rng = np.random.default_rng(1234)
    noise_fractions, span_lengths = [], []
    for _ in range(400):
        length = int(rng.integers(100, 600))
        tokens = rng.integers(3, 200, size=length)
        mask = random_spans_noise_mask(length, rng)
        noise_fractions.append(mask.mean())
        span_lengths.extend(n for _, n in _spans(mask))
        inputs, targets = apply_noise_mask(tokens, mask, SENTINELS, EOS)
        # Targets hold every removed token, in order; inputs keep every kept token, in order.
        np.testing.assert_array_equal(targets[(targets < 200) & (targets != EOS)], tokens[mask])
        np.testing.assert_array_equal(inputs[(inputs < 200) & (inputs != EOS)], tokens[~mask])
        # Reassemble the original text: each sentinel in the inputs -> the tokens after it in the targets.
        pieces = np.split(targets[:-1], np.flatnonzero(targets[:-1] >= 200)[1:])
        fill = {int(piece[0]): list(piece[1:]) for piece in pieces}
        rebuilt = [t for i in inputs[:-1] for t in (fill[int(i)] if i >= 200 else [i])]
        assert rebuilt == list(tokens)
    assert abs(np.mean(noise_fractions) - 0.15) < 0.01
    assert abs(np.mean(span_lengths) - 3.0) < 0.2


def test_span_corruption_example_features_are_deterministic():
    tokens = np.arange(10, 60)
    a = span_corruption_example(tokens, np.random.default_rng(7), SENTINELS, EOS)
    b = span_corruption_example(tokens, np.random.default_rng(7), SENTINELS, EOS)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert sorted(a) == sorted(
        ["encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"]
    )
    np.testing.assert_array_equal(a["decoder_input_tokens"], np.concatenate([[0], a["decoder_target_tokens"][:-1]]))
    assert a["encoder_input_tokens"][-1] == EOS and a["decoder_target_tokens"][-1] == EOS
    assert (a["decoder_loss_weights"] == 1).all()


def test_t5_budget_for_512_inputs_is_568_raw_tokens_and_114_targets():
    # The numbers T5 uses for its C4 span corruption (inputs 512 -> 568 raw tokens, targets 114).
    assert span_corruption_budget(512) == (568, 114)
    # The budget is the largest raw length that fits: one more token would overflow the inputs.
    for inputs_length in [2, 5, 20, 64, 128, 513]:
        tokens_length, _ = span_corruption_budget(inputs_length)
        assert span_corruption_lengths(tokens_length)[0] <= inputs_length
        assert span_corruption_lengths(tokens_length + 1)[0] > inputs_length
    with pytest.raises(ValueError, match="inputs_length must be at least 2"):
        span_corruption_budget(1)


@pytest.mark.parametrize("tokens_length", [1, 2, 3, 10, 57, 568])
def test_predicted_lengths_match_actual_corruption(tokens_length):
    example = span_corruption_example(np.arange(3, 3 + tokens_length), np.random.default_rng(0), SENTINELS, EOS)
    actual = (len(example["encoder_input_tokens"]), len(example["decoder_target_tokens"]))
    assert span_corruption_lengths(tokens_length) == actual


def test_causal_lm_example():
    example = causal_lm_example([5, 6, 7], eos_id=EOS)
    np.testing.assert_array_equal(example["decoder_input_tokens"], [5, 6, 7])
    np.testing.assert_array_equal(example["decoder_target_tokens"], [6, 7, 1])
    np.testing.assert_array_equal(example["decoder_loss_weights"], [1, 1, 1])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        causal_lm_example([5])


def test_seq2seq_instruction_example():
    example = seq2seq_instruction_example([5, 6], [7, 8, 9], eos_id=EOS)
    np.testing.assert_array_equal(example["encoder_input_tokens"], [5, 6, 1])
    np.testing.assert_array_equal(example["decoder_input_tokens"], [0, 7, 8, 9])
    np.testing.assert_array_equal(example["decoder_target_tokens"], [7, 8, 9, 1])
    np.testing.assert_array_equal(example["decoder_loss_weights"], [1, 1, 1, 1])


def test_decoder_instruction_example_has_loss_only_on_targets():
    example = decoder_instruction_example([5, 6, 7], [8, 9], eos_id=EOS)
    np.testing.assert_array_equal(example["decoder_input_tokens"], [5, 6, 7, 8, 9])
    np.testing.assert_array_equal(example["decoder_target_tokens"], [6, 7, 8, 9, 1])
    np.testing.assert_array_equal(example["decoder_loss_weights"], [0, 0, 1, 1, 1])
    with_bos = decoder_instruction_example([5], [8], eos_id=EOS, bos_id=2)
    np.testing.assert_array_equal(with_bos["decoder_input_tokens"], [2, 5, 8])
    np.testing.assert_array_equal(with_bos["decoder_loss_weights"], [0, 1, 1])
    with pytest.raises(ValueError, match="non-empty prompt or a bos_id"):
        decoder_instruction_example([], [8], eos_id=EOS)


def test_templates():
    assert render_template("Summarize: {dialogue}", {"dialogue": "hi", "x": 1}) == "Summarize: hi"
    with pytest.raises(KeyError, match=r"needs field\(s\) \['dialogue'\], example has \['text'\]"):
        render_template("Summarize: {dialogue}", {"text": "hi"})
    encode = lambda text: [ord(c) for c in text]  # noqa: E731  (a byte-level stand-in for a tokenizer)
    example = instruction_example({"q": "ab", "a": "c"}, "{q}?", "{a}", encode, EOS, batch_format="causal")
    np.testing.assert_array_equal(example["decoder_target_tokens"], [98, 63, 99, 1])
    np.testing.assert_array_equal(example["decoder_loss_weights"], [0, 0, 1, 1])
    example = instruction_example({"q": "ab", "a": "c"}, "{q}?", "{a}", encode, EOS, batch_format="seq2seq")
    np.testing.assert_array_equal(example["encoder_input_tokens"], [97, 98, 63, 1])


class _WordTokenizer:
    """Word ids from a fixed list; sentinels as in ``SENTINELS``."""

    eos_id, num_extra_ids = EOS, len(SENTINELS)

    def encode(self, text, add_eos=True):
        return [10 + int(word) for word in text.split()] + ([EOS] if add_eos else [])

    def sentinel_id(self, i):
        return SENTINELS[i]


def _uncorrupt(example):
    """The raw tokens back: each sentinel of the inputs replaced by its span from the targets."""
    spans, current = {}, None
    for token in example["decoder_target_tokens"][:-1].tolist():
        if token in SENTINELS:
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    out = []
    for token in example["encoder_input_tokens"][:-1].tolist():
        out.extend(spans[token] if token in SENTINELS else [token])
    return out


def test_document_span_corruption_cuts_a_document_into_chunks_that_fit_and_lose_nothing():
    document = {"text": " ".join(str(i % 150) for i in range(300))}
    fn = document_span_corruption_fn(_WordTokenizer(), encoder_length=64, decoder_length=20)
    examples = fn(document, np.random.default_rng(0))
    chunk, targets_length = span_corruption_budget(64)
    assert len(examples) == -(-300 // chunk)
    assert all(len(e["encoder_input_tokens"]) <= 64 and len(e["decoder_target_tokens"]) <= targets_length
               for e in examples)
    assert len(examples[0]["encoder_input_tokens"]) == 64  # a full chunk fills the encoder row exactly
    restored = [token for example in examples for token in _uncorrupt(example)]
    assert restored == [10 + i % 150 for i in range(300)]
    assert fn({"text": ""}, np.random.default_rng(0)) is None
    with pytest.raises(ValueError, match="more than decoder_length=8"):
        document_span_corruption_fn(_WordTokenizer(), encoder_length=64, decoder_length=8)


def _composition_pmf(total, parts):
    """P(one part has length j), j = 0..total, when ``total`` items are cut into ``parts`` non-empty runs with
    every cut equally likely (T5's random_spans_noise_mask): counted over all C(total - 1, parts - 1) cuts."""
    counts = np.zeros(total + 1)
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        for start, end in zip(bounds, bounds[1:]):
            counts[end - start] += 1
    return counts / counts.sum()


def test_span_lengths_are_a_random_partition_like_t5():
    # Length 60: 9 noise tokens in 3 spans, 51 kept tokens in 3 runs. Over 1000 seeds the span lengths must
    # follow the law of a uniformly random composition (an even split of 9 into 3 x 3 has no spread at all).
    length = 60
    num_noise, num_spans = span_counts(length)
    assert (num_noise, num_spans) == (9, 3)
    noise_lengths, kept_lengths, masks = [], [], set()
    for seed in range(1000):
        mask = random_spans_noise_mask(length, np.random.default_rng(seed))
        spans = _spans(mask)
        assert mask.sum() == num_noise and len(spans) == num_spans  # exact counts, every seed
        noise_lengths.extend(n for _, n in spans)
        kept_lengths.extend(n for _, n in _spans(~mask))
        masks.add(mask.tobytes())
    for observed, total in ((noise_lengths, num_noise), (kept_lengths, length - num_noise)):
        pmf = _composition_pmf(total, num_spans)
        counts = np.bincount(observed, minlength=len(pmf))
        assert len(counts) == len(pmf)  # no length beyond the total
        statistic, dof = chi_square(counts, pmf * len(observed))
        assert statistic < chi_square_bound(dof), (total, statistic, dof)
        support = np.arange(len(pmf))
        variance = np.sum(pmf * support**2) - np.sum(pmf * support) ** 2
        assert abs(np.var(observed) / variance - 1) < 0.15, (total, np.var(observed), variance)
    # There are C(8, 2) * C(50, 2) = 34,300 possible masks: 1000 seeds give nearly 1000 different ones.
    assert len(masks) > 900


def test_span_counts_are_exact_for_every_length():
    rng = np.random.default_rng(5)
    for length in range(2, 400):
        for density, mean_span in ((0.15, 3.0), (0.5, 8.0)):
            mask = random_spans_noise_mask(length, rng, density, mean_span)
            num_noise, num_spans = span_counts(length, density, mean_span)
            assert mask.sum() == num_noise and len(_spans(mask)) == num_spans, (length, density)
            assert len(_spans(~mask)) == num_spans and not mask[0]  # kept run before every noise span
