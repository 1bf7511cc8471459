"""T5 module: parameter tree, init scales, LM head, KV cache, packing, dropout, dtypes.

Logits parity with transformers lives in tests/hf/test_t5_hf.py; scan on vs off and remat in
tests/models/test_scan.py. ``TIED`` scans its layers (the default), ``UNTIED`` unrolls them, so the
tests that take the ``model_and_params`` fixture cover both layouts.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.models import build_model, init_params, logical_axes
from llmjax.models.t5 import T5, T5Config

TIED = T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0,
                relative_attention_num_buckets=8, relative_attention_max_distance=12)
UNTIED = dataclasses.replace(TIED, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                             num_layers=1, num_decoder_layers=2, d_kv=6, num_heads=3, scan_layers=False)


@functools.partial(
    jax.jit, static_argnums=0, static_argnames=("deterministic", "decode", "return_hidden", "method", "mutable")
)
def apply(model, variables, *args, **kwargs):
    """``model.apply`` compiled (eager dispatch of a whole T5 is slower than compiling it)."""
    return model.apply(variables, *args, **kwargs)


def init(model, seed=0):
    """``init_params`` compiled: eager initialization dispatches hundreds of small ops."""
    return jax.jit(init_params, static_argnums=0)(model, jax.random.key(seed))


def abstract_params(config):
    """Parameter shapes/dtypes without computing anything."""
    return jax.eval_shape(lambda: init_params(build_model(config), jax.random.key(0)))


def ids(seed, shape, vocab=97):
    return jax.random.randint(jax.random.key(seed), shape, 2, vocab, dtype=jnp.int32)


@pytest.fixture(scope="module", params=["tied", "untied"])
def model_and_params(request):
    config = TIED if request.param == "tied" else UNTIED
    model = build_model(config)
    return model, init(model, 0)


def test_parameter_tree_names_and_shapes():
    params = abstract_params(UNTIED)
    assert sorted(params) == ["decoder", "encoder", "lm_head", "shared"]
    assert sorted(params["encoder"]) == ["final_norm", "layers_0", "relative_position_bias"]
    assert sorted(k for k in params["decoder"] if k.startswith("layers_")) == ["layers_0", "layers_1"]
    layer = params["decoder"]["layers_1"]
    assert sorted(layer) == ["cross_attention", "cross_attention_norm", "mlp", "mlp_norm",
                             "self_attention", "self_attention_norm"]
    assert layer["self_attention"]["q"]["kernel"].shape == (32, 18)  # d_model x heads*d_kv (3*6)
    assert layer["cross_attention"]["o"]["kernel"].shape == (18, 32)
    assert sorted(layer["mlp"]) == ["wi_0", "wi_1", "wo"]
    assert params["decoder"]["relative_position_bias"]["rel_embedding"].shape == (8, 3)
    assert params["lm_head"]["kernel"].shape == (32, 97)
    tied = abstract_params(TIED)  # scanned: [num_layers, ...] leaves under "layers"
    assert "lm_head" not in tied and sorted(tied["encoder"]) == ["final_norm", "layers", "relative_position_bias"]
    assert sorted(tied["encoder"]["layers"]["mlp"]) == ["wi", "wo"]
    assert tied["decoder"]["layers"]["cross_attention"]["q"]["kernel"].shape == (2, 32, 32)


def test_logical_axes_cover_every_parameter():
    specs = logical_axes(build_model(UNTIED))
    assert tuple(specs["shared"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["encoder"]["layers_0"]["self_attention"]["q"]["kernel"]) == ("embed", "heads")
    assert tuple(specs["decoder"]["layers_0"]["mlp"]["wo"]["kernel"]) == ("mlp", "embed")
    assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")
    scanned = logical_axes(build_model(TIED))
    assert tuple(scanned["encoder"]["layers"]["self_attention"]["q"]["kernel"]) == ("layers", "embed", "heads")
    assert tuple(scanned["decoder"]["layers"]["mlp_norm"]["scale"]) == ("layers", "norm")
    assert tuple(scanned["decoder"]["relative_position_bias"]["rel_embedding"]) == ("relpos_buckets", None)  # not stacked


def test_init_scales_follow_t5_recipe():
    config = dataclasses.replace(UNTIED, d_model=64, d_kv=16, num_heads=4, d_ff=128)
    params = init(build_model(config), 1)
    layer = params["encoder"]["layers_0"]
    expected = {  # transformers' T5PreTrainedModel._init_weights (lm_head: fan-in, see T5 docstring)
        "q": float(layer["self_attention"]["q"]["kernel"].std()) / (64 * 16) ** -0.5,
        "k": float(layer["self_attention"]["k"]["kernel"].std()) / 64**-0.5,
        "o": float(layer["self_attention"]["o"]["kernel"].std()) / 64**-0.5,
        "wo": float(layer["mlp"]["wo"]["kernel"].std()) / 128**-0.5,
        "shared": float(params["shared"]["embedding"].std()) / 1.0,
        "lm_head": float(params["lm_head"]["kernel"].std()) / 64**-0.5,
    }
    for name, ratio in expected.items():
        assert 0.9 < ratio < 1.1, (name, ratio)
    assert np.all(np.asarray(layer["mlp_norm"]["scale"]) == 1.0)


def test_lm_head_from_hidden_state(model_and_params):
    model, params = model_and_params
    logits, hidden = apply(model, {"params": params}, ids(1, (2, 6)), ids(2, (2, 5)), return_hidden=True)
    assert logits.shape == (2, 5, 97) and logits.dtype == jnp.float32 and hidden.shape == (2, 5, 32)
    hidden = np.asarray(hidden, np.float64)
    if model.config.tie_word_embeddings:
        expected = hidden * 32**-0.5 @ np.asarray(params["shared"]["embedding"], np.float64).T
    else:
        expected = hidden @ np.asarray(params["lm_head"]["kernel"], np.float64)
    np.testing.assert_allclose(logits, expected, atol=1e-5)


@pytest.mark.parametrize("chunks", [[1] * 6, [3, 1, 2]])
def test_cached_decoding_matches_full_forward(model_and_params, chunks):
    model, params = model_and_params
    enc_mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3], jnp.int32)
    input_ids, decoder_ids = ids(3, (2, 7)) * enc_mask, ids(4, (2, 6))
    full = apply(model, {"params": params}, input_ids, decoder_ids, enc_mask)

    cache_len = 9  # longer than what is written: unwritten slots must stay invisible
    cache = model.init_cache(2, cache_len, 7)
    encoded = apply(model, {"params": params}, input_ids, enc_mask, method=T5.encode)
    step_logits, start = [], 0
    for length in chunks:
        logits, variables = apply(
            model, {"params": params, "cache": cache}, decoder_ids[:, start : start + length],
            encoded if start == 0 else None, enc_mask, jnp.ones((2, cache_len), jnp.int32),
            decode=True, cache_index=start, method=T5.decode, mutable="cache",
        )
        cache, start = variables["cache"], start + length
        step_logits.append(logits)
    np.testing.assert_allclose(np.concatenate(step_logits, axis=1), full, atol=1e-5)


def test_cache_shapes_and_decode_refuses_packing():
    model = build_model(dataclasses.replace(UNTIED, dtype="bfloat16"))
    cache = model.init_cache(2, 5, 7)
    layer = cache["decoder"]["layers_1"]
    assert layer["self_attention"]["cached_key"].shape == (2, 3, 5, 6)  # [b, heads, slots, d_kv]
    assert layer["cross_attention"]["cross_value"].shape == (2, 3, 7, 6)
    assert layer["self_attention"]["cached_value"].dtype == jnp.bfloat16
    stacked = build_model(TIED).init_cache(2, 5, 7)["decoder"]["layers"]  # [layers, b, heads, slots, d_kv]
    assert stacked["self_attention"]["cached_key"].shape == (2, 2, 4, 5, 8)
    assert stacked["cross_attention"]["cross_key"].shape == (2, 2, 4, 7, 8)
    params = init(model, 0)
    with pytest.raises(ValueError, match="does not support packing"):
        apply(model, {"params": params, "cache": cache}, ids(0, (2, 1)), None, decode=True, cache_index=0,
              segment_ids=jnp.ones((2, 1), jnp.int32), method=T5.decode, mutable="cache")


def test_packed_examples_match_separate_runs(model_and_params):
    model, params = model_and_params
    enc_a, dec_a, enc_b, dec_b = ids(5, (1, 5)), ids(6, (1, 4)), ids(7, (1, 4)), ids(8, (1, 3))
    alone_a = apply(model, {"params": params}, enc_a, dec_a)
    alone_b = apply(model, {"params": params}, enc_b, dec_b)

    pad = jnp.zeros((1, 1), jnp.int32)
    packed = apply(
        model, {"params": params},
        jnp.concatenate([enc_a, enc_b, pad], 1), jnp.concatenate([dec_a, dec_b, pad], 1),
        jnp.array([[1] * 9 + [0]]), jnp.array([[1] * 7 + [0]]),
        encoder_segment_ids=jnp.array([[1] * 5 + [2] * 4 + [0]]),
        decoder_segment_ids=jnp.array([[1] * 4 + [2] * 3 + [0]]),
        encoder_positions=jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0]]),
        decoder_positions=jnp.array([[0, 1, 2, 3, 0, 1, 2, 0]]),
    )
    np.testing.assert_allclose(packed[:, :4], alone_a, atol=1e-5)
    np.testing.assert_allclose(packed[:, 4:7], alone_b, atol=1e-5)
    # Without segment ids the two examples see each other: the test can fail.
    leaky = apply(model, {"params": params}, jnp.concatenate([enc_a, enc_b], 1),
                  jnp.concatenate([dec_a, dec_b], 1))
    assert np.abs(leaky[:, 4:7] - alone_b).max() > 1e-3


def test_dropout_only_when_not_deterministic():
    model = build_model(dataclasses.replace(UNTIED, dropout_rate=0.3))
    params = init(model, 0)
    args = (ids(1, (2, 6)), ids(2, (2, 5)))
    no_dropout = apply(build_model(UNTIED), {"params": params}, *args)
    np.testing.assert_array_equal(apply(model, {"params": params}, *args), no_dropout)
    train = [apply(model, {"params": params}, *args, deterministic=False, rngs={"dropout": jax.random.key(s)})
             for s in (1, 2)]
    assert np.abs(train[0] - no_dropout).max() > 1e-3 and np.abs(train[0] - train[1]).max() > 1e-3


def test_bfloat16_compute_keeps_fp32_params_and_logits():
    params = init(build_model(UNTIED), 0)
    model16 = build_model(dataclasses.replace(UNTIED, dtype="bfloat16"))
    args = (ids(1, (2, 6)), ids(2, (2, 5)))
    logits16, hidden16 = apply(model16, {"params": params}, *args, return_hidden=True)
    logits32 = apply(build_model(UNTIED), {"params": params}, *args)
    assert logits16.dtype == jnp.float32 and hidden16.dtype == jnp.bfloat16
    assert init(model16, 0)["shared"]["embedding"].dtype == jnp.float32
    # bf16 keeps 8 significant bits: the logits move by about 1% of their range (measured 0.9%). Much
    # less would mean the compute dtype was ignored; much more, that something else runs in bf16.
    assert 1e-3 * np.abs(logits32).max() <= np.abs(logits16 - logits32).max() <= 0.05 * np.abs(logits32).max()
