"""`llmjax generate` / `llmjax evaluate` with `--adapter DIR` (repeatable, kinds mixed): each PEFT adapter in turn
on the model loaded once; a LoRA adapter gives what the model with it merged into its files gives, a prompt-tuning
adapter what the base gives with its soft prompt."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from llmjax import hf, lora, prompt_tuning
from llmjax.cli import main
from llmjax.data.tokenizer import Tokenizer
from llmjax.evaluate import adapter_names, evaluate_dataset, generate_texts, load_examples, load_generation_config, \
    load_model_for_inference
from llmjax.errors import InputError
from tests.test_cli_generate_evaluate import blocks, expected_texts, t5_dir  # noqa: F401 (t5_dir is a fixture)
from tests.test_evaluate import tokenizer_dir  # noqa: F401 (a fixture)

PROMPTS = ["#Person1#: Where is the bank?", "Hello there"]
CFG = lora.LoraConfig(r=4, lora_alpha=8, target_modules=("q", "v", "wo"))
PT_CFG = prompt_tuning.PromptTuningConfig(num_virtual_tokens=3)


@pytest.fixture(scope="module")
def adapters(t5_dir, tmp_path_factory):  # noqa: F811
    """Two random adapters on the tiny T5 (B drawn, not zero) as PEFT dirs ``one/adapter`` (LoRA) and
    ``two/adapter`` (DoRA, its magnitudes drawn too), and for each the model with it merged as a Hugging Face dir:
    ``[(adapter dir, merged dir), ...]``."""
    model, params, _ = load_model_for_inference(t5_dir)
    root = tmp_path_factory.mktemp("adapters")
    pairs = []
    for seed, (name, cfg) in enumerate((("one", CFG), ("two", dataclasses.replace(CFG, use_dora=True)))):
        fresh = lora.init(model, params, cfg, jax.random.key(seed))

        def draw(path, x, s=seed):
            if path[-1].key == "lora_B":
                return np.asarray(jax.random.normal(jax.random.key(100 + s), x.shape)) * 0.5
            if path[-1].key == lora.MAGNITUDE:
                return np.asarray(x) * np.asarray(jax.random.uniform(jax.random.key(200 + s), x.shape, minval=0.5,
                                                                     maxval=1.5))
            return np.asarray(x)

        drawn = jax.tree_util.tree_map_with_path(draw, fresh)
        lora.save_pretrained(model, drawn, cfg, root / name / "adapter")
        hf.save_pretrained(model, jax.tree_util.tree_map(np.asarray, lora.merge(params, drawn, cfg)), root / name / "merged")
        Tokenizer.load(t5_dir).save_pretrained(root / name / "merged")
        pairs.append((root / name / "adapter", root / name / "merged"))
    return pairs


def test_generate_runs_each_adapter_on_the_base_loaded_once(t5_dir, adapters, capsys, monkeypatch):  # noqa: F811
    import llmjax.evaluate

    loads = []
    real = llmjax.evaluate.load_model
    monkeypatch.setattr(llmjax.evaluate, "load_model", lambda path: loads.append(path) or real(path))
    (one, merged_one), (two, merged_two) = adapters
    args = ["generate", "--model", str(t5_dir), "--prompt", *PROMPTS, "--max-new-tokens", "6"]
    assert main([*args, "--adapter", str(one), "--adapter", str(two)]) == 0
    assert loads == [t5_dir]  # the base is read once for both adapters
    texts_one, texts_two = (expected_texts(d, PROMPTS, max_new_tokens=6) for d in (merged_one, merged_two))
    assert texts_one != texts_two  # the adapters make different models
    assert capsys.readouterr().out == (f"=== adapter one_adapter ===\n{blocks(texts_one, [1, 2])}"
                                       f"=== adapter two_adapter ===\n{blocks(texts_two, [1, 2])}")


def test_evaluate_writes_one_report_per_adapter_equal_to_the_merged_models(t5_dir, adapters, tmp_path, capsys):  # noqa: F811
    (one, merged_one), (two, merged_two) = adapters
    args = ["evaluate", "--data", "bundled", "--limit", "2", "--template", "tldr", "--max-input-tokens", "1000",
            "--max-new-tokens", "4"]
    assert main([*args, "--model", str(t5_dir), "--adapter", str(one), "--adapter", str(two),
                 "--out", str(tmp_path / "both")]) == 0
    for name, adapter, merged in (("one_adapter", one, merged_one), ("two_adapter", two, merged_two)):
        assert main([*args, "--model", str(merged), "--out", str(tmp_path / name)]) == 0
        ours = json.loads((tmp_path / "both" / name / "scores.json").read_text())
        theirs = json.loads((tmp_path / name / "scores.json").read_text())
        assert ours["results"] == theirs["results"] and ours["settings"]["adapter"] == str(adapter)
        assert (tmp_path / "both" / name / "predictions.jsonl").read_text() == \
            (tmp_path / name / "predictions.jsonl").read_text()
    predictions = [(tmp_path / "both" / n / "predictions.jsonl").read_text() for n in ("one_adapter", "two_adapter")]
    assert predictions[0] != predictions[1]
    # One adapter: its report goes to --out itself.
    assert main([*args, "--model", str(t5_dir), "--adapter", str(one), "--out", str(tmp_path / "one")]) == 0
    assert (tmp_path / "one" / "predictions.jsonl").read_text() == predictions[0]


def test_adapter_names_and_errors(t5_dir, adapters, tmp_path, capsys):  # noqa: F811
    assert adapter_names(["runs/a/hf/adapter", "runs/b/hf/adapter", "x/other"]) == ["a_hf_adapter", "b_hf_adapter", "other"]
    assert adapter_names(["/r/a/b", "/r/c/a_b", "/r/d/b"]) == ["r_a_b", "r_c_a_b", "r_d_b"]  # "a_b" twice: whole paths
    assert adapter_names(["one", "two"]) == ["one", "two"]
    with pytest.raises(InputError, match="the same adapter directory is given twice"):
        adapter_names(["a/adapter", "a/adapter"])
    args = ["generate", "--model", str(t5_dir), "--prompt", "hi", "--max-new-tokens", "2"]
    assert main([*args, "--adapter", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.fixture(scope="module")
def soft_prompt_dir(t5_dir, tmp_path_factory):  # noqa: F811
    """A PEFT prompt-tuning dir for the tiny T5 written by ``prompt_tuning.save_pretrained``: ``(dir, soft prompt)``."""
    model, params, _ = load_model_for_inference(t5_dir)
    soft_prompt = prompt_tuning.init(model, params, PT_CFG, jax.random.key(7))
    directory = tmp_path_factory.mktemp("prompts") / "pt" / "adapter"
    prompt_tuning.save_pretrained(model, soft_prompt, PT_CFG, directory)
    return directory, np.asarray(soft_prompt)


def test_generate_mixes_prompt_tuning_and_lora_adapters(t5_dir, adapters, soft_prompt_dir, capsys):  # noqa: F811
    (one, merged_one), _ = adapters
    directory, soft_prompt = soft_prompt_dir
    args = ["generate", "--model", str(t5_dir), "--prompt", *PROMPTS, "--max-new-tokens", "6"]
    assert main([*args, "--adapter", str(directory), "--adapter", str(one)]) == 0
    model, params, tokenizer = load_model_for_inference(t5_dir)
    config = dataclasses.replace(load_generation_config(t5_dir), max_new_tokens=6)
    prompted = generate_texts(model, params, tokenizer, PROMPTS, generation_config=config, rng=jax.random.key(0),
                              soft_prompt=soft_prompt)
    assert prompted != expected_texts(t5_dir, PROMPTS, max_new_tokens=6)  # the soft prompt changes the output
    assert capsys.readouterr().out == (f"=== adapter pt_adapter ===\n{blocks(prompted, [1, 2])}"
                                       f"=== adapter one_adapter ===\n"
                                       f"{blocks(expected_texts(merged_one, PROMPTS, max_new_tokens=6), [1, 2])}")


def test_evaluate_with_a_prompt_tuning_adapter(t5_dir, soft_prompt_dir, tmp_path, capsys):  # noqa: F811
    directory, soft_prompt = soft_prompt_dir
    data = tmp_path / "short.jsonl"  # short dialogues: on long ones the random tiny T5 says the same with any prompt
    data.write_text("".join(json.dumps({"id": str(i), "dialogue": f"#Person1#: {text}", "summary": "x"}) + "\n"
                            for i, text in enumerate(PROMPTS)))
    assert main(["evaluate", "--model", str(t5_dir), "--adapter", str(directory), "--data", str(data),
                 "--template", "summarize", "--max-new-tokens", "4", "--out", str(tmp_path / "out")]) == 0
    model, params, tokenizer = load_model_for_inference(t5_dir)
    config = dataclasses.replace(load_generation_config(t5_dir), max_new_tokens=4)
    examples = load_examples(data, None)
    expected, base = (evaluate_dataset(model, params, tokenizer, examples, "summarize", generation_config=config,
                                       rng=jax.random.key(0), soft_prompt=prompt) for prompt in (soft_prompt, None))
    assert expected.predictions != base.predictions
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["prediction"] for line in lines] == expected.predictions
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["settings"]["adapter"] == str(directory)


def test_unknown_adapter_kind_is_a_user_error(t5_dir, soft_prompt_dir, tmp_path, capsys):  # noqa: F811
    directory, _ = soft_prompt_dir
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    args = ["generate", "--model", str(t5_dir), "--prompt", "hi", "--max-new-tokens", "2"]
    assert main([*args, "--adapter", str(directory), "--adapter", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # every adapter is checked before the first runs
    assert "peft_type='IA3' is not supported" in captured.err and "'LORA' or 'PROMPT_TUNING'" in captured.err
