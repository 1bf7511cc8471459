"""Reading and writing Hugging Face model directories (config.json + safetensors).

Pickle checkpoints (``pytorch_model.bin``) are refused: unpickling runs
arbitrary code. Tensors are read through a memory map, so a large checkpoint is
not copied into memory before it is sharded.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors.numpy
from llmjax.errors import UserError

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


class CheckpointError(UserError, ValueError):
    """A Hugging Face directory that llmjax cannot read, with the reason and the fix."""


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory; pass a local Hugging Face model directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing; a Hugging Face model directory needs config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None


def load_safetensors(file: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as read-only memory-mapped arrays (bf16 included)."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(f"{file}: corrupt safetensors header (length {header_len} > file size)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file}: corrupt safetensors header (not JSON)") from None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    raw = np.memmap(file, dtype=np.uint8, mode="r")
    tensors = {}
    for name, info in header.items():
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        expected_bytes = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - begin != expected_bytes:
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {info['shape']} ({expected_bytes} bytes) but its data offsets "
                f"span {end - begin} bytes; the file is corrupt"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{file}: tensor {name!r} runs past the end of the file; the file is truncated, "
                "download or save it again"
            )
        tensors[name] = raw[data_start + begin : data_start + end].view(dtype).reshape(info["shape"])
    return tensors


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a model directory: ``model.safetensors`` or a sharded index."""
    path = Path(path)
    single, index = path / WEIGHTS_NAME, path / WEIGHTS_INDEX_NAME
    if single.is_file():
        return load_safetensors(single)
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: has no 'weight_map'; the index file is malformed")
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_file = path / shard
            if not shard_file.is_file():
                raise CheckpointError(f"{shard_file}: listed in {index.name} but missing")
            tensors.update(load_safetensors(shard_file))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{index}: tensors {missing[:5]} are listed but in no shard")
        return tensors
    pickled = [name for name in PICKLE_NAMES if (path / name).exists()]
    if pickled:
        raise CheckpointError(
            f"{path / pickled[0]}: llmjax reads only safetensors and will not unpickle a checkpoint "
            "(unpickling can run arbitrary code). Convert it once with transformers: "
            "AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
        )
    raise CheckpointError(f"{path}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} found")


def write_model_dir(path: str | Path, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``path`` (created if needed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    contiguous = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    safetensors.numpy.save_file(contiguous, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
