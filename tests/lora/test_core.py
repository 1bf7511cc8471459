"""LoRA core: config validation, where adapters go, init, merge/unmerge, and the trainable count.

The reference for "base + adapters" is an independent forward: every targeted ``Dense`` call is
intercepted and computed factored, ``x @ W + scale * (x @ A) @ B``, on the unscanned model; merging
``W + scale * A @ B`` into the params must give the same logits.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import lora
from llmjax.model_config import DecoderConfig, T5Config
from llmjax.models import build_model, dummy_inputs, stack_layers
from llmjax.train.state import count_params

# The dimensions of tests/lora/test_peft_format.py's torch models, so eagerly compiled ops are shared.
TINY_T5 = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=3, num_heads=2,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
TINY_LLAMA = DecoderConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
T5_TARGETS = ("q", "v", "wi_0", "wo")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tiny(family: str, scan: bool):
    config = TINY_T5 if family == "t5" else TINY_LLAMA
    return build_model(dataclasses.replace(config, scan_layers=scan))


def random_params(model, seed: int = 0) -> dict:
    """Random fp32 numpy params (matrices N(0, 1/fan_in), norm scales ~1) built from the abstract shapes:
    no init is compiled, which on a busy CPU costs more than the whole test."""
    abstract = nn.meta.unbox(jax.eval_shape(lambda k: model.init(k, *dummy_inputs(model.config)), jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key == "scale":
            return (1 + 0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
        fan_in = leaf.shape[-2] if path[-1].key == "kernel" else 1
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract["params"])


def _inputs(model, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(2, 64, size=(2, 7)), jnp.int32)
    if isinstance(model.config, T5Config):
        return (ids, jnp.asarray(rng.integers(2, 64, size=(2, 5)), jnp.int32))
    return (ids,)


@functools.lru_cache
def _forward(config):
    # Jitted once per config: one compile of the whole forward is several times cheaper than eager dispatch.
    model = build_model(config)
    return jax.jit(lambda params, *inputs: model.apply({"params": params}, *inputs))


def _logits(model, params, inputs):
    return np.asarray(_forward(model.config)(params, *inputs))


def _random_b(adapters, seed: int):
    """Adapters with B drawn too (a fresh B is zero, which would hide a wrong merge)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(adapters)
    rng = np.random.default_rng(seed)
    drawn = [jnp.asarray(rng.normal(0, 0.3, leaf.shape), jnp.float32) if path[-1].key == lora.LORA_B else leaf
             for path, leaf in leaves]
    return jax.tree_util.tree_unflatten(tree, drawn)


def _factored_logits(model, params, adapters, cfg, inputs):
    """Logits with each targeted Dense computed as ``x W + s (x A) B`` (no merged kernel is formed)."""
    return np.asarray(jax.jit(lambda p, a, *x: lora.apply_factored(model, p, a, cfg, *x))(params, adapters, *inputs))


# ----------------------------------------------------------------------------------------------------
# LoraConfig


def test_config_scale_and_list_targets():
    cfg = lora.LoraConfig(r=8, lora_alpha=32, target_modules=["q", "v", "q"])
    assert cfg.scale == 4.0 and cfg.target_modules == ("q", "v") and cfg.lora_dropout == 0.0
    assert not cfg.use_rslora
    hash(cfg)  # frozen: usable as a static jit argument
    rs = lora.LoraConfig(r=16, lora_alpha=8, target_modules="all-linear", use_rslora=True)
    assert rs.scale == 2.0 and rs.target_modules == ("all-linear",)  # rsLoRA: lora_alpha / sqrt(r)


def test_all_linear_adapts_every_projection_inside_the_layers():
    every = {"t5": ("q", "k", "v", "o", "wi_0", "wi_1", "wo"), "llama": LLAMA_TARGETS}
    for family, names in every.items():
        config = TINY_T5 if family == "t5" else TINY_LLAMA
        listed = lora.sites(config, lora.LoraConfig(2, 4, target_modules=names))
        assert lora.sites(config, lora.LoraConfig(2, 4, target_modules="all-linear")) == listed
        assert lora.resolve_targets(lora.LoraConfig(2, 4, target_modules="all-linear"), config).target_modules == names
    ungated = dataclasses.replace(TINY_T5, feed_forward_proj="relu")
    assert "wi" in lora.resolve_targets(lora.LoraConfig(2, 4, target_modules="all-linear"), ungated).target_modules
    modules = {m for site in lora.sites(TINY_LLAMA, lora.LoraConfig(2, 4, target_modules="all-linear"))
               for m in site.hf_modules}
    assert not any("lm_head" in m or "embed" in m for m in modules)  # as PEFT: the output layer stays frozen


def test_config_section_takes_all_linear_rslora_and_modules_to_save():
    from llmjax.config import ConfigError, config_from_dict, config_to_dict, load_config
    from tests.conftest import REPO

    shipped = REPO / "configs" / "sft_t5_tiny_lora.yaml"
    config = load_config(shipped, ["lora.target_modules=all-linear", "lora.use_rslora=true"])
    assert config.lora == lora.LoraConfig(8, 32, target_modules="all-linear", use_rslora=True)
    assert config_from_dict(config_to_dict(config)).lora == config.lora  # what a run dir's config.yaml reads back
    with pytest.raises(ConfigError, match="'alllinear' is not allowed .did you mean 'all-linear'.*expected a list"):
        load_config(shipped, ["lora.target_modules=alllinear"])
    with pytest.raises(ConfigError, match="lora.use_rslora: expected bool"):
        load_config(shipped, ["lora.use_rslora=maybe"])
    saved = load_config(shipped, ["lora.modules_to_save=[layer_norm, lm_head]"])
    assert saved.lora.modules_to_save == ("layer_norm", "lm_head")
    assert config_from_dict(config_to_dict(saved)).lora == saved.lora
    with pytest.raises(ConfigError, match="lora.modules_to_save: expected a list, got 'layer_norm'"):
        load_config(shipped, ["lora.modules_to_save=layer_norm"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0, lora_alpha=8, target_modules=("q",)), "positive integer"),
    (dict(r=4.5, lora_alpha=8, target_modules=("q",)), "positive integer"),
    (dict(r=4, lora_alpha=0, target_modules=("q",)), "lora_alpha"),
    (dict(r=4, lora_alpha=8, lora_dropout=1.0, target_modules=("q",)), "lora_dropout"),
    (dict(r=4, lora_alpha=8, target_modules=()), "non-empty"),
    (dict(r=4, lora_alpha=8, target_modules=("query",)), r"\['query'\].*q_proj"),
    (dict(r=4, lora_alpha=8, target_modules=("all-linear", "q")), "give it alone"),
    (dict(r=4, lora_alpha=8, target_modules=("q",), use_rslora="yes"), "use_rslora='yes' must be true or false"),
])
def test_config_rejects(kwargs, match):
    with pytest.raises(lora.LoraConfigError, match=match):
        lora.LoraConfig(**kwargs)


def test_target_of_the_other_family_names_the_model_modules():
    with pytest.raises(lora.LoraConfigError, match=r"\['q_proj'\] are not modules of this T5 model.*'wi_0'.*'lm_head'"):
        lora.init(_tiny("t5", False), None, lora.LoraConfig(4, 8, target_modules=("q", "q_proj")), jax.random.key(0))


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_output_layer_is_a_target_only_when_untied(family):
    """``lm_head`` adapts an untied head ([d_model, vocab], one site outside the layers, scanned or not); a tied
    head is the embedding and is refused, before anything is built."""
    config = TINY_T5 if family == "t5" else TINY_LLAMA
    cfg = lora.LoraConfig(2, 4, target_modules=("lm_head",))
    for scan in (False, True):
        (site,) = lora.sites(dataclasses.replace(config, scan_layers=scan), cfg)
        assert (site.path, site.hf_modules, site.stacked) == (("lm_head",), ("lm_head",), False)
    tied = dataclasses.replace(config, tie_word_embeddings=True)
    with pytest.raises(lora.LoraConfigError, match="ties its output layer to the input embedding"):
        lora.sites(tied, cfg)
    from llmjax.config import ConfigError, load_config
    from tests.conftest import REPO

    shipped = REPO / "configs" / "sft_t5_tiny_lora.yaml"  # its T5 is untied (v1.1)
    assert load_config(shipped, ["lora.target_modules=[q, lm_head]"]).lora.target_modules == ("q", "lm_head")
    with pytest.raises(ConfigError, match="ties its output layer"):
        load_config(shipped, ["lora.target_modules=[q, lm_head]", "model.tie_word_embeddings=true"])


# ----------------------------------------------------------------------------------------------------
# Layout, init, merge


def test_sites_follow_peft_suffix_matching():
    """``q`` adapts self- and cross-attention queries of both stacks (what PEFT's suffix match does)."""
    modules = [m for site in lora.sites(TINY_T5, lora.LoraConfig(4, 8, target_modules=("q",))) for m in site.hf_modules]
    assert sorted(modules) == sorted(
        [f"encoder.block.{i}.layer.0.SelfAttention.q" for i in range(2)]
        + [f"decoder.block.{i}.layer.0.SelfAttention.q" for i in range(3)]
        + [f"decoder.block.{i}.layer.1.EncDecAttention.q" for i in range(3)])


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_init_layout_and_scanned_equals_stacked_unscanned(family):
    cfg = lora.LoraConfig(r=3, lora_alpha=6, target_modules=T5_TARGETS if family == "t5" else LLAMA_TARGETS)
    flat, scanned = _tiny(family, False), _tiny(family, True)
    params = random_params(flat)
    adapters = lora.init(flat, params, cfg, jax.random.key(1))
    for path, leaf in jax.tree_util.tree_leaves_with_path(adapters):
        keys = tuple(k.key for k in path)
        kernel = params
        for key in keys[:-1] + ("kernel",):
            kernel = kernel[key]
        assert leaf.dtype == jnp.float32
        want = (kernel.shape[0], 3) if keys[-1] == lora.LORA_A else (3, kernel.shape[1])
        assert leaf.shape == want, keys
        if keys[-1] == lora.LORA_A:  # PEFT's kaiming-uniform(a=sqrt(5)): U(+-1/sqrt(in))
            bound = 1 / np.sqrt(kernel.shape[0])
            assert 0.5 * bound < np.abs(leaf).max() <= bound
        else:
            assert not np.any(leaf)
    stacked = lora.init(scanned, stack_layers(params, flat.config), cfg, jax.random.key(1))
    jax.tree_util.tree_map(np.testing.assert_array_equal, stacked, stack_layers(adapters, flat.config))


@pytest.mark.parametrize("scan", [False, True])
def test_boxed_params_give_boxed_adapters_with_kernel_axes(scan):
    model = _tiny("t5", scan)
    boxed = jax.eval_shape(lambda k: model.init(k, *dummy_inputs(model.config)), jax.random.key(0))["params"]
    adapters = jax.eval_shape(lambda k: lora.init(model, boxed, lora.LoraConfig(2, 4, target_modules=("v", "wo")), k),
                              jax.random.key(1))
    specs = nn.get_partition_spec(adapters)
    site = specs["decoder"]["layers" if scan else "layers_1"]
    lead = ("layers",) if scan else ()
    assert tuple(site["self_attention"]["v"]["lora_A"]) == lead + ("embed", None)
    assert tuple(site["self_attention"]["v"]["lora_B"]) == lead + (None, "kv_heads")
    assert tuple(site["mlp"]["wo"]["lora_A"]) == lead + ("mlp", None)
    assert tuple(site["mlp"]["wo"]["lora_B"]) == lead + (None, "embed")
    head = jax.eval_shape(lambda k: lora.init(model, boxed, lora.LoraConfig(2, 4, target_modules=("lm_head",)), k),
                          jax.random.key(1))
    head = nn.get_partition_spec(head)["lm_head"]
    assert (tuple(head["lora_A"]), tuple(head["lora_B"])) == (("embed", None), (None, "vocab"))


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_step0_merge_unmerge(family):
    """Fresh adapters leave the logits unchanged; merged == factored forward; unmerge restores the base (the
    untied output layer adapted too)."""
    cfg = lora.LoraConfig(r=4, lora_alpha=8,
                          target_modules=(*(T5_TARGETS if family == "t5" else LLAMA_TARGETS), "lm_head"))
    model = _tiny(family, False)
    params = random_params(model)
    inputs = _inputs(model)
    base = _logits(model, params, inputs)
    fresh = lora.init(model, params, cfg, jax.random.key(1))
    np.testing.assert_array_equal(_logits(model, lora.merge(params, fresh, cfg), inputs), base)

    adapters = _random_b(fresh, seed=2)
    merged = jax.jit(lora.merge, static_argnums=2)(params, adapters, cfg)
    merged_logits = _logits(model, merged, inputs)
    assert np.abs(merged_logits - base).max() > 1e-2  # the adapters do change the model
    np.testing.assert_allclose(merged_logits, _factored_logits(model, params, adapters, cfg, inputs), atol=1e-5)
    restored = lora.unmerge(merged, adapters, cfg)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), restored, params)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_trainable_token_rows(tied):
    """``trainable_token_indices``: the adapters hold those rows of the input embedding, born as the base's (step 0
    is the base), boxed like the embedding's rows; moved rows replace the base's in the merged params and in the
    factored forward alike (a tied head reads them too), and nothing else of the embedding changes."""
    tokens = (5, 60, 11)
    cfg = lora.LoraConfig(r=2, lora_alpha=4, target_modules=("q_proj",), trainable_token_indices=tokens)
    model = build_model(dataclasses.replace(TINY_LLAMA, tie_word_embeddings=tied, scan_layers=True))
    params = random_params(model)
    inputs = _inputs(model)
    fresh = lora.init(model, params, cfg, jax.random.key(1))
    np.testing.assert_array_equal(fresh["embed"][lora.TOKENS], params["embed"]["embedding"][list(tokens)])
    np.testing.assert_array_equal(_logits(model, lora.merge(params, fresh, cfg), inputs),
                                  _logits(model, params, inputs))

    adapters = _random_b(fresh, seed=2)
    adapters["embed"][lora.TOKENS] = np.random.default_rng(3).normal(size=(3, 16)).astype(np.float32)
    merged = jax.jit(lora.merge, static_argnums=2)(params, adapters, cfg)
    embedding = np.asarray(merged["embed"]["embedding"])
    np.testing.assert_array_equal(embedding[list(tokens)], adapters["embed"][lora.TOKENS])
    others = np.setdiff1d(np.arange(64), tokens)
    np.testing.assert_array_equal(embedding[others], params["embed"]["embedding"][others])
    np.testing.assert_allclose(_logits(model, merged, inputs), _factored_logits(model, params, adapters, cfg, inputs),
                               atol=1e-5)
    without_rows = lora.merge(params, {**adapters, "embed": {lora.TOKENS: fresh["embed"][lora.TOKENS]}}, cfg)
    column_moved = np.abs(_logits(model, merged, inputs) - _logits(model, without_rows, inputs)).max(axis=(0, 1))
    assert (column_moved[60] > 1e-3) == tied  # token 60 is in no input: its row reaches the logits through a tied head

    boxed = jax.eval_shape(lambda k: model.init(k, *dummy_inputs(model.config)), jax.random.key(0))["params"]
    specs = nn.get_partition_spec(jax.eval_shape(lambda k: lora.init(model, boxed, cfg, k), jax.random.key(1)))
    assert tuple(specs["embed"][lora.TOKENS]) == (None, "embed")


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_output_layer_token_rows(family):
    """``output_token_indices`` (PEFT's ``{"lm_head": [...]}``) on an untied head: the adapters hold those columns
    of the head's ``[d_model, vocab]`` kernel as rows, born as the base's (step 0 is the base), sharded on the
    kernel's embed axis; moved rows replace exactly those columns in the merged params and in the factored forward
    alike, so only those tokens' logits move. The input embedding's rows train beside them (LLaMA) or not (T5)."""
    head, inputs_rows = (9, 60), ((5, 11) if family == "llama" else ())
    cfg = lora.LoraConfig(r=2, lora_alpha=4, target_modules=("q_proj",) if family == "llama" else ("q",),
                          trainable_token_indices={"embed_tokens": list(inputs_rows), "lm_head": list(head)})
    assert cfg.trainable_token_indices == inputs_rows and cfg.output_token_indices == head
    model = _tiny(family, True) if family == "t5" else build_model(dataclasses.replace(TINY_LLAMA, scan_layers=True))
    assert not model.config.tie_word_embeddings
    params = random_params(model)
    inputs = _inputs(model)
    fresh = lora.init(model, params, cfg, jax.random.key(1))
    kernel = np.asarray(params["lm_head"]["kernel"])
    np.testing.assert_array_equal(fresh["lm_head"][lora.TOKENS], kernel[:, list(head)].T)
    assert ("embed" in fresh) == bool(inputs_rows)
    np.testing.assert_array_equal(_logits(model, lora.merge(params, fresh, cfg), inputs),
                                  _logits(model, params, inputs))

    adapters = _random_b(fresh, seed=2)
    moved = np.random.default_rng(3).normal(size=fresh["lm_head"][lora.TOKENS].shape).astype(np.float32)
    adapters["lm_head"] = {lora.TOKENS: moved}
    merged = jax.jit(lora.merge, static_argnums=2)(params, adapters, cfg)
    others = np.setdiff1d(np.arange(kernel.shape[1]), head)
    np.testing.assert_array_equal(np.asarray(merged["lm_head"]["kernel"])[:, list(head)], moved.T)
    np.testing.assert_array_equal(np.asarray(merged["lm_head"]["kernel"])[:, others], kernel[:, others])
    np.testing.assert_allclose(_logits(model, merged, inputs), _factored_logits(model, params, adapters, cfg, inputs),
                               atol=1e-5)
    without = lora.merge(params, {**adapters, "lm_head": fresh["lm_head"]}, cfg)
    column_moved = np.abs(_logits(model, merged, inputs) - _logits(model, without, inputs)).max(axis=(0, 1))
    assert np.all(column_moved[list(head)] > 1e-3) and np.all(column_moved[others] == 0)
    with pytest.raises(lora.LoraConfigError, match="cannot undo trainable_token_indices"):
        lora.unmerge(merged, adapters, cfg)
    with pytest.raises(lora.LoraConfigError, match=r"adapters hold trained token rows \(lm_head/trainable_tokens_delta"
                                                   r"\) but the LoRA config has output_token_indices=\[\]"):
        lora.merge(params, adapters, dataclasses.replace(cfg, output_token_indices=()))

    boxed = jax.eval_shape(lambda k: model.init(k, *dummy_inputs(model.config)), jax.random.key(0))["params"]
    specs = nn.get_partition_spec(jax.eval_shape(lambda k: lora.init(model, boxed, cfg, k), jax.random.key(1)))
    assert tuple(specs["lm_head"][lora.TOKENS]) == (None, "embed")


def test_output_layer_token_rows_are_refused_where_they_cannot_act():
    untied = TINY_LLAMA
    tied = dataclasses.replace(TINY_LLAMA, tie_word_embeddings=True)
    rows = {"trainable_token_indices": {"lm_head": [3]}}
    with pytest.raises(lora.LoraConfigError, match="ties its output layer to the input embedding"):
        lora.token_sites(tied, lora.LoraConfig(2, 4, target_modules=("q_proj",), **rows))
    with pytest.raises(lora.LoraConfigError, match="target_modules adapts lm_head and trainable_token_indices"):
        lora.token_sites(untied, lora.LoraConfig(2, 4, target_modules=("q_proj", "lm_head"), **rows))
    with pytest.raises(lora.LoraConfigError, match="modules_to_save trains lm_head in full"):
        lora.token_sites(untied, lora.LoraConfig(2, 4, target_modules=("q_proj",), modules_to_save=("lm_head",),
                                                 **rows))
    with pytest.raises(lora.LoraConfigError, match=r"trainable_token_indices\['lm_head'\] \[64\] are not token ids"):
        lora.token_sites(untied, lora.LoraConfig(2, 4, target_modules=("q_proj",),
                                                 trainable_token_indices={"lm_head": [3, 64]}))
    with pytest.raises(lora.LoraConfigError, match="output layer's ids once"):
        lora.LoraConfig(2, 4, target_modules=("q_proj",), output_token_indices=(3,), **rows)
    with pytest.raises(lora.LoraConfigError, match=r"trainable_token_indices\['lm_head'\] repeats \[3\]"):
        lora.LoraConfig(2, 4, target_modules=("q_proj",), trainable_token_indices={"lm_head": [3, 3]})
    with pytest.raises(lora.LoraConfigError, match=r"names \['shared'\]"):
        lora.LoraConfig(2, 4, target_modules=("q",), trainable_token_indices={"shared": [3]})


def test_trainable_token_indices_in_a_run_config():
    from llmjax.adapter_configs import QuantizeConfig
    from llmjax.config import ConfigError, config_from_dict, config_to_dict, load_config
    from llmjax.stages.adapters import check_lora_fits, lora_identity
    from tests.conftest import REPO

    decoder = REPO / "configs" / "sft_decoder_tiny.yaml"
    section = ["lora.r=2", "lora.lora_alpha=4", "lora.target_modules=[q_proj]"]
    config = load_config(decoder, [*section, "lora.trainable_token_indices=[7, 3]"])
    assert config.lora.trainable_token_indices == (7, 3)
    assert load_config(decoder, [*section, "lora.trainable_token_indices={embed_tokens: [7, 3]}"]).lora == config.lora
    assert config_from_dict(config_to_dict(config)).lora == config.lora  # what a run dir's config.yaml reads back
    assert lora_identity(config.lora, config.model)["trainable_token_indices"] == [7, 3]  # a resume must keep them
    both = load_config(decoder, [*section, "lora.trainable_token_indices={embed_tokens: [7, 3], lm_head: [9]}"])
    assert both.lora.trainable_token_indices == (7, 3) and both.lora.output_token_indices == (9,)
    assert config_from_dict(config_to_dict(both)).lora == both.lora
    assert lora_identity(both.lora, both.model)["output_token_indices"] == [9]
    head_only = load_config(REPO / "configs" / "sft_t5_tiny_lora.yaml", ["lora.trainable_token_indices={lm_head: [3]}"])
    assert head_only.lora.output_token_indices == (3,) and not head_only.lora.trainable_token_indices
    with pytest.raises(ConfigError, match=r"trainable_token_indices \[512\] are not token ids of this model"):
        load_config(decoder, [*section, "lora.trainable_token_indices=[3, 512]"])
    with pytest.raises(ConfigError, match="not supported on a T5 with an untied output layer"):
        load_config(REPO / "configs" / "sft_t5_tiny_lora.yaml", ["lora.trainable_token_indices=[3]"])
    with pytest.raises(ConfigError, match="trainable_token_indices with quantize: is not supported"):
        check_lora_fits(config.model, config.lora, QuantizeConfig())
    with pytest.raises(lora.LoraConfigError, match=r"repeats \[3\]"):
        lora.LoraConfig(2, 4, target_modules=("q_proj",), trainable_token_indices=[3, 4, 3])
    with pytest.raises(lora.LoraConfigError, match="must be a list of token ids"):
        lora.LoraConfig(2, 4, target_modules=("q_proj",), trainable_token_indices=[-1])


def test_merge_scanned_equals_unscanned():
    """On a stacked tree merge and unmerge act layer by layer (the scanned forward itself is checked against
    peft in test_peft_format.py)."""
    cfg = lora.LoraConfig(r=4, lora_alpha=8, target_modules=T5_TARGETS)
    flat = _tiny("t5", False)
    params = random_params(flat)
    adapters = _random_b(lora.init(flat, params, cfg, jax.random.key(1)), seed=3)
    stack = lambda tree: stack_layers(tree, flat.config)  # noqa: E731
    for fn in (lora.merge, lora.unmerge):
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                               fn(stack(params), stack(adapters), cfg), stack(fn(params, adapters, cfg)))


def test_trainable_count_flan_t5_base_r32_qv():
    """r=32 on q and v of FLAN-T5-base (d_model 768, 12 + 12 layers, 12 heads x 64): the course's 3,538,944.

    Hand count: encoder 12 x (q, v) + decoder 12 x (self q, v + cross q, v) = 72 kernels of 768 x 768,
    each adding (768 + 768) x 32 = 49,152 parameters.
    """
    config = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    model = build_model(config)
    abstract = jax.eval_shape(lambda k: model.init(k, *dummy_inputs(config)), jax.random.key(0))["params"]
    adapters = jax.eval_shape(lambda k: lora.init(model, abstract, lora.LoraConfig(32, 32, target_modules=("q", "v")), k),
                              jax.random.key(1))
    assert count_params(nn.meta.unbox(adapters)) == 72 * (768 + 768) * 32 == 3_538_944


def test_adapter_branch_backward_is_autodiffs():
    """The factored branch's hand-written backward gives autodiff's gradients of ``scale * (x @ A) @ B`` for
    every argument, on an input with batch and length axes."""
    keys = jax.random.split(jax.random.key(0), 4)
    x, a = jax.random.normal(keys[0], (2, 5, 6)), jax.random.normal(keys[1], (6, 3))
    b, weights = jax.random.normal(keys[2], (3, 7)), jax.random.normal(keys[3], (2, 5, 7))

    def objective(branch):
        return lambda x, a, b: jnp.sum(jnp.tanh(branch(x, a, b)) * weights)

    ours = jax.grad(objective(lambda x, a, b: lora.adapter_branch(x, a, b, 2.5)), argnums=(0, 1, 2))(x, a, b)
    plain = jax.grad(objective(lambda x, a, b: 2.5 * ((x @ a) @ b)), argnums=(0, 1, 2))(x, a, b)
    for got, want in zip(ours, plain):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(lora.adapter_branch(x, a, b, 2.5), 2.5 * ((x @ a) @ b))


def factored_matches_merged(model, params, adapters, cfg, inputs):
    """Check that ``apply_factored`` gives the merged params' logits and adapter gradients (of a mean log-prob);
    -> ``(gradients, logits)`` of the merged form."""
    def loss(adapters, factored):
        if factored:
            logits = lora.apply_factored(model, params, adapters, cfg, *inputs)
        else:
            logits = model.apply({"params": lora.merge(params, adapters, cfg)}, *inputs)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3]), logits

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    (g_merged, logits_merged), (g_factored, logits_factored) = grad(adapters, False), grad(adapters, True)
    np.testing.assert_allclose(logits_factored, logits_merged, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), g_factored, g_merged)
    return g_merged, logits_merged


def test_factored_equals_merged_on_scanned_stack_values_and_grads():
    """apply_factored slices the stacked adapters per layer (the "lora" collection scans like params): logits and
    adapter gradients equal those of the merged params; lora_dropout acts only with a dropout rng."""
    cfg = lora.LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "up_proj", "down_proj", "lm_head"))
    flat, scanned = _tiny("llama", False), _tiny("llama", True)
    params = random_params(flat)
    adapters = stack_layers(_random_b(lora.init(flat, params, cfg, jax.random.key(1)), seed=5), flat.config)
    params = stack_layers(params, flat.config)
    inputs = _inputs(scanned)
    g_merged, logits_merged = factored_matches_merged(scanned, params, adapters, cfg, inputs)
    assert (np.abs(np.asarray(g_merged["layers"]["mlp"]["wo"]["lora_B"])).max(axis=(1, 2)) > 0).all()  # every layer
    assert np.abs(np.asarray(g_merged["lm_head"]["lora_A"])).max() > 0  # the head's adapter trains

    dropped = dataclasses.replace(cfg, lora_dropout=0.5)
    run = jax.jit(lambda key: lora.apply_factored(scanned, params, adapters, dropped, *inputs, rngs={"dropout": key}))
    first, second = np.asarray(run(jax.random.key(0))), np.asarray(run(jax.random.key(1)))
    assert np.abs(first - logits_merged).max() > 1e-2 and np.abs(first - second).max() > 1e-2
    np.testing.assert_array_equal(first, np.asarray(run(jax.random.key(0))))
