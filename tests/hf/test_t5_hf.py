"""T5 bridge against transformers: logits parity, round trips, sharded checkpoints, config/weight errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import llmjax.hf
from llmjax.hf import CheckpointError
from llmjax.hf import t5 as hf_t5
from llmjax.models import build_model, init_params
from llmjax.models.t5 import T5Config
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

VOCAB = 120
SMALL = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0)
VARIANTS = {
    # original T5: ReLU, tied embeddings, decoder output scaled by d_model**-0.5
    "v1_0": dict(SMALL, feed_forward_proj="relu"),
    # T5 v1.1 / FLAN-T5: gated GELU, separate lm_head, no scaling
    "v1_1": dict(SMALL, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    # odd sizes: d_kv * heads != d_model, few buckets with a short max distance, deeper decoder
    "unusual": dict(SMALL, d_kv=12, num_heads=3, relative_attention_num_buckets=10,
                    relative_attention_max_distance=6, num_decoder_layers=3,
                    feed_forward_proj="gated-silu", tie_word_embeddings=False),
}
ENC_LEN, DEC_LEN = 12, 7
init = jax.jit(init_params, static_argnums=0)  # compiled: eager init dispatches hundreds of small ops


def make_torch_t5(seed: int, **config) -> transformers.T5ForConditionalGeneration:
    """A random HF T5 whose norm scales and (untied) head are random too, so every mapping row matters."""
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**config)).eval()
    randomize_torch_norms(model)
    with torch.no_grad():
        if config.get("tie_word_embeddings") is False:
            # transformers 5 ties T5 heads at construction; give the head its own values.
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.2)
    return model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def hf_dir(request, tmp_path_factory):
    """(variant name, directory written by transformers, the torch model)."""
    name = request.param
    model = make_torch_t5(0, **VARIANTS[name])
    path = save_torch_model(model, tmp_path_factory.mktemp(name))
    return name, path, model


def batch():
    """Encoder/decoder inputs with right padding in some rows."""
    enc_mask = padding_mask([ENC_LEN, 5, 9], ENC_LEN)
    dec_mask = padding_mask([DEC_LEN, 3, 6], DEC_LEN)
    return dict(
        input_ids=random_ids(1, (3, ENC_LEN), VOCAB) * enc_mask,
        attention_mask=enc_mask,
        decoder_input_ids=random_ids(2, (3, DEC_LEN), VOCAB) * dec_mask,
        decoder_attention_mask=dec_mask,
    )


def llmjax_logits(model, params, inputs):
    return np.asarray(jax.jit(model.apply)({"params": params}, **inputs))


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_logits_match_transformers_with_padding(hf_dir, scan_layers):
    name, path, torch_model = hf_dir
    model, params = llmjax.hf.from_pretrained(path, scan_layers=scan_layers)
    assert model.config.tie_word_embeddings == (name == "v1_0")
    inputs = batch()
    diff = max_abs_diff(llmjax_logits(model, params, inputs), torch_logits(torch_model, **inputs),
                        mask=inputs["decoder_attention_mask"])
    assert diff <= 1e-4, f"{name}: max |dlogits| = {diff}"


def test_hf_to_llmjax_to_hf_is_bitwise_identical(hf_dir, tmp_path):
    _, path, _ = hf_dir
    model, params = llmjax.hf.from_pretrained(path)
    llmjax.hf.save_pretrained(model, params, tmp_path)
    original = safetensors.numpy.load_file(str(path / "model.safetensors"))
    exported = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key


@pytest.mark.parametrize("name", ["v1_0", "v1_1"])
def test_llmjax_init_exports_to_transformers(name, tmp_path):
    config = T5Config(**{k: v for k, v in VARIANTS[name].items()})
    model = build_model(config)
    params = randomize_norm_scales(jax.device_get(init(model, jax.random.key(3))), seed=3)
    llmjax.hf.save_pretrained(model, params, tmp_path)
    torch_model = load_torch_model(transformers.AutoModelForSeq2SeqLM, tmp_path)
    assert isinstance(torch_model, transformers.T5ForConditionalGeneration)
    assert torch_model.config.scale_decoder_outputs == config.tie_word_embeddings
    assert (torch_model.lm_head.weight is torch_model.shared.weight) == config.tie_word_embeddings
    inputs = batch()
    diff = max_abs_diff(llmjax_logits(model, params, inputs), torch_logits(torch_model, **inputs),
                        mask=inputs["decoder_attention_mask"])
    assert diff <= 1e-4, f"{name}: max |dlogits| = {diff}"
    generation = read_json(tmp_path / "generation_config.json")
    assert generation == {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
    assert torch_model.generation_config.decoder_start_token_id == 0


def test_sharded_checkpoint_with_index_loads(tmp_path):
    torch_model = make_torch_t5(4, **VARIANTS["v1_1"])
    save_torch_model(torch_model, tmp_path, max_shard_size="20KB")
    index = read_json(tmp_path / "model.safetensors.index.json")
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "model.safetensors").exists()
    model, params = llmjax.hf.from_pretrained(tmp_path)
    inputs = batch()
    diff = max_abs_diff(llmjax_logits(model, params, inputs), torch_logits(torch_model, **inputs),
                        mask=inputs["decoder_attention_mask"])
    assert diff <= 1e-4


def test_bfloat16_compute_is_close_to_float32(hf_dir):
    _, path, _ = hf_dir
    model32, params = llmjax.hf.from_pretrained(path)
    model16, params16 = llmjax.hf.from_pretrained(path, dtype="bfloat16")
    inputs = batch()
    logits32 = llmjax_logits(model32, params, inputs)
    logits16 = jax.jit(model16.apply)({"params": params16}, **inputs)
    assert logits16.dtype == np.float32 and params16["shared"]["embedding"].dtype == np.float32
    scale = np.abs(logits32).max()
    diff = max_abs_diff(logits16, logits32, mask=inputs["decoder_attention_mask"])
    assert 0 < diff <= 0.05 * scale, (diff, scale)


def test_old_style_config_without_head_tensor_ties_head_to_embedding(tmp_path):
    """transformers 5 saves only shared.weight when an untied config's head equals it."""
    torch_model = make_torch_t5(5, **dict(VARIANTS["v1_1"], tie_word_embeddings=True))
    save_torch_model(torch_model, tmp_path)
    config = read_json(tmp_path / "config.json")
    config.pop("scale_decoder_outputs")
    config["tie_word_embeddings"] = False  # how v1.1 configs on the hub say "no scaling"
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, params = llmjax.hf.from_pretrained(tmp_path)
    assert not model.config.tie_word_embeddings
    np.testing.assert_array_equal(params["lm_head"]["kernel"], params["shared"]["embedding"].T)


# ----------------------------------------------------------------------------
# Config translation
# ----------------------------------------------------------------------------

def test_config_round_trip_and_mt5_defaults():
    config = T5Config(**VARIANTS["unusual"])
    assert hf_t5.config_from_hf(hf_t5.config_to_hf(config)) == config
    mt5 = hf_t5.config_from_hf({"model_type": "mt5", **{k: SMALL[k] for k in hf_t5._REQUIRED_KEYS}})
    assert mt5.feed_forward_proj == "gated-gelu" and not mt5.tie_word_embeddings


def hf_config(**changes):
    config = hf_t5.config_to_hf(T5Config(**SMALL))
    config.update(changes)
    return config


def test_missing_config_key_is_named():
    config = hf_config()
    del config["d_kv"]
    with pytest.raises(CheckpointError, match=r"missing required key\(s\) \['d_kv'\]"):
        hf_t5.config_from_hf(config)


def test_unsupported_feed_forward_proj():
    with pytest.raises(CheckpointError, match="feed_forward_proj='gated-foo'.*not supported"):
        hf_t5.config_from_hf(hf_config(feed_forward_proj="gated-foo"))


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model_type="umt5")))
    with pytest.raises(CheckpointError, match="model_type='umt5', which llmjax does not support"):
        llmjax.hf.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="model_type='bert' is not a T5 model"):
        hf_t5.config_from_hf(hf_config(model_type="bert"))


# ----------------------------------------------------------------------------
# Weight errors
# ----------------------------------------------------------------------------

@pytest.fixture()
def hf_tensors():
    config = T5Config(**VARIANTS["v1_1"], scan_layers=False)  # the family mapping's layout
    model = build_model(config)
    return config, llmjax.hf.params_to_hf(jax.device_get(init(model, jax.random.key(0))), config)


def test_wrong_tensor_shape_names_key_and_shapes(hf_tensors):
    config, tensors = hf_tensors
    tensors["decoder.block.1.layer.1.EncDecAttention.q.weight"] = np.zeros((32, 16), np.float32)
    with pytest.raises(CheckpointError, match=(
        r"tensor 'decoder.block.1.layer.1.EncDecAttention.q.weight': expected shape \(32, 32\) "
        r"\(llmjax decoder/layers_1/cross_attention/q/kernel\), found \(32, 16\)"
    )):
        llmjax.hf.params_from_hf(tensors, config)


def test_missing_and_unexpected_tensors_are_listed(hf_tensors):
    config, tensors = hf_tensors
    del tensors["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    tensors["encoder.block.2.layer.0.layer_norm.weight"] = np.ones(32, np.float32)
    with pytest.raises(CheckpointError, match=(
        r"missing tensors \['encoder.block.1.layer.1.DenseReluDense.wi_1.weight'\], "
        r"unexpected tensors \['encoder.block.2.layer.0.layer_norm.weight'\]"
    )):
        llmjax.hf.params_from_hf(tensors, config)


def test_tied_config_with_distinct_head_is_refused(hf_tensors):
    config, tensors = hf_tensors
    tied = T5Config(**dict(VARIANTS["v1_1"], tie_word_embeddings=True), scan_layers=False)
    with pytest.raises(CheckpointError, match="lm_head.weight differs from shared.weight"):
        llmjax.hf.params_from_hf(tensors, tied)


def test_export_refuses_params_without_hf_name(hf_tensors):
    config, tensors = hf_tensors
    params = llmjax.hf.params_from_hf(tensors, config)
    params["value_head"] = {"kernel": np.zeros((32, 1), np.float32)}
    with pytest.raises(CheckpointError, match=r"params \['value_head/kernel'\] have no Hugging Face T5 name"):
        llmjax.hf.params_to_hf(params, config)


def test_bfloat16_checkpoint_loads_as_float32_params(tmp_path):
    torch_model = make_torch_t5(6, **VARIANTS["v1_1"]).to(torch.bfloat16)
    save_torch_model(torch_model, tmp_path)
    _, params = llmjax.hf.from_pretrained(tmp_path, scan_layers=False)
    q = params["encoder"]["layers_0"]["self_attention"]["q"]["kernel"]
    expected = torch_model.encoder.block[0].layer[0].SelfAttention.q.weight.detach().float().numpy().T
    assert q.dtype == np.float32 and np.array_equal(q, expected)


def test_mt5_logits_match_transformers(tmp_path):
    torch.manual_seed(7)
    config = transformers.MT5Config(**{k: v for k, v in SMALL.items()})
    torch_model = transformers.MT5ForConditionalGeneration(config).eval()
    with torch.no_grad():  # mT5 checkpoints have their own head; transformers ties it at construction
        torch_model.lm_head.weight = torch.nn.Parameter(torch.randn_like(torch_model.shared.weight) * 0.2)
    save_torch_model(torch_model, tmp_path)
    model, params = llmjax.hf.from_pretrained(tmp_path)
    assert model.config.feed_forward_proj == "gated-gelu" and not model.config.tie_word_embeddings
    inputs = batch()
    diff = max_abs_diff(llmjax_logits(model, params, inputs), torch_logits(torch_model, **inputs),
                        mask=inputs["decoder_attention_mask"])
    assert diff <= 1e-4
