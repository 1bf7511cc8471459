"""Shared helpers for Hugging Face bridge tests (any family): torch reference models, I/O, comparisons.

Import as ``from tests.hf.helpers import ...`` (pytest runs from the repository root).
"""

from __future__ import annotations

import json
from pathlib import Path

import flax.traverse_util
import numpy as np
import torch
import transformers

transformers.logging.set_verbosity_error()  # progress bars and tying notes would drown test output


def random_ids(seed: int, shape: tuple[int, ...], vocab_size: int, low: int = 2) -> np.ndarray:
    """int32 token ids in ``[low, vocab_size)`` (``low=2`` keeps pad 0 / eos 1 out)."""
    return np.random.default_rng(seed).integers(low, vocab_size, size=shape, dtype=np.int32)


def padding_mask(lengths: list[int], length: int) -> np.ndarray:
    """``[len(lengths), length]`` int32 mask, 1 for the first ``lengths[i]`` tokens of row i."""
    return (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)


def randomize_torch_norms(model: torch.nn.Module, scale: float = 0.2) -> None:
    """Norm weights ``1 + scale * N(0, 1)`` in place: at their init (all ones) two swapped norms look alike."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + scale * torch.randn_like(param))


def randomize_norm_scales(params: dict, seed: int, scale: float = 0.2) -> dict:
    """llmjax params with every norm ``scale`` drawn as ``1 + scale * N(0, 1)`` (fp32), for the same reason."""
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(params)
    for path, value in flat.items():
        if path[-1] == "scale":
            flat[path] = (1.0 + scale * rng.standard_normal(value.shape)).astype(np.float32)
    return flax.traverse_util.unflatten_dict(flat)


def save_torch_model(model: torch.nn.Module, path: Path, **kwargs) -> Path:
    """``model.save_pretrained(path)`` with safetensors (``kwargs``: e.g. ``max_shard_size="20KB"``)."""
    model.save_pretrained(str(path), safe_serialization=True, **kwargs)
    return Path(path)


def load_torch_model(auto_class, path: Path) -> torch.nn.Module:
    """Load with ``transformers`` and assert it reports no missing/unexpected/mismatched weights."""
    model, info = auto_class.from_pretrained(str(path), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}  # missing/unexpected/mismatched keys, error_msgs
    assert not problems, f"transformers loading {path} reported {problems}"
    return model.eval()


def torch_logits(model: torch.nn.Module, **inputs: np.ndarray) -> np.ndarray:
    """Forward ``model`` on numpy inputs (ints become int64 tensors); logits as fp32 numpy."""
    tensors = {k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in inputs.items()}
    with torch.no_grad():
        return model(**tensors).logits.float().numpy()


def max_abs_diff(a, b, mask: np.ndarray | None = None) -> float:
    """``max |a - b|`` over positions where ``mask [..., length]`` is nonzero (all when None)."""
    diff = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    if mask is not None:
        diff = diff[np.asarray(mask).astype(bool)]
    return float(diff.max())


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
