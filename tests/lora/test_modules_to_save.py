"""LoRA's ``modules_to_save`` (PEFT's option): whole weights that train beside the adapters.

Which weights a name takes (PEFT's rule), the copies' init, merge and factored forward (values and
gradients), the refusals, and the trainable count. The PEFT format both ways is in ``test_peft_format.py``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from llmjax import lora
from llmjax.model_config import DecoderConfig, T5Config
from llmjax.models import build_model, dummy_inputs, stack_layers
from llmjax.train.state import count_params
from tests.lora.test_core import (
    TINY_LLAMA, TINY_T5, _inputs, _logits, _random_b, _tiny, factored_matches_merged, random_params,
)

NORMS_T5 = 2 * 2 + 1 + 3 * 3 + 1  # per encoder layer 2, decoder layer 3, and each stack's final norm


def _leaf_names(config, **options) -> list[str]:
    cfg = lora.LoraConfig(2, 4, target_modules=options.pop("targets", ("q",)), **options)
    return sorted(name for leaf in lora.saved_leaves(config, cfg) for name in leaf.hf_names)


def test_names_match_as_peft_matches_them():
    """PEFT's rule (peft 0.22's, that of target_modules): the module of that name or one whose name ends with '.' and
    the entry. ``layer_norm`` takes T5's norms inside the blocks, not ``final_layer_norm``; ``norm`` takes LLaMA's
    last norm, not ``input_layernorm``; a container (``DenseReluDense``) takes every weight inside it. peft before
    0.22 matched a plain suffix (``core.saves(..., legacy=True)``), which took both."""
    norms = _leaf_names(TINY_T5, modules_to_save=["layer_norm"])
    assert len(norms) == NORMS_T5 - 2 and "encoder.final_layer_norm.weight" not in norms
    assert _leaf_names(TINY_T5, modules_to_save=["final_layer_norm"]) == [
        "decoder.final_layer_norm.weight", "encoder.final_layer_norm.weight"]
    assert len(_leaf_names(TINY_T5, modules_to_save=["layer_norm", "final_layer_norm"])) == NORMS_T5
    assert _leaf_names(TINY_LLAMA, targets=("q_proj",), modules_to_save=["norm", "lm_head"]) == [
        "lm_head.weight", "model.norm.weight"]
    assert _leaf_names(TINY_LLAMA, targets=("q_proj",), modules_to_save=["input_layernorm"]) == [
        f"model.layers.{i}.input_layernorm.weight" for i in range(2)]
    unscanned = dataclasses.replace(TINY_T5, scan_layers=False)  # one layer of a stack
    inside = _leaf_names(unscanned, modules_to_save=["encoder.block.1.layer.1.DenseReluDense"])
    assert inside == [f"encoder.block.1.layer.1.DenseReluDense.{p}.weight" for p in ("wi_0", "wi_1", "wo")]
    assert _leaf_names(unscanned, modules_to_save=["1.DenseReluDense"]) == [  # '.1.' only: not block.11's
        f"encoder.block.{b}.layer.1.DenseReluDense.{p}.weight" for b in range(2) for p in ("wi_0", "wi_1", "wo")]
    assert lora.core.saves("encoder.final_layer_norm", "layer_norm", legacy=True)
    assert not lora.core.saves("encoder.final_layer_norm", "layer_norm")
    assert lora.core.saves("layer_norm", "layer_norm") and not lora.core.saves("xlayer_norm", "layer_norm")


def test_scanned_layout_stacks_each_saved_weight():
    scanned = dataclasses.replace(TINY_T5, scan_layers=True)
    leaves = lora.saved_leaves(scanned, lora.LoraConfig(2, 4, target_modules=("q",),
                                                        modules_to_save=["layer_norm", "final_layer_norm"]))
    by_path = {leaf.path: leaf.hf_names for leaf in leaves}
    assert by_path[("decoder", "layers", "cross_attention_norm", "scale")] == tuple(
        f"decoder.block.{i}.layer.1.layer_norm.weight" for i in range(3))
    assert by_path[("encoder", "final_norm", "scale")] == ("encoder.final_layer_norm.weight",)
    assert sum(len(names) for names in by_path.values()) == NORMS_T5


@pytest.mark.parametrize("config, saved, targets, match", [
    (TINY_T5, ["nothing"], ("q",), r"\['nothing'\] match no module with weights of this T5 model.*'layer_norm'"),
    (TINY_T5, ["shared"], ("q",), r"matches \['shared'\].*more than one name"),
    (TINY_T5, ["embed_tokens"], ("q",), r"matches \['encoder.embed_tokens', 'decoder.embed_tokens'\]"),
    (TINY_T5, ["encoder"], ("q",), r"matches \['encoder'\], whose weights.*more than one name"),
    (dataclasses.replace(TINY_LLAMA, tie_word_embeddings=True), ["lm_head"], ("q_proj",), "lm_head.*tied"),
    (TINY_T5, ["SelfAttention", "q"], ("v",), "and '.*SelfAttention.q' inside it"),
    (TINY_T5, ["SelfAttention"], ("q",), "modules_to_save and target_modules both take"),
    (dataclasses.replace(TINY_T5, scan_layers=True), ["block.0.layer.0.layer_norm"], ("q",),
     "saves encoder/layers/self_attention_norm/scale in 1 of its 2 layers"),
])
def test_refusals_name_the_problem(config, saved, targets, match):
    with pytest.raises(lora.LoraConfigError, match=match):
        lora.saved_leaves(config, lora.LoraConfig(2, 4, target_modules=targets, modules_to_save=saved))


def test_config_rejects_a_string_and_empty_names():
    for bad in ("layer_norm", [""], [3]):
        with pytest.raises(lora.LoraConfigError, match="modules_to_save=.* must be a list of module names"):
            lora.LoraConfig(2, 4, target_modules=("q",), modules_to_save=bad)
    assert lora.LoraConfig(2, 4, target_modules=("q",), modules_to_save=None).modules_to_save == ()
    assert lora.LoraConfig(2, 4, target_modules=("q",), modules_to_save=["a", "a"]).modules_to_save == ("a",)


def _moved(adapters, seed: int):
    """Adapters with B drawn and each saved copy moved off the base (so a merge that ignored them would show)."""
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree_util.tree_flatten_with_path(_random_b(adapters, seed))
    names = (lora.LORA_A, lora.LORA_B, lora.MAGNITUDE)
    moved = [leaf if path[-1].key in names else leaf * (1 + rng.uniform(-0.5, 0.5, leaf.shape)).astype(np.float32)
             for path, leaf in leaves]
    return jax.tree_util.tree_unflatten(tree, moved)


@pytest.mark.parametrize("family, saved", [("t5", ["layer_norm"]), ("llama", ["norm", "lm_head"])])
def test_copies_start_at_the_base_and_train_through_both_forms(family, saved):
    """Fresh copies equal the base's weights (step 0 is the base); merged and factored forms give the same logits
    and the same gradients for A, B and the copies, on a scanned stack; unmerge is refused."""
    targets = ("q", "wo") if family == "t5" else ("v_proj", "down_proj")
    cfg = lora.LoraConfig(r=2, lora_alpha=4, target_modules=targets, modules_to_save=saved)
    flat, scanned = _tiny(family, False), _tiny(family, True)
    params = random_params(flat)
    fresh = lora.init(flat, params, cfg, jax.random.key(1))
    for leaf in lora.saved_leaves(flat.config, cfg):
        node_params, node_copy = params, fresh
        for key in leaf.path:
            node_params, node_copy = node_params[key], node_copy[key]
        np.testing.assert_array_equal(node_copy, node_params)
    inputs = _inputs(flat)
    np.testing.assert_array_equal(_logits(flat, lora.merge(params, fresh, cfg), inputs), _logits(flat, params, inputs))

    adapters = stack_layers(_moved(fresh, seed=3), flat.config)
    stacked = stack_layers(params, flat.config)
    grads, logits = factored_matches_merged(scanned, stacked, adapters, cfg, _inputs(scanned))
    plain = dataclasses.replace(cfg, modules_to_save=())
    assert np.abs(logits - _logits(scanned, lora.merge(stacked, lora.lora_part(adapters), plain),
                                   _inputs(scanned))).max() > 1e-2  # the copies matter
    for leaf in lora.saved_leaves(scanned.config, cfg):  # each copy trains
        grad = grads
        for key in leaf.path:
            grad = grad[key]
        assert np.abs(np.asarray(grad)).max() > 0, leaf.path
    with pytest.raises(lora.LoraConfigError, match="cannot undo modules_to_save"):
        lora.unmerge(lora.merge(stacked, adapters, cfg), adapters, cfg)


def test_copies_are_boxed_as_the_base_weights_and_counted():
    """A copy shards like the weight it replaces; r=32 on q and v of FLAN-T5-base with every norm saved trains
    the course's 3,538,944 LoRA numbers plus 62 norms of 768 (12 x 2 + 12 x 3 in the layers, 2 final)."""
    model = _tiny("llama", True)
    boxed = jax.eval_shape(lambda k: model.init(k, *dummy_inputs(model.config)), jax.random.key(0))["params"]
    cfg = lora.LoraConfig(2, 4, target_modules=("v_proj",), modules_to_save=["input_layernorm", "lm_head"])
    specs = nn.get_partition_spec(jax.eval_shape(lambda k: lora.init(model, boxed, cfg, k), jax.random.key(1)))
    base = nn.get_partition_spec(boxed)
    assert specs["lm_head"]["kernel"] == base["lm_head"]["kernel"]
    assert specs["layers"]["pre_attention_norm"] == base["layers"]["pre_attention_norm"]

    config = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    big = build_model(config)
    abstract = jax.eval_shape(lambda k: big.init(k, *dummy_inputs(config)), jax.random.key(0))["params"]
    cfg = lora.LoraConfig(32, 32, target_modules=("q", "v"), modules_to_save=["layer_norm", "final_layer_norm"])
    adapters = jax.eval_shape(lambda k: lora.init(big, abstract, cfg, k), jax.random.key(1))
    assert count_params(nn.meta.unbox(adapters)) == 3_538_944 + 62 * 768 == 3_586_560


def test_llama_decoder_config_untied_head_is_its_own_weight():
    """An untied LLaMA head and its embedding are two weights: each may be saved alone."""
    untied = DecoderConfig(**{**dataclasses.asdict(TINY_LLAMA), "tie_word_embeddings": False})
    assert _leaf_names(untied, targets=("q_proj",), modules_to_save=["embed_tokens"]) == ["model.embed_tokens.weight"]
