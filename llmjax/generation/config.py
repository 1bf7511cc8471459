"""``GenerationConfig``: decoding settings under Hugging Face's names, validated at construction.

Defaults are Hugging Face's (``transformers.GenerationConfig`` with its built-in
defaults applied): greedy, ``top_k=50`` once sampling is on, ``length_penalty=1.0``,
``early_stopping=False``, and ``max_length=20`` when neither length is given.
Token ids left as None are filled from the model config by ``generate``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import warnings
from pathlib import Path
from typing import Any

from llmjax.errors import InputError, InputNotFoundError

# Hugging Face generation keys that do not change the tokens: ignored silently.
HF_METADATA_KEYS = frozenset({
    "transformers_version", "_from_model_config", "bos_token_id", "use_cache",
    "return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
    "output_hidden_states", "max_time", "cache_implementation", "cache_config", "compile_config",
    "disable_compile", "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "assistant_confidence_threshold", "prompt_lookup_num_tokens", "max_matching_ngram_size",
    "low_memory", "prefill_chunk_size", "max_cache_len", "continuous_batching_config",
    # assisted / speculative decoding: speeds, does not change greedy tokens
    "assistant_early_exit", "assistant_ensemble_weight", "assistant_lookbehind", "target_lookbehind",
    "speculation_type", "use_mtp",
})

# Hugging Face decoding features llmjax does not implement, with the value that makes each
# inert. Read from a file, they are ignored; set to anything else, ignored with a warning.
HF_UNSUPPORTED_KEYS: dict[str, Any] = {
    "min_length": 0, "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "remove_invalid_values": False,
    "exponential_decay_length_penalty": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "sequence_bias": None, "guidance_scale": None,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None, "top_h": None,
    "diversity_penalty": 0.0, "num_beam_groups": 1, "penalty_alpha": None, "dola_layers": None,
    "constraints": None, "force_words_ids": None, "renormalize_logits": False,
    "watermarking_config": None, "stop_strings": None, "token_healing": False,
}

EARLY_STOPPING_VALUES = (True, False, "never")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How to decode. Field names and meanings follow ``transformers.GenerationConfig``.

    Lengths count new tokens (``max_new_tokens``); ``max_length`` is accepted for
    Hugging Face files and means prompt plus new tokens (for T5: the decoder start
    token plus new tokens); ``max_new_tokens`` wins when both are set.
    """

    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50           # applied only when do_sample; 0 disables (HF's default is 50)
    top_p: float = 1.0        # applied only when do_sample; 1.0 disables
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence; 1.0 disables
    no_repeat_ngram_size: int = 0    # no n-gram of this size occurs twice in the sequence; 0 disables
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    eos_token_id: int | tuple[int, ...] | None = None  # stored as a tuple
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None

    def __post_init__(self):
        if isinstance(self.eos_token_id, (list, tuple)):
            object.__setattr__(self, "eos_token_id", tuple(int(i) for i in self.eos_token_id) or None)
        elif self.eos_token_id is not None:
            object.__setattr__(self, "eos_token_id", (int(self.eos_token_id),))
        self._validate()

    def _validate(self) -> None:
        def fail(message: str):
            raise InputError(f"GenerationConfig: {message}")

        for name in ("max_new_tokens", "max_length"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                fail(f"{name}={value!r} must be a positive integer")
        if not _is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            fail(f"min_new_tokens={self.min_new_tokens!r} must be an integer >= 0")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            fail(f"min_new_tokens={self.min_new_tokens} exceeds max_new_tokens={self.max_new_tokens}; "
                 "lower min_new_tokens or raise max_new_tokens")
        if not isinstance(self.do_sample, bool):
            fail(f"do_sample={self.do_sample!r} must be True or False")
        if not _is_number(self.temperature) or not self.temperature > 0 or math.isinf(self.temperature):
            fail(f"temperature={self.temperature!r} must be a finite number > 0 "
                 "(for deterministic output use do_sample=False, not temperature=0)")
        if not _is_int(self.top_k) or self.top_k < 0:
            fail(f"top_k={self.top_k!r} must be an integer >= 0 (0 disables top-k filtering)")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            fail(f"top_p={self.top_p!r} must be in (0, 1] (1.0 disables nucleus filtering)")
        if (not _is_number(self.repetition_penalty) or not self.repetition_penalty > 0
                or math.isinf(self.repetition_penalty)):
            fail(f"repetition_penalty={self.repetition_penalty!r} must be a finite number > 0 "
                 "(1.0 disables it; above 1 discourages repeats, below 1 favours them)")
        if not _is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            fail(f"no_repeat_ngram_size={self.no_repeat_ngram_size!r} must be an integer >= 0 "
                 "(0 disables it; n > 0 forbids any n-gram to occur twice)")
        if not _is_int(self.num_beams) or self.num_beams < 1:
            fail(f"num_beams={self.num_beams!r} must be a positive integer (1 = no beam search)")
        if not _is_number(self.length_penalty) or math.isnan(self.length_penalty):
            fail(f"length_penalty={self.length_penalty!r} must be a number")
        if self.early_stopping not in EARLY_STOPPING_VALUES or not isinstance(self.early_stopping, (bool, str)):
            fail(f"early_stopping={self.early_stopping!r} must be True, False or 'never'")
        if not _is_int(self.num_return_sequences) or self.num_return_sequences < 1:
            fail(f"num_return_sequences={self.num_return_sequences!r} must be a positive integer")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            fail(f"num_return_sequences={self.num_return_sequences} cannot exceed num_beams={self.num_beams}")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            fail(f"greedy decoding returns one sequence per prompt; num_return_sequences="
                 f"{self.num_return_sequences} needs do_sample=True or num_beams >= num_return_sequences")
        for name in ("pad_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                fail(f"{name}={value!r} must be a token id (integer >= 0) or None")
        if self.eos_token_id is not None and any(i < 0 for i in self.eos_token_id):
            fail(f"eos_token_id={self.eos_token_id!r} must hold token ids >= 0")

    @property
    def reads_history(self) -> bool:
        """Whether a processor reads the tokens so far (``repetition_penalty``, ``no_repeat_ngram_size``)."""
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0

    def new_tokens(self, prompt_length: int) -> int:
        """The number of new tokens to decode after a (decoder) prompt of ``prompt_length`` tokens."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        max_length = 20 if self.max_length is None else self.max_length  # HF's default
        if max_length <= prompt_length:
            raise InputError(
                f"GenerationConfig: max_length={max_length} leaves no room after a prompt of "
                f"{prompt_length} tokens; set max_new_tokens instead"
            )
        return max_length - prompt_length

    @classmethod
    def from_hf(cls, source: str | Path | dict) -> "GenerationConfig":
        """Read a Hugging Face ``generation_config.json`` (a file, its directory, or its dict).

        Keys in :data:`HF_METADATA_KEYS` are skipped; keys in :data:`HF_UNSUPPORTED_KEYS`
        are skipped with a warning when set to a value that changes Hugging Face's output;
        any other unknown key is an error naming the closest valid key.
        """
        if isinstance(source, dict):
            data = dict(source)
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "generation_config.json"
            if not path.is_file():
                raise InputNotFoundError(f"no generation config at {path}; expected a generation_config.json")
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InputError(f"{path}: not valid JSON ({e})") from None
            if not isinstance(data, dict):
                raise InputError(f"{path}: expected a JSON object of generation settings, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs, changed = {}, []
        for key, value in data.items():
            if key in fields:
                kwargs[key] = value
            elif key in HF_METADATA_KEYS:
                continue
            elif key in HF_UNSUPPORTED_KEYS:
                if value is not None and value != HF_UNSUPPORTED_KEYS[key]:
                    changed.append(f"{key}={value!r}")
            else:
                close = difflib.get_close_matches(key, sorted(fields | HF_METADATA_KEYS | set(HF_UNSUPPORTED_KEYS)), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise InputError(f"GenerationConfig.from_hf: unknown key {key!r}{hint}")
        if changed:
            warnings.warn(
                "GenerationConfig.from_hf: llmjax does not implement " + ", ".join(changed)
                + "; these settings are ignored, so outputs may differ from Hugging Face",
                stacklevel=2,
            )
        # HF files may carry null for "unset"; our fields with non-None defaults keep their default.
        kwargs = {k: v for k, v in kwargs.items() if v is not None or _default(cls, k) is None}
        return cls(**kwargs)

    def to_hf(self) -> dict:
        """The dict of a ``generation_config.json`` with these settings (HF reads it back unchanged)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        eos = out["eos_token_id"]
        out["eos_token_id"] = eos[0] if eos is not None and len(eos) == 1 else (list(eos) if eos else None)
        return {k: v for k, v in out.items() if v is not None}


def _default(cls, name: str):
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
