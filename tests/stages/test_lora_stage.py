"""A stage with a ``lora:`` section (``llmjax.stages.adapters``): only adapters train and are checkpointed,
step 0 is the base, a killed run resumes bitwise, a changed base is refused, and the export is a merged
Hugging Face dir that transformers loads plus a PEFT adapter dir that peft applies with the same logits."""

import dataclasses
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llmjax import hf, lora
from llmjax.config import ConfigError, load_config
from llmjax.loading import load_model, open_manager, read_checkpoint_params
from llmjax.stages import run_stage, stage_module
from llmjax.stages.adapters import ADAPTER_SUBDIR, MATCHED_AS, lora_identity
from llmjax.train.loop import BaseChangedError
from tests.stages.test_sft import SFT_CONFIG, SFT_QUICK, SMALL_T5, _bitwise_equal, _metrics, _sft, kill_and_resume

LORA = ["lora.r=4", "lora.lora_alpha=8", "lora.target_modules=[q, v]"]
STEPS = 4


@pytest.fixture(scope="module")
def base_dir(pretrained, tmp_path_factory):
    """The pre-trained small T5 as a Hugging Face directory with its tokenizer (what peft applies adapters to)."""
    out = tmp_path_factory.mktemp("base") / "hf"
    loaded = load_model(pretrained)
    hf.save_pretrained(loaded.model, loaded.params, out)
    shutil.copy(Path(loaded.tokenizer_dir) / "spiece.model", out)
    return out


@pytest.fixture(scope="module")
def lora_run(base_dir, tmp_path_factory):
    """A 4-step LoRA SFT run from ``base_dir`` (ROUGE of generations at the end) with its export:
    ``(run dir, summary)``."""
    out = tmp_path_factory.mktemp("lora") / "run"
    summary = run_stage(_sft(base_dir, out, *LORA, f"train.steps={STEPS}", "optim.learning_rate=1e-2",
                             "train.export_hf=hf", f"train.rouge_every_steps={STEPS}", "train.rouge_examples=2"),
                        progress=False)
    return out, summary


def _paths(tree) -> list[str]:
    return ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def test_lora_run_trains_and_checkpoints_adapters_only_and_loss_falls(base_dir, lora_run):
    out, summary = lora_run
    assert summary["step"] == STEPS
    losses = [r["loss"] for r in _metrics(out) if r["split"] == "train"]
    assert len(losses) == STEPS and losses[-1] < losses[0], losses
    assert 0.0 <= summary["generate"]["rougeL"] <= 1.0  # the ROUGE hook ran on the merged params

    # The checkpoint: adapter params and their optimizer state, no base weights, the base's path and hash.
    manager = open_manager(out / "checkpoints", read_only=True)
    saved = manager.item_metadata(STEPS)["state"]
    meta = manager.restore(STEPS, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    manager.close()
    assert not saved.get("frozen_params")
    assert set(saved["params"]) == {"lora"}
    adapter_paths = _paths(saved["params"])
    assert adapter_paths and all(p.endswith(("/lora_A", "/lora_B")) for p in adapter_paths)
    assert {p.split("/")[-2] for p in adapter_paths} == {"q", "v"}
    adapter_sizes = sorted(int(np.prod(m.shape)) for m in jax.tree_util.tree_leaves(saved["params"]))
    moments = sorted(int(np.prod(m.shape)) for path, m in zip(_paths(saved["opt_state"]),
                                                               jax.tree_util.tree_leaves(saved["opt_state"]))
                     if not path.endswith("count"))
    assert moments == sorted(adapter_sizes * 2)  # AdamW's mu and nu, for the adapters alone
    assert meta["base"]["path"] == str(base_dir.absolute()) and meta["lora"]["r"] == 4

    # The base is untouched: every leaf the adapters do not target equals the base bitwise, and the
    # targeted kernels are the base plus scale * A @ B of the saved adapters.
    base = load_model(base_dir).params
    _, trained, _ = read_checkpoint_params(out / "checkpoints")
    adapters = trained["lora"]
    assert all(np.abs(leaf).max() > 0 for leaf in jax.tree_util.tree_leaves(adapters))  # B moved from zero
    cfg = lora.LoraConfig(r=4, lora_alpha=8, target_modules=("q", "v"))
    merged = load_model(out / "checkpoints").params  # the loader merges a LoRA checkpoint's adapters
    expected = jax.tree_util.tree_map(np.asarray, lora.merge(base, adapters, cfg))
    for path, got, want, original in zip(_paths(merged), jax.tree_util.tree_leaves(merged),
                                         jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(base)):
        if path.split("/")[-2] in ("q", "v"):
            np.testing.assert_allclose(got, want, atol=1e-6, err_msg=path)
            assert not np.array_equal(got, original), path
        else:
            np.testing.assert_array_equal(got, original, err_msg=path)


def test_step0_loss_equals_the_base_models(base_dir, lora_run, tmp_path):
    out, _ = lora_run
    stage = stage_module("sft").build_stage(_sft(base_dir, tmp_path / "full"))  # no lora: the base alone
    _, sums = stage.loss_fn(stage.base.params, next(stage.train_data), None)
    first = next(r for r in _metrics(out) if r["split"] == "train" and r["step"] == 1)  # the loss before step 1
    assert abs(first["loss"] - float(sums["loss"] / sums["weights"])) <= 1e-5


def test_resume_against_a_changed_base_is_refused(base_dir, lora_run, tmp_path):
    out, _ = lora_run
    shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
    loaded = load_model(base_dir)
    changed = jax.tree_util.tree_map(np.copy, loaded.params)
    changed["shared"]["embedding"][0, 0] += 1.0
    hf.save_pretrained(loaded.model, changed, tmp_path / "changed")
    shutil.copy(base_dir / "spiece.model", tmp_path / "changed")
    with pytest.raises(BaseChangedError, match=f"base model changed: checkpoint step {STEPS} .* trained from {base_dir}"):
        run_stage(_sft(tmp_path / "changed", tmp_path / "run", *LORA, f"train.steps={STEPS + 2}",
                       f"checkpoint.dir={tmp_path / 'checkpoints'}"), progress=False)


def test_export_is_a_merged_transformers_dir_and_a_peft_adapter_with_its_logits(base_dir, lora_run):
    import peft
    import torch
    import transformers

    _, summary = lora_run
    export = Path(summary["export"])
    merged = transformers.T5ForConditionalGeneration.from_pretrained(export).eval()
    with_adapter = peft.PeftModel.from_pretrained(
        transformers.T5ForConditionalGeneration.from_pretrained(base_dir), export / ADAPTER_SUBDIR).eval()
    plain = transformers.T5ForConditionalGeneration.from_pretrained(base_dir).eval()
    ids = torch.tensor([[5, 17, 42, 9, 1], [33, 8, 120, 1, 0]])
    inputs = dict(input_ids=ids, attention_mask=(ids != 0).long(), decoder_input_ids=torch.tensor([[0, 7, 11], [0, 3, 4]]))
    with torch.no_grad():
        a, b, c = (m(**inputs).logits.numpy() for m in (merged, with_adapter, plain))
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert np.abs(a - c).max() > 1e-3  # the adapters changed the model


@pytest.mark.slow
def test_sigkill_during_lora_training_then_resume_gives_bitwise_equal_adapters(base_dir, tmp_path):
    kill_after = kill_and_resume(tmp_path, [*SMALL_T5, *SFT_QUICK, *LORA, f"init_from={base_dir}"], steps=16)
    (_, a, _), (_, b, _) = (read_checkpoint_params(tmp_path / run / "checkpoints") for run in ("whole", "killed"))
    assert set(a) == set(b) == {"lora"}  # the checkpoints hold the adapters and no base weights
    assert _bitwise_equal(a, b), f"killed after checkpoint {kill_after}"


def test_lora_config_errors(base_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'lora.alpha' \(did you mean 'lora.lora_alpha'\?\)"):
        load_config(SFT_CONFIG, ["lora.r=4", "lora.alpha=8", "lora.target_modules=[q]"])
    with pytest.raises(ConfigError, match="lora: trains the adapters only, so train.trainable/train.frozen do not"):
        load_config(SFT_CONFIG, [*LORA, "train.frozen=[shared]"])
    with pytest.raises(ConfigError, match=r"target_modules \['q_proj'\] are not modules of this T5 model"):
        stage_module("sft").build_stage(_sft(base_dir, tmp_path / "run", "lora.r=4", "lora.lora_alpha=8",
                                             "lora.target_modules=[q_proj]"))
    assert not (tmp_path / "run").exists()  # refused before the run wrote anything
    with pytest.raises(lora.LoraConfigError, match=r"modules_to_save \['nothing'\] match no module"):
        run_stage(_sft(base_dir, tmp_path / "run", *LORA, "lora.modules_to_save=[nothing]"), progress=False)
    with pytest.raises(ConfigError, match="modules_to_save trains lm_head/kernel in full, which quantize: keeps int8"):
        run_stage(_sft(base_dir, tmp_path / "run", *LORA, "lora.modules_to_save=[lm_head]", "quantize.weights=int8"),
                  progress=False)
    assert not (tmp_path / "run").exists()
    pretraining = load_config(SFT_CONFIG.parent / "pretrain_t5_tiny.yaml", [
        f"train.output_dir={tmp_path / 'random'}", *LORA, "lora.init_lora_weights=pissa"])
    no_base = "init_lora_weights: pissa starts the adapters from the principal part.*set init_from"
    with pytest.raises(ConfigError, match=no_base):
        run_stage(pretraining, progress=False)
    assert not (tmp_path / "random").exists()  # refused before the stage writes its config
    with pytest.raises(ConfigError, match=no_base):
        stage_module("pretrain").build_stage(pretraining)  # and for a caller that builds the stage itself
    assert load_config(SFT_CONFIG).lora is None  # no section: no LoRA
    shipped = load_config(SFT_CONFIG.parent / "sft_t5_tiny_lora.yaml")
    assert shipped.lora == lora.LoraConfig(r=8, lora_alpha=32, target_modules=("q", "v")) and shipped.stage == "sft"


@pytest.mark.slow
def test_lora_pretraining_of_a_sharded_decoder_from_random_weights(pretrained, tmp_path):
    """The same transformation on another stage and family: LLaMA targets and trained token rows of the input
    embedding, a data/fsdp/tensor mesh, no base (the frozen random weights are then checkpointed whole, there being
    nothing to rebuild them from)."""
    out = tmp_path / "run"
    summary = run_stage(load_config(SFT_CONFIG.parent / "pretrain_t5_tiny.yaml", [
        "model.include=model/decoder_tiny.yaml", "data.objective=causal_lm", "data.decoder_length=32",
        f"data.tokenizer={pretrained / 'tokenizer'}", "train.steps=2", "train.batch_size=8", "train.eval_every_steps=0", "optim.warmup_steps=0",
        f"train.output_dir={out}", "train.export_hf=null", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
        "lora.r=4", "lora.lora_alpha=4", "lora.target_modules=[q_proj, down_proj]",
        "lora.trainable_token_indices=[3, 4, 5]"]), progress=False)
    assert summary["step"] == 2 and np.isfinite(summary["loss"])
    _, saved, meta = read_checkpoint_params(out / "checkpoints")
    assert meta["lora"]["target_modules"] == ["q_proj", "down_proj"] and "base" not in meta
    assert meta["lora"]["trainable_token_indices"] == [3, 4, 5]
    assert {p.split("/")[-2] for p in _paths(saved["lora"])} == {"q", "wo", "embed"}  # q_proj, down_proj, the rows
    loaded = load_model(out)
    assert set(loaded.params) == set(saved) - {"lora"}  # the loader merges the adapters away
    rows, base = saved["lora"]["embed"][lora.TOKENS], np.asarray(saved["embed"]["embedding"])
    np.testing.assert_array_equal(np.asarray(loaded.params["embed"]["embedding"]), np.concatenate([base[:3], rows,
                                                                                                    base[6:]]))
    assert np.abs(rows - base[3:6]).max() > 1e-4  # the rows trained; the embedding itself stayed frozen


def test_lora_dropout_drops_the_adapter_input_in_training_only(base_dir, tmp_path):
    """With the model's own dropout off, a training loss (dropout rng) differs from the deterministic one only
    through lora_dropout; a stage that cannot rebuild its loss (no loss_for) refuses lora_dropout."""
    from llmjax.stages.adapters import with_lora

    def losses(dropout):
        stage = stage_module("sft").build_stage(_sft(base_dir, tmp_path / str(dropout), *LORA, "model.dropout_rate=0.0",
                                                     f"lora.lora_dropout={dropout}"))
        tree = stage.init_tree(jax.random.key(0), stage.base.params)
        tree["lora"] = jax.tree_util.tree_map(lambda x: x + 0.1, tree["lora"])  # B away from zero
        batch = next(stage.train_data)
        return [float(stage.loss_fn(tree, batch, rng)[1]["loss"]) for rng in (None, jax.random.key(1))]

    deterministic, undropped = losses(0.0)
    assert undropped == pytest.approx(deterministic, abs=1e-6)
    deterministic, dropped = losses(0.5)
    assert abs(deterministic - dropped) > 1e-3
    plain = stage_module("sft").build_stage(_sft(base_dir, tmp_path / "plain", "model.dropout_rate=0.0"))
    with pytest.raises(ConfigError, match="lora.lora_dropout=0.5 is not supported by stage 'sft': it gives no loss_for"):
        with_lora(dataclasses.replace(plain, loss_for=None), lora.LoraConfig(4, 8, 0.5, ("q", "v")))


def test_a_lora_run_in_the_other_layer_layout_than_its_base_loads_merged(base_dir, tmp_path):
    """An unrolled-layer LoRA run (``model.scan_layers=false``) on a base read in the scanned layout: its
    checkpoint holds unrolled adapters, and ``load_model`` lays them over the base in the run's layout. The run
    adapts ``all-linear`` with rsLoRA's scale, which the checkpoint records and the loader applies."""
    out = tmp_path / "run"
    run_stage(_sft(base_dir, out, *LORA, "lora.target_modules=all-linear", "lora.use_rslora=true",
                   "model.scan_layers=false", "train.steps=1", "optim.learning_rate=1e-2"), progress=False)
    loaded = load_model(out)
    assert not loaded.config.scan_layers
    _, trained, meta = read_checkpoint_params(out / "checkpoints")
    assert meta["lora"]["use_rslora"] and meta["lora"]["target_modules"] == ["all-linear"]
    base = load_model(base_dir)
    assert base.config.scan_layers  # the two layouts differ, which is what this test is about
    from llmjax.models import unstack_layers

    every = lora.LoraConfig(4, 8, target_modules=("q", "k", "v", "o", "wi_0", "wi_1", "wo"), use_rslora=True)
    expected = lora.merge(unstack_layers(base.params, base.config), trained["lora"], every)
    for got, want in zip(jax.tree_util.tree_leaves(loaded.params), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert jax.tree_util.tree_structure(loaded.params) == jax.tree_util.tree_structure(expected)


def test_merged_and_factored_forms_give_the_same_loss_and_adapter_gradients(base_dir, tmp_path, monkeypatch):
    """``with_lora``'s two forms of the loss (merged kernels; adapters computed factored, the default where the
    stage can rebuild its loss) agree in loss and adapter gradients; a form that cannot run is refused by name."""
    from llmjax.stages.adapters import with_lora

    called: list[str] = []  # which form each loss traced: lora.merge or lora.apply_factored
    for name in ("merge", "apply_factored"):
        original = getattr(lora, name)
        monkeypatch.setattr(lora, name, lambda *a, _f=original, _n=name, **k: called.append(_n) or _f(*a, **k))

    plain = stage_module("sft").build_stage(_sft(base_dir, tmp_path / "plain", "model.dropout_rate=0.0"))
    cfg = lora.LoraConfig(4, 8, 0.0, ("q", "v", "wo"))
    stages = {form: with_lora(plain, cfg, form=form) for form in ("auto", "merged", "factored")}
    stages["auto, no loss_for"] = with_lora(dataclasses.replace(plain, loss_for=None), cfg)
    tree = stages["auto"].init_tree(jax.random.key(0), plain.base.params)
    tree["lora"] = jax.tree_util.tree_map(lambda x: x + 0.05, tree["lora"])  # B away from zero
    batch = next(plain.train_data)
    results = {}
    traced = {}
    for form, stage in stages.items():
        called.clear()
        loss, grads = jax.jit(jax.value_and_grad(
            lambda adapters, s=stage: s.loss_fn({**tree, "lora": adapters}, batch, None)[0]))(tree["lora"])
        results[form], traced[form] = (float(loss), grads), set(called)
    # the default is the factored form, merged where the stage cannot rebuild its loss
    assert traced == {"auto": {"apply_factored"}, "factored": {"apply_factored"}, "merged": {"merge"},
                      "auto, no loss_for": {"merge"}}
    assert results["auto"][0] == results["factored"][0]
    assert results["auto, no loss_for"][0] == results["merged"][0]
    assert results["factored"][0] == pytest.approx(results["merged"][0], rel=1e-5)
    gradients = [jax.tree_util.tree_leaves(results[form][1]) for form in ("merged", "factored")]
    largest = max(float(np.abs(g).max()) for g in gradients[0])  # the loss is a sum over tokens
    assert largest > 1e-3
    for merged, factored in zip(*gradients):
        np.testing.assert_allclose(factored, merged, rtol=1e-4, atol=1e-6 * largest)

    with pytest.raises(ValueError, match="form must be one of"):
        with_lora(plain, cfg, form="fused")
    with pytest.raises(ValueError, match="form='merged' cannot run an int8 base or lora_dropout"):
        with_lora(plain, dataclasses.replace(cfg, lora_dropout=0.1), form="merged")
    with pytest.raises(ValueError, match="form='factored' needs a stage with loss_for; 'sft' gives none"):
        with_lora(dataclasses.replace(plain, loss_for=None), cfg, form="factored")


def test_resume_with_other_adapters_is_refused_by_name_and_all_linear_spelled_out_resumes(base_dir, tmp_path):
    """A LoRA checkpoint continues only with the adapters it holds. ``all-linear`` spelled out as its module list
    (in another order) resumes bitwise; another rank, alpha, scale rule or module list, or no ``lora:`` section,
    is refused before anything is read, naming the keys (orbax would otherwise fail on the tree, or a new
    alpha would silently rescale the trained adapters)."""
    rank = ["lora.r=2", "lora.lora_alpha=4"]
    run_stage(_sft(base_dir, tmp_path / "half", *rank, "lora.target_modules=all-linear", "train.steps=2"),
              progress=False)
    run_stage(_sft(base_dir, tmp_path / "whole", *rank, "lora.target_modules=all-linear", "train.steps=4"),
              progress=False)
    shutil.copytree(tmp_path / "half", tmp_path / "listed")
    spelled_out = "lora.target_modules=[wo, wi_1, wi_0, o, v, k, q]"
    summary = run_stage(_sft(base_dir, tmp_path / "listed", *rank, spelled_out, "train.steps=4"), progress=False)
    assert summary["start_step"] == 2 and summary["step"] == 4
    assert _bitwise_equal(read_checkpoint_params(tmp_path / "listed" / "checkpoints", 4)[1]["lora"],
                          read_checkpoint_params(tmp_path / "whole" / "checkpoints", 4)[1]["lora"])

    changed = {
        "fewer": ([*rank, "lora.target_modules=[q, v]"],
                  r"lora.target_modules \(checkpoint: \['k', 'o', 'q', 'v', 'wi_0', 'wi_1', 'wo'\], this run: \['q', 'v'\]\)"),
        "rank": (["lora.r=4", "lora.lora_alpha=4", "lora.target_modules=all-linear"],
                 r"lora.r \(checkpoint: 2, this run: 4\)"),
        "alpha": (["lora.r=2", "lora.lora_alpha=8", "lora.target_modules=all-linear"],
                  r"lora.lora_alpha \(checkpoint: 4.0, this run: 8.0\)"),
        "rslora": ([*rank, "lora.target_modules=all-linear", "lora.use_rslora=true"],
                   r"lora.use_rslora \(checkpoint: False, this run: True\)"),
        "dora": ([*rank, "lora.target_modules=all-linear", "lora.use_dora=true"],
                 r"lora.use_dora \(checkpoint: None, this run: True\)"),  # plain LoRA records none
        "pissa": ([*rank, "lora.target_modules=all-linear", "lora.init_lora_weights=pissa"],
                  r"lora.init_lora_weights \(checkpoint: None, this run: pissa\)"),
        "saved": ([*rank, "lora.target_modules=all-linear", "lora.modules_to_save=[final_layer_norm]"],
                  r"lora.modules_to_save \(checkpoint: None, this run: \['final_layer_norm'\]\)"),
        "none": ([], r"a lora: section \(checkpoint: \{'r': 2, .*\}, this run: none\)"),
    }
    for name, (overrides, match) in changed.items():
        shutil.copytree(tmp_path / "half", tmp_path / name)
        files = sorted((tmp_path / name).rglob("*"))
        with pytest.raises(ConfigError, match=rf"checkpoint step 2 in .*{name}/checkpoints was trained with other "
                                              rf"trainable parts than this run's config gives: {match}; set them back"):
            run_stage(_sft(base_dir, tmp_path / name, *overrides, "train.steps=4"), progress=False)
        assert sorted((tmp_path / name).rglob("*")) == files, name  # nothing written
    # lora_dropout is a training setting, like the learning rate: it may change on resume.
    model = load_model(base_dir).model
    assert (lora_identity(lora.LoraConfig(2, 4, 0.1, "all-linear"), model.config)
            == lora_identity(lora.LoraConfig(2, 4, 0.0, ("q", "k", "v", "o", "wi_0", "wi_1", "wo")), model.config))
    # Entries that peft's rule before 0.22 (a plain suffix, llmjax's until then) reads otherwise record the rule: a
    # checkpoint of them from before saved other weights (layer_norm took final_layer_norm too) and is refused.
    norms = lora_identity(lora.LoraConfig(2, 4, target_modules=("q",), modules_to_save=["layer_norm"]), model.config)
    assert norms["modules_to_save_matched_as"] == MATCHED_AS
    assert "modules_to_save_matched_as" not in lora_identity(lora.LoraConfig(
        2, 4, target_modules=("q",), modules_to_save=["layer_norm", "final_layer_norm"]), model.config)


def test_pissa_run_resumes_bitwise_with_its_start_computed_again(base_dir, tmp_path):
    """PiSSA's frozen start is not checkpointed: a resumed run computes it again from the base (the same SVD), so
    2 + 2 steps give the adapters of 4 straight steps, bit for bit."""
    pissa = [*LORA, "lora.init_lora_weights=pissa", "optim.learning_rate=1e-2"]
    run_stage(_sft(base_dir, tmp_path / "whole", *pissa, "train.steps=4"), progress=False)
    run_stage(_sft(base_dir, tmp_path / "split", *pissa, "train.steps=2"), progress=False)
    summary = run_stage(_sft(base_dir, tmp_path / "split", *pissa, "train.steps=4"), progress=False)
    assert summary["start_step"] == 2
    assert _bitwise_equal(read_checkpoint_params(tmp_path / "split" / "checkpoints", 4)[1]["lora"],
                          read_checkpoint_params(tmp_path / "whole" / "checkpoints", 4)[1]["lora"])


@pytest.mark.parametrize("option, extra, leaf", [
    ("lora.use_dora=true", {"use_dora": True}, lora.MAGNITUDE),
    ("lora.modules_to_save=[layer_norm]", {"modules_to_save": ("layer_norm",)}, "scale"),
    ("lora.init_lora_weights=pissa", {"init_lora_weights": "pissa"}, lora.LORA_A),
    ("lora.target_modules=[q, v, lm_head]", {"target_modules": ("q", "v", "lm_head")}, lora.LORA_A),
    ("lora.trainable_token_indices={lm_head: [5, 17, 300]}", {"output_token_indices": (5, 17, 300)}, lora.TOKENS),
], ids=["dora", "modules_to_save", "pissa", "lm_head", "head_token_rows"])
def test_dora_saved_modules_or_pissa_run_trains_and_exports_what_peft_applies(option, extra, leaf, base_dir, tmp_path):
    """``lora.use_dora: true`` / ``lora.modules_to_save: [layer_norm]`` / ``lora.init_lora_weights: pissa`` /
    ``lm_head`` adapted too / the untied head's rows of three tokens: step 0 is the base, the checkpoint holds A, B and
    a magnitude per adapted kernel / a copy of every norm's scale / A and B alone (PiSSA's frozen start is computed
    again from the base) / A and B of the head too / the head's rows, all moved from their deterministic start by
    training, the loader merges them, and the export's PEFT
    adapter applied by peft gives the exported merged model's logits."""
    import peft
    import torch
    import transformers

    out = tmp_path / "run"
    summary = run_stage(_sft(base_dir, out, *LORA, option, f"train.steps={STEPS}",
                             "optim.learning_rate=1e-2", "train.export_hf=hf"), progress=False)
    stage = stage_module("sft").build_stage(_sft(base_dir, tmp_path / "full"))
    _, sums = stage.loss_fn(stage.base.params, next(stage.train_data), None)
    losses = [r["loss"] for r in _metrics(out) if r["split"] == "train"]
    assert abs(losses[0] - float(sums["loss"] / sums["weights"])) <= 1e-5 and losses[-1] < losses[0], losses

    adapters = read_checkpoint_params(out / "checkpoints")[1]["lora"]
    assert {p.split("/")[-1] for p in _paths(adapters)} == {"lora_A", "lora_B", leaf}
    cfg = lora.LoraConfig(r=4, lora_alpha=8, **{"target_modules": ("q", "v"), **extra})
    base = load_model(base_dir).params
    fresh = lora.init(load_model(base_dir).model, base, cfg, jax.random.key(0))
    starts = {p: x for p, x in zip(_paths(fresh), jax.tree_util.tree_leaves(fresh))}
    for path, trained in zip(_paths(adapters), jax.tree_util.tree_leaves(adapters)):
        if path.endswith(leaf):
            assert np.abs(trained - np.asarray(starts[path])).max() > 1e-4, path  # the magnitudes / copies / A trained
    assert ("lm_head" in adapters) == ("lm_head" in cfg.target_modules or bool(cfg.output_token_indices))
    expected = jax.tree_util.tree_map(np.asarray, lora.merge(base, lora.pissa_initial(base, adapters, cfg), cfg))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                           load_model(out / "checkpoints").params, expected)

    export = Path(summary["export"])
    merged = transformers.T5ForConditionalGeneration.from_pretrained(export).eval()
    with_adapter = peft.PeftModel.from_pretrained(
        transformers.T5ForConditionalGeneration.from_pretrained(base_dir), export / ADAPTER_SUBDIR).eval()
    ids = torch.tensor([[5, 17, 42, 9, 1], [33, 8, 120, 1, 0]])
    inputs = dict(input_ids=ids, attention_mask=(ids != 0).long(), decoder_input_ids=torch.tensor([[0, 7, 11], [0, 3, 4]]))
    with torch.no_grad():
        np.testing.assert_allclose(merged(**inputs).logits.numpy(), with_adapter(**inputs).logits.numpy(), atol=1e-4)
