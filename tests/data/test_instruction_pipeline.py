"""Instruction tasks and batches: task specs, mixture rates, packed == unpacked loss, resume, seqio for real."""

import dataclasses
import functools
import importlib.util
import json

import jax
import numpy as np
import pytest

from llmjax.config import ConfigError, DataConfig, load_config
from llmjax.data.instruction_pipeline import build_tasks, instruction_batches, mixed_source, parse_task
from llmjax.data.instructions import InstructionDataError
from llmjax.models import build_model
from llmjax.train.lm_loss import lm_loss_fn
from tests.train.helpers import TINY

EOS, BOS = 1, 2


class CharTokenizer:
    """One id per character (ASCII fits the tiny models' 128 ids), so decoded batches read as text."""

    eos_id = EOS

    def encode(self, text, add_eos=True):
        return [ord(c) for c in text] + ([EOS] if add_eos else [])


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _config(tasks, rates=(), encoder_length=64, decoder_length=64, packing=True):
    return DataConfig(objective="instruction", tasks=tuple(tasks), task_rates=tuple(rates),
                      encoder_length=encoder_length, decoder_length=decoder_length, packing=packing)


def test_task_specs():
    builtin = parse_task("dialogsum")
    assert (builtin.spec, builtin.templates, builtin.kind, builtin.source) == ("dialogsum", "dialogsum", "bundled", "dialogsum")
    spec = parse_task("alpaca@jsonl:data/{split}.jsonl")
    assert (spec.templates, spec.kind, spec.source) == ("alpaca", "jsonl", "data/{split}.jsonl")
    with pytest.raises(InstructionDataError, match="not a built-in task"):
        parse_task("alpaca")
    with pytest.raises(InstructionDataError, match="KIND one of"):
        parse_task("alpaca@csv:x.csv")


def test_config_keys_are_validated():
    assert _config(["dialogsum"]).tasks == ("dialogsum",)
    with pytest.raises(ConfigError, match="needs data.tasks"):
        DataConfig(objective="instruction")
    with pytest.raises(ConfigError, match="data.tasks is for data.objective=instruction"):
        DataConfig(tasks=("dialogsum",))
    with pytest.raises(ConfigError, match="1 rates for 2 data.tasks"):
        _config(["dialogsum", "dialogsum_topic"], [1.0])
    config = load_config(None, ["data.objective=instruction", "data.tasks=[dialogsum, dialogsum_topic]",
                                "data.task_rates=[3, 1]"])
    assert config.data.tasks == ("dialogsum", "dialogsum_topic") and config.data.task_rates == (3.0, 1.0)


def test_file_tasks_name_missing_fields_and_splits(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [{"instruction": "Say hi.", "output": "hi"}])
    with pytest.raises(InstructionDataError, match=r"need field\(s\) \['dialogue', 'summary'\]"):
        build_tasks([f"dialogsum@jsonl:{tmp_path}/train.jsonl"], (), "train")
    with pytest.raises(InstructionDataError, match=r"put \{split\} in its path"):
        build_tasks([f"alpaca@jsonl:{tmp_path}/train.jsonl"], (), "validation")
    tasks, weights = build_tasks([f"alpaca@jsonl:{tmp_path}/{{split}}.jsonl"], (), "train")
    assert len(tasks[0].source) == 1 and weights == [1]


def test_parquet_and_datasets_files_with_the_template_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"dialogue": "#Person1#: Hi.\n#Person2#: Hello.", "summary": "They greet.", "extra": 1}] * 3
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    _write_jsonl(tmp_path / "train.jsonl", rows)
    for spec in (f"dialogsum@parquet:{tmp_path}/train.parquet", f"dialogsum@hf:{tmp_path}/train.jsonl"):
        batch = next(instruction_batches(_config([spec], encoder_length=128, decoder_length=16), CharTokenizer(),
                                         batch_format="seq2seq", batch_size=3, seed=0, num_epochs=1))
        targets = batch["decoder_target_tokens"][batch["decoder_loss_weights"] == 1]
        assert "".join("|" if t == EOS else chr(t) for t in targets) == "They greet.|" * 3, spec


def test_mixture_rates_are_observed(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [{"q": f"a{i}", "a": "x"} for i in range(40)])
    b = _write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"b{i}", "output": "y"} for i in range(60)])
    templates = tmp_path / "qa.json"
    templates.write_text(json.dumps([{"prompt": "{q}", "response": "{a}"}]))
    tasks, weights = build_tasks([f"{templates}@jsonl:{a}", f"alpaca@jsonl:{b}"], (0.8, 0.2), "train")
    rows = mixed_source(tasks, weights, seed=0)
    # 100 items by default (the tasks' sizes); a longer mixture for the statistics.
    from llmjax.data.sources import Mixture

    rows = Mixture(rows.sources, weights, length=20_000, seed=0)
    share = np.mean([rows[i]["task"] == 0 for i in range(len(rows))])
    assert abs(share - 0.8) < 0.01, share  # binomial sd 0.0028
    # Default rates: proportional to task sizes (40 : 60).
    _, weights = build_tasks([f"{templates}@jsonl:{a}", f"alpaca@jsonl:{b}"], (), "train")
    assert weights == [40, 60]


def test_batches_follow_the_seed_and_resume(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"instruction": f"task {i}", "output": f"out {i}"} for i in range(30)])
    config = _config([f"alpaca@jsonl:{path}"], decoder_length=128)
    make = lambda seed: instruction_batches(config, CharTokenizer(), batch_format="causal", batch_size=2, seed=seed,  # noqa: E731
                                            bos_id=BOS)
    first = [next(it) for it in [make(0)] for _ in range(4)]
    second = make(0)
    for batch in first:
        np.testing.assert_array_equal(next(second)["decoder_input_tokens"], batch["decoder_input_tokens"])
    assert not np.array_equal(next(make(1))["decoder_input_tokens"], first[0]["decoder_input_tokens"])
    it = make(0)
    next(it), next(it)
    resumed = make(0)
    resumed.restore(it.state())
    np.testing.assert_array_equal(next(resumed)["decoder_target_tokens"], first[2]["decoder_target_tokens"])
    # Every row decodes to whole examples: each trained span is an "out N" followed by eos.
    targets, weights = first[0]["decoder_target_tokens"], first[0]["decoder_loss_weights"]
    trained = "".join("|" if t == EOS else chr(t) for t in targets[weights == 1])
    assert trained.count("|") == first[0]["decoder_segment_ids"].max(axis=1).sum()
    assert all(span.startswith("out ") for span in trained.split("|")[:-1])


class SentinelCharTokenizer(CharTokenizer):
    num_extra_ids = 3

    def sentinel_id(self, i):
        return 125 - i  # '}', '|', '{': not in the test's texts


def test_span_corruption_task_mixes_pretraining_examples_into_sft(tmp_path):
    docs = _write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document number {i} says hello"} for i in range(20)])
    qa = _write_jsonl(tmp_path / "qa.jsonl", [{"instruction": f"task {i}", "output": f"out {i}"} for i in range(20)])
    config = _config([f"alpaca@jsonl:{qa}", f"span_corruption@jsonl:{docs}"], rates=[0.5, 0.5], packing=False)
    it = instruction_batches(config, SentinelCharTokenizer(), batch_format="seq2seq", batch_size=16, seed=0)
    batch = next(it)
    sentinel_rows = [row for row in range(16) if 125 in batch["encoder_input_tokens"][row]]
    assert 0 < len(sentinel_rows) < 16  # both tasks are present
    for row in sentinel_rows:
        inputs = "".join(chr(t) for t in batch["encoder_input_tokens"][row] if t > EOS)
        targets = "".join(chr(t) for t, w in zip(batch["decoder_target_tokens"][row],
                                                 batch["decoder_loss_weights"][row]) if w and t != EOS)
        assert inputs.startswith("document") or targets.startswith("}")
        assert targets.startswith("}")  # the targets open with the first sentinel
        assert len(targets) < len(inputs)  # 15% noise: the inputs keep most of the document
    assert parse_task("span_corruption").source == "corpus"  # built-in: the bundled corpus
    with pytest.raises(InstructionDataError, match="encoder-decoder"):
        instruction_batches(config, SentinelCharTokenizer(), batch_format="causal", batch_size=2, seed=0)
    short = _config([f"span_corruption@jsonl:{docs}"], encoder_length=64, decoder_length=4)
    with pytest.raises(InstructionDataError, match="raise data.decoder_length"):
        instruction_batches(short, SentinelCharTokenizer(), batch_format="seq2seq", batch_size=2, seed=0)


def _total_loss(batches, params, loss_fn):
    total, tokens = 0.0, 0
    for batch in batches:
        _, sums = loss_fn(params, {k: jax.numpy.asarray(v) for k, v in batch.items()}, None)
        total, tokens = total + float(sums["loss"]), tokens + int(sums["weights"])
    return total / tokens, tokens


@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_packed_target_only_loss_equals_unpacked(family, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}" * (1 + i % 3)},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(9)]
    path = _write_jsonl(tmp_path / "chat.jsonl", rows)
    layers = {"t5": {"num_layers": 1}, "decoder": {"num_hidden_layers": 1}}[family]  # one layer: quick to compile
    model = build_model(dataclasses.replace(TINY[family], **layers))
    params = jax.jit(model.init)(jax.random.key(0), np.ones((1, 8), np.int32),
                                 *([np.ones((1, 8), np.int32)] if family == "t5" else []))["params"]
    loss_fn = jax.jit(lm_loss_fn(model))
    batch_format = {"t5": "seq2seq", "decoder": "causal"}[family]
    common = dict(batch_format=batch_format, seed=0, bos_id=BOS, shuffle=False, num_epochs=1)
    packed = list(instruction_batches(_config([f"chat@jsonl:{path}"], encoder_length=48, decoder_length=96),
                                      CharTokenizer(), batch_size=4, **common))
    unpacked = list(instruction_batches(_config([f"chat@jsonl:{path}"], encoder_length=48, decoder_length=96,
                                                packing=False), CharTokenizer(), batch_size=9, **common))
    assert len(unpacked) == 1 and "decoder_segment_ids" not in unpacked[0]
    assert sum(int(b["decoder_segment_ids"].max(axis=1).sum()) for b in packed) == 9
    assert max(int(b["decoder_segment_ids"].max()) for b in packed) >= 2  # rows really hold several examples
    packed_loss, packed_tokens = _total_loss(packed, params, loss_fn)
    unpacked_loss, unpacked_tokens = _total_loss(unpacked, params, loss_fn)
    # Target-only: the trained tokens are the 9 answers plus their eos, nothing else.
    assert packed_tokens == unpacked_tokens == sum(len(f"answer {i}") + 1 for i in range(9))
    # Equal up to fp32 summation order: ~1e-7 relative (the mean is ~4.8 = ln 128 at init).
    assert abs(packed_loss - unpacked_loss) <= 1e-6 * unpacked_loss, (packed_loss, unpacked_loss)


# ---------------------------------------------------------------------------------------------------- seqio

requires_seqio = pytest.mark.skipif(importlib.util.find_spec("seqio") is None,
                                    reason="seqio is not installed: pip install 'llmjax[seqio]' to run these tests")


@pytest.fixture(scope="module")
def seqio_mixture():
    """Two seqio Tasks over in-memory data (seqio's own rekey preprocessor) and a Mixture of them at 1:3."""
    import seqio
    import tensorflow as tf

    data = {"train": {"question": [f"q{i}" for i in range(20)], "answer": [f"a{i}" for i in range(20)]},
            "validation": {"question": ["qv"], "answer": ["av"]}}

    def dataset_fn(split, shuffle_files, seed=None):
        del shuffle_files, seed
        return tf.data.Dataset.from_tensor_slices(data[split])

    source = seqio.FunctionDataSource(dataset_fn, splits=("train", "validation"))
    text = seqio.Feature(seqio.PassThroughVocabulary(1), dtype=tf.string, add_eos=False, rank=0)
    features = {"inputs": text, "targets": text}
    for name, key_map in (("llmjax_test_ask", {"inputs": "question", "targets": "answer"}),
                          ("llmjax_test_echo", {"inputs": "answer", "targets": "question"})):
        if name not in seqio.TaskRegistry.names():
            seqio.TaskRegistry.add(name, source=source, output_features=features,
                                   preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map=key_map)])
    if "llmjax_test_mix" not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add("llmjax_test_mix", [("llmjax_test_ask", 1.0), ("llmjax_test_echo", 3.0)])
    return "llmjax_test_mix"


@requires_seqio
def test_seqio_task_feeds_the_pipeline(seqio_mixture):
    config = _config(["inputs_targets@seqio:llmjax_test_ask"], encoder_length=16, decoder_length=8, packing=False)
    batch = next(instruction_batches(config, CharTokenizer(), batch_format="seq2seq", batch_size=20, seed=0, shuffle=False))
    inputs = ["".join(map(chr, row[row > EOS])) for row in batch["encoder_input_tokens"]]
    targets = ["".join(map(chr, row[row > EOS])) for row in batch["decoder_target_tokens"]]
    assert inputs == [f"q{i}" for i in range(20)] and targets == [f"a{i}" for i in range(20)]
    validation = build_tasks(["inputs_targets@seqio:llmjax_test_ask"], (), "validation")[0]
    assert validation[0].source[0] == {"inputs": "qv", "targets": "av"}


@requires_seqio
def test_seqio_mixture_expands_to_its_tasks_at_its_rates(seqio_mixture):
    tasks, weights = build_tasks([f"inputs_targets@seqio:{seqio_mixture}", "dialogsum"], (0.5, 0.5), "train")
    assert [task.name for task in tasks] == [f"inputs_targets@seqio:{seqio_mixture}/llmjax_test_ask",
                                             f"inputs_targets@seqio:{seqio_mixture}/llmjax_test_echo", "dialogsum"]
    assert weights == pytest.approx([0.125, 0.375, 0.5])
    config = dataclasses.replace(_config([f"inputs_targets@seqio:{seqio_mixture}"], decoder_length=32), packing=False)
    batch = next(instruction_batches(config, CharTokenizer(), batch_format="causal", batch_size=400, seed=0, bos_id=BOS))
    answers = ["".join(chr(t) for t, w in zip(row, weights_row) if w and t != EOS)
               for row, weights_row in zip(batch["decoder_target_tokens"], batch["decoder_loss_weights"])]
    echo_share = np.mean([answer.startswith("q") for answer in answers])  # the echo task answers with the question
    assert abs(echo_share - 0.75) < 0.07, echo_share  # 400 draws at 3:1, sd 0.022
