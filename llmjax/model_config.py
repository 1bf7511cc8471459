"""Model configs: one frozen dataclass per family, and the registry from family name to config class.

These are plain data with no JAX or Flax import, so the run config (``llmjax.config``) and anything
else at the bottom of the import graph can name a model without importing the modules that build it.
``llmjax.models`` re-exports them beside the modules.
"""

from __future__ import annotations

import dataclasses

# Activation names the models implement (``llmjax.models.layers.ACTIVATIONS`` maps them to functions;
# a test keeps the two in step).
ACTIVATION_NAMES = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")

# Dtype names a config may use; ``llmjax.models.layers.DTYPES`` maps them to jnp dtypes.
DTYPE_NAMES = ("bfloat16", "float16", "float32")

# Rematerialization policies of the layer stack (``llmjax.models.scan.REMAT_POLICIES`` maps them to
# ``jax.checkpoint`` policies): what each layer keeps for the backward pass instead of recomputing it.
#   none                nothing recomputed: every intermediate activation is kept (fastest, most memory)
#   full                only each layer's input is kept; the whole layer runs again in the backward pass
#   save_dots           matmul outputs are kept, elementwise ops (norms, activations, softmax) recomputed
#   save_dots_no_batch  as save_dots, but dots with batch dimensions (the attention scores and
#                       weighted values, [batch, heads, q, k] sized) are recomputed too: only the
#                       projection and feed-forward matmul outputs are kept
REMAT_POLICY_NAMES = ("none", "full", "save_dots", "save_dots_no_batch")

# How a model stores and multiplies its weights (``llmjax.models.int8``; ``llmjax.quantize`` makes such params):
#   None          float weights in param_dtype
#   int8          int8 dense kernels and embeddings with fp32 per-output-channel scales; activations in the
#                 compute dtype (weight-only; the form QLoRA trains through)
#   int8_dynamic  the same weights, activations quantized per token on the fly (int8 x int8 -> int32 dots)
QUANTIZATIONS = ("int8", "int8_dynamic")


def check_dtype(name: str, value: str) -> None:
    if value not in DTYPE_NAMES:
        raise ValueError(f"{name}={value!r} is not a dtype llmjax knows; use one of {sorted(DTYPE_NAMES)}")


def check_remat_policy(name: str, value: str) -> None:
    if value not in REMAT_POLICY_NAMES:
        raise ValueError(f"{name}={value!r} is not a remat policy; use one of {list(REMAT_POLICY_NAMES)}")


def check_quantization(name: str, value: str | None) -> None:
    if value is not None and value not in QUANTIZATIONS:
        raise ValueError(f"{name}={value!r} is not a quantization; use null or one of {list(QUANTIZATIONS)}")


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
    scan_layers: bool = True      # each stack's layers as one nn.scan (params ``layers`` [num_layers, ...])
    remat_policy: str = "none"    # what the backward pass recomputes (REMAT_POLICY_NAMES)
    quantization: str | None = None  # None: float weights; QUANTIZATIONS: int8 weights (llmjax.quantize)

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            if getattr(self, name) <= 0:
                raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
        if self.num_decoder_layers is not None and self.num_decoder_layers <= 0:
            raise ValueError(f"T5Config.num_decoder_layers must be positive, got {self.num_decoder_layers}")
        if self.activation not in ACTIVATION_NAMES:
            raise ValueError(
                f"T5Config.feed_forward_proj={self.feed_forward_proj!r}: activation {self.activation!r} "
                f"is not supported; use one of {sorted(ACTIVATION_NAMES)} optionally prefixed with 'gated-'"
            )
        for name in ("dtype", "param_dtype"):
            check_dtype(f"T5Config.{name}", getattr(self, name))
        check_remat_policy("T5Config.remat_policy", self.remat_policy)
        check_quantization("T5Config.quantization", self.quantization)

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
    scan_layers: bool = True      # the layers as one nn.scan (params ``layers`` [num_hidden_layers, ...])
    remat_policy: str = "none"    # what the backward pass recomputes (REMAT_POLICY_NAMES)
    quantization: str | None = None  # None: float weights; QUANTIZATIONS: int8 weights (llmjax.quantize)

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
        if self.hidden_act not in ACTIVATION_NAMES:
            raise ValueError(
                f"DecoderConfig.hidden_act={self.hidden_act!r} is not supported; use one of {sorted(ACTIVATION_NAMES)}"
            )
        for name in ("dtype", "param_dtype"):
            check_dtype(f"DecoderConfig.{name}", getattr(self, name))
        check_remat_policy("DecoderConfig.remat_policy", self.remat_policy)
        check_quantization("DecoderConfig.quantization", self.quantization)

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


# family name -> config class (the name used in run configs: `model.family: t5`)
MODEL_CONFIGS = {"t5": T5Config, "decoder": DecoderConfig}


def family_of(config) -> str:
    """The family name of a model config instance (``"t5"`` or ``"decoder"``)."""
    for name, cls in MODEL_CONFIGS.items():
        if isinstance(config, cls):
            return name
    raise TypeError(f"unknown model config type {type(config).__name__}")
