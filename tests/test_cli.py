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
    ["train"], ["export"], ["import"], ["tokenizer", "train"], ["data", "dialogsum"], ["data", "corpus"],
    ["generate"], ["evaluate"],
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
