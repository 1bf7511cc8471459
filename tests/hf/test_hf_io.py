"""llmjax.hf.io and the family dispatch: reading directories, sharded indexes and the errors for bad files."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

import llmjax.hf
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


def test_corrupt_headers(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]")
    with pytest.raises(CheckpointError, match=r"corrupt safetensors header \(not JSON\)"):
        load_safetensors(file)
    write_raw_safetensors(file, {"x": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0")
    with pytest.raises(CheckpointError, match="tensor 'x' has unsupported dtype F8_E4M3"):
        load_safetensors(file)
    write_raw_safetensors(file, {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8))
    with pytest.raises(CheckpointError, match=r"tensor 'x' has shape \[3\] \(12 bytes\) but its data offsets span 8"):
        load_safetensors(file)


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
