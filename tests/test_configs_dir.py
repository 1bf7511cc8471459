"""Every YAML in configs/ parses, and every model it names builds (abstractly, no memory) with the right size."""

import dataclasses
import math

import jax
import pytest
import torch
import transformers
import yaml

from llmjax.config import CONFIGS_DIR, MeshConfig, load_config, load_section
from llmjax.models import MODEL_CONFIGS, DecoderConfig, T5Config, build_model, dummy_inputs
from llmjax.sharding import make_mesh

MODEL_FILES = sorted((CONFIGS_DIR / "model").glob("*.yaml"))
MESH_FILES = sorted((CONFIGS_DIR / "mesh").glob("*.yaml"))
RUN_FILES = sorted(CONFIGS_DIR.glob("*.yaml"))

# Published T5 v1.1 shapes (t5x examples/t5/t5_1_1/{small,base,large,xl,xxl}.gin; HF google/t5-v1_1-*):
# (d_model, d_ff, num_heads, layers per stack); all have d_kv 64, vocab 32128, gated GELU, untied head.
T5_V1_1 = {"t5_small": (512, 1024, 6, 8), "t5_base": (768, 2048, 12, 12), "t5_large": (1024, 2816, 16, 24),
           "t5_xl": (2048, 5120, 32, 24), "t5_xxl": (4096, 10240, 64, 24)}
LLAMA_7B_PARAMS = 6_738_415_616  # Meta's LLaMA-7B as counted by transformers


def _param_count(config) -> int:
    model = build_model(config)
    shapes = jax.eval_shape(lambda r: model.init(r, *dummy_inputs(config)), jax.random.key(0))["params"]
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def _hf_param_count(config) -> int:
    """Independent count: the transformers model with the same dimensions, built on the meta device."""
    if isinstance(config, T5Config):
        hf = transformers.T5Config(
            vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv, d_ff=config.d_ff,
            num_layers=config.num_layers, num_decoder_layers=config.decoder_layers, num_heads=config.num_heads,
            relative_attention_num_buckets=config.relative_attention_num_buckets,
            feed_forward_proj=config.feed_forward_proj, tie_word_embeddings=config.tie_word_embeddings)
        cls = transformers.T5ForConditionalGeneration
    else:
        hf = transformers.LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads, num_key_value_heads=config.kv_heads,
            head_dim=config.dim_per_head, tie_word_embeddings=config.tie_word_embeddings)
        cls = transformers.LlamaForCausalLM
    with torch.device("meta"):
        count = sum(p.numel() for p in cls(hf).parameters())
    if isinstance(config, T5Config) and not config.tie_word_embeddings:
        count += config.vocab_size * config.d_model  # transformers >= 5 always ties T5's head to `shared`
    return count


def test_configs_exist():
    names = {p.stem for p in MODEL_FILES}
    assert {"t5_tiny", *T5_V1_1, "decoder_tiny", "decoder_125m", "decoder_1b", "decoder_7b"} <= names
    assert {p.stem for p in MESH_FILES} >= {"single", "gpu8", "tpu_pod_slice"}
    assert "pretrain_t5_tiny" in {p.stem for p in RUN_FILES}


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.stem)
def test_model_file_builds_with_the_reference_size(path):
    config = load_section(path, "model")
    assert _param_count(config) == _hf_param_count(config)


@pytest.mark.parametrize("name", sorted(T5_V1_1))
def test_t5_v1_1_published_shapes(name):
    config = load_section(CONFIGS_DIR / "model" / f"{name}.yaml", "model")
    d_model, d_ff, heads, layers = T5_V1_1[name]
    assert (config.d_model, config.d_ff, config.num_heads, config.num_layers, config.decoder_layers) == \
        (d_model, d_ff, heads, layers, layers)
    assert (config.d_kv, config.vocab_size, config.feed_forward_proj, config.tie_word_embeddings) == \
        (64, 32128, "gated-gelu", False)


def test_decoder_sizes():
    load = lambda name: load_section(CONFIGS_DIR / "model" / f"{name}.yaml", "model")  # noqa: E731
    assert _param_count(load("decoder_7b")) == LLAMA_7B_PARAMS
    assert _param_count(load("decoder_1b")) == pytest.approx(1.1e9, rel=0.02)  # TinyLlama-1.1B
    assert _param_count(load("decoder_125m")) == pytest.approx(125e6, rel=0.1)


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.stem)
def test_model_files_restate_no_defaults(path):
    # One place for each fact: a size file lists only what differs from the family's dataclass defaults.
    raw = yaml.safe_load(path.read_text())
    defaults = {f.name: f.default for f in dataclasses.fields(MODEL_CONFIGS[raw["family"]])}
    restated = {k: v for k, v in raw.items() if k != "family" and defaults.get(k) == v}
    assert not restated, f"{path.name} restates defaults {restated}"


@pytest.mark.parametrize("path", MESH_FILES, ids=lambda p: p.stem)
def test_mesh_presets(path):
    mesh = load_section(path, "mesh")
    assert isinstance(mesh, MeshConfig)
    devices = {"single": 1, "gpu8": 8, "tpu_pod_slice": 64}[path.stem]
    resolved = mesh.resolve(devices)
    shape = (resolved.data, resolved.fsdp, resolved.tensor)
    assert math.prod(shape) == devices
    if devices <= len(jax.devices()):
        assert make_mesh(*shape, devices=jax.devices()[:devices]).size == devices


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: p.stem)
def test_run_config_parses_and_builds(path):
    cfg = load_config(path)
    assert _param_count(cfg.model) > 0
    assert isinstance(cfg.model, (T5Config, DecoderConfig))
