"""LLaMA-style decoder-only model: RMSNorm, RoPE, SwiGLU, grouped-query attention."""

from __future__ import annotations

import dataclasses

from llmjax.models.layers import ACTIVATIONS
from llmjax.models.t5 import _check_dtype


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Dimensions of a LLaMA-style decoder. Field names follow Hugging Face ``LlamaConfig``."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA)
    head_dim: int | None = None             # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    attention_dropout: float = 0.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DecoderConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"DecoderConfig.num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.kv_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"DecoderConfig.hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; set head_dim explicitly"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"DecoderConfig.hidden_act={self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}"
            )
        for name in ("dtype", "param_dtype"):
            _check_dtype(f"DecoderConfig.{name}", getattr(self, name))

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads
