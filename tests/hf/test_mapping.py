"""llmjax.hf.mapping, the engine both families' tables run through: expansion, lookups, export errors.

Parity and round trips per family live in test_t5_hf.py / test_llama_hf.py; here the lookups that LoRA's
PEFT names will use are checked against the module names of the transformers models themselves.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import llmjax.hf
from llmjax.hf import CheckpointError
from llmjax.hf.mapping import Row, WeightMap, expand, export_params, param_shapes
from llmjax.model_config import DecoderConfig, T5Config

T5_SMALL = dict(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=3, num_heads=2,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False)
LLAMA_SMALL = dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False)


def test_expand_fills_every_combination_and_keeps_plain_rows_once():
    table = (("emb.weight", "embed/embedding", False), ("h.{i}.{p}.weight", "layers_{i}/{p}/kernel", True))
    rows = expand(table, i=range(2), p=("q", "k"))
    assert rows == [
        Row("emb.weight", ("embed", "embedding"), False),
        Row("h.0.q.weight", ("layers_0", "q", "kernel"), True), Row("h.0.k.weight", ("layers_0", "k", "kernel"), True),
        Row("h.1.q.weight", ("layers_1", "q", "kernel"), True), Row("h.1.k.weight", ("layers_1", "k", "kernel"), True),
    ]
    assert Row("w", ("k",), True).hf_shape((3, 5)) == (5, 3) and Row("w", ("k",), False).hf_shape((3, 5)) == (3, 5)
    with pytest.raises(ValueError, match="placeholders differ"):
        expand((("h.{i}.weight", "layers/kernel", True),), i=range(2))


def test_a_table_that_misses_a_param_is_a_bug_not_a_user_error():
    config = DecoderConfig(**LLAMA_SMALL)
    rows = llmjax.hf.weight_map(config).rows
    with pytest.raises(AssertionError, match=r"llama mapping table and model params differ: \['final_norm/scale'\]"):
        WeightMap("llama", tuple(r for r in rows if r.hf_name != "model.norm.weight"), param_shapes(config))
    with pytest.raises(AssertionError, match="names a param or a tensor twice"):
        WeightMap("llama", rows + rows[:1], param_shapes(config))


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_every_kernel_maps_to_the_transformers_linear_of_that_name(family):
    """hf_module(path) is a real nn.Linear of the transformers model, with the kernel's transposed shape:
    the name PEFT's LoRA keys (``base_model.model.<module>.lora_A.weight``) are built from."""
    if family == "t5":
        config = T5Config(**T5_SMALL)
        torch_model = transformers.T5ForConditionalGeneration(transformers.T5Config(**T5_SMALL))
    else:
        config = DecoderConfig(**LLAMA_SMALL)
        torch_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_SMALL))
    weights = llmjax.hf.weight_map(config)
    modules = dict(torch_model.named_modules())
    kernels = [path for path in weights.shapes if path[-1] == "kernel"]
    assert len(kernels) == (1 + 2 * 7 + 3 * 11 if family == "t5" else 1 + 2 * 7)  # head + per-layer projections
    for path in kernels:
        module = modules[weights.hf_module(path)]
        assert isinstance(module, torch.nn.Linear), path
        assert tuple(module.weight.shape) == weights.row(path).hf_shape(weights.shapes[path]), path
        assert weights.path(weights.hf_name(path)) == path
    # and the transformers model holds no parameter the table does not name (tied copies aside)
    names = {row.hf_name for row in weights.rows}
    assert {n for n, _ in torch_model.named_parameters()} - names <= {"encoder.embed_tokens.weight",
                                                                       "decoder.embed_tokens.weight"}


def test_llama_names_for_lora():
    weights = llmjax.hf.weight_map(DecoderConfig(**LLAMA_SMALL))
    assert weights.hf_module(("layers_1", "mlp", "wi_0", "kernel")) == "model.layers.1.mlp.gate_proj"
    assert weights.hf_name(("layers_0", "pre_mlp_norm", "scale")) == "model.layers.0.post_attention_layernorm.weight"
    assert weights.path("model.layers.1.self_attn.o_proj.weight") == ("layers_1", "self_attention", "o", "kernel")
    with pytest.raises(KeyError, match="llmjax param layers_0/value_head/kernel has no Hugging Face llama name"):
        weights.hf_module(("layers_0", "value_head", "kernel"))
    with pytest.raises(KeyError, match="'model.layers.2.mlp.up_proj.weight' is not a Hugging Face llama tensor"):
        weights.path("model.layers.2.mlp.up_proj.weight")


def test_export_errors_name_the_param():
    config = DecoderConfig(**LLAMA_SMALL)
    weights = llmjax.hf.weight_map(config)
    params: dict = {}
    for path, shape in weights.shapes.items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.zeros(shape, np.float32)
    assert set(export_params(params, weights)) == {row.hf_name for row in weights.rows}
    del params["layers_1"]["mlp"]["wo"]
    with pytest.raises(CheckpointError, match=r"params have no layers_1/mlp/wo/kernel \(needed for "
                                              r"'model.layers.1.mlp.down_proj.weight'\)"):
        export_params(params, weights)
    params["layers_1"]["mlp"]["wo"] = {"kernel": np.zeros((3, 16), np.float32)}
    with pytest.raises(CheckpointError, match=r"param layers_1/mlp/wo/kernel: expected shape \(24, 16\) for this "
                                              r"config, found \(3, 16\)"):
        export_params(params, weights)
