"""Decoder module: parameter tree, positions, masks, packing and the KV cache.

Tests that take the ``model_and_params`` fixture run with the layers scanned and unrolled.

Parity with Hugging Face LLaMA lives in tests/hf/test_llama_hf.py; here each property is
checked against the model itself run another way (unpadded, unpacked, uncached).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import axes
from llmjax.models import init_params, logical_axes, stack_layers
from llmjax.models.decoder import Decoder, DecoderConfig, default_positions

TINY = DecoderConfig(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, initializer_range=0.2,
)
UNROLLED = dataclasses.replace(TINY, scan_layers=False)


# Jitted forward: one compile per shape is much faster than eager op-by-op dispatch.
_forward = jax.jit(
    lambda model, params, *args, **kwargs: model.apply({"params": params}, *args, **kwargs), static_argnums=0
)


@pytest.fixture(scope="module", params=["scanned", "unrolled"])
def model_and_params(request):
    model = Decoder(TINY if request.param == "scanned" else UNROLLED)
    return model, init_params(model, jax.random.key(0))


def _ids(shape, seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 3, TINY.vocab_size)


def test_param_tree_shapes_and_axes():
    params = init_params(Decoder(UNROLLED), jax.random.key(0))
    layer = params["layers_0"]
    assert layer["self_attention"]["q"]["kernel"].shape == (32, 32)
    assert layer["self_attention"]["k"]["kernel"].shape == (32, 16)  # 2 kv heads * head_dim 8
    assert layer["self_attention"]["o"]["kernel"].shape == (32, 32)
    assert layer["mlp"]["wi_0"]["kernel"].shape == (32, 48)
    assert layer["mlp"]["wo"]["kernel"].shape == (48, 32)
    assert params["lm_head"]["kernel"].shape == (32, 97)
    assert set(params) == {"embed", "layers_0", "layers_1", "final_norm", "lm_head"}
    specs = logical_axes(Decoder(UNROLLED))
    assert tuple(specs["lm_head"]["kernel"]) == (axes.EMBED, axes.VOCAB)
    assert tuple(specs["layers_1"]["self_attention"]["v"]["kernel"]) == (axes.EMBED, axes.KV_HEADS)
    assert tuple(specs["embed"]["embedding"]) == (axes.VOCAB, axes.EMBED)

    # Scanned: one "layers" entry, every leaf the unrolled layers stacked on a leading "layers" axis.
    scanned = jax.eval_shape(lambda: init_params(Decoder(TINY), jax.random.key(0)))
    shapes = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    assert shapes(scanned) == shapes(stack_layers(params, TINY))
    assert scanned["layers"]["self_attention"]["k"]["kernel"].shape == (2, 32, 16)
    specs = logical_axes(Decoder(TINY))
    assert tuple(specs["layers"]["self_attention"]["v"]["kernel"]) == (axes.LAYERS, axes.EMBED, axes.KV_HEADS)
    assert tuple(specs["layers"]["pre_mlp_norm"]["scale"]) == (axes.LAYERS, axes.NORM)


def test_tied_embeddings_have_no_head_and_attend_to_embedding():
    cfg = DecoderConfig(**{**TINY.__dict__, "tie_word_embeddings": True})
    model = Decoder(cfg)
    params = init_params(model, jax.random.key(0))
    assert "lm_head" not in params
    ids = _ids((1, 5))
    logits, hidden = model.apply({"params": params}, ids, return_hidden=True)
    assert logits.dtype == jnp.float32 and hidden.shape == (1, 5, 32)
    np.testing.assert_allclose(logits, hidden @ params["embed"]["embedding"].T, atol=1e-5)


def test_default_positions_hand_computed():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(default_positions(5, mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    segments = jnp.array([[1, 1, 2, 2, 2, 0], [1, 2, 3, 3, 0, 0]])
    np.testing.assert_array_equal(
        default_positions(6, segment_ids=segments), [[0, 1, 0, 1, 2, 0], [0, 0, 0, 1, 0, 1]]
    )
    np.testing.assert_array_equal(default_positions(3), [[0, 1, 2]])


def test_causal_future_tokens_do_not_change_past_logits(model_and_params):
    model, params = model_and_params
    ids = _ids((1, 6))
    changed = ids.at[0, 4].set((ids[0, 4] + 1) % TINY.vocab_size)
    a = _forward(model, params, ids)
    b = _forward(model, params, changed)
    np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert np.abs(np.asarray(a[:, 4:] - b[:, 4:])).max() > 1e-3


def test_left_padding_equals_unpadded_run(model_and_params):
    model, params = model_and_params
    ids = _ids((1, 5))
    alone = _forward(model, params, ids)
    padded_ids = jnp.concatenate([jnp.zeros((1, 3), ids.dtype), ids], axis=1)
    mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]])
    padded = _forward(model, params, padded_ids, mask)
    np.testing.assert_allclose(padded[:, 3:], alone, atol=1e-5)


def test_packing_equals_separate_runs(model_and_params):
    model, params = model_and_params
    first, second = _ids((1, 3), seed=2), _ids((1, 4), seed=3)
    packed = jnp.concatenate([first, second, jnp.zeros((1, 1), first.dtype)], axis=1)
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
    out = _forward(model, params, packed, segment_ids=segment_ids)
    np.testing.assert_allclose(out[:, :3], _forward(model, params, first), atol=1e-5)
    np.testing.assert_allclose(out[:, 3:7], _forward(model, params, second), atol=1e-5)
    # Explicit positions give the same result as the ones derived from segment ids.
    positions = jnp.array([[0, 1, 2, 0, 1, 2, 3, 0]])
    explicit = _forward(model, params, packed, segment_ids=segment_ids, positions=positions)
    np.testing.assert_allclose(explicit, out, atol=1e-6)


@pytest.mark.parametrize("chunked_steps", [False, True])
def test_cached_decoding_equals_full_forward(model_and_params, chunked_steps):
    """Prefill a left-padded prompt, then decode (one token, or two at a time) under jit."""
    model, params = model_and_params
    total, prompt_len, cache_len = 8, 4, 10
    ids = _ids((2, total), seed=4)
    mask = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1], [1] * total])
    full = _forward(model, params, ids, mask)

    # Key validity over cache slots: prompt padding is 0, every later slot is a real token.
    key_mask = jnp.concatenate([mask, jnp.ones((2, cache_len - total), mask.dtype)], axis=1)
    positions = default_positions(cache_len, key_mask)

    @jax.jit
    def step(cache, chunk, index):
        chunk_positions = jax.lax.dynamic_slice_in_dim(positions, index, chunk.shape[1], axis=1)
        return model.apply(
            {"params": params, "cache": cache}, chunk, key_mask, positions=chunk_positions,
            decode=True, cache_index=index, mutable=["cache"],
        )

    cache = model.init_cache(2, cache_len)
    logits, variables = step(cache, ids[:, :prompt_len], jnp.int32(0))
    outputs = [logits]
    width = 2 if chunked_steps else 1
    for start in range(prompt_len, total, width):
        logits, variables = step(variables["cache"], ids[:, start:start + width], jnp.int32(start))
        outputs.append(logits)
    decoded = jnp.concatenate(outputs, axis=1)
    real = np.asarray(mask, bool)
    assert np.abs(np.asarray(decoded - full))[real].max() <= 1e-5

    # Default positions in decode mode are read off the cache mask, same as passing them.
    cache = model.init_cache(2, cache_len)
    implicit, _ = model.apply(
        {"params": params, "cache": cache}, ids[:, :prompt_len], key_mask,
        decode=True, cache_index=0, mutable=["cache"],
    )
    np.testing.assert_allclose(implicit, outputs[0], atol=1e-5)


@pytest.mark.parametrize("config", [TINY, UNROLLED], ids=["scanned", "unrolled"])
def test_init_cache_matches_model_init(config):
    model = Decoder(config)
    cache = model.init_cache(3, 7)
    reference = model.init(jax.random.key(0), jnp.zeros((3, 7), jnp.int32), decode=True)["cache"]
    assert jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), cache) == jax.tree_util.tree_map(
        lambda x: (x.shape, x.dtype), reference
    )
    if config.scan_layers:  # [layers, b, kv_heads, slots, d]
        assert cache["layers"]["self_attention"]["cached_key"].shape == (2, 3, 2, 7, 8)
    else:  # [b, kv_heads, slots, d]
        assert cache["layers_1"]["self_attention"]["cached_key"].shape == (3, 2, 7, 8)


def test_bf16_compute_is_close_to_fp32(model_and_params):
    model, params = model_and_params
    ids = _ids((2, 6))
    fp32 = _forward(model, params, ids)
    bf16 = _forward(Decoder(dataclasses.replace(model.config, dtype="bfloat16")), params, ids)
    assert bf16.dtype == jnp.float32
    scale = np.abs(np.asarray(fp32)).max()
    # About 1% of the logit range (measured 0.9%); far less would mean bf16 was never used.
    assert 1e-3 * scale <= np.abs(np.asarray(bf16 - fp32)).max() <= 0.05 * scale


def test_attention_dropout_needs_rng_and_changes_output():
    cfg = DecoderConfig(**{**TINY.__dict__, "attention_dropout": 0.5})
    model = Decoder(cfg)
    params = init_params(model, jax.random.key(0))
    ids = _ids((1, 6))
    eval_out = _forward(model, params, ids)
    train_out = model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert np.abs(np.asarray(train_out - eval_out)).max() > 1e-3
    with pytest.raises(Exception, match="dropout"):
        model.apply({"params": params}, ids, deterministic=False)


def test_logits_to_keep_gives_the_last_positions(model_and_params):
    """``logits_to_keep=n`` (Hugging Face's argument): the last ``n`` positions of the full forward, hidden too."""
    model, params = model_and_params
    ids = _ids((2, 6))
    mask = jnp.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    full, hidden = model.apply({"params": params}, ids, mask, return_hidden=True)
    kept, kept_hidden = model.apply({"params": params}, ids, mask, return_hidden=True, logits_to_keep=2)
    assert kept.shape == (2, 2, TINY.vocab_size) and kept_hidden.shape == (2, 2, TINY.hidden_size)
    np.testing.assert_allclose(kept, full[:, -2:], atol=1e-6)
    np.testing.assert_allclose(kept_hidden, hidden[:, -2:], atol=1e-6)
    with pytest.raises(ValueError, match="logits_to_keep must be >= 0"):
        model.apply({"params": params}, ids, logits_to_keep=-1)


def test_segment_ids_refused_in_decode_mode():
    model = Decoder(TINY)
    with pytest.raises(ValueError, match="segment_ids .* decode=True"):
        model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), decode=True,
                   segment_ids=jnp.ones((1, 4), jnp.int32))


def test_activations_constrained_under_mesh(model_and_params):
    """With the rules table active on an 8-device mesh the forward pass still runs and agrees."""
    from jax.sharding import Mesh

    model, params = model_and_params
    ids = _ids((8, 4))
    devices = np.array(jax.devices()[:8]).reshape(2, 2, 2)
    with Mesh(devices, ("data", "fsdp", "tensor")), nn.logical_axis_rules(axes.LOGICAL_AXIS_RULES):
        sharded = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, ids)
    np.testing.assert_allclose(sharded, _forward(model, params, ids), atol=1e-5)
