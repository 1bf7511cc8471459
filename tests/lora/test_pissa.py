"""PiSSA (``init_lora_weights: pissa``): the adapters start as each kernel's principal part, against ``peft``.

The init against peft's own (its residual weights and adapters), step 0, the factored and merged forms (values
and gradients, the starting point frozen), and the PEFT format both ways: what llmjax saves is the plain LoRA of
rank 2r that peft's ``path_initial_model_for_weight_conversion`` writes, so peft applies it to the unchanged base,
and llmjax reads what peft converts.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")

import llmjax.hf  # noqa: E402
from llmjax import lora  # noqa: E402
from llmjax.models import stack_layers  # noqa: E402
from tests.lora.test_core import _inputs, _logits, _tiny, factored_matches_merged, random_params  # noqa: E402
from tests.lora.test_peft_format import (  # noqa: E402
    FAMILIES, TOL, _ids, _llmjax_logits, _torch_base, _torch_logits, base_dirs,  # noqa: F401 (base_dirs: a fixture)
)


def _pissa(**options) -> lora.LoraConfig:
    return lora.LoraConfig(**{"r": 2, "lora_alpha": 4, "target_modules": ("q", "wo"), "init_lora_weights": "pissa",
                              **options})


def _trained(adapters, seed: int):
    """Adapters with A and B moved off their start (PiSSA's frozen A0, B0 left as they are)."""
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree_util.tree_flatten_with_path(adapters)
    moved = [leaf + rng.normal(0, 0.2, leaf.shape).astype(np.float32)
             if path[-1].key in (lora.LORA_A, lora.LORA_B) else leaf for path, leaf in leaves]
    return jax.tree_util.tree_unflatten(tree, moved)


def test_config_values():
    assert _pissa().init_lora_weights == "pissa" and lora.LoraConfig(2, 4, target_modules=("q",)).init_lora_weights
    for bad in ("gaussian", False, 1, "PISSA"):
        with pytest.raises(lora.LoraConfigError, match="init_lora_weights=.* is not supported"):
            _pissa(init_lora_weights=bad)
    with pytest.raises(lora.LoraConfigError, match="with use_dora=true is not supported"):
        _pissa(use_dora=True)


@pytest.mark.parametrize("family, scan", [("t5", False), ("llama", True)], ids=["t5-unscanned", "llama-scanned"])
def test_init_equals_peft_pissa(family, scan, base_dirs):
    """peft's PiSSA init takes ``scale * B0 @ A0`` out of each weight; llmjax's ``scale * A0 @ B0`` is that part
    (1e-5; singular vectors' signs may differ, the product does not), and ``A0`` spans the same directions."""
    _, _, targets, task = FAMILIES[family]
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=targets, init_lora_weights="pissa", task_type=task)
    torch_base = _torch_base(family, base_dirs[family])
    weights = {name: p.detach().numpy().copy() for name, p in torch_base.named_parameters()}
    model = peft.get_peft_model(torch_base, config)
    changed = {name.removeprefix("base_model.model.").replace(".base_layer", ""): p.detach().numpy()
               for name, p in model.named_parameters() if ".base_layer." in name}

    jmodel, params = llmjax.hf.from_pretrained(base_dirs[family], scan_layers=scan)
    cfg = lora.LoraConfig(r=3, lora_alpha=5, target_modules=targets, init_lora_weights="pissa")
    adapters = lora.init(jmodel, params, cfg, jax.random.key(0))
    checked = 0
    for site in lora.sites(jmodel.config, cfg):
        node = adapters
        for key in site.path:
            node = node[key]
        a0, b0 = (np.asarray(node[k]) for k in (lora.LORA_A, lora.LORA_B))
        np.testing.assert_array_equal(a0, np.asarray(node[lora.INIT_A]))
        for i, module in enumerate(site.hf_modules):
            a, b = (a0[i], b0[i]) if site.stacked else (a0, b0)
            taken = weights[f"{module}.weight"] - changed[f"{module}.weight"]  # [out, in]
            np.testing.assert_allclose(cfg.scale * a @ b, taken.T, atol=1e-5)
            checked += 1
    assert checked == sum(len(site.hf_modules) for site in lora.sites(jmodel.config, cfg))


def test_step0_is_the_base_and_both_forms_agree_with_the_start_frozen():
    cfg = _pissa()
    flat, scanned = _tiny("t5", False), _tiny("t5", True)
    params = random_params(flat)
    fresh = lora.init(flat, params, cfg, jax.random.key(0))
    inputs = _inputs(flat)
    np.testing.assert_allclose(_logits(flat, lora.merge(params, fresh, cfg), inputs), _logits(flat, params, inputs),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(lora.apply_factored(flat, params, fresh, cfg, *inputs)),
                               _logits(flat, params, inputs), atol=1e-5)

    adapters = stack_layers(_trained(fresh, seed=1), flat.config)
    stacked = stack_layers(params, flat.config)
    grads, _ = factored_matches_merged(scanned, stacked, adapters, cfg, _inputs(scanned))
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        frozen = path[-1].key in lora.FROZEN_LEAVES
        assert (np.abs(np.asarray(grad)).max() == 0) == frozen, path

    # A checkpoint holds A and B only: the start is computed again from the base, and required.
    bare = jax.tree_util.tree_map(lambda x: x, adapters)
    for node in (bare["encoder"]["layers"]["self_attention"]["q"],):
        del node[lora.INIT_A], node[lora.INIT_B]
    with pytest.raises(lora.LoraConfigError, match="have no .*lora_A_init.*add it with llmjax.lora.pissa_initial"):
        lora.merge(stacked, bare, cfg)
    again = lora.pissa_initial(stacked, bare, cfg)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                           lora.merge(stacked, again, cfg), lora.merge(stacked, adapters, cfg))


@pytest.mark.parametrize("family, scan", [("t5", True), ("llama", False)], ids=["t5-scanned", "llama-unscanned"])
def test_peft_format_both_ways(family, scan, base_dirs, tmp_path):
    """(a) llmjax saves a trained PiSSA adapter as a plain LoRA of rank 2r that peft applies to the unchanged base
    with llmjax's logits; (b) peft's own conversion (``path_initial_model_for_weight_conversion``) of its trained
    PiSSA adapter, read by llmjax, gives the logits of peft's PiSSA model."""
    _, _, targets, task = FAMILIES[family]
    model, params = llmjax.hf.from_pretrained(base_dirs[family], scan_layers=scan)
    cfg = lora.LoraConfig(r=2, lora_alpha=6, target_modules=targets[::2], init_lora_weights="pissa", use_rslora=True)
    adapters = _trained(lora.init(model, params, cfg, jax.random.key(0)), seed=2)
    want = _llmjax_logits(model, params, adapters, cfg, family)
    base = np.asarray(model.apply({"params": params}, *[np.asarray(x, np.int32) for x in _ids(family)]))
    assert np.abs(want - base).max() > 1e-2  # the trained adapter matters
    lora.save_pretrained(model, adapters, cfg, tmp_path / "from_llmjax")
    written = json.loads((tmp_path / "from_llmjax" / "adapter_config.json").read_text())
    assert (written["r"], written["init_lora_weights"]) == (4, True)
    assert written["lora_alpha"] == pytest.approx(6 * 2 ** 0.5)  # rsLoRA: the same scale at rank 2r
    loaded = peft.PeftModel.from_pretrained(_torch_base(family, base_dirs[family]), str(tmp_path / "from_llmjax"))
    np.testing.assert_allclose(_torch_logits(loaded.eval(), family), want, atol=TOL, rtol=0)
    plain, plain_cfg = lora.from_pretrained(model, tmp_path / "from_llmjax")
    np.testing.assert_allclose(_llmjax_logits(model, params, plain, plain_cfg, family), want, atol=TOL, rtol=0)

    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=targets, init_lora_weights="pissa", task_type=task)
    pissa_model = peft.get_peft_model(_torch_base(family, base_dirs[family]), config)
    pissa_model.peft_config["default"].init_lora_weights = True  # peft's recipe: save the start as plain LoRA
    pissa_model.save_pretrained(str(tmp_path / "start"))
    pissa_model.peft_config["default"].init_lora_weights = "pissa"
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in pissa_model.named_parameters():
            if "lora_" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    pissa_model.save_pretrained(str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(
        tmp_path / "start"))
    read, read_cfg = lora.from_pretrained(model, tmp_path / "converted")
    assert read_cfg.r == 6 and read_cfg.init_lora_weights is True
    np.testing.assert_allclose(_llmjax_logits(model, params, read, read_cfg, family),
                               _torch_logits(pissa_model.eval(), family), atol=TOL, rtol=0)


def test_pissa_on_a_data_fsdp_tensor_mesh_equals_one_device():
    """PiSSA adapters born sharded from a start decomposed on the host (``pissa_start``, as the LoRA stage does)
    give the one-device loss and gradients on a 2x2x2 mesh, and shard like their kernels."""
    from tests.lora.test_dora import mesh_matches_one_device

    cfg = lora.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights="pissa")
    adapters = mesh_matches_one_device(cfg, {lora.LORA_B: lambda v: v * 1.5}, pissa=True)
    assert {s.data.shape for s in adapters["layers"]["mlp"]["wo"][lora.INIT_B].addressable_shards} == {(2, 2, 16)}
