import numpy as np
import pytest

from llmjax.batch import validate_batch
from llmjax.data.objectives import causal_lm_example, seq2seq_instruction_example
from llmjax.data.packing import RowPacker, pack_examples

EOS = 1


def test_decoder_only_first_fit_layout():
    # Lengths 3, 4, 2, 1 into rows of 6: [a a a c c d] and [b b b b . .] (c and d fill row 1's gap).
    examples = [
        causal_lm_example([10, 11, 12, 13]),  # a: 3 tokens
        causal_lm_example([20, 21, 22, 23, 24]),  # b: 4 tokens
        causal_lm_example([30, 31, 32]),  # c: 2 tokens
        causal_lm_example([40, 41]),  # d: 1 token
    ]
    batch = pack_examples(examples, decoder_length=6)
    validate_batch(batch, "causal", batch_size=2, lengths={"decoder": 6})
    np.testing.assert_array_equal(batch["decoder_input_tokens"], [[10, 11, 12, 30, 31, 40], [20, 21, 22, 23, 0, 0]])
    np.testing.assert_array_equal(batch["decoder_target_tokens"], [[11, 12, 13, 31, 32, 41], [21, 22, 23, 24, 0, 0]])
    np.testing.assert_array_equal(batch["decoder_segment_ids"], [[1, 1, 1, 2, 2, 3], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["decoder_positions"], [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]])
    np.testing.assert_array_equal(batch["decoder_loss_weights"], [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def test_seq2seq_sides_share_segment_ids_and_both_must_fit():
    examples = [
        seq2seq_instruction_example([5, 6], [7], EOS),  # encoder 3, decoder 2
        seq2seq_instruction_example([8], [9, 10], EOS),  # encoder 2, decoder 3: decoder side does not fit row 1
        seq2seq_instruction_example([11], [], EOS),  # encoder 2, decoder 1: fits row 1
    ]
    batch = pack_examples(examples, decoder_length=4, encoder_length=5)
    validate_batch(batch, "seq2seq", batch_size=2, lengths={"encoder": 5, "decoder": 4})
    np.testing.assert_array_equal(batch["encoder_input_tokens"], [[5, 6, 1, 11, 1], [8, 1, 0, 0, 0]])
    np.testing.assert_array_equal(batch["encoder_segment_ids"], [[1, 1, 1, 2, 2], [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(batch["encoder_positions"], [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(batch["decoder_target_tokens"], [[7, 1, 1, 0], [9, 10, 1, 0]])
    np.testing.assert_array_equal(batch["decoder_input_tokens"], [[0, 7, 0, 0], [0, 9, 10, 0]])
    np.testing.assert_array_equal(batch["decoder_segment_ids"], [[1, 1, 2, 0], [1, 1, 1, 0]])
    np.testing.assert_array_equal(batch["decoder_positions"], [[0, 1, 0, 0], [0, 1, 2, 0]])
    np.testing.assert_array_equal(batch["decoder_loss_weights"], [[1, 1, 1, 0], [1, 1, 1, 0]])


def test_too_long_example_names_its_index_and_length():
    examples = [causal_lm_example([1, 2, 3]), causal_lm_example(list(range(10)))]
    with pytest.raises(ValueError, match="example 1 has decoder length 9, longer than the row length 6.*truncate=True"):
        pack_examples(examples, decoder_length=6)


def test_truncate_cuts_to_the_row():
    batch = pack_examples([causal_lm_example(list(range(10, 20)))], decoder_length=4, truncate=True)
    np.testing.assert_array_equal(batch["decoder_input_tokens"], [[10, 11, 12, 13]])
    np.testing.assert_array_equal(batch["decoder_target_tokens"], [[11, 12, 13, 14]])
    np.testing.assert_array_equal(batch["decoder_segment_ids"], [[1, 1, 1, 1]])


def test_one_segment_per_row_is_plain_padding():
    packer = RowPacker(decoder_length=5, max_rows=3, max_segments_per_row=1)
    assert packer.add(causal_lm_example([1, 2, 3]))
    assert packer.add(causal_lm_example([4, 5]))
    batch = packer.to_batch(num_rows=3, include_segments=False)
    assert sorted(batch) == ["decoder_input_tokens", "decoder_loss_weights", "decoder_target_tokens"]
    np.testing.assert_array_equal(batch["decoder_input_tokens"], [[1, 2, 0, 0, 0], [4, 0, 0, 0, 0], [0] * 5])
    np.testing.assert_array_equal(batch["decoder_loss_weights"], [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0] * 5])


def test_full_packer_refuses_without_changing():
    packer = RowPacker(decoder_length=4, max_rows=1)
    assert packer.add(causal_lm_example([1, 2, 3, 4]))
    assert not packer.add(causal_lm_example([5, 6, 7]))  # 2 tokens, 1 slot left
    assert len(packer) == 1
    np.testing.assert_array_equal(packer.to_batch()["decoder_input_tokens"], [[1, 2, 3, 0]])


def test_wrong_features_and_empty_sides():
    seq2seq = seq2seq_instruction_example([5], [7], EOS)
    with pytest.raises(ValueError, match="decoder-only packing expects.*pass encoder_length for seq2seq"):
        pack_examples([seq2seq], decoder_length=4)
    empty = {name: np.zeros(0, np.int32) for name in causal_lm_example([1, 2])}
    with pytest.raises(ValueError, match="example 0 has no decoder tokens"):
        pack_examples([empty], decoder_length=4)


def test_truncation_is_counted_per_side_for_placed_examples_only():
    packer = RowPacker(decoder_length=4, encoder_length=3, max_rows=1, max_segments_per_row=1, truncate=True)
    assert packer.add(seq2seq_instruction_example([5, 6, 7, 8, 9], [2], eos_id=1))  # encoder cut to 3
    assert not packer.add(seq2seq_instruction_example([5], [2, 3, 4, 5, 6], eos_id=1))  # decoder cut, but no row: refused
    assert packer.truncated == {"decoder": 0, "encoder": 1} and packer.num_examples == 1
