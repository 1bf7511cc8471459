"""The cached decoding path of each family: KV-cache decoding equals recomputing everything each step,
and the same loop runs on a model sharded over 8 fake devices; both for models with the layers scanned
(the default; the loop unstacks them) and unrolled.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
import torch

from llmjax.generate import _decode_loop, generate, resolve_config
from llmjax.generation.families import unrolled_layers
from llmjax.models import logical_axes
from llmjax.sharding import activate, logical_to_sharding, make_mesh, shard_batch
from tests.generation.models import prompts, small_model

NEW = 12


def recompute_greedy(family, model, params, ids, mask, new_tokens, eos):
    """Greedy decoding with no cache: every step runs the full model (encoder too) on all tokens so far.

    One fixed-size buffer keeps one compiled forward; causal attention makes the unfilled
    tail irrelevant to the positions read. ``eos`` is suppressed (as min_new_tokens does).
    """
    batch = ids.shape[0]
    if family == "t5":
        buffer = np.zeros((batch, 1 + new_tokens), np.int32)  # decoder start token 0, then new tokens
        forward = jax.jit(lambda p, dec: model.apply({"params": p}, ids, dec, mask))
        start = 1
    else:
        buffer = np.concatenate([ids, np.zeros((batch, new_tokens), np.int32)], axis=1)
        full_mask = np.concatenate([mask, np.ones((batch, new_tokens), np.int32)], axis=1)
        forward = jax.jit(lambda p, seq: model.apply({"params": p}, seq, full_mask))
        start = ids.shape[1]
    for t in range(new_tokens):
        logits = np.array(forward(params, buffer)[:, start + t - 1])
        logits[:, eos] = -np.inf
        buffer[:, start + t] = logits.argmax(-1)
    return buffer


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("name", ["t5_v1_1", "llama_gqa"])
def test_kv_cache_decoding_equals_recomputing_the_sequence(name, scan_layers, tmp_path):
    family, torch_model, model, params = small_model(name, 0, tmp_path, scan_layers=scan_layers)
    ids, mask = prompts(family, 2, [9, 5, 7], torch_model.config.vocab_size)
    eos = torch_model.config.eos_token_id
    cached = generate(model, params, ids, mask, max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=eos)
    np.testing.assert_array_equal(np.asarray(cached), recompute_greedy(family, model, params, ids, mask, NEW, eos))


@pytest.mark.parametrize("name", ["t5_v1_1", "llama_gqa"])
def test_scanned_model_decodes_with_its_layers_unrolled(name, tmp_path):
    """The loop runs a scanned model unstacked: the same weights per layer, and no dynamic slice (a copy on
    CPU) of a stacked weight or cache is left in the compiled greedy loop."""
    family, torch_model, model, params = small_model(name, 0, tmp_path)
    assert model.config.scan_layers
    unrolled, unrolled_params = unrolled_layers(model, params)
    assert not unrolled.config.scan_layers and type(unrolled) is type(model)
    stack = params["layers"] if family == "decoder" else params["decoder"]["layers"]
    last = unrolled_params["layers_1"] if family == "decoder" else unrolled_params["decoder"]["layers_1"]
    for stacked, layer in zip(jax.tree_util.tree_leaves(stack), jax.tree_util.tree_leaves(last)):
        np.testing.assert_array_equal(layer, stacked[1])
    assert unrolled_layers(unrolled, unrolled_params)[1] is unrolled_params

    ids, mask = prompts(family, 2, [9, 5, 7], torch_model.config.vocab_size)
    config = resolve_config(model, max_new_tokens=4)
    compiled = _decode_loop.lower(params, ids, mask, jax.random.key(0), None, model=model, config=config,
                                  max_new_tokens=4).compile().as_text()
    assert not re.findall(r"= \S+ dynamic-slice\(", compiled)


@pytest.mark.parametrize("name, settings, scan_layers", [
    ("llama_gqa", dict(max_new_tokens=6), True),
    ("t5_v1_0", dict(max_new_tokens=6, num_beams=2, num_return_sequences=2), True),
    ("llama_gqa", dict(max_new_tokens=6, num_beams=2), False),  # beams reorder the unstacked cache
])
def test_sharded_model_decodes_like_transformers(name, settings, scan_layers, tmp_path):
    """Params sharded by the logical rules over a (data 2, fsdp 2, tensor 2) mesh; batch over data*fsdp."""
    assert jax.device_count() == 8
    family, torch_model, model, params = small_model(name, 0, tmp_path, scan_layers=scan_layers)
    ids, mask = prompts(family, 3, [6, 3, 5, 4], torch_model.config.vocab_size)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    params = jax.device_put(params, logical_to_sharding(logical_axes(model), mesh))
    embedding = params["shared"]["embedding"] if family == "t5" else params["embed"]["embedding"]
    assert len(embedding.sharding.device_set) == 8 and not embedding.sharding.is_fully_replicated
    batch = shard_batch({"ids": ids, "mask": mask}, mesh)
    with activate(mesh):
        out = generate(model, params, batch["ids"], batch["mask"], **settings)
    with torch.inference_mode():
        reference = torch_model.generate(input_ids=torch.from_numpy(ids.astype(np.int64)),
                                         attention_mask=torch.from_numpy(mask.astype(np.int64)), **settings)
    np.testing.assert_array_equal(np.asarray(out), reference.numpy())
