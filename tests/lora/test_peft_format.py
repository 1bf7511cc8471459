"""PEFT's LoRA format both ways, with ``peft`` (torch) as the reference, T5 and LLaMA, scanned and not.

(a) an adapter ``peft`` wrote (random non-zero B) read by llmjax gives peft's logits; (b) an adapter llmjax
wrote read by ``peft.PeftModel.from_pretrained`` gives llmjax's logits; both within 1e-4. Then the
errors for adapter directories llmjax must refuse, and ``llmjax lora merge`` against ``merge_and_unload``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

peft = pytest.importorskip("peft")

import llmjax.hf  # noqa: E402
from llmjax import cli, lora  # noqa: E402
from llmjax.hf.io import CheckpointError  # noqa: E402
from llmjax.testing import torch_llama, torch_t5  # noqa: E402
from tests.lora.test_core import _random_b  # noqa: E402

# Gated T5 (v1.1) and LLaMA with GQA, every projection adapted.
FAMILIES = {
    "t5": (lambda: torch_t5(0, vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=3,
                            num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
           transformers.T5ForConditionalGeneration, ["q", "k", "v", "o", "wi_0", "wi_1", "wo"], "SEQ_2_SEQ_LM"),
    "llama": (lambda: torch_llama(0, vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2),
              transformers.LlamaForCausalLM, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"], "CAUSAL_LM"),
}
TOL = 1e-4


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """family -> a saved random HF model directory."""
    dirs = {}
    for family, (build, *_) in FAMILIES.items():
        dirs[family] = tmp_path_factory.mktemp(f"base_{family}")
        build().save_pretrained(str(dirs[family]), safe_serialization=True)
    return dirs


def _ids(family: str):
    rng = np.random.default_rng(1)
    ids = rng.integers(2, 64, size=(2, 6))
    return (ids, rng.integers(2, 64, size=(2, 4))) if family == "t5" else (ids,)


def _torch_logits(model, family: str) -> np.ndarray:
    ids = [torch.tensor(x) for x in _ids(family)]
    with torch.no_grad():
        if family == "t5":
            return model(input_ids=ids[0], decoder_input_ids=ids[1]).logits.numpy()
        return model(input_ids=ids[0]).logits.numpy()


def _llmjax_logits(model, params, adapters, cfg, family: str) -> np.ndarray:
    merged = lora.merge(params, adapters, cfg)
    return np.asarray(model.apply({"params": merged}, *[np.asarray(x, np.int32) for x in _ids(family)]))


def _torch_base(family: str, base_dir: Path):
    return FAMILIES[family][1].from_pretrained(str(base_dir)).eval()


def _peft_adapter(family: str, base_dir: Path, out: Path, **options):
    """A peft LoRA adapter with random A (peft's init) and random B, saved to ``out``; -> the peft model.
    ``options``: peft.LoraConfig's, over r=3, lora_alpha=5 and every projection. With ``use_dora`` each
    magnitude, with ``modules_to_save`` each trained copy, and with ``trainable_token_indices`` the token rows, is
    also moved off the base (by a factor in [0.5, 1.5] per element)."""
    _, _, targets, task = FAMILIES[family]
    config = peft.LoraConfig(**{"r": 3, "lora_alpha": 5, "target_modules": targets, **options}, task_type=task)
    model = peft.get_peft_model(_torch_base(family, base_dir), config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
            elif "lora_magnitude_vector" in name or ".modules_to_save." in name or "trainable_tokens_delta" in name:
                param.mul_(0.5 + torch.rand(param.shape, generator=generator))
    model.save_pretrained(str(out))
    return model.eval()


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_peft_parity_both_ways(family, scan, base_dirs, tmp_path):
    model, params = llmjax.hf.from_pretrained(base_dirs[family], scan_layers=scan)

    # (a) peft writes, llmjax reads
    peft_model = _peft_adapter(family, base_dirs[family], tmp_path / "from_peft")
    adapters, cfg = lora.from_pretrained(model, tmp_path / "from_peft")
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (3, 5, 0.0)
    assert set(cfg.target_modules) == set(FAMILIES[family][2])  # peft writes them as a set, in any order
    want = _torch_logits(peft_model, family)
    base = _torch_logits(_torch_base(family, base_dirs[family]), family)
    assert np.abs(want - base).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(_llmjax_logits(model, params, adapters, cfg, family), want, atol=TOL, rtol=0)

    # (b) llmjax writes, peft reads
    cfg = lora.LoraConfig(r=2, lora_alpha=6, target_modules=FAMILIES[family][2][::2])
    adapters = _random_b(lora.init(model, params, cfg, jax.random.key(3)), seed=4)
    _written_read_by_peft_and_back(family, model, params, adapters, cfg, base_dirs[family], tmp_path / "from_llmjax")


def _written_read_by_peft_and_back(family, model, params, adapters, cfg, base_dir: Path, out: Path) -> dict:
    """Save ``adapters`` with llmjax into ``out``: peft applies them with llmjax's logits, and llmjax reads them
    back bit-exactly with the same config. -> the written ``adapter_config.json``."""
    lora.save_pretrained(model, adapters, cfg, out, base_model_name_or_path=str(base_dir))
    loaded = peft.PeftModel.from_pretrained(_torch_base(family, base_dir), str(out))
    np.testing.assert_allclose(_torch_logits(loaded.eval(), family),
                               _llmjax_logits(model, params, adapters, cfg, family), atol=TOL, rtol=0)
    again, cfg_again = lora.from_pretrained(model, out)
    assert dataclasses.replace(cfg_again, modules_to_save=cfg.modules_to_save) == cfg
    assert lora.saved_leaves(model.config, cfg_again) == lora.saved_leaves(model.config, cfg)  # the same modules
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, jax.device_get(adapters))
    return json.loads((out / "adapter_config.json").read_text())


@pytest.mark.parametrize("family, scan", [("llama", False), ("t5", True)], ids=["llama-unscanned", "t5-scanned"])
def test_rslora_all_linear_parity_both_ways(family, scan, base_dirs, tmp_path):
    """rsLoRA's scale lora_alpha / sqrt(r) and ``target_modules: all-linear``, both ways against peft."""
    model, params = llmjax.hf.from_pretrained(base_dirs[family], scan_layers=scan)
    every = set(FAMILIES[family][2])

    # (a) peft writes (it saves the modules all-linear stood for), llmjax reads
    peft_model = _peft_adapter(family, base_dirs[family], tmp_path / "from_peft", r=4, lora_alpha=6,
                               target_modules="all-linear", use_rslora=True)
    adapters, cfg = lora.from_pretrained(model, tmp_path / "from_peft")
    assert cfg.use_rslora and cfg.scale == 3.0 and set(cfg.target_modules) == every
    np.testing.assert_allclose(_llmjax_logits(model, params, adapters, cfg, family),
                               _torch_logits(peft_model, family), atol=TOL, rtol=0)

    # (b) llmjax writes, peft reads: the file lists the modules and keeps use_rslora
    cfg = lora.LoraConfig(r=4, lora_alpha=3, target_modules="all-linear", use_rslora=True)
    adapters = _random_b(lora.init(model, params, cfg, jax.random.key(3)), seed=4)
    lora.save_pretrained(model, adapters, cfg, tmp_path / "from_llmjax")
    written = json.loads((tmp_path / "from_llmjax" / "adapter_config.json").read_text())
    assert written["use_rslora"] is True and set(written["target_modules"]) == every
    loaded = peft.PeftModel.from_pretrained(_torch_base(family, base_dirs[family]), str(tmp_path / "from_llmjax"))
    want = _llmjax_logits(model, params, adapters, cfg, family)
    np.testing.assert_allclose(_torch_logits(loaded.eval(), family), want, atol=TOL, rtol=0)
    plain = dataclasses.replace(cfg, use_rslora=False)  # the scale matters: lora_alpha / r would differ
    assert np.abs(_llmjax_logits(model, params, adapters, plain, family) - want).max() > 1e-2


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_dora_parity_both_ways(family, scan, base_dirs, tmp_path):
    """DoRA (``use_dora``), both ways against peft: its magnitude vectors are read and written beside A and B."""
    from tests.lora.test_dora import _random_magnitude

    model, params = llmjax.hf.from_pretrained(base_dirs[family], scan_layers=scan)
    # (a) peft writes, llmjax reads: peft's logits, which differ from the same A and B without DoRA
    peft_model = _peft_adapter(family, base_dirs[family], tmp_path / "from_peft", use_dora=True)
    adapters, cfg = lora.from_pretrained(model, tmp_path / "from_peft")
    assert cfg.use_dora and (cfg.r, cfg.lora_alpha) == (3, 5)
    want = _torch_logits(peft_model, family)
    np.testing.assert_allclose(_llmjax_logits(model, params, adapters, cfg, family), want, atol=TOL, rtol=0)
    plain = _llmjax_logits(model, params, _strip_magnitudes(adapters), dataclasses.replace(cfg, use_dora=False),
                           family)
    assert np.abs(plain - want).max() > 1e-2  # DoRA's rescaling matters

    # (b) llmjax writes, peft reads; and back bit-exactly
    cfg = lora.LoraConfig(r=2, lora_alpha=6, target_modules=FAMILIES[family][2][::2], use_dora=True)
    adapters = _random_magnitude(_random_b(lora.init(model, params, cfg, jax.random.key(3)), seed=4), seed=5)
    written = _written_read_by_peft_and_back(family, model, params, adapters, cfg, base_dirs[family],
                                             tmp_path / "from_llmjax")
    assert written["use_dora"] is True


@pytest.mark.parametrize("family, scan", [("llama", True), ("t5", False)], ids=["llama-scanned", "t5-unscanned"])
def test_dora_of_some_layers_reads_with_the_base(family, scan, base_dirs, tmp_path):
    """A DoRA adapter of some layers only (``layers_to_transform``) is read with the base's params: the layers it
    leaves alone hold zero A and B and the base kernel's norms as magnitude, which computes the base kernel. peft's
    logits; written back as DoRA on every layer, which peft reads with the same logits; ``llmjax lora merge`` equals
    peft's ``merge_and_unload``. Without the params it is refused, saying so."""
    model, params = llmjax.hf.from_pretrained(base_dirs[family], scan_layers=scan)
    peft_model = _peft_adapter(family, base_dirs[family], tmp_path / "from_peft", use_dora=True,
                               layers_to_transform=[1], target_modules=FAMILIES[family][2][1::2])
    with pytest.raises(lora.AdapterError, match=r"leaves some layers of its modules alone .* needs the base's params"):
        lora.from_pretrained(model, tmp_path / "from_peft")
    adapters, cfg = lora.from_pretrained(model, tmp_path / "from_peft", params)
    half = lora.from_pretrained(model, tmp_path / "from_peft", jax.tree_util.tree_map(
        lambda x: x.astype(jnp.bfloat16), params))[0]  # a bf16 base gives its norms too
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2), half, adapters)
    want = _torch_logits(peft_model, family)
    np.testing.assert_allclose(_llmjax_logits(model, params, adapters, cfg, family), want, atol=TOL, rtol=0)
    base_logits = model.apply({"params": params}, *[np.asarray(x, np.int32) for x in _ids(family)])
    assert np.abs(np.asarray(base_logits) - want).max() > 1e-2  # the adapter matters
    _written_read_by_peft_and_back(family, model, params, adapters, cfg, base_dirs[family], tmp_path / "from_llmjax")

    base = tmp_path / "base"
    shutil.copytree(base_dirs[family], base)
    assert cli.main(["lora", "merge", "--base", str(base), "--adapter", str(tmp_path / "from_peft"),
                     "--out", str(tmp_path / "merged")]) == 0
    merged = FAMILIES[family][1].from_pretrained(str(tmp_path / "merged")).eval()
    np.testing.assert_allclose(_torch_logits(merged, family), _torch_logits(peft_model.merge_and_unload(), family),
                               atol=TOL, rtol=0)


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_output_layer_parity_both_ways(family, scan, base_dirs, tmp_path):
    """LoRA on an untied output layer (``lm_head`` in ``target_modules``), both ways against peft, plain and DoRA."""
    model, params = llmjax.hf.from_pretrained(base_dirs[family], scan_layers=scan)
    some = FAMILIES[family][2][1::3]
    for dora in (False, True):
        # (a) peft writes, llmjax reads: peft's logits, which the head's adapter changes
        out = tmp_path / f"from_peft_{dora}"
        peft_model = _peft_adapter(family, base_dirs[family], out, target_modules=[*some, "lm_head"], use_dora=dora)
        adapters, cfg = lora.from_pretrained(model, out)
        assert set(cfg.target_modules) == {*some, "lm_head"} and cfg.use_dora == dora
        assert lora.LORA_A in adapters["lm_head"]
        want = _torch_logits(peft_model, family)
        np.testing.assert_allclose(_llmjax_logits(model, params, adapters, cfg, family), want, atol=TOL, rtol=0)
        headless = {key: value for key, value in adapters.items() if key != "lm_head"}
        other = _llmjax_logits(model, params, headless, dataclasses.replace(cfg, target_modules=some), family)
        assert np.abs(other - want).max() > 1e-2  # the head's adapter matters
        # peft also stored the head's own weight (save_embedding_layers), which the adapter applies to: change it
        # there, and both apply the changed head; llmjax writes it back where peft reads it
        key = "base_model.model.lm_head.base_layer.weight"
        tensors = safetensors.numpy.load_file(str(out / "adapter_model.safetensors"))
        tensors[key] = tensors[key] * np.float32(1.3)
        safetensors.numpy.save_file(tensors, str(out / "adapter_model.safetensors"))
        moved = _torch_logits(peft.PeftModel.from_pretrained(_torch_base(family, base_dirs[family]), str(out)).eval(),
                              family)
        assert np.abs(moved - want).max() > 1e-2
        adapters, cfg = lora.from_pretrained(model, out)
        np.testing.assert_allclose(_llmjax_logits(model, params, adapters, cfg, family), moved, atol=TOL, rtol=0)
        with pytest.raises(lora.LoraConfigError, match="cannot undo"):
            lora.unmerge(lora.merge(params, adapters, cfg), adapters, cfg)
        _written_read_by_peft_and_back(family, model, params, adapters, cfg, base_dirs[family], tmp_path / f"re_{dora}")

        # (b) llmjax writes, peft reads; and back bit-exactly
        cfg = lora.LoraConfig(r=2, lora_alpha=6, target_modules=["lm_head", *some], use_dora=dora)
        adapters = _random_b(lora.init(model, params, cfg, jax.random.key(3)), seed=4)
        if dora:
            from tests.lora.test_dora import _random_magnitude

            adapters = _random_magnitude(adapters, seed=5)
        written = _written_read_by_peft_and_back(family, model, params, adapters, cfg, base_dirs[family],
                                                 tmp_path / f"from_llmjax_{dora}")
        assert "lm_head" in written["target_modules"]


def test_output_layer_of_a_tied_model_is_refused(tmp_path):
    """A tied head is the embedding: LoRA on ``lm_head`` is refused, in a config and in a peft adapter."""
    base = torch_t5(0, vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=2)
    assert base.config.tie_word_embeddings
    base.save_pretrained(str(tmp_path / "base"), safe_serialization=True)
    model, params = llmjax.hf.from_pretrained(tmp_path / "base")
    with pytest.raises(lora.LoraConfigError, match="ties its output layer"):
        lora.init(model, params, lora.LoraConfig(2, 4, target_modules=["q", "lm_head"]), jax.random.key(0))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "lm_head"], task_type="SEQ_2_SEQ_LM")
    peft.get_peft_model(base, config).save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(lora.AdapterError, match="adapts lm_head, which this model ties"):
        lora.from_pretrained(model, tmp_path / "adapter")


# What the installed peft's modules_to_save entries pick (its rule changed in 0.22) and what llmjax writes for them:
# entries that peft before and since 0.22 read alike.
SAVED = {
    "t5": {"entries": ["layer_norm"], "before_0.22": {"layer_norm", "final_layer_norm"},
           "written": ["0.layer_norm", "1.layer_norm", "2.layer_norm"]},
    "llama": {"entries": ["norm", "lm_head"], "before_0.22": {"norm", "input_layernorm", "post_attention_layernorm",
                                                              "lm_head"},
              "written": ["model.norm", "lm_head"]},
}
PEFT_BEFORE_0_22 = tuple(int(p) for p in peft.__version__.split(".")[:2]) < (0, 22)


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_modules_to_save_parity_both_ways(family, scan, base_dirs, tmp_path):
    """``modules_to_save`` both ways against peft: its trained copies (T5's norms in the blocks; LLaMA's last norm
    and untied head) are read and written under their Hugging Face names, beside the adapters."""
    saved = SAVED[family]
    model, params = llmjax.hf.from_pretrained(base_dirs[family], scan_layers=scan)
    # (a) peft writes, llmjax reads: peft's logits, which differ from the same adapters on the base's weights
    peft_model = _peft_adapter(family, base_dirs[family], tmp_path / "from_peft", modules_to_save=saved["entries"])
    adapters, cfg = lora.from_pretrained(model, tmp_path / "from_peft")
    if PEFT_BEFORE_0_22:  # its plain suffix took more: entries for what it took, by today's rule
        assert set(cfg.modules_to_save) == saved["before_0.22"]
    else:
        assert cfg.modules_to_save == tuple(saved["entries"])
    want = _torch_logits(peft_model, family)
    np.testing.assert_allclose(_llmjax_logits(model, params, adapters, cfg, family), want, atol=TOL, rtol=0)
    plain = _llmjax_logits(model, params, lora.lora_part(adapters), dataclasses.replace(cfg, modules_to_save=()),
                           family)
    assert np.abs(plain - want).max() > 1e-2  # the saved copies matter

    # (b) llmjax writes, peft reads; and back bit-exactly
    from tests.lora.test_modules_to_save import _moved

    cfg = lora.LoraConfig(r=2, lora_alpha=6, target_modules=FAMILIES[family][2][::2],
                          modules_to_save=saved["entries"])
    adapters = _moved(lora.init(model, params, cfg, jax.random.key(3)), seed=4)
    written = _written_read_by_peft_and_back(family, model, params, adapters, cfg, base_dirs[family],
                                             tmp_path / "from_llmjax")
    assert written["modules_to_save"] == saved["written"]


def test_modules_to_save_of_peft_before_0_22_are_read_by_its_rule(base_dirs, tmp_path):
    """peft before 0.22 matched ``modules_to_save`` by plain suffix (T5's ``layer_norm`` took ``final_layer_norm``
    too), since 0.22 by the module's own name: a file says which by its tensors (it holds every saved weight), and a
    config alone by its ``peft_version`` (none: before 0.18)."""
    model, params = llmjax.hf.from_pretrained(base_dirs["t5"], scan_layers=True)
    every = lora.LoraConfig(r=2, lora_alpha=6, target_modules=["q"], modules_to_save=["layer_norm", "final_layer_norm"])
    from tests.lora.test_modules_to_save import _moved

    adapters = jax.device_get(_moved(lora.init(model, params, every, jax.random.key(3)), seed=4))
    lora.save_pretrained(model, adapters, every, tmp_path / "every")
    raw = json.loads((tmp_path / "every" / "adapter_config.json").read_text())
    assert raw["modules_to_save"] == ["layer_norm", "final_layer_norm"]  # read alike by both rules: as written
    for version in ("0.21.2", None, "0.22.0"):  # the tensors decide: every norm is there
        (tmp_path / "every" / "adapter_config.json").write_text(json.dumps(
            {**raw, "modules_to_save": ["layer_norm"], "peft_version": version}))
        again, cfg = lora.from_pretrained(model, tmp_path / "every")
        assert sorted(cfg.modules_to_save) == ["final_layer_norm", "layer_norm"], version
        jax.tree_util.tree_map(np.testing.assert_array_equal, again, adapters)
    for version, want in (("0.21.2", ["final_layer_norm", "layer_norm"]), (None, ["final_layer_norm", "layer_norm"]),
                          ("0.22.0", ["layer_norm"]), ("0.22.1.dev0", ["layer_norm"])):  # no tensors: the version
        raw_version = {**raw, "modules_to_save": ["layer_norm"], "peft_version": version}
        assert sorted(lora.lora_config(raw_version, model, "adapter_config.json").modules_to_save) == want, version

    inner = dataclasses.replace(every, modules_to_save=("layer_norm",))  # the norms in the blocks only
    lora.save_pretrained(model, lora.init(model, params, inner, jax.random.key(5)), inner, tmp_path / "inner")
    raw = json.loads((tmp_path / "inner" / "adapter_config.json").read_text())
    assert raw["modules_to_save"] == ["0.layer_norm", "1.layer_norm", "2.layer_norm"]  # no final_layer_norm ends so
    (tmp_path / "inner" / "adapter_config.json").write_text(json.dumps(
        {**raw, "modules_to_save": ["layer_norm"], "peft_version": "0.21.2"}))
    assert lora.from_pretrained(model, tmp_path / "inner")[1].modules_to_save == ("layer_norm",)  # no final norms


def _strip_magnitudes(adapters):
    """The adapters without their DoRA magnitudes."""
    if lora.MAGNITUDE in adapters:
        return {k: v for k, v in adapters.items() if k != lora.MAGNITUDE}
    return {k: _strip_magnitudes(v) for k, v in adapters.items()}


def test_dora_gradients_equal_peft_with_the_norm_held_constant(base_dirs, tmp_path):
    """The gradients of A, B and the magnitude through llmjax's factored DoRA forward (the training path) equal
    peft's, which holds ``||W + s A B||`` constant in the backward pass; letting the gradient through the norm
    would change A's and B's."""
    family = "llama"
    model, params = llmjax.hf.from_pretrained(base_dirs[family], scan_layers=False)
    peft_model = _peft_adapter(family, base_dirs[family], tmp_path / "start", use_dora=True,
                               target_modules=["q_proj", "v_proj", "down_proj"])
    adapters, cfg = lora.from_pretrained(model, tmp_path / "start")
    ids = _ids(family)[0]
    loss = peft_model(input_ids=torch.tensor(ids)).logits.log_softmax(-1)[..., 3].mean()
    loss.backward()
    with torch.no_grad():  # peft's gradients, written as an adapter: the format code lays them out as llmjax's
        for param in peft_model.parameters():
            if param.grad is not None:
                param.copy_(param.grad)
    peft_model.save_pretrained(str(tmp_path / "grads"))
    theirs = lora.from_pretrained(model, tmp_path / "grads")[0]

    def objective(adapters):
        logits = lora.apply_factored(model, params, adapters, cfg, np.asarray(ids, np.int32))
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

    ours = jax.jit(jax.grad(objective))(adapters)
    largest = max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(theirs))
    assert largest > 1e-3
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * largest), ours, theirs)
    assert {path[-1].key for path, _ in jax.tree_util.tree_leaves_with_path(ours)} == {
        "lora_A", "lora_B", lora.MAGNITUDE}


@pytest.mark.parametrize("family, scan, options, rank", [
    ("t5", True, {"rank_pattern": {"q": 5, "wo": 1}, "alpha_pattern": {"EncDecAttention.v": 9},
                  "layers_to_transform": [1], "exclude_modules": ["k"], "bias": "all"}, 5),
    ("llama", False, {"target_modules": r".*\.(q_proj|up_proj|down_proj)", "rank_pattern": {"up_proj": 2},
                      "alpha_pattern": {"layers.0.self_attn.q_proj": 11}, "use_rslora": True}, 3),
    ("llama", True, {"layers_to_transform": 0, "layers_pattern": "layers", "rank_pattern": {"v_proj": 6}}, 6),
], ids=["t5-scanned-ranks-alphas-layers-excluded", "llama-unscanned-regex-rslora", "llama-scanned-one-layer"])
def test_peft_rank_alpha_and_layer_options_read_exactly(family, scan, options, rank, base_dirs, tmp_path):
    """An adapter peft wrote with per-module ranks and alphas, only some layers, excluded modules or a regex
    target gives peft's logits in llmjax's uniform form (the largest rank, zero-padded; each module's scale in
    its B; zero A and B where peft adapts nothing), and that form saved again is a plain adapter peft reads with
    the same logits."""
    model, params = llmjax.hf.from_pretrained(base_dirs[family], scan_layers=scan)
    peft_model = _peft_adapter(family, base_dirs[family], tmp_path / "from_peft", **options)
    adapters, cfg = lora.from_pretrained(model, tmp_path / "from_peft")
    assert cfg.r == rank and cfg.lora_alpha == 5 and cfg.use_rslora == options.get("use_rslora", False)
    want = _torch_logits(peft_model, family)
    assert np.abs(want - _torch_logits(_torch_base(family, base_dirs[family]), family)).max() > 1e-2
    np.testing.assert_allclose(_llmjax_logits(model, params, adapters, cfg, family), want, atol=TOL, rtol=0)
    lora.save_pretrained(model, adapters, cfg, tmp_path / "again")
    written = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert written["r"] == rank and written["rank_pattern"] == {} and written["layers_to_transform"] is None
    loaded = peft.PeftModel.from_pretrained(_torch_base(family, base_dirs[family]), str(tmp_path / "again"))
    np.testing.assert_allclose(_torch_logits(loaded.eval(), family), want, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Directories llmjax refuses


@pytest.fixture(scope="module")
def t5_adapter(base_dirs, tmp_path_factory):
    """``(model, adapter_dir)``: a valid llmjax-written T5 adapter (q, v; r=2)."""
    model, params = llmjax.hf.from_pretrained(base_dirs["t5"], scan_layers=False)
    cfg = lora.LoraConfig(2, 4, target_modules=("q", "v"))
    directory = tmp_path_factory.mktemp("t5_adapter")
    lora.save_pretrained(model, lora.init(model, params, cfg, jax.random.key(0)), cfg, directory)
    return model, directory


TOKEN_ROWS = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_trainable_tokens_parity_both_ways(tied, scan, base_dirs, tmp_path):
    """``trainable_token_indices`` on LLaMA both ways against peft: the trained rows of the input embedding (which
    a tied head reads too, as peft ties its token adapter to the head) are read and written as peft stores them."""
    base_dir = base_dirs["llama"]
    if tied:
        base_dir = tmp_path / "tied"
        torch_llama(0, vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=True).save_pretrained(str(base_dir))
    model, params = llmjax.hf.from_pretrained(base_dir, scan_layers=scan)
    assert model.config.tie_word_embeddings == tied
    ids = _ids("llama")[0]
    tokens = [int(ids[0, 1]), int(ids[1, 3]), 63]  # two in the input; 63 is not, so only a tied head reads its row

    # (a) peft writes (rows moved off the base), llmjax reads: peft's logits, which the rows change
    peft_model = _peft_adapter("llama", base_dir, tmp_path / "from_peft", target_modules=["q_proj", "down_proj"],
                               trainable_token_indices=tokens)
    adapters, cfg = lora.from_pretrained(model, tmp_path / "from_peft")
    assert cfg.trainable_token_indices == tuple(tokens) and adapters["embed"][lora.TOKENS].shape == (3, 16)
    want = _torch_logits(peft_model, "llama")
    np.testing.assert_allclose(_llmjax_logits(model, params, adapters, cfg, "llama"), want, atol=TOL, rtol=0)
    rowless = {**adapters, "embed": {lora.TOKENS: np.asarray(params["embed"]["embedding"])[tokens]}}
    other = _llmjax_logits(model, params, rowless, cfg, "llama")
    assert np.abs(other - want).max() > 1e-2  # the rows matter
    # ... the rows of tokens absent from the input, through the tied head alone
    head_only = {**adapters, "embed": {lora.TOKENS: np.where(np.arange(3)[:, None] == 2, adapters["embed"][lora.TOKENS],
                                                             rowless["embed"][lora.TOKENS])}}
    changed = np.abs(_llmjax_logits(model, params, head_only, cfg, "llama") - other).max(axis=(0, 1))
    assert (changed[63] > 1e-2) == tied and np.all(changed[:63] < 1e-5)
    with pytest.raises(lora.LoraConfigError, match="cannot undo trainable_token_indices"):
        lora.unmerge(lora.merge(params, adapters, cfg), adapters, cfg)
    with pytest.raises(lora.LoraConfigError, match=r"adapters hold trained token rows \(embed/trainable_tokens_delta\) "
                                                   r"but the LoRA config has trainable_token_indices=\[\]"):
        lora.merge(params, adapters, dataclasses.replace(cfg, trainable_token_indices=()))
    # PEFT's dict form naming the input embedding reads the same (on a tied model, also with the head named beside it
    # with the same ids, which peft ties to the embedding's rows: checked against peft below)
    form = {"embed_tokens": tokens, **({"lm_head": tokens} if tied else {})}
    again, cfg_again = lora.from_pretrained(model, _copy(tmp_path / "from_peft", tmp_path, {
        "trainable_token_indices": form}))
    assert cfg_again == cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, adapters)
    if tied:
        both = _peft_adapter("llama", base_dir, tmp_path / "both", target_modules=["q_proj"],
                             trainable_token_indices=form)
        adapters_both, cfg_both = lora.from_pretrained(model, tmp_path / "both")
        np.testing.assert_allclose(_llmjax_logits(model, params, adapters_both, cfg_both, "llama"),
                                   _torch_logits(both, "llama"), atol=TOL, rtol=0)

    # (b) llmjax writes (fresh rows are the base's, then moved), peft reads; and back bit-exactly
    cfg = lora.LoraConfig(r=2, lora_alpha=6, target_modules=["v_proj"], trainable_token_indices=tokens[::-1])
    adapters = _random_b(lora.init(model, params, cfg, jax.random.key(3)), seed=4)
    np.testing.assert_array_equal(adapters["embed"][lora.TOKENS],
                                  np.asarray(params["embed"]["embedding"])[tokens[::-1]])
    adapters["embed"][lora.TOKENS] = adapters["embed"][lora.TOKENS] * 1.5
    written = _written_read_by_peft_and_back("llama", model, params, adapters, cfg, base_dir, tmp_path / "from_llmjax")
    assert written["trainable_token_indices"] == tokens[::-1]


@pytest.mark.parametrize("changes, tensors, match", [
    ({"trainable_token_indices": [3, 64]}, None, r"trainable_token_indices \[64\] are not token ids of this model "
                                                 r"\(vocab_size 64\)"),
    ({"trainable_token_indices": [3, 7, 3]}, None, r"repeats \[3\]"),
    ({"trainable_token_indices": {"shared": [3]}}, None, r"names \['shared'\]; llmjax trains token rows"),
    ({"trainable_token_indices": "3"}, None, "must be a list of token ids"),
    ({"trainable_token_indices": [3, 7]}, None, r"has shape \(3, 16\), expected \(2, 16\)"),
    ({"modules_to_save": ["embed_tokens"]}, None, "modules_to_save trains model.embed_tokens in full and "
                                                  "trainable_token_indices some of its rows"),
    ({}, lambda t: {k: v for k, v in t.items() if k != TOKEN_ROWS}, rf"missing tensors \['{TOKEN_ROWS}'\]"),
    ({"trainable_token_indices": None}, None, rf"unexpected tensors \['{TOKEN_ROWS}'\]"),
])
def test_trainable_tokens_refusals(changes, tensors, match, base_dirs, tmp_path):
    model, _ = llmjax.hf.from_pretrained(base_dirs["llama"])
    _peft_adapter("llama", base_dirs["llama"], tmp_path / "peft", target_modules=["q_proj"],
                  trainable_token_indices=[3, 7, 9])
    with pytest.raises(lora.AdapterError, match=match):
        lora.from_pretrained(model, _copy(tmp_path / "peft", tmp_path, changes, tensors))


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_trainable_tokens_on_tied_t5_parity_both_ways(scan, tmp_path):
    """On a T5 whose output layer is tied to ``shared`` (T5 v1.0), peft ties its wrapper of ``shared`` to the
    stacks' ``embed_tokens`` and to the head: the rows, which the encoder, the decoder and the head read, are read
    and written under ``shared``'s name, both ways against peft."""
    base_dir = tmp_path / "tied"
    torch_t5(0, vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=3, num_heads=2,
             feed_forward_proj="gated-gelu", tie_word_embeddings=True).save_pretrained(str(base_dir))
    model, params = llmjax.hf.from_pretrained(base_dir, scan_layers=scan)
    encoder_ids, decoder_ids = _ids("t5")
    tokens = [int(encoder_ids[0, 1]), int(decoder_ids[1, 2]), 63]  # one row for each stack; 63 the head's alone

    # (a) peft writes (rows moved off the base), llmjax reads: peft's logits, which the rows change
    peft_model = _peft_adapter("t5", base_dir, tmp_path / "from_peft", target_modules=["q", "wo"],
                               trainable_token_indices=tokens)
    weights = safetensors.numpy.load_file(str(tmp_path / "from_peft" / "adapter_model.safetensors"))
    assert "base_model.model.shared.token_adapter.trainable_tokens_delta" in weights
    adapters, cfg = lora.from_pretrained(model, tmp_path / "from_peft")
    assert cfg.trainable_token_indices == tuple(tokens) and adapters["shared"][lora.TOKENS].shape == (3, 16)
    want = _torch_logits(peft_model, "t5")
    np.testing.assert_allclose(_llmjax_logits(model, params, adapters, cfg, "t5"), want, atol=TOL, rtol=0)
    base_rows = np.asarray(params["shared"]["embedding"])[tokens]
    for row in range(3):  # each row matters: the encoder's, the decoder's, the head's
        one_back = {**adapters, "shared": {lora.TOKENS: np.where(np.arange(3)[:, None] == row, base_rows,
                                                                 adapters["shared"][lora.TOKENS])}}
        assert np.abs(_llmjax_logits(model, params, one_back, cfg, "t5") - want).max() > 1e-3, row

    # (b) llmjax writes, peft reads; and back bit-exactly
    from tests.lora.test_modules_to_save import _moved

    cfg = lora.LoraConfig(r=2, lora_alpha=6, target_modules=["q", "wo"], trainable_token_indices=tokens)
    adapters = _moved(lora.init(model, params, cfg, jax.random.key(3)), seed=4)
    written = _written_read_by_peft_and_back("t5", model, params, adapters, cfg, base_dir, tmp_path / "from_llmjax")
    assert written["trainable_token_indices"] == tokens

    # (c) peft's dict form naming embed_tokens wraps the encoder's and the decoder's apart: two sets of rows for one
    # shared weight, refused with that reason
    _peft_adapter("t5", base_dir, tmp_path / "dict_form", target_modules=["q"],
                  trainable_token_indices={"embed_tokens": tokens})
    with pytest.raises(lora.AdapterError, match="on a T5 peft matches twice: it wraps the encoder's and the decoder's"):
        lora.from_pretrained(model, tmp_path / "dict_form")


HEAD_ROWS = "base_model.model.lm_head.token_adapter.trainable_tokens_delta"


@pytest.mark.parametrize("family, scan", [("llama", False), ("llama", True), ("t5", False), ("t5", True)],
                         ids=["llama-unscanned", "llama-scanned", "t5-unscanned", "t5-scanned"])
def test_output_layer_token_rows_parity_both_ways(family, scan, base_dirs, tmp_path):
    """PEFT's ``trainable_token_indices={"lm_head": [...]}`` on an untied head (LLaMA beside the input embedding's
    own ids; T5 v1.1, whose input rows peft cannot train, alone), both ways against peft."""
    model, params = llmjax.hf.from_pretrained(base_dirs[family], scan_layers=scan)
    head = [4, 17, 63]  # 63 is in no input: only the head's row reaches the logits
    rows = {"lm_head": head, **({"embed_tokens": [int(_ids(family)[0][0, 1]), 9]} if family == "llama" else {})}
    targets = ["q_proj", "down_proj"] if family == "llama" else ["q", "wo"]

    # (a) peft writes (rows moved off the base), llmjax reads: peft's logits, which the head's rows change
    peft_model = _peft_adapter(family, base_dirs[family], tmp_path / "from_peft", target_modules=targets,
                               trainable_token_indices=rows)
    assert HEAD_ROWS in safetensors.numpy.load_file(str(tmp_path / "from_peft" / "adapter_model.safetensors"))
    adapters, cfg = lora.from_pretrained(model, tmp_path / "from_peft")
    assert cfg.output_token_indices == tuple(head)
    assert cfg.trainable_token_indices == tuple(rows.get("embed_tokens", ()))
    want = _torch_logits(peft_model, family)
    np.testing.assert_allclose(_llmjax_logits(model, params, adapters, cfg, family), want, atol=TOL, rtol=0)
    base_rows = np.asarray(params["lm_head"]["kernel"])[:, head].T
    unmoved = _llmjax_logits(model, params, {**adapters, "lm_head": {lora.TOKENS: base_rows}}, cfg, family)
    moved = np.abs(unmoved - want).max(axis=(0, 1))
    assert np.all(moved[head] > 1e-3) and np.all(np.delete(moved, head) < 1e-5)  # the head's rows alone moved those

    # (b) llmjax writes, peft reads; and back bit-exactly
    from tests.lora.test_modules_to_save import _moved

    cfg = lora.LoraConfig(r=2, lora_alpha=6, target_modules=targets, trainable_token_indices=rows)
    adapters = _moved(lora.init(model, params, cfg, jax.random.key(3)), seed=4)
    written = _written_read_by_peft_and_back(family, model, params, adapters, cfg, base_dirs[family],
                                             tmp_path / "from_llmjax")
    assert written["trainable_token_indices"] == rows


@pytest.mark.parametrize("changes, match", [
    ({"trainable_token_indices": {"lm_head": [3, 64]}}, r"trainable_token_indices\['lm_head'\] \[64\] are not "
                                                        r"token ids of this model"),
    ({"trainable_token_indices": {"lm_head": [3, 7]}}, r"has shape \(3, 16\), expected \(2, 16\) for the "
                                                       r"trainable_token_indices \[3, 7\] of lm_head"),
    ({"trainable_token_indices": None}, rf"unexpected tensors \['{HEAD_ROWS}'\]"),
    ({"trainable_token_indices": [3, 7, 9]}, rf"missing tensors \['{TOKEN_ROWS}'\]"),
    ({"target_modules": ["q_proj", "lm_head"]}, "target_modules adapts lm_head and trainable_token_indices"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save trains lm_head in full and trainable_token_indices"),
])
def test_output_layer_token_rows_refusals(changes, match, base_dirs, tmp_path):
    model, _ = llmjax.hf.from_pretrained(base_dirs["llama"])
    _peft_adapter("llama", base_dirs["llama"], tmp_path / "peft", target_modules=["q_proj"],
                  trainable_token_indices={"lm_head": [3, 7, 9]})
    with pytest.raises(lora.AdapterError, match=match):
        lora.from_pretrained(model, _copy(tmp_path / "peft", tmp_path, changes))


def test_output_layer_token_rows_of_a_tied_model_are_refused(tmp_path):
    """On a tied model peft's ``{"lm_head": [...]}`` alone trains rows the head reads and the input embedding does
    not; llmjax computes the head from the embedding and cannot hold them apart, so it refuses them by name."""
    base = tmp_path / "tied"
    torch_llama(0, vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True).save_pretrained(str(base))
    model, _ = llmjax.hf.from_pretrained(base)
    _peft_adapter("llama", base, tmp_path / "peft", target_modules=["q_proj"], trainable_token_indices={"lm_head": [3]})
    with pytest.raises(lora.AdapterError, match=r"names lm_head \(\[3\]\), but this model ties its output layer"):
        lora.from_pretrained(model, tmp_path / "peft")


def test_trainable_tokens_on_untied_t5_are_refused(t5_adapter, tmp_path):
    """On a T5 with an untied head (T5 v1.1, FLAN-T5) peft wraps ``shared`` alone, and T5's stacks keep reading
    the weight itself: the rows would change none of its outputs, so llmjax refuses them there (in a config and in
    an adapter) with that reason."""
    model, directory = t5_adapter
    assert not model.config.tie_word_embeddings
    with pytest.raises(lora.AdapterError, match="trainable_token_indices is not supported on a T5 with an untied "
                                                "output layer .T5 v1.1, FLAN-T5.: PEFT wraps its shared embedding"):
        lora.from_pretrained(model, _copy(directory, tmp_path, {"trainable_token_indices": [3]}))
    with pytest.raises(lora.LoraConfigError, match="not supported on a T5 with an untied output layer"):
        lora.sites(model.config, lora.LoraConfig(2, 4, target_modules=["q"], trainable_token_indices=[3]))


def _copy(directory: Path, tmp_path: Path, config_changes: dict | None = None, tensors=None) -> Path:
    out = tmp_path / "adapter"
    out.mkdir()
    config = json.loads((directory / "adapter_config.json").read_text())
    config.update(config_changes or {})
    (out / "adapter_config.json").write_text(json.dumps(config))
    weights = safetensors.numpy.load_file(str(directory / "adapter_model.safetensors"))
    safetensors.numpy.save_file(tensors(weights) if tensors else weights, str(out / "adapter_model.safetensors"))
    return out


Q0 = "base_model.model.encoder.block.0.layer.0.SelfAttention.q"


@pytest.mark.parametrize("changes, match", [
    ({"peft_type": "PROMPT_TUNING"}, "peft_type='PROMPT_TUNING'"),
    ({"task_type": "CAUSAL_LM"}, "task_type='CAUSAL_LM'.*SEQ_2_SEQ_LM"),
    ({"use_dora": True}, r"missing tensors \['base_model.model.decoder.block.0.layer.0.SelfAttention.q.lora_magnitude"),
    ({"use_dora": True, "layers_to_transform": [0]}, "a DoRA adapter that leaves some layers of its modules alone"),
    ({"use_rslora": "yes"}, "use_rslora='yes' must be true or false"),
    ({"bias": "some"}, "bias=\"some\" .trained biases"),
    ({"modules_to_save": ["lm_head"]}, r"missing tensors \['base_model.model.lm_head.weight'\]"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights=\"pissa\": PEFT trained this adapter against a base it changed"),
    ({"init_lora_weights": "olora"}, "path_initial_model_for_weight_conversion"),
    ({"modules_to_save": ["shared"]}, r"modules_to_save matches \['shared'\].*more than one name"),
    ({"modules_to_save": "lm_head"}, "modules_to_save='lm_head' must be a list of module names"),
    ({"layer_replication": [[0, 2]]}, "layer_replication"),
    ({"target_modules": {"q": 1}}, "list of module names"),
    ({"target_modules": "(q"}, r"target_modules='\(q' is not a valid regular expression"),
    ({"target_modules": r".*\.nothing"}, "matches no module of this model"),
    ({"target_modules": ["q", "v"], "exclude_modules": ["q", "v"]}, "leave no module adapted"),
    ({"layers_to_transform": "all"}, "layers_to_transform=\"all\" must be a layer index"),
    ({"rank_pattern": {"q": 0}}, "r=0 must be a positive integer"),
    ({"rank_pattern": ["q"]}, "rank_pattern=\\[\"q\"\\] must map module-name patterns to numbers"),
    ({"rank_pattern": {"EncDecAttention.q": 4}}, r"EncDecAttention.q.lora_A.weight' has shape \(2, 16\), "
                                                 r"expected \(4, 16\) \(r=4"),
    ({"target_modules": ["SelfAttention.q", "v"]}, r"unexpected tensors \[.*EncDecAttention.q.lora_A"),
    ({"layers_to_transform": [0]}, r"unexpected tensors \['base_model.model.decoder.block.1"),
    ({"target_modules": ["layer.0.SelfAttention.nothing"]}, "'layer.0.SelfAttention.nothing' names no module"),
    ({"target_modules": ["q_proj"]}, r"\['q_proj'\] are not modules of this T5 model.*another model family"),
    ({"r": 0}, "r=0 must be a positive integer"),
    ({"r": 3}, r"has shape \(2, 16\), expected \(3, 16\)"),
    ({"target_modules": ["q", "v", "o"]}, r"missing tensors \['base_model.model.decoder.block.0.layer.0.SelfAttention.o"),
])
def test_from_pretrained_refuses_config(changes, match, t5_adapter, tmp_path):
    model, directory = t5_adapter
    with pytest.raises(lora.AdapterError, match=match):
        lora.from_pretrained(model, _copy(directory, tmp_path, changes))


def test_dotted_target_modules_read_as_the_module_names_they_cover(t5_adapter, tmp_path):
    """peft saves ``all-linear`` as full module paths, and matches any entry as a suffix of the module name."""
    model, directory = t5_adapter
    dotted = {"target_modules": ["SelfAttention.q", "EncDecAttention.q", "decoder.block.0.layer.0.SelfAttention.v",
                                 "v"]}
    adapters, cfg = lora.from_pretrained(model, _copy(directory, tmp_path, dotted))
    want, want_cfg = lora.from_pretrained(model, directory)
    assert cfg == want_cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, adapters, want)


@pytest.mark.parametrize("edit, match", [
    (lambda t: {k: v for k, v in t.items() if k != f"{Q0}.lora_B.weight"}, rf"missing tensors \['{Q0}.lora_B.weight'\]"),
    (lambda t: {**t, f"{Q0[:-1]}k.lora_A.weight": t[f"{Q0}.lora_A.weight"]}, r"unexpected tensors \[.*SelfAttention.k.lora_A"),
    (lambda t: {**t, f"{Q0}.lora_B.weight": t[f"{Q0}.lora_B.weight"][:4]}, r"lora_B.weight' has shape \(4, 2\), "
                                                                            r"expected \(8, 2\)"),
])
def test_from_pretrained_refuses_tensors(edit, match, t5_adapter, tmp_path):
    model, directory = t5_adapter
    with pytest.raises(lora.AdapterError, match=match):
        lora.from_pretrained(model, _copy(directory, tmp_path, tensors=edit))


def test_from_pretrained_refuses_missing_files(t5_adapter, tmp_path):
    model, directory = t5_adapter  # the directory is read by llmjax.hf.io, as every PEFT adapter dir
    with pytest.raises(CheckpointError, match="no such directory"):
        lora.from_pretrained(model, tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="adapter_config.json: missing"):
        lora.from_pretrained(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        lora.from_pretrained(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text((directory / "adapter_config.json").read_text())
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="will not unpickle"):
        lora.from_pretrained(model, tmp_path)


# ----------------------------------------------------------------------------------------------------
# llmjax lora merge


@pytest.mark.parametrize("options", [{}, {"use_dora": True}, {"modules_to_save": ["layer_norm", "lm_head"]},
                                     {"target_modules": ["q", "wo", "lm_head"]}],
                         ids=["lora", "dora", "modules_to_save", "lm_head"])
def test_cli_lora_merge_equals_peft_merge_and_unload(options, base_dirs, tmp_path, capsys):
    base = tmp_path / "base"
    base.mkdir()
    for file in base_dirs["t5"].iterdir():
        (base / file.name).write_bytes(file.read_bytes())
    (base / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    peft_model = _peft_adapter("t5", base, tmp_path / "adapter", **options)
    want = _torch_logits(peft_model.merge_and_unload(), "t5")

    out = tmp_path / "merged"
    assert cli.main(["lora", "merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(out)]) == 0
    merged, info = transformers.T5ForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not any(info.values()), info
    np.testing.assert_allclose(_torch_logits(merged.eval(), "t5"), want, atol=TOL, rtol=0)
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 512}'

    # refusals: one line, exit 2, nothing created
    assert cli.main(["lora", "merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(out)]) == 2
    assert "is not an empty directory" in capsys.readouterr().err
    assert cli.main(["lora", "merge", "--base", str(base), "--adapter", str(base), "--out", str(tmp_path / "x")]) == 2
    assert "adapter_config.json: missing" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "merged"]


@pytest.mark.parametrize("family, tied, tokens", [
    ("llama", False, [3, 11, 40]), ("llama", True, [3, 11, 40]), ("t5", True, [3, 11, 40]),
    ("llama", False, {"embed_tokens": [3, 11], "lm_head": [11, 40]}), ("t5", False, {"lm_head": [11, 40]}),
], ids=["llama-untied", "llama-tied", "t5-tied", "llama-head", "t5-head"])
def test_cli_lora_merge_of_trainable_tokens_equals_peft_merge_and_unload(family, tied, tokens, tmp_path):
    """An adapter with ``trainable_token_indices`` merged by ``llmjax lora merge``: the model ``peft``'s
    ``merge_and_unload`` gives (those rows of the embedding, and of a tied or untied head, replaced)."""
    base = tmp_path / "base"
    if family == "llama":
        torch_llama(0, vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=tied).save_pretrained(str(base))
    else:
        torch_t5(0, vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2,
                 tie_word_embeddings=tied).save_pretrained(str(base))
    peft_model = _peft_adapter(family, base, tmp_path / "adapter", trainable_token_indices=tokens,
                               target_modules=["o_proj" if family == "llama" else "o"])
    want = _torch_logits(peft_model.merge_and_unload(), family)
    assert cli.main(["lora", "merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "merged")]) == 0
    merged, info = FAMILIES[family][1].from_pretrained(str(tmp_path / "merged"), output_loading_info=True)
    assert not any(info.values()), info
    np.testing.assert_allclose(_torch_logits(merged.eval(), family), want, atol=TOL, rtol=0)
