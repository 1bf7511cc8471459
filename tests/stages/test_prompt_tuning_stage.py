"""A stage with a ``prompt_tuning:`` section (``llmjax.stages.adapters.with_prompt_tuning``): only the soft
prompt trains and is checkpointed, the base is unchanged, the loss falls, the ROUGE hook generates after the
soft prompt, a TEXT init holds the text's embeddings, and the export is the base plus a PEFT prompt dir."""

import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llmjax import prompt_tuning
from llmjax.config import ConfigError
from llmjax.loading import load_model, open_manager
from llmjax.stages import run_stage, stage_module
from llmjax.stages.adapters import ADAPTER_SUBDIR
from tests.stages.test_sft import _metrics, _sft

N = 5
PROMPT = [f"prompt_tuning.num_virtual_tokens={N}", "data.packing=false"]
STEPS = 6


@pytest.fixture(scope="module")
def prompt_run(pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("prompt") / "run"
    summary = run_stage(_sft(pretrained, out, *PROMPT, "prompt_tuning.prompt_tuning_init=SAMPLE_VOCAB",
                             f"train.steps={STEPS}", "optim.learning_rate=0.1", "train.export_hf=hf"), progress=False)
    return out, summary


def test_prompt_tuning_trains_the_soft_prompt_alone_and_loss_falls(pretrained, prompt_run):
    out, summary = prompt_run
    assert summary["step"] == STEPS
    losses = [r["loss"] for r in _metrics(out) if r["split"] == "train"]
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.05, losses

    manager = open_manager(out / "checkpoints", read_only=True)
    saved = manager.item_metadata(STEPS)["state"]
    meta = manager.restore(STEPS, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    manager.close()
    assert set(saved["params"]) == {"soft_prompt"} and not saved.get("frozen_params")
    assert meta["prompt_tuning"]["num_virtual_tokens"] == N

    base = load_model(pretrained)
    trained = load_model(out / "checkpoints")
    for got, want in zip(jax.tree_util.tree_leaves(trained.params), jax.tree_util.tree_leaves(base.params)):
        np.testing.assert_array_equal(got, want)  # the model's weights never moved
    width = base.config.d_model
    assert trained.soft_prompt.shape == (N, width)
    embedding = np.asarray(base.params["shared"]["embedding"])
    moved = [not (embedding == row).all(axis=1).any() for row in trained.soft_prompt]
    assert all(moved)  # every row started as a vocabulary row (SAMPLE_VOCAB) and was trained away from it

    exported, cfg = prompt_tuning.from_pretrained(trained.model, summary["export"] + "/" + ADAPTER_SUBDIR)
    np.testing.assert_array_equal(exported, trained.soft_prompt)
    assert cfg.prompt_tuning_init == "SAMPLE_VOCAB" and cfg.num_virtual_tokens == N
    beside = load_model(summary["export"]).params  # the base beside it, as a Hugging Face dir
    for got, want in zip(jax.tree_util.tree_leaves(beside), jax.tree_util.tree_leaves(base.params)):
        np.testing.assert_array_equal(got, want)


def test_rouge_hook_generates_after_the_soft_prompt_and_text_init_holds_the_texts_embeddings(
        pretrained, tmp_path, monkeypatch):
    import llmjax.evaluate

    seen = []
    real = llmjax.evaluate.generate_texts
    monkeypatch.setattr(llmjax.evaluate, "generate_texts",
                        lambda *a, soft_prompt=None, **k: seen.append(soft_prompt) or real(*a, soft_prompt=soft_prompt, **k))
    text = "summarize the dialogue"
    stage = stage_module("sft").build_stage(_sft(
        pretrained, tmp_path / "run", *PROMPT, "prompt_tuning.prompt_tuning_init=TEXT",
        f"prompt_tuning.prompt_tuning_init_text='{text}'", "train.rouge_every_steps=1", "train.rouge_examples=2"))
    tree = stage.init_tree(jax.random.key(0), stage.base.params)
    ids = stage.tokenizer.encode(text, add_eos=True)  # T5 tokenizes as HF: text + eos, repeated to N rows
    expected = np.asarray(stage.base.params["shared"]["embedding"])[(ids * N)[:N]]
    np.testing.assert_array_equal(np.asarray(tree["soft_prompt"]), expected)
    assert stage.is_trainable(("soft_prompt",)) and not stage.is_trainable(("shared", "embedding"))

    scores = stage.eval_hook(tree, 1)
    assert set(scores) >= {"rouge1", "rougeL"}
    np.testing.assert_array_equal(np.asarray(seen[-1]), expected)


def test_generate_from_a_prompt_tuning_run_applies_its_soft_prompt(prompt_run, capsys):
    """``llmjax generate --model RUN`` puts the run's soft prompt first; the 3-tuple loader refuses the run
    rather than silently dropping it."""
    from llmjax.cli import main
    from llmjax.evaluate import ModelPathError, generate_texts, load_for_inference, load_model_for_inference
    from llmjax.generate import GenerationConfig

    out, _ = prompt_run
    with pytest.raises(ModelPathError, match="prompt-tuning run"):
        load_model_for_inference(out)
    model, params, tokenizer, soft_prompt = load_for_inference(out)
    assert soft_prompt.shape == (N, model.config.d_model)
    text = "#Person1#: Can I book a table for two at 7:00 pm? #Person2#: Sure."
    assert main(["generate", "--model", str(out), "--prompt", text, "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    config = GenerationConfig(max_new_tokens=8, eos_token_id=tokenizer.eos_id, pad_token_id=model.config.pad_token_id)
    with_prompt = generate_texts(model, params, tokenizer, [text], generation_config=config, soft_prompt=soft_prompt)
    without = generate_texts(model, params, tokenizer, [text], generation_config=config)
    assert with_prompt != without  # the check below can tell the two apart
    assert with_prompt[0] in printed.splitlines()


def test_resume_with_another_prompt_length_or_with_lora_is_refused_by_name(pretrained, prompt_run, tmp_path):
    out, _ = prompt_run
    shutil.copytree(out, tmp_path / "run")
    for overrides, match in (
            ([f"prompt_tuning.num_virtual_tokens={N + 1}", "data.packing=false"],
             rf"prompt_tuning.num_virtual_tokens \(checkpoint: {N}, this run: {N + 1}\)"),
            (["lora.r=2", "lora.lora_alpha=4", "lora.target_modules=[q, v]"],
             r"a lora: section \(checkpoint: none, this run: \{'r': 2, .*\}\); "
             r"a prompt_tuning: section \(checkpoint: \{'num_virtual_tokens': 5\}, this run: none\)")):
        with pytest.raises(ConfigError, match=rf"checkpoint step {STEPS} in .* was trained with other trainable "
                                              rf"parts than this run's config gives: {match}; set them back to resume"):
            run_stage(_sft(pretrained, tmp_path / "run", *overrides, f"train.steps={STEPS + 2}"), progress=False)
