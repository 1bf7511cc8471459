"""DoRA (``LoraConfig.use_dora``, PEFT's ``use_dora``): a magnitude per output channel beside A and B.

Against independent references: the column norms and the rescaled kernel computed here by hand in numpy;
``peft`` (torch) for logits both ways (T5 and LLaMA, scanned and not) and for the gradients of A, B and the
magnitude, which PEFT takes with the norm held constant (the DoRA paper's section 4.3).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import lora
from llmjax.model_config import T5Config
from llmjax.models import build_model, dummy_inputs, stack_layers
from llmjax.train.state import count_params
from tests.lora.test_core import (
    LLAMA_TARGETS, T5_TARGETS, _factored_logits, _inputs, _logits, _random_b, _tiny, factored_matches_merged,
    random_params,
)


def _random_magnitude(adapters, seed: int):
    """Adapters with each magnitude moved off the base's norms (a fresh one would hide a wrong rescaling)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf * jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
        if path[-1].key == lora.MAGNITUDE else leaf, adapters)


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_dora_step0_and_merge_by_hand_and_factored(family):
    """Fresh DoRA adapters: the magnitude is each output channel's norm and the logits are the base's. Trained
    ones: the merged kernel is ``(W + s A B) * m / ||W + s A B||`` by hand in numpy, the merged logits equal the
    factored forward's, and unmerge is refused (the merge is not invertible from the merged kernel)."""
    cfg = lora.LoraConfig(r=3, lora_alpha=5, target_modules=T5_TARGETS if family == "t5" else LLAMA_TARGETS,
                          use_dora=True)
    model = _tiny(family, False)
    params = random_params(model)
    inputs = _inputs(model)
    base = _logits(model, params, inputs)
    fresh = lora.init(model, params, cfg, jax.random.key(1))
    site = ("decoder", "layers_1", "mlp", "wo") if family == "t5" else ("layers_1", "mlp", "wo")
    kernel = np.asarray(lora.core._get(params, site + ("kernel",)), np.float64)
    node = lora.core._get(fresh, site)
    assert set(node) == {"lora_A", "lora_B", "lora_magnitude_vector"}
    np.testing.assert_allclose(node[lora.MAGNITUDE], np.linalg.norm(kernel, axis=0), rtol=1e-6)
    np.testing.assert_allclose(_logits(model, lora.merge(params, fresh, cfg), inputs), base, atol=1e-5, rtol=0)

    adapters = _random_magnitude(_random_b(fresh, seed=2), seed=3)
    merged = jax.jit(lora.merge, static_argnums=2)(params, adapters, cfg)
    node = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), lora.core._get(adapters, site))
    adapted = kernel + cfg.scale * node["lora_A"] @ node["lora_B"]
    by_hand = adapted * node[lora.MAGNITUDE] / np.linalg.norm(adapted, axis=0)
    np.testing.assert_allclose(lora.core._get(merged, site + ("kernel",)), by_hand, rtol=1e-5, atol=1e-6)
    merged_logits = _logits(model, merged, inputs)
    plain = _logits(model, lora.merge(params, _random_b(fresh, seed=2), cfg), inputs)
    assert np.abs(merged_logits - plain).max() > 1e-2  # the magnitudes matter
    np.testing.assert_allclose(_factored_logits(model, params, adapters, cfg, inputs), merged_logits, atol=1e-5)
    with pytest.raises(lora.LoraConfigError, match="cannot undo a DoRA merge"):
        lora.unmerge(merged, adapters, cfg)
    # adapters and config that disagree about DoRA are refused, not half-applied
    with pytest.raises(lora.LoraConfigError, match="have .*lora_magnitude_vector but the LoRA config has use_dora=False"):
        lora.merge(params, adapters, dataclasses.replace(cfg, use_dora=False))
    with pytest.raises(lora.LoraConfigError, match="have .*lora_magnitude_vector but the LoRA config has use_dora=False"):
        _factored_logits(model, params, adapters, dataclasses.replace(cfg, use_dora=False), inputs)
    with pytest.raises(lora.LoraConfigError, match="have no .*lora_magnitude_vector but .* use_dora=True"):
        lora.merge(params, _random_b(lora.init(model, params, dataclasses.replace(cfg, use_dora=False),
                                               jax.random.key(1)), 2), cfg)


def test_dora_factored_on_a_scanned_stack_values_grads_and_dropout():
    """The factored DoRA forward on a scanned stack equals the merged params' in logits and in the gradients of
    A, B and the magnitude (both hold the norm constant); with lora_dropout it differs per key only in training."""
    cfg = lora.LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"),
                          use_dora=True)
    flat, scanned = _tiny("llama", False), _tiny("llama", True)
    params = random_params(flat)
    adapters = _random_magnitude(_random_b(lora.init(flat, params, cfg, jax.random.key(1)), seed=5), seed=6)
    adapters, params = stack_layers(adapters, flat.config), stack_layers(params, flat.config)
    assert adapters["layers"]["mlp"]["wo"][lora.MAGNITUDE].shape == (2, 16)
    inputs = _inputs(scanned)
    g_merged, logits_merged = factored_matches_merged(scanned, params, adapters, cfg, inputs)
    assert (np.abs(np.asarray(g_merged["layers"]["mlp"]["wo"][lora.MAGNITUDE])).max(axis=1) > 0).all()

    dropped = dataclasses.replace(cfg, lora_dropout=0.5)
    run = jax.jit(lambda key: lora.apply_factored(scanned, params, adapters, dropped, *inputs, rngs={"dropout": key}))
    first, second = np.asarray(run(jax.random.key(0))), np.asarray(run(jax.random.key(1)))
    assert np.abs(first - logits_merged).max() > 1e-2 and np.abs(first - second).max() > 1e-2
    np.testing.assert_allclose(lora.apply_factored(scanned, params, adapters, dropped, *inputs), logits_merged,
                               atol=1e-5)  # no dropout rng: no dropout


def test_dora_magnitude_is_boxed_with_the_output_axis_and_counted():
    """The magnitude shards like its kernel's output axis; r=32 DoRA on q and v of FLAN-T5-base trains the
    course's 3,538,944 LoRA numbers plus one magnitude per output channel of the 72 kernels: 72 x 768 more."""
    model = _tiny("t5", True)
    boxed = jax.eval_shape(lambda k: model.init(k, *dummy_inputs(model.config)), jax.random.key(0))["params"]
    adapters = jax.eval_shape(lambda k: lora.init(model, boxed, lora.LoraConfig(2, 4, target_modules=("v", "wo"),
                                                                                 use_dora=True), k), jax.random.key(1))
    specs = nn.get_partition_spec(adapters)["decoder"]["layers"]
    assert tuple(specs["self_attention"]["v"][lora.MAGNITUDE]) == ("layers", "kv_heads")
    assert tuple(specs["mlp"]["wo"][lora.MAGNITUDE]) == ("layers", "embed")

    config = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    big = build_model(config)
    abstract = jax.eval_shape(lambda k: big.init(k, *dummy_inputs(config)), jax.random.key(0))["params"]
    cfg = lora.LoraConfig(32, 32, target_modules=("q", "v"), use_dora=True)
    adapters = jax.eval_shape(lambda k: lora.init(big, abstract, cfg, k), jax.random.key(1))
    assert count_params(nn.meta.unbox(adapters)) == 3_538_944 + 72 * 768 == 3_594_240


def test_dora_on_an_int8_base_uses_the_dequantized_kernels_norms():
    """QLoRA with DoRA: the factored forward on the int8 model (weight-only, kernels dequantized inside their
    matmuls) equals the DoRA adapters merged into the dequantized base, so the norm is the dequantized kernel's."""
    from llmjax import quantize

    cfg = lora.LoraConfig(r=2, lora_alpha=4, target_modules=("q", "wo"), use_dora=True)
    model = _tiny("t5", False)
    params = random_params(model)
    qmodel, qparams = quantize.quantize(model, params, "int8")
    _, dequantized = quantize.dequantize(qmodel, qparams)
    adapters = _random_magnitude(_random_b(lora.init(model, dequantized, cfg, jax.random.key(1)), seed=2), seed=3)
    inputs = _inputs(model)
    want = _logits(model, lora.merge(dequantized, adapters, cfg), inputs)
    np.testing.assert_allclose(_factored_logits(qmodel, qparams, adapters, cfg, inputs), want, atol=1e-4, rtol=0)


def mesh_matches_one_device(cfg, change: dict, pissa: bool = False):
    """Adapters of ``cfg`` on a small decoder, born sharded with their kernels, with ``change`` (leaf name -> function)
    applied to their values: the loss and adapter gradients on a 2x2x2 data/fsdp/tensor mesh equal one device's.
    ``pissa``: PiSSA's start is decomposed on the host first and passed in (no SVD inside the sharded init).
    -> the adapters tree on the mesh."""
    from llmjax.model_config import DecoderConfig
    from llmjax.sharding import activate, init_sharded, make_mesh, shard_batch

    config = DecoderConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = build_model(config)
    start = None
    if pissa:
        host = nn.meta.unbox(jax.jit(lambda k: model.init(k, *dummy_inputs(config)))(jax.random.key(0))["params"])
        start = lora.init(model, host, cfg, jax.random.key(0))

    def init(key):
        params = model.init(key, *dummy_inputs(config))["params"]
        adapters = lora.init(model, params, cfg, jax.random.fold_in(key, 1), pissa_start=start)
        moved = jax.tree_util.tree_map_with_path(  # the same on any mesh
            lambda path, box: box.replace_boxed(change.get(path[-1].key, lambda v: v)(box.value)), adapters,
            is_leaf=lambda x: isinstance(x, nn.Partitioned))
        return {"params": params, "lora": moved}

    ids = np.random.default_rng(0).integers(2, 128, size=(8, 8)).astype(np.int32)

    def loss(adapters, params, batch):
        logits = lora.apply_factored(model, params, adapters, cfg, batch["input_ids"])
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

    results = []
    for shape in ((1, 1, 1), (2, 2, 2)):
        mesh = make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
        tree, _ = init_sharded(init, mesh, jax.random.key(0))
        with activate(mesh):
            value, grads = jax.jit(jax.value_and_grad(loss))(tree["lora"], tree["params"],
                                                             shard_batch({"input_ids": ids}, mesh))
        results.append((float(value), jax.device_get(grads)))
    (value_one, grads_one), (value_mesh, grads_mesh) = results
    assert value_mesh == pytest.approx(value_one, rel=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads_mesh, grads_one)
    return tree["lora"]


def test_dora_on_a_data_fsdp_tensor_mesh_equals_one_device():
    """DoRA adapters born sharded with their kernels (the magnitude along the output axis) on a 2x2x2 mesh give the
    one-device loss and gradients of A, B and the magnitude (the column norms reduce across the fsdp shards)."""
    cfg = lora.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", use_dora=True)
    adapters = mesh_matches_one_device(cfg, {"lora_B": lambda v: v + 0.05, lora.MAGNITUDE: lambda v: v * 1.1})
    magnitude = adapters["layers"]["mlp"]["wi_0"][lora.MAGNITUDE]
    assert {s.data.shape for s in magnitude.addressable_shards} == {(2, 32)}  # [L, 64] split over tensor=2
