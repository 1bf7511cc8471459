"""The SFT stage and the stage contract: init_from, step-0 loss against transformers, frozen-base
checkpoints (what they hold, exact resume, the base's hash), ROUGE of generations, clear config errors."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llmjax.config import CONFIGS_DIR, DEFAULT_CONFIG_PATH, ConfigError, load_config
from llmjax.loading import load_model, open_manager
from llmjax.stages import run_stage, stage_module
from llmjax.stages.init_source import resolve_init
from llmjax.train.checkpoint import Checkpointer
from llmjax.train.loop import BaseChangedError

REPO = Path(__file__).resolve().parents[2]
# A 1-layer T5: these tests are about the stage's plumbing, not model size.
SMALL_T5 = ["model.num_layers=1", "model.d_model=32", "model.d_kv=8", "model.d_ff=64", "model.num_heads=4"]
SFT_CONFIG = CONFIGS_DIR / "sft_t5_tiny.yaml"
# Short rows and steps; a constant learning rate so a run of N steps continued to M computes what one of M does.
SFT_QUICK = ["train.batch_size=8", "train.log_every_steps=1", "train.eval_every_steps=0", "train.rouge_every_steps=0",
             "data.encoder_length=128", "data.decoder_length=32", "optim.warmup_steps=0", "optim.schedule=constant",
             "checkpoint.every_steps=2", "checkpoint.keep=null", "checkpoint.async_save=false", "train.export_hf=null"]
FROZEN_EMBEDDINGS = "train.frozen=[^shared/]"  # the token embedding


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _bitwise_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def _sft(init_from, out, *overrides):
    return load_config(SFT_CONFIG, [*SMALL_T5, *SFT_QUICK, f"init_from={init_from}", f"train.output_dir={out}",
                                    *overrides])


@pytest.mark.slow
def test_sft_from_a_pretrain_checkpoint_logs_eval_loss_and_rouge_and_exports(pretrained, tmp_path):
    out = tmp_path / "sft"
    summary = run_stage(_sft(pretrained, out, "train.steps=4", "train.eval_every_steps=2", "train.eval_steps=1",
                             "train.rouge_every_steps=2", "train.rouge_examples=3", "train.export_hf=hf"),
                        progress=False)
    rows = _metrics(out)
    assert [r["step"] for r in rows if r["split"] == "eval"] == [2, 4]
    generate = [r for r in rows if r["split"] == "generate"]
    assert [r["step"] for r in generate] == [2, 4]
    assert all(0.0 <= r[k] <= 1.0 for r in generate for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
    assert summary["generate"] == {k: v for k, v in generate[-1].items() if k not in ("step", "split")}
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    exported = load_model(summary["export"])  # HF dir with the tokenizer of the base
    assert exported.kind == "hf" and (Path(summary["export"]) / "spiece.model").is_file()
    # Full fine-tuning: every parameter moved from the base.
    base = load_model(pretrained).params
    moved = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), base, exported.params)
    assert all(jax.tree_util.tree_leaves(moved))


def test_model_section_is_taken_from_init_from_or_must_match_it(pretrained, tmp_path):
    config = load_config(SFT_CONFIG, [f"init_from={pretrained}", "model={}", "model.dropout_rate=0.3"])
    resolved, loaded = resolve_init(config)
    assert resolved.model == dataclasses.replace(loaded.config, dropout_rate=0.3)
    with pytest.raises(ConfigError, match=r"model.d_model=64 but init_from=.* has d_model=32 .*only \[.*dropout_rate"):
        resolve_init(load_config(SFT_CONFIG, [f"init_from={pretrained}", *SMALL_T5, "model.d_model=64"]))
    with pytest.raises(ConfigError, match="model.family='decoder' but init_from=.* holds a 't5' model"):
        resolve_init(load_config(SFT_CONFIG, [f"init_from={pretrained}", "model.include=model/decoder_tiny.yaml"]))


def test_unknown_stage_and_wrong_objective_are_config_errors(pretrained, tmp_path):
    with pytest.raises(ConfigError, match=r"stage='dpo_typo' is not a training stage; choose one of \[.*'pretrain'.*'sft'\]"):
        stage_module("dpo_typo")
    with pytest.raises(ConfigError, match="stage: sft trains on instruction data; set data.objective=instruction"):
        stage_module("sft").build_stage(load_config(DEFAULT_CONFIG_PATH, [
            *SMALL_T5, "stage=sft", f"init_from={pretrained}", f"train.output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="data.objective=instruction trains with stage: sft"):
        stage_module("pretrain").build_stage(_sft(pretrained, tmp_path, "stage=pretrain"))


@pytest.mark.slow
def test_frozen_base_checkpoints_only_what_trains_resumes_exactly_and_refuses_a_changed_base(pretrained, tmp_path):
    from llmjax import hf

    base_dir = tmp_path / "base_hf"
    loaded = load_model(pretrained)
    hf.save_pretrained(loaded.model, loaded.params, base_dir)
    shutil.copy(Path(loaded.tokenizer_dir) / "spiece.model", base_dir)

    whole = run_stage(_sft(base_dir, tmp_path / "whole", "train.steps=4", FROZEN_EMBEDDINGS), progress=False)
    run_stage(_sft(base_dir, tmp_path / "split", "train.steps=2", FROZEN_EMBEDDINGS), progress=False)
    resumed = run_stage(_sft(base_dir, tmp_path / "split", "train.steps=4", FROZEN_EMBEDDINGS), progress=False)
    assert resumed["start_step"] == 2 and resumed["step"] == whole["step"] == 4

    # The checkpoint holds the trainable params and their optimizer state, not the frozen embeddings.
    checkpoints = tmp_path / "split" / "checkpoints"
    manager = open_manager(checkpoints, read_only=True)
    saved = manager.item_metadata(4)["state"]
    meta = manager.restore(4, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    manager.close()
    assert not saved.get("frozen_params")
    saved_paths = ["/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(saved["params"])]
    assert "lm_head/kernel" in saved_paths and not [p for p in saved_paths if p.startswith("shared/")]
    assert meta["base"]["path"] == str(base_dir.absolute()) and len(meta["base"]["sha256"]) == 64
    assert meta["base"]["step"] is None  # a Hugging Face directory has no steps

    # Reading the checkpoint lays the trained part over the base: bitwise what one uninterrupted run gives,
    # and the frozen embeddings are the base's.
    a, b = load_model(tmp_path / "whole").params, load_model(checkpoints).params
    assert _bitwise_equal(a, b)
    np.testing.assert_array_equal(b["shared"]["embedding"], loaded.params["shared"]["embedding"])
    assert not np.array_equal(b["lm_head"]["kernel"], loaded.params["lm_head"]["kernel"])

    # Change one weight of the base: the resume is refused, naming the base.
    changed = jax.tree_util.tree_map(np.copy, loaded.params)
    changed["shared"]["embedding"][0, 0] += 1.0
    hf.save_pretrained(loaded.model, changed, base_dir)
    with pytest.raises(BaseChangedError, match=f"base model changed: checkpoint step 4 .* trained from {base_dir}"):
        run_stage(_sft(base_dir, tmp_path / "split", "train.steps=6", FROZEN_EMBEDDINGS), progress=False)



def test_resume_with_other_trainable_filters_is_refused_by_name(pretrained, tmp_path):
    """The ``train.trainable`` / ``train.frozen`` filters decide the checkpoint's tree: a resume with others is
    refused naming them, before orbax would fail on the tree, and the run directory is left as it was."""
    run_stage(_sft(pretrained, tmp_path / "run", "train.steps=2", FROZEN_EMBEDDINGS), progress=False)
    files = sorted((tmp_path / "run").rglob("*"))
    with pytest.raises(ConfigError, match=r"checkpoint step 2 in .* was trained with other trainable parts than this "
                                          r"run's config gives: train.frozen \(checkpoint: \['\^shared/'\], this run: "
                                          r"\[\]\); set them back to resume"):
        run_stage(_sft(pretrained, tmp_path / "run", "train.steps=4"), progress=False)
    assert sorted((tmp_path / "run").rglob("*")) == files


@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_step0_loss_from_a_transformers_dir_equals_transformers(pretrained, tmp_path, family):
    """SFT from a directory ``transformers`` wrote: the stage's loss on its first batch is torch's."""
    import torch
    import transformers

    torch.manual_seed(0)
    if family == "t5":
        hf_config = transformers.T5Config(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                          feed_forward_proj="gated-gelu", dropout_rate=0.0)
        torch_model = transformers.T5ForConditionalGeneration(hf_config)
        run_config, decoder_length = SFT_CONFIG, 96
    else:
        hf_config = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        torch_model = transformers.LlamaForCausalLM(hf_config)
        run_config, decoder_length = CONFIGS_DIR / "sft_decoder_tiny.yaml", 384  # prompt and response
    torch_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    config = load_config(run_config, [
        "model={}", f"init_from={tmp_path / 'hf'}", f"data.tokenizer={pretrained / 'tokenizer'}", "data.packing=false",
        "data.encoder_length=128", f"data.decoder_length={decoder_length}", "train.batch_size=8", f"train.output_dir={tmp_path / 'out'}",
        "train.eval_every_steps=0", "train.rouge_every_steps=0"])
    stage = stage_module("sft").build_stage(config)
    batch = next(stage.train_data)
    _, sums = stage.loss_fn(stage.base.params, batch, None)
    ours = float(sums["loss"] / sums["weights"])

    with torch.no_grad():
        theirs = float(torch_sft_loss(torch_model.eval(), batch, seq2seq=family == "t5", dtype=torch.float64))
    weights = np.asarray(batch["decoder_loss_weights"])
    assert weights.sum() > 0 and (weights == 0).any()  # target-only weights: prompts and padding carry none
    assert abs(ours - theirs) <= 1e-4, (ours, theirs)


def torch_sft_loss(model, batch: dict, seq2seq: bool, skip: int = 0, dtype=None):
    """The SFT loss of an llmjax ``batch`` computed in torch: ``model`` (``transformers`` or ``peft``) on the batch's
    rows, cross-entropy per target token over ``decoder_loss_weights``. ``skip``: leading positions of a decoder's
    logits to drop (those of a ``peft`` soft prompt); ``dtype``: the log-softmax's (default: the logits')."""
    import torch

    as_torch = lambda name: torch.from_numpy(np.asarray(batch[name], np.int64))  # noqa: E731
    if seq2seq:
        logits = model(input_ids=as_torch("encoder_input_tokens"),
                       attention_mask=(as_torch("encoder_input_tokens") != 0).long(),
                       decoder_input_ids=as_torch("decoder_input_tokens")).logits
    else:
        logits = model(input_ids=as_torch("decoder_input_tokens")).logits[:, skip:]
    logits = logits if dtype is None else logits.to(dtype)
    nll = -torch.log_softmax(logits, -1).gather(-1, as_torch("decoder_target_tokens")[..., None])[..., 0]
    weights = torch.from_numpy(np.asarray(batch["decoder_loss_weights"])).to(logits.dtype)
    return (nll * weights).sum() / weights.sum()


def kill_and_resume(tmp_path, overrides, steps: int = 24, every: int = 2, config=SFT_CONFIG) -> int:
    """``llmjax train`` in two processes: ``tmp_path/whole`` runs ``steps`` steps uninterrupted,
    ``tmp_path/killed`` is SIGKILLed after a random checkpoint (every ``every`` steps, async saves) and
    resumed to the end. Returns the step it was killed after; asserts both finished and the resume resumed."""
    import os
    import random
    import subprocess
    import sys

    from tests.train.test_loop import _wait_until

    def cli(out):
        env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
        args = [*overrides, f"train.output_dir={out}", f"train.steps={steps}", f"checkpoint.every_steps={every}",
                "checkpoint.async_save=true", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]
        return subprocess.Popen([sys.executable, "-m", "llmjax.cli", "train", "--config", str(config), *args],
                                env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    whole, killed = cli(tmp_path / "whole"), cli(tmp_path / "killed")
    kill_after = random.Random().choice(range(every, steps // 2, every))
    checkpoints = Checkpointer(tmp_path / "killed" / "checkpoints")
    _wait_until(lambda: checkpoints.has_step(kill_after), killed, f"checkpoint {kill_after}")
    killed.kill()
    killed.wait()
    assert not checkpoints.has_step(steps), "the run ended before the kill landed"
    resumed = cli(tmp_path / "killed")
    for process in (whole, resumed):
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output
    assert "resumed from step" in output, output
    return kill_after


@pytest.mark.slow
def test_sigkill_during_sft_then_resume_equals_uninterrupted(pretrained, tmp_path):
    """Frozen embeddings (checkpoints without the base), killed after a random checkpoint, resumed: bitwise."""
    kill_after = kill_and_resume(tmp_path, [*SMALL_T5, *SFT_QUICK, f"init_from={pretrained}", FROZEN_EMBEDDINGS])
    a = load_model(tmp_path / "whole" / "checkpoints").params
    b = load_model(tmp_path / "killed" / "checkpoints").params
    assert _bitwise_equal(a, b), f"killed after checkpoint {kill_after}"


@pytest.mark.slow
def test_continued_pretraining_from_a_run_dir_keeps_its_tokenizer_and_records_its_base(pretrained, tmp_path):
    out = tmp_path / "more"
    summary = run_stage(load_config(DEFAULT_CONFIG_PATH, [
        "model={}", f"init_from={pretrained}", "train.steps=1", "train.batch_size=8", f"train.output_dir={out}",
        "train.eval_every_steps=0", "data.encoder_length=64", "data.decoder_length=16", "optim.warmup_steps=0",
        "train.export_hf=null"]), progress=False)
    meta = Checkpointer(out / "checkpoints").restore_params().meta
    assert summary["step"] == 1 and not (out / "tokenizer").exists()
    assert meta["tokenizer_dir"] == str((pretrained / "tokenizer").absolute())
    base = load_model(pretrained)
    assert meta["base"]["path"] == str(base.path) and meta["base"]["step"] == base.step == 2


def test_rouge_sample_is_fixed_validation_prompts_with_their_summaries(tmp_path):
    from llmjax.data.bundled.dialogsum import bundled_dialogsum
    from llmjax.stages.sft import rouge_sample

    config = load_config(SFT_CONFIG, ["train.rouge_examples=4", f"train.output_dir={tmp_path}"])
    prompts, references = rouge_sample(config)
    assert (prompts, references) == rouge_sample(config)  # the same sample at every evaluation
    validation = {example["summary"]: example["dialogue"] for example in bundled_dialogsum("validation")}
    assert len(prompts) == 4 and all(reference in validation for reference in references)
    assert all(validation[reference] in prompt for prompt, reference in zip(prompts, references))


def test_init_from_in_the_other_layer_layout_converts_the_weights(pretrained):
    """A scanned init source trained unrolled (and back) starts from the same weights, restacked."""
    from llmjax.models import stack_layers

    _, scanned = resolve_init(load_config(SFT_CONFIG, [f"init_from={pretrained}", "model={}"]))
    assert scanned.config.scan_layers and "layers" in scanned.params["encoder"]
    resolved, unrolled = resolve_init(load_config(SFT_CONFIG, [f"init_from={pretrained}", "model={}",
                                                               "model.scan_layers=false"]))
    assert not resolved.model.scan_layers and unrolled.model.config == resolved.model
    assert "layers_0" in unrolled.params["encoder"] and "layers" not in unrolled.params["encoder"]
    assert _bitwise_equal(stack_layers(unrolled.params, resolved.model), scanned.params)
