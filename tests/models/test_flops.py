"""FLOP counts of a train step: dense part against the models' actual matmul parameters, attention by hand."""

from __future__ import annotations

import dataclasses
import math

import jax
import pytest

from llmjax.models import build_model, init_params
from llmjax.models.decoder import DecoderConfig
from llmjax.models.t5 import T5Config
from llmjax.models import step_flops
from llmjax.models.flops import decoder_step_flops, t5_step_flops

T5_TINY = T5Config(vocab_size=96, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=3, num_heads=2,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False)
DECODER_TINY = DecoderConfig(vocab_size=96, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)


def matmul_params(config) -> int:
    """Entries of every 2-D weight applied as a matmul: kernels, plus a tied embedding used as the head."""
    params = init_params(build_model(config), jax.random.PRNGKey(0))
    leaves = jax.tree_util.tree_leaves_with_path(params)
    total = sum(math.prod(x.shape) for path, x in leaves if path[-1].key == "kernel")
    if config.tie_word_embeddings:
        total += config.vocab_size * (config.d_model if isinstance(config, T5Config) else config.hidden_size)
    return total


@pytest.mark.parametrize("tied", [False, True])
def test_decoder_dense_flops_are_six_times_matmul_params_per_token(tied):
    config = dataclasses.replace(DECODER_TINY, tie_word_embeddings=tied)
    flops = decoder_step_flops(config, batch=3, length=5)
    assert flops.tokens == 15
    assert flops.dense == 6 * matmul_params(config) * 15


@pytest.mark.parametrize("tied", [False, True])
def test_t5_dense_flops_equal_lengths_are_six_times_matmul_params_per_token(tied):
    # with equal encoder and decoder lengths every matmul param sees the same number of tokens
    config = dataclasses.replace(T5_TINY, tie_word_embeddings=tied)
    flops = t5_step_flops(config, batch=2, encoder_length=7, decoder_length=7)
    assert flops.dense == 6 * matmul_params(config) * 14
    assert flops.tokens == 28


def test_t5_counts_encoder_and_decoder_tokens_separately_by_hand():
    d, d_attn, d_ff, vocab = 16, 8, 24, 96
    batch, enc, dec = 2, 10, 3
    enc_tokens, dec_tokens = batch * enc, batch * dec
    encoder = 2 * (4 * d * d_attn + 3 * d * d_ff) * enc_tokens
    cross_kv = 3 * 2 * d * d_attn * enc_tokens
    decoder = (3 * (6 * d * d_attn + 3 * d * d_ff) + d * vocab) * dec_tokens
    attention = 12 * d_attn * (2 * enc * enc_tokens + 3 * (dec + enc) * dec_tokens)
    flops = t5_step_flops(T5_TINY, batch, enc, dec)
    assert flops.dense == 6 * (encoder + cross_kv + decoder)
    assert flops.attention == attention
    assert flops.total == flops.dense + attention


def test_decoder_attention_by_hand():
    # 12 * layers * (query heads * head_dim) * keys * query tokens; GQA does not shrink it
    assert decoder_step_flops(DECODER_TINY, batch=3, length=5).attention == 12 * 2 * 16 * 5 * 15


def test_virtual_tokens_lengthen_the_input_but_get_no_lm_head():
    # decoder: the layers see length + n positions, the LM head only the length real ones
    batch, length, n = 3, 5, 2
    plain = decoder_step_flops(DECODER_TINY, batch, length + n)
    prompted = decoder_step_flops(DECODER_TINY, batch, length, virtual_tokens=n)
    assert prompted.tokens == batch * (length + n) == plain.tokens
    assert prompted.attention == plain.attention == 12 * 2 * 16 * 7 * 21
    assert prompted.dense == plain.dense - 6 * 16 * 96 * batch * n
    assert step_flops(DECODER_TINY, batch, length, virtual_tokens=n) == prompted
    # T5: the soft prompt lengthens the encoder input
    assert step_flops(T5_TINY, 2, 3, encoder_length=10, virtual_tokens=4) == t5_step_flops(T5_TINY, 2, 14, 3)


def test_step_flops_dispatches_and_t5_needs_encoder_length():
    assert step_flops(DECODER_TINY, 3, 5) == decoder_step_flops(DECODER_TINY, 3, 5)
    assert step_flops(T5_TINY, 2, 3, encoder_length=10) == t5_step_flops(T5_TINY, 2, 10, 3)
    with pytest.raises(ValueError, match="T5 FLOPs need encoder_length"):
        step_flops(T5_TINY, 2, 3)
