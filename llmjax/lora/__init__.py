"""LoRA for both families: adapters as a separate param pytree (:mod:`llmjax.lora.core`), read and written in
Hugging Face PEFT's format (:mod:`llmjax.lora.peft_format`)."""

from llmjax.lora.core import (  # noqa: F401 (the public API)
    FAMILY_TARGETS, LORA_A, LORA_B, LoraConfig, LoraConfigError, Site, delta, init, merge, sites, unmerge,
)
