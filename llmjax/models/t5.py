"""T5 encoder-decoder: v1.0 (ReLU, tied embeddings), v1.1 and FLAN-T5 (gated GELU, untied head)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from llmjax.models.layers import ACTIVATIONS


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Dimensions of a T5-family model. Field names follow Hugging Face ``T5Config``."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: same as num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (v1.0), "gated-gelu" (v1.1 / FLAN-T5), "gated-silu", ...
    tie_word_embeddings: bool = True
    initializer_factor: float = 1.0
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    dtype: str = "float32"        # compute dtype ("bfloat16" for training)
    param_dtype: str = "float32"  # storage dtype of the master weights

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            if getattr(self, name) <= 0:
                raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
        if self.num_decoder_layers is not None and self.num_decoder_layers <= 0:
            raise ValueError(f"T5Config.num_decoder_layers must be positive, got {self.num_decoder_layers}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"T5Config.feed_forward_proj={self.feed_forward_proj!r}: activation {self.activation!r} "
                f"is not supported; use one of {sorted(ACTIVATIONS)} optionally prefixed with 'gated-'"
            )
        for name in ("dtype", "param_dtype"):
            _check_dtype(f"T5Config.{name}", getattr(self, name))

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        act = self.feed_forward_proj.split("-", 1)[1] if self.gated else self.feed_forward_proj
        return "gelu_new" if act == "gelu" and self.gated else act  # HF maps gated-gelu to gelu_new

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _check_dtype(name: str, value: str) -> None:
    if value not in DTYPES:
        raise ValueError(f"{name}={value!r} is not a dtype llmjax knows; use one of {sorted(DTYPES)}")
