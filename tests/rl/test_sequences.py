"""The (prompt, response) contract: outputs aligned with response tokens for both families, padding-invariant,
the reward head's position, responses cut at the first eos."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.model_config import DecoderConfig, T5Config
from llmjax.models import build_model
from llmjax.rl.sequences import final_hidden, response_outputs, responses_of_generation

DECODER = DecoderConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, dtype="float32")
T5 = T5Config(vocab_size=61, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0, dtype="float32")


def _init(cfg):
    model = build_model(cfg)
    ids = jnp.ones((1, 4), jnp.int32)
    args = (ids, ids) if isinstance(cfg, T5Config) else (ids,)
    return model, model.init(jax.random.key(0), *args)["params"]


def _batch(prompt_rows, response_rows, P, T, left):
    def pad(rows, length, left):
        ids = np.zeros((len(rows), length), np.int32)
        mask = np.zeros_like(ids)
        for i, row in enumerate(rows):
            cols = slice(length - len(row), length) if left else slice(0, len(row))
            ids[i, cols], mask[i, cols] = row, 1
        return ids, mask
    p, pm = pad(prompt_rows, P, left)
    r, rm = pad(response_rows, T, False)
    return {"prompt_ids": p, "prompt_mask": pm, "response_ids": r, "response_mask": rm}


PROMPTS, RESPONSES = [[5, 6, 7], [8, 9, 10, 11, 12]], [[20, 21, 1], [22, 1]]


def test_decoder_outputs_are_those_of_the_unpadded_sequence_at_each_response_token():
    model, params = _init(DECODER)
    batch = _batch(PROMPTS, RESPONSES, 6, 4, left=True)
    logits, hidden = response_outputs(model, params, batch)
    assert logits.shape == (2, 4, 61) and hidden.shape == (2, 4, 32)
    final = final_hidden(model, params, batch)
    for row in range(2):
        sequence = jnp.asarray([PROMPTS[row] + RESPONSES[row]])
        full_logits, full_hidden = model.apply({"params": params}, sequence, return_hidden=True)
        P, n = len(PROMPTS[row]), len(RESPONSES[row])
        # response token t is predicted by the token before it
        np.testing.assert_allclose(logits[row, :n], full_logits[0, P - 1:P - 1 + n], atol=1e-5)
        np.testing.assert_allclose(hidden[row, :n], full_hidden[0, P - 1:P - 1 + n], atol=1e-5)
        np.testing.assert_allclose(final[row], full_hidden[0, -1], atol=1e-5)  # read the whole response


def test_t5_outputs_are_the_decoder_reading_start_then_the_response():
    model, params = _init(T5)
    batch = _batch(PROMPTS, RESPONSES, 6, 4, left=False)
    logits, hidden = response_outputs(model, params, batch)
    final = final_hidden(model, params, batch)
    for row in range(2):
        encoder = jnp.asarray([PROMPTS[row]])
        decoder = jnp.asarray([[T5.decoder_start_token_id] + RESPONSES[row]])
        full_logits, full_hidden = model.apply({"params": params}, encoder, decoder, return_hidden=True)
        n = len(RESPONSES[row])
        np.testing.assert_allclose(logits[row, :n], full_logits[0, :n], atol=1e-5)
        np.testing.assert_allclose(hidden[row, :n], full_hidden[0, :n], atol=1e-5)
        np.testing.assert_allclose(final[row], full_hidden[0, n], atol=1e-5)


@pytest.mark.parametrize("xp", [np, jnp])
def test_responses_stop_at_the_first_eos_inclusive(xp):
    tokens = xp.asarray([[4, 1, 5, 1], [4, 5, 6, 7], [1, 9, 9, 9]])
    ids, mask = responses_of_generation(tokens, eos_id=1, pad_id=0)
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    np.testing.assert_array_equal(ids, [[4, 1, 0, 0], [4, 5, 6, 7], [1, 0, 0, 0]])
