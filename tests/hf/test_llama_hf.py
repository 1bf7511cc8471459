"""LLaMA bridge against transformers: logits parity, round trips, cached decoding, config/weight errors."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import llmjax.hf
from llmjax.hf import CheckpointError
from llmjax.hf import llama as hf_llama
from llmjax.hf.io import read_tensors
from llmjax.models import build_model, init_params
from llmjax.models.decoder import DecoderConfig
from tests.hf.helpers import (
    load_torch_model,
    max_abs_diff,
    padding_mask,
    randomize_norm_scales,
    randomize_torch_norms,
    random_ids,
    read_json,
    save_torch_model,
    torch_logits,
)

VOCAB = 112
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
             num_attention_heads=4, rms_norm_eps=1e-5, initializer_range=0.2)
VARIANTS = {
    # grouped-query attention, separate lm_head, non-default RoPE base
    "gqa_untied": dict(SMALL, num_key_value_heads=2, rope_theta=500.0, tie_word_embeddings=False),
    # multi-query attention, head_dim != hidden/heads, tied embeddings
    "mqa_tied": dict(SMALL, num_key_value_heads=1, head_dim=12, rope_theta=20000.0, tie_word_embeddings=True),
}
LENGTH = 9
LEFT_PAD_MASK = padding_mask([LENGTH, 6, 3], LENGTH)[:, ::-1].copy()  # rows padded on the left


def hf_positions(mask: np.ndarray) -> np.ndarray:
    """Positions Hugging Face ``generate`` gives left-padded rows (``forward`` alone would use arange)."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def left_padded_torch_logits(torch_model, ids: np.ndarray) -> np.ndarray:
    """The reference: transformers' logits for ``ids`` under LEFT_PAD_MASK with generate's positions."""
    return torch_logits(torch_model, input_ids=ids, attention_mask=LEFT_PAD_MASK,
                        position_ids=hf_positions(LEFT_PAD_MASK))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def hf_dir(request, tmp_path_factory):
    """A random transformers LlamaForCausalLM (random norm weights too, so every table row matters) saved
    with safetensors; yields (variant, dir, torch model)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**VARIANTS[request.param])).eval()
    randomize_torch_norms(model)
    path = save_torch_model(model, tmp_path_factory.mktemp(request.param))
    return request.param, path, model


def test_logits_match_transformers_with_left_padding(hf_dir):
    _, path, torch_model = hf_dir
    model, params = llmjax.hf.from_pretrained(path)
    ids = random_ids(1, (3, LENGTH), VOCAB)
    expected = left_padded_torch_logits(torch_model, ids)
    got = jax.jit(model.apply)({"params": params}, ids, LEFT_PAD_MASK)
    assert got.dtype == jnp.float32
    assert max_abs_diff(got, expected, LEFT_PAD_MASK) <= 1e-4


def test_config_translation(hf_dir):
    variant, path, _ = hf_dir
    config = hf_llama.config_from_hf(read_json(path / "config.json"))
    spec = VARIANTS[variant]
    assert config.kv_heads == spec["num_key_value_heads"]
    assert config.rope_theta == spec["rope_theta"]
    assert config.tie_word_embeddings == spec["tie_word_embeddings"]
    assert config.dim_per_head == spec.get("head_dim", 8)
    assert config.rms_norm_eps == 1e-5


def test_hf_to_llmjax_to_hf_is_bitwise(hf_dir):
    _, path, _ = hf_dir
    tensors = read_tensors(path)
    config = hf_llama.config_from_hf(read_json(path / "config.json"))
    back = llmjax.hf.params_to_hf(llmjax.hf.params_from_hf(tensors, config), config)
    assert set(back) == set(tensors)
    for name, value in tensors.items():
        assert back[name].shape == value.shape and back[name].dtype == value.dtype, name
        assert np.array_equal(back[name], value), name


def test_export_loads_in_transformers_with_same_logits(hf_dir, tmp_path):
    """llmjax init -> save_pretrained -> AutoModelForCausalLM (no missing/unexpected weights) -> same logits."""
    variant, _, _ = hf_dir
    config = hf_llama.config_from_hf(transformers.LlamaConfig(**VARIANTS[variant]).to_dict())
    model = build_model(config)
    params = randomize_norm_scales(init_params(model, jax.random.key(3)), seed=3)
    llmjax.hf.save_pretrained(model, params, tmp_path)
    torch_model = load_torch_model(transformers.AutoModelForCausalLM, tmp_path)
    assert type(torch_model).__name__ == "LlamaForCausalLM"
    assert torch_model.config.tie_word_embeddings == config.tie_word_embeddings
    ids = random_ids(2, (3, LENGTH), VOCAB)
    expected = left_padded_torch_logits(torch_model, ids)
    got = model.apply({"params": params}, ids, LEFT_PAD_MASK)
    assert max_abs_diff(got, expected, LEFT_PAD_MASK) <= 1e-4
    # and it reads back into llmjax unchanged
    model_again, params_again = llmjax.hf.from_pretrained(tmp_path)
    assert model_again.config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params_again, jax.device_get(params))


def test_bf16_compute_is_close_to_transformers_fp32(hf_dir):
    _, path, torch_model = hf_dir
    model, params = llmjax.hf.from_pretrained(path, dtype="bfloat16")
    ids = random_ids(4, (3, LENGTH), VOCAB)
    expected = left_padded_torch_logits(torch_model, ids)
    got = model.apply({"params": params}, ids, LEFT_PAD_MASK)
    assert got.dtype == jnp.float32
    assert max_abs_diff(got, expected, LEFT_PAD_MASK) <= 0.03 * np.abs(expected).max()


def test_packing_matches_separate_transformers_runs(hf_dir):
    _, path, torch_model = hf_dir
    model, params = llmjax.hf.from_pretrained(path)
    first, second = random_ids(5, (1, 4), VOCAB), random_ids(6, (1, 5), VOCAB)
    packed = np.concatenate([first, second], axis=1)
    segment_ids = np.array([[1] * 4 + [2] * 5])
    got = model.apply({"params": params}, packed, segment_ids=segment_ids)
    assert max_abs_diff(got[:, :4], torch_logits(torch_model, input_ids=first)) <= 1e-4
    assert max_abs_diff(got[:, 4:], torch_logits(torch_model, input_ids=second)) <= 1e-4


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_cached_decoding_matches_transformers(hf_dir, scan_layers):
    """Prefill the left-padded prompt, then one token per step; compare to transformers' full forward."""
    _, path, torch_model = hf_dir
    model, params = llmjax.hf.from_pretrained(path, scan_layers=scan_layers)
    ids = random_ids(7, (3, LENGTH), VOCAB)
    expected = left_padded_torch_logits(torch_model, ids)
    prompt_len = 5
    positions = hf_positions(LEFT_PAD_MASK)

    @jax.jit
    def step(cache, chunk, chunk_positions, index):
        return model.apply({"params": params, "cache": cache}, chunk, LEFT_PAD_MASK, positions=chunk_positions,
                           decode=True, cache_index=index, mutable=["cache"])

    logits, variables = step(model.init_cache(3, LENGTH), ids[:, :prompt_len], positions[:, :prompt_len], 0)
    outputs = [logits]
    for i in range(prompt_len, LENGTH):
        logits, variables = step(variables["cache"], ids[:, i:i + 1], positions[:, i:i + 1], i)
        outputs.append(logits)
    assert max_abs_diff(np.concatenate(outputs, axis=1), expected, LEFT_PAD_MASK) <= 1e-4


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------

def _hf_config(**changes) -> dict:
    return {**transformers.LlamaConfig(**VARIANTS["gqa_untied"]).to_dict(), **changes}


@pytest.mark.parametrize("changes, message", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), r"rope_scaling=.*linear.*does not implement"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     r"rope_parameters=.*yarn.*only plain RoPE"),
    (dict(attention_bias=True), r"attention_bias=True: projection biases are unsupported"),
    (dict(mlp_bias=True), r"mlp_bias=True: projection biases are unsupported"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu': only SiLU"),
    (dict(model_type="mistral"), r"model_type='mistral'"),
])
def test_unsupported_config_is_refused(changes, message):
    with pytest.raises(CheckpointError, match=message):
        hf_llama.config_from_hf(_hf_config(**changes))


def test_missing_config_key_is_named():
    hf = _hf_config()
    del hf["intermediate_size"]
    with pytest.raises(CheckpointError, match="missing required key 'intermediate_size'"):
        hf_llama.config_from_hf(hf)


def test_legacy_top_level_rope_theta_is_read():
    hf = _hf_config()
    del hf["rope_parameters"]
    hf["rope_theta"] = 1234.0
    assert hf_llama.config_from_hf(hf).rope_theta == 1234.0


def _tensors_and_config(hf_dir):
    _, path, _ = hf_dir
    tensors = dict(safetensors.numpy.load_file(str(path / "model.safetensors")))
    config = hf_llama.config_from_hf(json.loads((path / "config.json").read_text()))
    return tensors, dataclasses.replace(config, scan_layers=False)  # the mapping's layout


def test_weight_errors_name_the_tensor(hf_dir):
    tensors, config = _tensors_and_config(hf_dir)

    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        llmjax.hf.params_from_hf(missing, config)

    extra = {**tensors, "model.layers.2.mlp.up_proj.weight": tensors["model.layers.1.mlp.up_proj.weight"]}
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['model.layers.2.mlp.up_proj.weight'\]"):
        llmjax.hf.params_from_hf(extra, config)

    wrong = {**tensors, "model.layers.0.self_attn.k_proj.weight": np.zeros((7, 32), np.float32)}
    with pytest.raises(CheckpointError, match=(
            r"tensor 'model.layers.0.self_attn.k_proj.weight': expected shape \(\d+, 32\) "
            r"\(llmjax layers_0/self_attention/k/kernel\), found \(7, 32\)")):
        llmjax.hf.params_from_hf(wrong, config)

    # buffers from older checkpoints are ignored, not errors
    with_buffer = {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}
    llmjax.hf.params_from_hf(with_buffer, config)


def test_tied_checkpoint_with_a_different_head_is_refused():
    config = hf_llama.config_from_hf(_hf_config(**VARIANTS["mqa_tied"]))
    tensors = llmjax.hf.params_to_hf(init_params(build_model(config), jax.random.key(0)), config)
    assert "lm_head.weight" not in tensors
    embedding = tensors["model.embed_tokens.weight"]
    llmjax.hf.params_from_hf({**tensors, "lm_head.weight": embedding.copy()}, config)  # redundant copy: fine
    with pytest.raises(CheckpointError, match=(
            "lm_head.weight differs from model.embed_tokens.weight, but config.json ties them; "
            "set tie_word_embeddings=false")):
        llmjax.hf.params_from_hf({**tensors, "lm_head.weight": embedding + 1.0}, config)


def test_export_refuses_non_silu():
    config = DecoderConfig(**{k: v for k, v in VARIANTS["gqa_untied"].items()}, hidden_act="gelu")
    with pytest.raises(CheckpointError, match="hidden_act='gelu' cannot be exported"):
        hf_llama.config_to_hf(config)
