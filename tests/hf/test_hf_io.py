"""llmjax.hf.io and the family dispatch: reading directories, sharded indexes and the errors for bad files."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

import llmjax.hf
import llmjax.hf.io
from llmjax.errors import UserError
from llmjax.hf import CheckpointError
from llmjax.hf.io import load_safetensors, read_config, read_tensors
from llmjax.models.decoder import DecoderConfig

TENSORS = {
    "a.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
    "b.bias": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16),
    "c.count": np.array([7], dtype=np.int64),
}


def write_safetensors(path, tensors=TENSORS):
    safetensors.numpy.save_file(dict(tensors), str(path))
    return path


def write_raw_safetensors(path, header: dict, data: bytes):
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def test_reads_every_tensor_with_dtype_and_values(tmp_path):
    tensors = load_safetensors(write_safetensors(tmp_path / "model.safetensors"))
    assert sorted(tensors) == sorted(TENSORS)
    for name, value in TENSORS.items():
        assert tensors[name].dtype == value.dtype and np.array_equal(tensors[name], value), name


def test_sharded_index_reads_all_shards(tmp_path):
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"a.weight": TENSORS["a.weight"]})
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"b.bias": TENSORS["b.bias"]})
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                            "b.bias": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    tensors = read_tensors(tmp_path)
    assert sorted(tensors) == ["a.weight", "b.bias"]
    np.testing.assert_array_equal(tensors["a.weight"], TENSORS["a.weight"])


def test_index_errors(tmp_path):
    index_file = tmp_path / "model.safetensors.index.json"
    index_file.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="has no 'weight_map'; the index file is malformed"):
        read_tensors(tmp_path)
    index_file.write_text(json.dumps({"weight_map": {"a.weight": "shard-1.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"shard-1.safetensors: listed in model.safetensors.index.json but missing"):
        read_tensors(tmp_path)
    write_safetensors(tmp_path / "shard-1.safetensors", {"b.bias": TENSORS["b.bias"]})
    with pytest.raises(CheckpointError, match=r"tensors \['a.weight'\] are listed but in no shard"):
        read_tensors(tmp_path)


def test_missing_directory_config_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory; pass a local Hugging Face model directory"):
        read_config(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="config.json: missing; a Hugging Face model directory needs config.json"):
        llmjax.hf.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        read_config(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json found"):
        read_tensors(tmp_path)


def test_pickle_checkpoint_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=(
        r"pytorch_model.bin: llmjax reads only safetensors and will not unpickle a checkpoint.*"
        r"save_pretrained\(dir, safe_serialization=True\)"
    )):
        read_tensors(tmp_path)


def test_truncated_safetensors(tmp_path):
    file = write_safetensors(tmp_path / "model.safetensors")
    data = file.read_bytes()
    file.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="runs past the end of the file; the file is truncated"):
        load_safetensors(file)
    file.write_bytes(data[:40])  # cut inside the JSON header
    with pytest.raises(CheckpointError, match=r"corrupt safetensors header \(length \d+ > file size\)"):
        load_safetensors(file)
    file.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=r"truncated safetensors file \(5 bytes\)"):
        load_safetensors(file)


def test_unsupported_dtype_and_wrong_byte_count(tmp_path):
    file = tmp_path / "model.safetensors"
    write_raw_safetensors(file, {"x": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0")
    with pytest.raises(CheckpointError, match="tensor 'x' has unsupported dtype F8_E4M3; llmjax reads"):
        load_safetensors(file)
    write_raw_safetensors(file, {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8))
    with pytest.raises(CheckpointError, match=r"tensor 'x' has shape \[3\] \(12 bytes\) but its data offsets span 8"):
        load_safetensors(file)


def _x(**entry):
    """A header with one tensor 'x' (two F32 values at bytes [0, 8)), fields replaced by ``entry``."""
    return {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], **entry}}


# (header as JSON text or object, data bytes, expected message, does the safetensors library refuse it too?)
BAD_HEADERS = {
    "header_is_a_list": ("[1, 2]", b"", r"the header is a JSON array, expected an object of tensor entries", True),
    "entry_is_not_an_object": ({"x": [1]}, b"",
                               r"tensor 'x' is a JSON array, expected an object with \['dtype', 'shape',", True),
    "missing_dtype": ({"x": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8), r"tensor 'x' has no 'dtype' field",
                      True),
    "unknown_field": (_x(device="cuda"), bytes(8), r"tensor 'x' has unknown fields \['device'\]", False),
    "dtype_not_a_string": (_x(dtype=4), bytes(8), r"tensor 'x' field 'dtype' must be a string", True),
    "shape_not_integers": (_x(shape=[2.5]), bytes(8),
                           r"tensor 'x' field 'shape' must be a list of non-negative integers, found \[2.5\]", True),
    "shape_negative": (_x(shape=[-2]), bytes(8), r"tensor 'x' field 'shape' .* found \[-2\]", True),
    "shape_boolean": (_x(shape=[True]), bytes(8), r"tensor 'x' field 'shape' .* found \[True\]", True),
    "shape_not_a_list": (_x(shape="2"), bytes(8), r"tensor 'x' field 'shape' .* found '2'", True),
    "offsets_negative": (_x(data_offsets=[-8, 0]), bytes(8),
                         r"tensor 'x' field 'data_offsets' must be \[begin, end\] with 0 <= begin <= end, "
                         r"found \[-8, 0\]", True),
    "offsets_three_numbers": (_x(data_offsets=[0, 8, 8]), bytes(8), r"'data_offsets' .* found \[0, 8, 8\]", True),
    "offsets_reversed": (_x(shape=[0], data_offsets=[8, 0]), bytes(8), r"'data_offsets' .* found \[8, 0\]", True),
    "tensors_overlap": ({**_x(), "y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8),
                        r"tensor 'y' field 'data_offsets' overlaps tensor 'x'", True),
    "bytes_before_a_tensor": (_x(data_offsets=[4, 12]), bytes(12),
                              r"data bytes \[0, 4\) before tensor 'x' belong to no tensor", True),
    "bytes_after_the_last_tensor": (_x(), bytes(12),
                                    r"data bytes \[8, 12\) after the last tensor belong to no tensor", True),
    "metadata_not_strings": ({"__metadata__": {"format": 1}, **_x()}, bytes(8),
                             r"'__metadata__' must be an object of strings, found \{\"format\": 1\}", True),
    "duplicate_tensor_name": ('{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                              '"x": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}}', bytes(8),
                              r"key 'x' appears twice", False),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_header_is_one_line_naming_file_tensor_and_field(case, tmp_path):
    header, data, message, library_refuses = BAD_HEADERS[case]
    file = tmp_path / "model.safetensors"
    encoded = (header if isinstance(header, str) else json.dumps(header)).encode()
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    with pytest.raises(CheckpointError, match=message) as error:
        load_safetensors(file)
    text = str(error.value)
    assert text.startswith(f"{file}: ") and "\n" not in text and isinstance(error.value, UserError)
    assert list(tmp_path.iterdir()) == [file]  # reading created nothing
    # The reference implementation refuses the same files; where it does not, llmjax is stricter on
    # purpose (the format forbids duplicate names; an unknown field means an unknown writer).
    if library_refuses:
        with pytest.raises(safetensors.SafetensorError):
            with safetensors.safe_open(str(file), framework="numpy") as f:
                [f.get_tensor(name) for name in f.keys()]


def test_header_larger_than_the_format_allows(tmp_path, monkeypatch):
    monkeypatch.setattr(llmjax.hf.io, "MAX_HEADER_BYTES", 16)
    file = write_safetensors(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"header of \d+ bytes exceeds the format's 16"):
        load_safetensors(file)


def test_valid_edge_cases_read(tmp_path):
    """Scalars, empty tensors and metadata are valid safetensors and read back as written."""
    tensors = {"scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 3), ml_dtypes.bfloat16),
               "after": np.arange(3, dtype=np.int32)}
    file = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(tensors, str(file), metadata={"format": "pt"})
    loaded = load_safetensors(file)
    assert sorted(loaded) == sorted(tensors)
    for name, value in tensors.items():
        assert loaded[name].shape == value.shape and loaded[name].dtype == value.dtype, name
        np.testing.assert_array_equal(loaded[name], value)


def test_index_with_bad_shard_names_or_json(tmp_path):
    index_file = tmp_path / "model.safetensors.index.json"
    index_file.write_text("{bad")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not valid JSON"):
        read_tensors(tmp_path)
    for shard in ("../model.safetensors", 3):
        index_file.write_text(json.dumps({"weight_map": {"a.weight": shard}}))
        with pytest.raises(CheckpointError, match=r"weight_map gives tensor 'a.weight' the shard .*; expected a file"):
            read_tensors(tmp_path)
    write_safetensors(tmp_path / "one.safetensors", {"a.weight": TENSORS["a.weight"]})
    write_safetensors(tmp_path / "two.safetensors", {"a.weight": TENSORS["a.weight"]})
    index_file.write_text(json.dumps({"weight_map": {"a.weight": "one.safetensors", "b": "two.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"two.safetensors: tensors \['a.weight'\] are also in another shard"):
        read_tensors(tmp_path)


def test_cli_import_of_a_corrupt_file_is_one_line_exit_2_and_writes_nothing(tmp_path):
    """Negative data_offsets used to read the header's own bytes as weights; now the CLI refuses the file."""
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    config = {"model_type": "llama", "vocab_size": 8, "hidden_size": 4, "intermediate_size": 8,
              "num_hidden_layers": 1, "num_attention_heads": 2}
    (hf_dir / "config.json").write_text(json.dumps(config))
    write_raw_safetensors(hf_dir / "model.safetensors", _x(data_offsets=[-8, 0]), bytes(8))
    before = sorted(tmp_path.rglob("*"))
    result = subprocess.run([sys.executable, "-m", "llmjax.cli", "import", str(hf_dir), "--out", str(tmp_path / "c")],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"llmjax import: error: {hf_dir / 'model.safetensors'}: corrupt safetensors")
    assert "field 'data_offsets'" in result.stderr and result.stderr.count("\n") == 1
    assert sorted(tmp_path.rglob("*")) == before


def test_family_dispatch_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"model_type=None, which llmjax does not support; supported: \["):
        llmjax.hf.family_for_model_type(None)

    class NotAModelConfig:
        pass

    class FakeModel:
        config = NotAModelConfig()

    with pytest.raises(TypeError, match="no Hugging Face mapping for model config of type NotAModelConfig"):
        llmjax.hf.save_pretrained(FakeModel(), {}, tmp_path)
    assert llmjax.hf.family_for_config(DecoderConfig()).CONFIG_CLASS is DecoderConfig


def test_from_pretrained_rejects_unknown_override(tmp_path):
    config = {"model_type": "t5", "vocab_size": 10, "d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 1,
              "num_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"\['dtpye'\] are not fields of T5Config"):
        llmjax.hf.from_pretrained(tmp_path, dtpye="bfloat16")
