import builtins
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmjax.batch import validate_batch
from llmjax.data.objectives import causal_lm_example, seq2seq_instruction_example, span_corruption_example
from llmjax.data.sources import (
    DataIterator,
    JsonlSource,
    MappedSource,
    Mixture,
    ParquetSource,
    file_source,
    hf_dataset_source,
    seqio_source,
    tfds_source,
)
from llmjax.errors import DataError, InputError, InputNotFoundError

EOS = 1
SENTINELS = list(range(299, 199, -1))


def _encode(text):
    """A stand-in tokenizer: one id per word (the data pipeline knows no real tokenizer)."""
    return [3 + sum(map(ord, word)) % 190 for word in text.split()]


def _rows(n):
    return [{"text": " ".join(f"w{i}x{j}" for j in range(3 + i % 7)), "id": i} for i in range(n)]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in _rows(40)) + "\n\n")
    return path


def _causal_lm(example, rng):
    return causal_lm_example(_encode(example["text"]), eos_id=EOS)


def _ids(batches):
    return [tuple(map(tuple, b["decoder_input_tokens"])) for b in batches]


# ------------------------------------------------------------------------------------------- file sources


def test_jsonl_rows_and_errors(tmp_path, jsonl):
    source = JsonlSource(jsonl, fields=["text"])
    assert len(source) == 40  # the trailing blank line is skipped
    assert source[2] == {"text": _rows(40)[2]["text"]}
    with pytest.raises(IndexError, match="index 40 out of range"):
        source[40]
    # Every row is checked when the file is opened: the error names the file, the line and the field.
    bad = tmp_path / "bad.jsonl"
    for rows, message in [
        ('{"text": "a"}\n\n{"title": "b"}\n', r"bad.jsonl line 3 \(row 1\) has no field 'text' \(it has \['title'\]\)"),
        ('{"text": "a"}\n{oops\n', r"bad.jsonl line 2 \(row 1\) is not valid JSON: Expecting property name"),
        ('[1]\n', r"bad.jsonl line 1 \(row 0\) is a JSON list, expected an object"),
        ('{"text": "a"}\n{"text": 5}\n', r"bad.jsonl line 2 \(row 1\): field 'text' must be a string, got int 5"),
        ('{"text": null}\n', r"line 1 \(row 0\) has no field 'text'"),
    ]:
        bad.write_text(rows)
        with pytest.raises(DataError, match=message):
            JsonlSource(bad, fields=["text"])
    bad.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2: not UTF-8 text"):
        JsonlSource(bad, fields=["text"])
    with pytest.raises(InputNotFoundError, match="JSONL file .*nope.jsonl does not exist"):
        JsonlSource(tmp_path / "nope.jsonl", fields=["text"])


def test_file_source_reads_jsonl_and_plain_text(tmp_path, jsonl):
    plain = tmp_path / "lines.txt"
    plain.write_text("first line\n\nsecond line\n", encoding="utf-8")
    assert [file_source(plain)[i] for i in range(2)] == [{"text": "first line"}, {"text": "second line"}]
    assert isinstance(file_source(jsonl), JsonlSource) and file_source(jsonl)[0] == {"text": _rows(1)[0]["text"]}
    with pytest.raises(InputNotFoundError, match="text file .*nope.txt does not exist"):
        file_source(tmp_path / "nope.txt")


def test_parquet_rows_and_errors(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": ["a b", None, "c"], "label": [1, 2, 3]}), path)
    source = ParquetSource(path, fields=["text"])
    assert len(source) == 3 and source[2] == {"text": "c"}
    with pytest.raises(DataError, match=r"data.parquet row 1 has no field 'text'"):
        source[1]
    with pytest.raises(DataError, match=r"data.parquet row 0 has no field 'summary' \(columns: \['text', 'label'\]\)"):
        ParquetSource(path, fields=["summary"])
    with pytest.raises(DataError, match=r"data.parquet: field 'label' must be a string column"):
        ParquetSource(path, fields=["label"])


def test_hf_datasets_json_parquet_and_disk(tmp_path, jsonl):
    from_json = hf_dataset_source(jsonl, "json", fields=["text"], cache_dir=tmp_path / "cache")
    assert len(from_json) == 40 and from_json[5] == {"text": _rows(40)[5]["text"]}
    with pytest.raises(DataError, match="field 'id' must be a string column"):
        hf_dataset_source(jsonl, "json", fields=["id"], cache_dir=tmp_path / "cache")
    from_json.dataset.save_to_disk(str(tmp_path / "saved"))
    from_disk = hf_dataset_source(tmp_path / "saved", "disk", fields=["text"])
    assert from_disk[7] == {"text": _rows(40)[7]["text"]}
    parquet = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": ["x", "y"]}), parquet)
    assert hf_dataset_source(parquet, "parquet", cache_dir=tmp_path / "cache")[1] == {"text": "y"}
    with pytest.raises(DataError, match="has no field 'summary'"):
        hf_dataset_source(jsonl, "json", fields=["summary"], cache_dir=tmp_path / "cache")
    with pytest.raises(InputError, match="format must be 'json', 'parquet' or 'disk', got 'csv'"):
        hf_dataset_source(jsonl, "csv")


def test_seqio_and_tfds_name_the_extra_when_missing(monkeypatch):
    real_import = builtins.__import__

    def no_seqio(name, *args, **kwargs):
        if name.split(".")[0] in ("seqio", "tensorflow_datasets"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_seqio)
    with pytest.raises(ImportError, match=r"pip install 'llmjax\[seqio\]'"):
        seqio_source("c4_v220_span_corruption", "train")
    with pytest.raises(ImportError, match=r"pip install 'llmjax\[seqio\]'"):
        tfds_source("c4", "train")


# ------------------------------------------------------------------------------------------- iterator


def _iterator(source, **overrides):
    options = dict(batch_size=4, decoder_length=16, seed=3)
    options.update(overrides)
    return DataIterator(source, _causal_lm, **options)


def test_batches_have_the_contract_shape(jsonl):
    batch = next(_iterator(JsonlSource(jsonl, ["text"])))
    validate_batch(batch, "causal", batch_size=4, lengths={"decoder": 16})
    assert batch["decoder_segment_ids"].max() > 1  # rows really hold several examples
    unpacked = next(_iterator(JsonlSource(jsonl, ["text"]), pack=False))
    validate_batch(unpacked, "causal", batch_size=4, lengths={"decoder": 16})
    assert "decoder_segment_ids" not in unpacked


def test_resume_gives_the_same_batches(jsonl):
    source = JsonlSource(jsonl, ["text"])
    first = _iterator(source)
    [next(first) for _ in range(7)]  # 7 batches cross an epoch boundary (about 5 batches per epoch)
    state = json.loads(json.dumps(first.state()))
    expected = [next(first) for _ in range(6)]
    resumed = _iterator(source)
    resumed.restore(state)
    got = [next(resumed) for _ in range(6)]
    assert state["epoch"] >= 1
    for a, b in zip(expected, got):
        assert sorted(a) == sorted(b)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_resume_with_span_corruption_and_chunked_documents(jsonl):
    # example_fn returns a list (a document cut in 2-word chunks): the state must point inside a document.
    def chunks(example, rng):
        tokens = _encode(example["text"])
        return [span_corruption_example(tokens[i : i + 2], rng, SENTINELS, EOS) for i in range(0, len(tokens), 2)]

    def make():
        return DataIterator(JsonlSource(jsonl, ["text"]), chunks, batch_size=2, decoder_length=8, encoder_length=8)

    first = make()
    [next(first) for _ in range(5)]
    state = first.state()
    expected = [next(first) for _ in range(5)]
    resumed = make()
    resumed.restore(state)
    assert state["offset"] > 0 or state["position"] > 0
    for a, b in zip(expected, [next(resumed) for _ in range(5)]):
        validate_batch(b, "seq2seq", batch_size=2, lengths={"encoder": 8, "decoder": 8})
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_restore_refuses_a_different_layout(jsonl):
    state = _iterator(JsonlSource(jsonl, ["text"]), seed=3).state()
    with pytest.raises(InputError, match="iterator state has seed=3 but this iterator has seed=4"):
        _iterator(JsonlSource(jsonl, ["text"]), seed=4).restore(state)


def test_epochs_are_shuffled_by_seed(jsonl):
    seen = {}

    def record(example, rng):
        seen.setdefault(key, []).append(example["id"])
        return causal_lm_example(_encode(example["text"]), eos_id=EOS)

    source = JsonlSource(jsonl)  # no fields: whole rows, id included
    for key in ["all", "again", "other seed"]:
        seed = 4 if key == "other seed" else 3
        list(DataIterator(source, record, batch_size=2, decoder_length=64, seed=seed, num_epochs=2))
    assert sorted(seen["all"][:40]) == list(range(40))  # every example exactly once per epoch
    assert seen["all"][:40] != seen["all"][40:]  # each epoch has its own order
    assert seen["all"] == seen["again"] and seen["all"] != seen["other seed"]


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_get_row_blocks_of_the_one_process_global_batches(jsonl, process_count):
    # 9 batches of 8 rows cross an epoch boundary; the global sequence must not depend on the layout.
    source = JsonlSource(jsonl, ["text"])
    single = _iterator(source, batch_size=8)
    expected, states = [], []
    for _ in range(9):
        expected.append(next(single))
        states.append(single.state())
    processes = [_iterator(source, batch_size=8, process_index=p, process_count=process_count)
                 for p in range(process_count)]
    for step, whole in enumerate(expected):
        parts = [next(process) for process in processes]
        for name, value in whole.items():
            assert all(part[name].shape[0] == 8 // process_count for part in parts)
            np.testing.assert_array_equal(np.concatenate([part[name] for part in parts]), value, err_msg=f"{step}")
        assert all(process.state() == states[step] for process in processes)
    assert single.state()["epoch"] >= 1
    # a state saved by one layout resumes exactly on another
    resumed = _iterator(source, batch_size=8, process_index=1, process_count=process_count)
    resumed.restore(json.loads(json.dumps(single.state())))
    after = next(single)
    rows = 8 // process_count
    for name, value in next(resumed).items():
        np.testing.assert_array_equal(value, after[name][rows : 2 * rows])


def test_finite_iteration_ends_on_every_process_at_the_same_batch(jsonl):
    source = JsonlSource(jsonl, ["text"])
    counts = [len(list(_iterator(source, num_epochs=1, batch_size=4, process_index=p, process_count=2)))
              for p in range(2)]
    assert counts[0] == counts[1] == len(list(_iterator(source, num_epochs=1, batch_size=4)))


def test_finite_iteration_pads_the_last_batch(jsonl):
    batches = list(_iterator(JsonlSource(jsonl, ["text"]), num_epochs=1, pack=False, batch_size=16))
    assert len(batches) == 3  # 40 examples, 16 per batch
    assert (batches[-1]["decoder_loss_weights"][8:] == 0).all() and batches[-1]["decoder_loss_weights"][7].any()


def test_too_long_example_names_its_source_index(jsonl):
    iterator = _iterator(JsonlSource(jsonl, ["text"]), decoder_length=4, shuffle=False)
    with pytest.raises(ValueError, match="example 2 has decoder length 5, longer than the row length 4"):
        next(iterator)


# ------------------------------------------------------------------------------------------- mixtures


def test_mixture_follows_weights_and_walks_each_source_without_repeats(tmp_path):
    tasks = []
    for task, size in [("a", 30), ("b", 10)]:
        path = tmp_path / f"{task}.jsonl"
        path.write_text("\n".join(json.dumps({"q": f"{task}{i}"}) for i in range(size)))
        tasks.append(MappedSource(JsonlSource(path, ["q"]), lambda row: {"prompt": row["q"]}))
    mixture = Mixture(tasks, weights=[1.0, 3.0], length=2000, seed=5)
    items = [mixture[i]["prompt"] for i in range(len(mixture))]
    share_b = np.mean([item.startswith("b") for item in items])
    assert abs(share_b - 0.75) < 0.03
    first_b = [item for item in items if item.startswith("b")][:10]
    assert sorted(first_b) == sorted(f"b{i}" for i in range(10))  # a full pass before any repeat
    again = Mixture(tasks, weights=[1.0, 3.0], length=2000, seed=5)
    assert [again[i]["prompt"] for i in range(len(again))] == items
    with pytest.raises(ValueError, match="need one weight per source"):
        Mixture(tasks, weights=[1.0])


def test_mixture_feeds_the_iterator(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"q{i} x", "a": f"a{i}"}) for i in range(12)))
    qa = JsonlSource(path, ["q", "a"])
    mixture = Mixture([qa, qa], weights=[1, 1], seed=0)

    def instruction(example, rng):
        return seq2seq_instruction_example(_encode(example["q"]), _encode(example["a"]), EOS)

    batch = next(DataIterator(mixture, instruction, batch_size=2, decoder_length=6, encoder_length=9))
    validate_batch(batch, "seq2seq", batch_size=2, lengths={"encoder": 9, "decoder": 6})
    assert (batch["decoder_segment_ids"] == [[1, 1, 2, 2, 3, 3], [1, 1, 2, 2, 3, 3]]).all()


def test_iterator_stats_count_batched_and_truncated_examples():
    long = [{"text": " ".join(["w"] * 20)}] * 3  # 21 tokens with eos: longer than a row of 8
    iterator = _iterator(long, batch_size=2, decoder_length=8, truncate=True, pack=False, shuffle=False)
    next(iterator)
    assert iterator.stats() == {"examples": 2.0, "truncated_decoder_examples": 2.0}
