"""The command line: every subcommand's --help, the data/tokenizer/import/export commands, one-line user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import transformers

from llmjax import cli
from llmjax.hf.io import read_tensors
from tests.hf.helpers import save_torch_model

COMMANDS = [
    ["train"], ["export"], ["import"], ["tokenizer", "train"], ["data", "dialogsum"], ["data", "detox"], ["data", "corpus"],
    ["generate"], ["evaluate"], ["lora", "merge"], ["calc", "memory"], ["calc", "compute"], ["quantize"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: llmjax " + " ".join(command) in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_console_script_help_runs_without_jax_import_errors():
    result = subprocess.run([sys.executable, "-m", "llmjax.cli", "--help"], capture_output=True, text=True, check=True)
    assert "train" in result.stdout and "export" in result.stdout


def test_data_and_tokenizer_commands_write_their_files(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    assert cli.main(["data", "corpus", "--out", str(corpus), "--num-documents", "300"]) == 0
    lines = corpus.read_text().splitlines()
    assert len(lines) == 300 and "text" in json.loads(lines[0])

    assert cli.main(["data", "dialogsum", "--out", str(tmp_path / "ds"), "--num-examples", "50"]) == 0
    splits = {p.stem: len(p.read_text().splitlines()) for p in (tmp_path / "ds").glob("*.jsonl")}
    assert splits == {"train": 40, "validation": 5, "test": 5}

    out = tmp_path / "tok"
    assert cli.main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "400", "--out", str(out)]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert len(hf_tok) == 400
    assert hf_tok.convert_tokens_to_ids("<extra_id_0>") == 399
    assert "trained tokenizer with 400 ids" in capsys.readouterr().out


def test_import_then_export_round_trips_bitwise(tmp_path):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch_model = transformers.LlamaForCausalLM(config)
    hf_dir = save_torch_model(torch_model, tmp_path / "hf")
    assert cli.main(["import", str(hf_dir), "--out", str(tmp_path / "ckpt")]) == 0
    assert cli.main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 0
    original, exported = read_tensors(hf_dir), read_tensors(tmp_path / "back")
    assert set(exported) == set(original)
    for name, value in exported.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(original[name]), err_msg=name)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--config", "no/such.yaml"], "no/such.yaml"),
        (["train", "train.stpes=3"], "did you mean 'train.steps'"),
        (["import", "no_such_dir", "--out", "x"], "no such directory"),
        (["export", "--checkpoint", "no_such_ckpt", "--out", "x"], "no_such_ckpt"),
        (["tokenizer", "train", "--input", "missing.txt", "--vocab-size", "400", "--out", "t"], "missing.txt"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"llmjax {argv[0]}: error: ")
    assert message in err
    assert "\n" not in err and "Traceback" not in err


def test_pickle_checkpoint_is_refused_with_conversion_hint(tmp_path, capsys):
    hf_dir = tmp_path / "pickled"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 8, "d_model": 4, "d_kv": 2,
                                                    "d_ff": 8, "num_layers": 1, "num_heads": 2}))
    (hf_dir / "pytorch_model.bin").write_bytes(b"not really a pickle")
    assert cli.main(["import", str(hf_dir), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "will not unpickle" in err and "safe_serialization=True" in err


# ---------------------------------------------------------------------------------------- bad inputs
# Each: one line on stderr, exit 2, nothing created on disk.


def _one_line_error(capsys, command: str) -> str:
    """The error line; any other stderr output may only be the training progress bar."""
    lines = capsys.readouterr().err.strip().split("\n")
    assert all("step/s" in line for line in lines[:-1]), lines
    err = lines[-1]
    assert err.startswith(f"llmjax {command}: error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_yaml_syntax_error_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text("model: {include: model/t5_tiny.yaml}\ntrain: [unclosed\n")
    assert cli.main(["train", "--config", "run.yaml"]) == 2
    err = _one_line_error(capsys, "train")
    assert "run.yaml: not valid YAML at line 3, column 1" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_every_config_problem_is_reported_in_one_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text("trian: {steps: 3}\noptim: {lerning_rate: 0.1, name: adam}\n")
    assert cli.main(["train", "--config", "run.yaml"]) == 2
    err = _one_line_error(capsys, "train")
    problems = ["unknown config key 'trian' (did you mean 'train'?)", "missing section 'model'",
                "unknown config key 'optim.lerning_rate' (did you mean 'optim.learning_rate'?)",
                "optim.name='adam' is not allowed"]
    positions = [err.find(problem) for problem in problems]
    assert -1 not in positions and positions == sorted(positions), err  # the misspelling first
    assert "4 problems: (1) " in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


@pytest.mark.parametrize("argv", [
    ["export", "--checkpoint", "missing", "--out", "hf"],
    ["generate", "--model", "missing", "--prompt", "hello"],
    ["evaluate", "--model", "missing", "--out", "report"],
    ["import", "missing", "--out", "ckpt"],
    ["quantize", "--model", "missing", "--out", "int8"],
], ids=lambda argv: argv[0])
def test_read_only_inputs_that_do_not_exist_create_nothing(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    assert "missing" in _one_line_error(capsys, argv[0])
    assert list(tmp_path.iterdir()) == []


def test_export_of_an_empty_checkpoint_dir_is_one_line_and_changes_nothing(tmp_path):
    # A subprocess: orbax used to print a traceback at interpreter exit, after the error line.
    (tmp_path / "ckpt").mkdir()
    result = subprocess.run([sys.executable, "-m", "llmjax.cli", "export", "--checkpoint", "ckpt", "--out", "hf"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "llmjax export: error: ckpt is neither a Hugging Face directory (no config.json) nor an llmjax checkpoint "
        "directory (no numbered step directories, no checkpoints/); pass one of those"]
    assert [p.name for p in tmp_path.rglob("*")] == ["ckpt"]


BAD_ROWS = [
    ('{"text": 5}', "line 2 (row 1): field 'text' must be a string, got int 5"),
    ('{"text": "unclosed', "line 2 (row 1) is not valid JSON: Unterminated string"),
    ('["text"]', "line 2 (row 1) is a JSON list, expected an object"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS, ids=["not_a_string", "malformed", "not_an_object"])
@pytest.mark.parametrize("command", ["train", "tokenizer"])
def test_bad_jsonl_rows_name_file_line_and_field(command, row, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text('{"text": "a fine first document"}\n' + row + "\n")
    if command == "train":
        argv = ["train", "data.kind=jsonl", "data.source=data.jsonl", "data.eval_source=null", "train.output_dir=run"]
    else:
        argv = ["tokenizer", "train", "--input", "data.jsonl", "--vocab-size", "400", "--out", "tok"]
    assert cli.main(argv) == 2
    assert f"data.jsonl {message}" in _one_line_error(capsys, command)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]  # no output directory left behind


def test_an_internal_bug_keeps_its_traceback(tmp_path, monkeypatch):
    # Only UserError is the user's mistake; a ValueError from inside llmjax is a bug and must not read as one.
    import llmjax.data.bundled.corpus as corpus

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(corpus, "write_corpus", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["data", "corpus", "--out", str(tmp_path / "c.jsonl")])


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    from llmjax.data.bundled.corpus import generate_corpus
    from llmjax.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(generate_corpus(2000, 0), out, vocab_size=512)
    return out


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_the_run_resumes(small_tokenizer, tmp_path,
                                                                               monkeypatch, capsys):
    from llmjax.train import checkpoint

    argv = ["train", "train.steps=10", "train.batch_size=8", "train.eval_every_steps=0", "train.export_hf=null",
            f"train.output_dir={tmp_path / 'run'}", "checkpoint.every_steps=5", "checkpoint.keep=null",
            f"data.tokenizer={small_tokenizer}", "model.num_layers=1", "model.d_model=32", "model.d_kv=8",
            "model.d_ff=64", "model.num_heads=4", "data.encoder_length=32", "data.decoder_length=8",
            "optim.warmup_steps=2"]
    checkpoints = tmp_path / "run" / "checkpoints"
    # The disk has room for the first checkpoint only (a real full disk is a tmpfs mount, which needs root).
    monkeypatch.setattr(checkpoint, "_free_bytes", lambda directory: 0 if (directory / "5").exists() else 2**40)
    assert cli.main(argv) == 2
    err = _one_line_error(capsys, "train")
    assert err.startswith(f"llmjax train: error: saving checkpoint step 10 to {checkpoints} failed: it needs about ")
    assert f"the last complete checkpoint is step 5 ({checkpoints / '5'})" in err
    checkpoint.verify_step_dir(checkpoints / "5", 5)

    monkeypatch.undo()  # space freed: the same command resumes from step 5 and finishes
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"resumed from step 5 ({checkpoints / '5'})\n")
    summary = json.loads(out[out.index("{"):])
    assert summary["start_step"] == 5 and summary["step"] == 10
