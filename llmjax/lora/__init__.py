"""LoRA for both families: adapters as a separate param pytree (:mod:`llmjax.lora.core`), read and written in
Hugging Face PEFT's format (:mod:`llmjax.lora.peft_format`)."""

from llmjax.lora.core import (  # noqa: F401 (the public API)
    ALL_LINEAR, COLLECTION, FAMILY_TARGETS, FROZEN_LEAVES, INIT_A, INIT_B, LORA_A, LORA_B, MAGNITUDE, PISSA, TOKENS,
    LoraConfig, LoraConfigError, SavedLeaf, Site, TokenSite, adapter_branch, apply_factored, delta, dora_factor, init,
    lora_part, merge, pissa_factors, pissa_initial, resolve_targets, rule_dependent, saved_leaves, sites, token_sites,
    unmerge, with_saved,
)
from llmjax.lora.peft_format import (  # noqa: F401
    PEFT_TYPE, AdapterError, from_pretrained, lora_config, merge_into_hf_dir, save_pretrained,
)
