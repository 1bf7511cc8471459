"""`llmjax generate` and `llmjax evaluate` through `llmjax.cli.main` (and one real subprocess).

Each command's output is checked against the library calls it stands for (llmjax.evaluate), on the
tiny random models and tokenizer of tests/test_evaluate.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from llmjax.cli import main
from llmjax.evaluate import (
    build_prompts,
    compare_shots,
    generate_texts,
    load_examples,
    load_generation_config,
    load_model_for_inference,
    scores_table,
)
from tests.test_evaluate import save_model_dir, tokenizer_dir  # noqa: F401  (tokenizer_dir is a fixture)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def t5_dir(tokenizer_dir, tmp_path_factory):  # noqa: F811
    return save_model_dir("t5", tokenizer_dir, tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def decoder_dir(tokenizer_dir, tmp_path_factory):  # noqa: F811
    return save_model_dir("decoder", tokenizer_dir, tmp_path_factory.mktemp("decoder"))


def expected_texts(model_dir, prompts, seed=0, batch_size=8, **decoding):
    model, params, tokenizer = load_model_for_inference(model_dir)
    config = dataclasses.replace(load_generation_config(model_dir), **decoding)
    return generate_texts(model, params, tokenizer, prompts, generation_config=config, batch_size=batch_size,
                          rng=jax.random.key(seed))


def blocks(output: str, ids) -> str:
    return "".join(f"--- {i} ---\n{text}\n" for i, text in zip(ids, output))


@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_generate_prompts(family, t5_dir, decoder_dir, capsys):
    model_dir = t5_dir if family == "t5" else decoder_dir
    prompts = ["#Person1#: Where is the bank?", "Hello there"]
    assert main(["generate", "--model", str(model_dir), "--prompt", *prompts, "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == blocks(expected_texts(model_dir, prompts, max_new_tokens=5), [1, 2])


def test_generate_with_repetition_settings(decoder_dir, capsys):
    prompts = ["#Person1#: Where is the bank?", "Hello there"]
    args = ["generate", "--model", str(decoder_dir), "--prompt", *prompts, "--max-new-tokens", "12",
            "--no-repeat-ngram-size", "2", "--repetition-penalty", "1.3"]
    assert main(args) == 0
    expected = expected_texts(decoder_dir, prompts, max_new_tokens=12, no_repeat_ngram_size=2, repetition_penalty=1.3)
    assert capsys.readouterr().out == blocks(expected, [1, 2])
    assert expected != expected_texts(decoder_dir, prompts, max_new_tokens=12)  # the flags change the output


def test_generate_input_file_with_template_and_sampling(t5_dir, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("#Person1#: Hi.\n#Person2#: Hello.\n\n\n#Person1#: Bye.\n")
    args = ["generate", "--model", str(t5_dir), "--input-file", str(tmp_path / "prompts.txt"), "--template", "tldr",
            "--max-new-tokens", "4", "--do-sample", "--top-k", "20", "--temperature", "0.7", "--seed", "3",
            "--show-prompt"]
    assert main(args) == 0
    out = capsys.readouterr().out
    prompts = ["#Person1#: Hi.\n#Person2#: Hello.\n\nTL;DR: ", "#Person1#: Bye.\n\nTL;DR: "]
    outputs = expected_texts(t5_dir, prompts, seed=3, max_new_tokens=4, do_sample=True, top_k=20, temperature=0.7)
    assert out == "".join(f"--- {i} ---\nprompt: {p}\n{o}\n" for i, p, o in zip([1, 2], prompts, outputs))
    assert main(args) == 0 and capsys.readouterr().out == out  # same seed, same samples


def test_generate_dataset_with_shots_and_beams(t5_dir, capsys):
    args = ["generate", "--model", str(t5_dir), "--dataset", "bundled-dialogsum", "--limit", "2", "--shots", "1",
            "--max-input-tokens", "1000", "--max-new-tokens", "4", "--num-beams", "2", "--early-stopping", "true"]
    assert main(args) == 0
    examples = load_examples("bundled", "test", 2)
    model, _, tokenizer = load_model_for_inference(t5_dir)
    prompts, kept = build_prompts(model, tokenizer, examples, "summarize", shots=1,
                                  shot_pool=load_examples("bundled", "train"), max_input_tokens=1000)
    assert kept == [1, 1]
    outputs = expected_texts(t5_dir, prompts, max_new_tokens=4, num_beams=2, early_stopping=True)
    assert capsys.readouterr().out == "".join(
        f"--- {e['id']} ---\n{o}\nreference: {e['summary']}\n" for e, o in zip(examples, outputs))


def test_evaluate_writes_report_equal_to_library_run(t5_dir, tmp_path, capsys):
    out_dir = tmp_path / "eval"
    args = ["evaluate", "--model", str(t5_dir), "--data", "bundled", "--limit", "2", "--template", "tldr",
            "--shots", "0", "1", "--max-input-tokens", "1000", "--max-new-tokens", "4", "--out", str(out_dir)]
    assert main(args) == 0
    model, params, tokenizer = load_model_for_inference(t5_dir)
    config = dataclasses.replace(load_generation_config(t5_dir), max_new_tokens=4)
    results = compare_shots(model, params, tokenizer, load_examples("bundled", "test", 2), "tldr", (0, 1),
                            shot_pool=load_examples("bundled", "train"), max_input_tokens=1000,
                            generation_config=config, rng=jax.random.key(0))
    assert capsys.readouterr().out == (f"{scores_table(results)}\nwrote {out_dir / 'scores.json'}, "
                                       f"{out_dir / 'predictions.jsonl'} and {out_dir / 'report.md'}\n")
    scores = json.loads((out_dir / "scores.json").read_text())
    assert {name: r["scores"] for name, r in scores["results"].items()} == {n: r.scores for n, r in results.items()}
    settings = scores["settings"]
    assert [settings[key] for key in ("model", "data", "split", "limit")] == [str(t5_dir), "bundled", "test", 2]
    assert settings["generation_config"]["max_new_tokens"] == 4
    assert settings["generation_config"]["decoder_start_token_id"] == 0
    assert (settings["template"], settings["num_examples"]) == ("tldr", 2)
    assert scores_table(results) in (out_dir / "report.md").read_text()


@pytest.mark.slow
def test_evaluate_in_a_subprocess(decoder_dir, tmp_path):
    script = REPO / ".venv" / "bin" / "llmjax"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "llmjax.cli"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        command + ["evaluate", "--model", str(decoder_dir), "--limit", "2", "--max-new-tokens", "3",
                   "--max-input-tokens", "400", "--out", str(tmp_path / "eval")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(
        "| setting | references | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | BLEU | Exact match |\n")
    assert "| 0-shot | all |" in done.stdout and "| 0-shot | first |" in done.stdout
    assert json.loads((tmp_path / "eval" / "scores.json").read_text())["settings"]["num_examples"] == 2

    done = subprocess.run(command + ["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (f"llmjax generate: error: model directory {tmp_path / 'nowhere'} does not exist; pass a "
                           "Hugging Face directory (config.json + model.safetensors) or an llmjax checkpoint or run directory\n")


@pytest.mark.parametrize("extra, message", [
    (["--template", "nope", "--limit", "1"],
     "llmjax evaluate: error: unknown prompt template 'nope'; choose one of summarize,"),
    (["--top-p", "1.5"], "llmjax evaluate: error: GenerationConfig: top_p=1.5 must be in (0, 1]"),
    (["--no-repeat-ngram-size", "-1"],
     "llmjax evaluate: error: GenerationConfig: no_repeat_ngram_size=-1 must be an integer >= 0"),
    (["--repetition-penalty", "0"],
     "llmjax evaluate: error: GenerationConfig: repetition_penalty=0.0 must be a finite number > 0"),
    (["--min-new-tokens", "9", "--max-new-tokens", "3"],
     "llmjax evaluate: error: GenerationConfig: min_new_tokens=9 exceeds"),
    (["--data", "/no/such/data"], "llmjax evaluate: error: DialogSum path /no/such/data does not exist"),
    (["--limit", "0"], "llmjax evaluate: error: limit must be >= 1, got 0"),
])
def test_evaluate_user_errors_exit_2(t5_dir, tmp_path, capsys, extra, message):
    assert main(["evaluate", "--model", str(t5_dir), "--out", str(tmp_path), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.err.count("\n") == 1 and captured.out == ""


def test_generate_user_errors_exit_2(t5_dir, tmp_path, capsys):
    cases = [
        (["--model", str(tmp_path), "--prompt", "x"], f"{tmp_path} is neither a Hugging Face directory"),
        (["--model", str(t5_dir), "--prompt", "x", "--shots", "1"], "--shots needs --template"),
        (["--model", str(t5_dir), "--input-file", str(tmp_path / "none.txt")],
         f"input file {tmp_path / 'none.txt'} does not exist"),
        (["--model", str(t5_dir), "--prompt", "x", "--num-beams", "0"],
         "GenerationConfig: num_beams=0 must be a positive integer"),
    ]
    for args, message in cases:
        assert main(["generate", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"llmjax generate: error: {message}") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:  # argparse: a malformed option value
        main(["generate", "--model", str(t5_dir), "--prompt", "x", "--num-beams", "two"])
    assert exit_info.value.code == 2
    assert "argument --num-beams: invalid int value: 'two'" in capsys.readouterr().err
