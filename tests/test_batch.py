import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.batch import is_packed, packing_features, required_features, shift_right, validate_batch


def _batch(batch_format="seq2seq", batch=2, enc=5, dec=4, packed=False):
    names = required_features(batch_format) + (packing_features(batch_format) if packed else ())
    return {
        name: np.ones((batch, enc if name.startswith("encoder") else dec), dtype=np.int32) for name in names
    }


@pytest.mark.parametrize("batch_format", ["seq2seq", "causal"])
@pytest.mark.parametrize("packed", [False, True])
def test_valid_batches_pass(batch_format, packed):
    batch = _batch(batch_format, packed=packed)
    validate_batch(batch, batch_format, batch_size=2, lengths={"decoder": 4})
    assert is_packed(batch) == packed


def test_float_loss_weights_and_jax_arrays_are_accepted():
    batch = {k: jnp.asarray(v) for k, v in _batch("causal").items()}
    batch["decoder_loss_weights"] = jnp.ones((2, 4), jnp.float32)
    validate_batch(batch, "causal")


def test_missing_feature():
    batch = _batch("seq2seq")
    del batch["decoder_target_tokens"]
    with pytest.raises(ValueError, match=r"missing feature\(s\) \['decoder_target_tokens'\]"):
        validate_batch(batch, "seq2seq")


def test_encoder_feature_in_causal_batch_is_unknown():
    batch = _batch("causal")
    batch["encoder_input_tokens"] = np.ones((2, 4), np.int32)
    with pytest.raises(ValueError, match=r"unknown feature\(s\) \['encoder_input_tokens'\].*decoder_\* names only"):
        validate_batch(batch, "causal")


def test_partial_packing_features():
    batch = _batch("seq2seq")
    batch["decoder_segment_ids"] = np.ones((2, 4), np.int32)
    expected = r"missing \['encoder_segment_ids', 'encoder_positions', 'decoder_positions'\]"
    with pytest.raises(ValueError, match=expected):
        validate_batch(batch, "seq2seq")


def test_wrong_dtype():
    batch = _batch("causal")
    batch["decoder_input_tokens"] = batch["decoder_input_tokens"].astype(np.int64)
    with pytest.raises(ValueError, match="'decoder_input_tokens' must be int32, got int64"):
        validate_batch(batch, "causal")
    batch = _batch("causal")
    batch["decoder_loss_weights"] = batch["decoder_loss_weights"].astype(np.float64)
    with pytest.raises(ValueError, match="'decoder_loss_weights' must be int32 or float32, got float64"):
        validate_batch(batch, "causal")


def test_wrong_rank():
    batch = _batch("causal")
    batch["decoder_target_tokens"] = np.ones((2, 4, 1), np.int32)
    with pytest.raises(ValueError, match=r"must have rank 2 \[batch, length\], got shape \(2, 4, 1\)"):
        validate_batch(batch, "causal")


def test_inconsistent_lengths_and_batch_sizes():
    batch = _batch("seq2seq")
    batch["decoder_loss_weights"] = np.ones((2, 3), np.int32)
    with pytest.raises(ValueError, match="inconsistent decoder lengths: 'decoder_loss_weights' has length 3"):
        validate_batch(batch, "seq2seq")
    batch = _batch("seq2seq")
    batch["decoder_input_tokens"] = np.ones((3, 4), np.int32)
    with pytest.raises(ValueError, match="inconsistent batch sizes"):
        validate_batch(batch, "seq2seq")


def test_expected_batch_size_and_lengths():
    batch = _batch("seq2seq", enc=5, dec=4)
    with pytest.raises(ValueError, match="expected batch size 8, got 2"):
        validate_batch(batch, "seq2seq", batch_size=8)
    with pytest.raises(ValueError, match="expected encoder length 6, got 5"):
        validate_batch(batch, "seq2seq", lengths={"encoder": 6, "decoder": 4})
    with pytest.raises(ValueError, match="a causal batch has no encoder_\\* features"):
        validate_batch(_batch("causal"), "causal", lengths={"encoder": 6})


def test_unknown_format():
    with pytest.raises(ValueError, match=r"batch format must be one of \('seq2seq', 'causal'\), got 'gpt'"):
        validate_batch(_batch("seq2seq"), "gpt")


def test_shift_right_numpy():
    targets = np.array([[5, 6, 7, 1], [8, 1, 0, 0]], dtype=np.int32)
    np.testing.assert_array_equal(shift_right(targets, 0), [[0, 5, 6, 7], [0, 8, 1, 0]])
    assert shift_right(targets, 0).dtype == np.int32


def test_shift_right_restarts_each_segment_and_works_under_jit():
    targets = np.array([[5, 6, 1, 7, 8, 1, 0]], dtype=np.int32)
    segments = np.array([[1, 1, 1, 2, 2, 2, 0]], dtype=np.int32)
    expected = [[0, 5, 6, 0, 7, 8, 0]]  # segment 2 starts fresh; padding gets the start id
    np.testing.assert_array_equal(shift_right(targets, 0, segments), expected)
    jitted = jax.jit(lambda t, s: shift_right(t, 0, s))(jnp.asarray(targets), jnp.asarray(segments))
    np.testing.assert_array_equal(np.asarray(jitted), expected)
