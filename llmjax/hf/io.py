"""Reading and writing Hugging Face model directories (config.json + safetensors).

Pickle checkpoints (``pytorch_model.bin``) are refused: unpickling runs
arbitrary code. Tensors are read through a memory map, so a large checkpoint is
not copied into memory before it is sharded. (``safetensors.safe_open(...,
framework="numpy")`` reads bf16 since 0.8 but copies every tensor, so the reader
is our own; it validates the untrusted header in full, see :func:`parse_header`.)
"""

from __future__ import annotations

import json
import math
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
_FIELDS = ("dtype", "shape", "data_offsets")  # exactly these in every tensor entry
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


class CheckpointError(UserError, ValueError):
    """A Hugging Face checkpoint llmjax cannot read or write, with the reason and the fix (the bridge's one error)."""


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory; pass a local Hugging Face model directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing; a Hugging Face model directory needs config.json")
    return _read_json(config_file)


def _read_json(file: Path):
    """The JSON value in ``file``; a file that is not JSON text is a CheckpointError."""
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def _corrupt(file: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"{file}: corrupt safetensors header: {problem}; the file is damaged or not a safetensors file, "
        "download or save it again"
    )


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """``json`` object hook: the format forbids a key twice (Python would silently keep the last)."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null")


def _naturals(value) -> bool:
    """A JSON array of non-negative integers (``true`` is not one, although Python's bool is an int)."""
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def parse_header(file: Path, header: bytes, data_size: int) -> dict[str, tuple[np.dtype, tuple[int, ...], int, int]]:
    """Validate a safetensors header -> ``{name: (dtype, shape, begin, end)}``, offsets into the data buffer.

    The file is untrusted: the header must be an object; ``__metadata__``, if present, maps strings to
    strings; every other entry is an object with exactly ``dtype`` (a known name), ``shape`` (non-negative
    integers) and ``data_offsets`` (``0 <= begin <= end``, ``end - begin`` = the shape's bytes); and the
    tensors tile the ``data_size`` bytes after the header with no overlap and no hole, as the format
    requires (so no bytes hide between tensors). Any violation raises :class:`CheckpointError` naming the
    file, the tensor and the field.
    """
    try:
        entries = json.loads(header, object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{file}: corrupt safetensors header (not JSON)") from None
    except _DuplicateKey as e:
        raise _corrupt(file, f"key {e.args[0]!r} appears twice") from None
    if not isinstance(entries, dict):
        raise _corrupt(file, f"the header is a JSON {_json_type(entries)}, expected an object of tensor entries")
    metadata = entries.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(file, f"'__metadata__' must be an object of strings, found {json.dumps(metadata)[:80]}")
    tensors = {}
    for name, entry in entries.items():
        where = f"tensor {name!r}"
        if not isinstance(entry, dict):
            raise _corrupt(file, f"{where} is a JSON {_json_type(entry)}, expected an object with {list(_FIELDS)}")
        absent, unknown = [f for f in _FIELDS if f not in entry], sorted(set(entry) - set(_FIELDS))
        if absent or unknown:
            raise _corrupt(file, f"{where} has {f'no {absent[0]!r} field' if absent else f'unknown fields {unknown}'}")
        dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype_name, str):
            raise _corrupt(file, f"{where} field 'dtype' must be a string such as \"F32\", found {dtype_name!r}")
        if dtype_name not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{file}: tensor {name!r} has unsupported dtype {dtype_name}; llmjax reads {sorted(SAFETENSORS_DTYPES)}"
            )
        if not _naturals(shape):
            raise _corrupt(file, f"{where} field 'shape' must be a list of non-negative integers, found {shape!r}")
        if not (_naturals(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
            raise _corrupt(
                file, f"{where} field 'data_offsets' must be [begin, end] with 0 <= begin <= end, found {offsets!r}"
            )
        dtype, (begin, end) = np.dtype(SAFETENSORS_DTYPES[dtype_name]), offsets
        expected_bytes = math.prod(shape) * dtype.itemsize  # Python ints: a huge shape cannot overflow
        if end - begin != expected_bytes:
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {shape} ({expected_bytes} bytes) but its data offsets "
                f"span {end - begin} bytes; the file is corrupt"
            )
        if end > data_size:
            raise CheckpointError(
                f"{file}: tensor {name!r} runs past the end of the file; the file is truncated, "
                "download or save it again"
            )
        tensors[name] = (dtype, tuple(shape), begin, end)
    _check_tiling(file, tensors, data_size)
    return tensors


def _check_tiling(file: Path, tensors: dict, data_size: int) -> None:
    """Tensors sorted by offset must start where the previous one ended and end at the buffer's end."""
    cursor, previous = 0, None
    for name, (_, _, begin, end) in sorted(tensors.items(), key=lambda item: item[1][2:]):
        if begin < cursor:
            raise _corrupt(file, f"tensor {name!r} field 'data_offsets' overlaps tensor {previous!r}")
        if begin > cursor:
            raise _corrupt(file, f"data bytes [{cursor}, {begin}) before tensor {name!r} belong to no tensor")
        cursor, previous = end, name
    if cursor != data_size:
        raise _corrupt(file, f"data bytes [{cursor}, {data_size}) after the last tensor belong to no tensor")


def load_safetensors(file: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as read-only memory-mapped arrays (bf16 included).

    The header is validated in full first (:func:`parse_header`); nothing is written anywhere.
    """
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(f"{file}: corrupt safetensors header (length {header_len} > file size)")
        if header_len > MAX_HEADER_BYTES:
            raise _corrupt(file, f"header of {header_len} bytes exceeds the format's {MAX_HEADER_BYTES}")
        header = f.read(header_len)
    data_start = 8 + header_len
    tensors = parse_header(file, header, size - data_start)
    raw = np.memmap(file, dtype=np.uint8, mode="r")
    return {
        name: raw[data_start + begin : data_start + end].view(dtype).reshape(shape)
        for name, (dtype, shape, begin, end) in tensors.items()
    }


def _read_weight_map(index: Path) -> dict[str, str]:
    """``weight_map`` of a sharded checkpoint's index: tensor name -> shard file name in the same directory."""
    content = _read_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: has no 'weight_map'; the index file is malformed")
    for name, shard in weight_map.items():
        # a plain file name: an index must not point at files outside its directory
        if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard:
            raise CheckpointError(
                f"{index}: weight_map gives tensor {name!r} the shard {shard!r}; expected a file name in "
                f"{index.parent}"
            )
    return weight_map


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a model directory: ``model.safetensors`` or a sharded index."""
    path = Path(path)
    single, index = path / WEIGHTS_NAME, path / WEIGHTS_INDEX_NAME
    if single.is_file():
        return load_safetensors(single)
    if index.is_file():
        weight_map = _read_weight_map(index)
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_file = path / shard
            if not shard_file.is_file():
                raise CheckpointError(f"{shard_file}: listed in {index.name} but missing")
            shard_tensors = load_safetensors(shard_file)
            repeated = sorted(set(shard_tensors) & set(tensors))
            if repeated:
                raise CheckpointError(f"{shard_file}: tensors {repeated[:5]} are also in another shard")
            tensors.update(shard_tensors)
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
    _write_dir(Path(path), "config.json", config, WEIGHTS_NAME, tensors)


def _write_dir(path: Path, config_name: str, config: dict, weights_name: str, tensors: dict[str, np.ndarray]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / config_name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    contiguous = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    safetensors.numpy.save_file(contiguous, str(path / weights_name), metadata={"format": "pt"})


# -- PEFT adapter directories (adapter_config.json + adapter_model.safetensors) ----------------------------

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_PICKLE_NAME = "adapter_model.bin"


# PEFT's task_type of a model, by whether it is an encoder-decoder (``Family.seq2seq``).
PEFT_TASK_TYPES = {True: "SEQ_2_SEQ_LM", False: "CAUSAL_LM"}


def read_adapter_config(path: str | Path) -> dict:
    """``adapter_config.json`` of a PEFT adapter directory as a dict (its ``peft_type`` says which kind of
    adapter it is); clear errors when the directory or file is absent or malformed."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory; pass a PEFT adapter directory "
                              f"({ADAPTER_CONFIG_NAME} + {ADAPTER_WEIGHTS_NAME})")
    config_file = path / ADAPTER_CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing; a PEFT adapter directory needs {ADAPTER_CONFIG_NAME}")
    config = _read_json(config_file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    return config


def read_adapter_dir(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(adapter_config.json as a dict, tensors)`` of a PEFT adapter directory; clear errors when absent,
    malformed or pickled."""
    config, path = read_adapter_config(path), Path(path)
    weights = path / ADAPTER_WEIGHTS_NAME
    if not weights.is_file():
        if (path / ADAPTER_PICKLE_NAME).is_file():
            raise CheckpointError(
                f"{path / ADAPTER_PICKLE_NAME}: llmjax reads only safetensors and will not unpickle an adapter; "
                "save it again with peft (model.save_pretrained(dir), safe_serialization is the default)")
        raise CheckpointError(f"{weights}: missing; a PEFT adapter directory needs {ADAPTER_WEIGHTS_NAME}")
    return config, load_safetensors(weights)


def write_adapter_dir(path: str | Path, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``path`` (created if needed)."""
    _write_dir(Path(path), ADAPTER_CONFIG_NAME, config, ADAPTER_WEIGHTS_NAME, tensors)
