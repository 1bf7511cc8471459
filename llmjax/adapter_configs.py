"""Configs of the adapter kinds a run config may add (``prompt_tuning:``), kept in the core layer so
``llmjax.config`` can build them; the code that uses them re-exports them (``llmjax.prompt_tuning``)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from llmjax.errors import UserError

INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


class PromptTuningError(UserError, ValueError):
    """A prompt-tuning config, soft prompt or adapter directory llmjax cannot use (what is wrong, how to fix)."""


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig:
    """PEFT's ``PromptTuningConfig`` fields that matter here (the run config's ``prompt_tuning:`` section).

    num_virtual_tokens:      ``n``, rows of the soft prompt
    prompt_tuning_init:      ``RANDOM`` (N(0, 1)), ``SAMPLE_VOCAB`` (embeddings of random tokens) or
                             ``TEXT`` (embeddings of ``prompt_tuning_init_text``'s tokens)
    prompt_tuning_init_text: the text of ``TEXT``
    tokenizer_name_or_path:  the tokenizer of ``TEXT`` when ``init`` is given none (a stage fills in its
                             own); PEFT refuses to load a ``TEXT`` config without one
    """

    num_virtual_tokens: int
    prompt_tuning_init: Literal["RANDOM", "SAMPLE_VOCAB", "TEXT"] = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None

    def __post_init__(self):
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise PromptTuningError(f"prompt_tuning.num_virtual_tokens must be an integer >= 1, got {n!r}")
        if self.prompt_tuning_init not in INITS:
            raise PromptTuningError(f"prompt_tuning.prompt_tuning_init={self.prompt_tuning_init!r} is unknown; "
                                    f"use one of {list(INITS)}")
        text = self.prompt_tuning_init_text
        if self.prompt_tuning_init == "TEXT" and not (isinstance(text, str) and text.strip()):
            raise PromptTuningError("prompt_tuning.prompt_tuning_init=TEXT needs prompt_tuning.prompt_tuning_init_text "
                                    "(the words whose embeddings start the prompt)")
        if self.prompt_tuning_init != "TEXT" and text is not None:
            raise PromptTuningError(f"prompt_tuning.prompt_tuning_init_text is only read with prompt_tuning_init=TEXT "
                                    f"(got {self.prompt_tuning_init}); set the init to TEXT or drop the text")
