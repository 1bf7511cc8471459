"""Configs of the adapter kinds a run config may add (``lora:``, ``prompt_tuning:``), kept in the core layer so
``llmjax.config`` can build and check them; the code that uses them re-exports them (``llmjax.lora``,
``llmjax.prompt_tuning``)."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from llmjax.errors import InputError, UserError

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


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """The run config's ``quantize:`` section: a LoRA run keeps its frozen base quantized (QLoRA-style).

    weights: the base's storage, ``int8`` (``llmjax.quantize``: symmetric per-output-channel int8 kernels and
      embeddings with fp32 scales). The adapters train in fp32 through the base dequantized on the fly
      (``x @ int8_kernel.astype(compute dtype) * scale``, activations in the compute dtype: weight-only, since
      per-token activation rounding has no gradient), so the frozen base takes about a quarter of its fp32
      memory. Needs a ``lora:`` section.
    """

    weights: Literal["int8"] = "int8"

    def __post_init__(self):
        if self.weights != "int8":
            raise UserError(f"quantize.weights={self.weights!r} is not supported; the one form is int8")


PISSA = "pissa"  # LoraConfig.init_lora_weights: A and B from the kernel's principal singular directions

# The module names each family can adapt: every projection kernel inside a layer, and the output layer.
ALL_LINEAR = "all-linear"  # PEFT's target_modules shorthand for every projection inside the layers
FAMILY_TARGETS = {
    "T5": ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
OUTPUT_LAYER = "lm_head"  # an untied output layer, adapted only when named (all-linear leaves it out, as PEFT's)
INPUT_EMBEDDING = "embed_tokens"  # the input embedding, whose rows trainable_token_indices trains (PEFT's key)


class LoraConfigError(InputError):
    """A LoRA setting (``r``, ``lora_alpha``, ``target_modules``, ...) that cannot be used."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters, PEFT's names and meaning.

    r: rank of the update (> 0). lora_alpha: the update is scaled by ``lora_alpha / r``.
    lora_dropout: dropout on the adapter's input while training, in [0, 1).
    target_modules: Hugging Face module names to adapt, e.g. ``("q", "v")`` (T5) or ``("q_proj", "v_proj")``,
      or ``"all-linear"`` (``ALL_LINEAR``), as in PEFT: every projection inside the layers (the output layer
      stays frozen); :func:`resolve_targets` names them for a model. ``lm_head`` (``OUTPUT_LAYER``) adapts an
      untied output layer ``[d_model, vocab]`` (a tied one is the embedding, which LoRA does not adapt here).
    use_rslora: rank-stabilized LoRA (PEFT's option): the scale is ``lora_alpha / sqrt(r)``, so raising the
      rank does not shrink each direction's update.
    use_dora: DoRA (weight-decomposed LoRA, Liu et al. 2024; PEFT's ``use_dora``): each adapted kernel also
      trains a magnitude per output channel, ``m``, born as the base kernel's column norms, and computes
      ``(W + scale * A @ B) * m / ||W + scale * A @ B||`` (the norm over the input axis, per output channel,
      held constant in the backward pass as the paper and PEFT do). ``out`` more trained numbers per kernel.
    modules_to_save: Hugging Face module names whose weights train in full beside the adapters (PEFT's
      ``modules_to_save``, matched as ``peft`` 0.22 matches it: the module of that name or every one whose name ends
      with ``.`` and the entry, e.g. ``lm_head`` for an untied head, ``layer_norm`` and ``final_layer_norm`` for
      every T5 norm); the adapters hold a trained copy of each such weight, which replaces the base's.
      :func:`llmjax.lora.saved_leaves` resolves them on a model.
    init_lora_weights: ``True`` (PEFT's default: A random, B zero) or ``"pissa"`` (PiSSA, Meng et al. 2024; PEFT's
      option): A and B start as the kernel's ``r`` principal singular directions, ``A0 @ B0`` its best rank-r
      approximation (over ``scale``), and train against the frozen rest, so the model computes
      ``W - scale * A0 @ B0 + scale * A @ B`` (step 0 is the base). llmjax keeps ``W`` and the frozen ``A0``, ``B0``
      (:func:`llmjax.lora.pissa_factors`) and saves what PEFT's ``path_initial_model_for_weight_conversion`` saves:
      a plain LoRA of rank ``2r``, ``[A | A0]`` and ``[B; -B0]``, which applies to the unchanged base.
    trainable_token_indices: token ids whose rows of the input embedding (a decoder's, or the ``shared`` one of a
      T5 whose head is tied to it) train in full beside the adapters (PEFT's option, e.g. the rows of tokens added
      for a chat template): the adapters hold those rows, born as the base's, and the model reads them in place of
      the base's (a tied output layer too, as PEFT ties it). PEFT's dict form is read here and in a run config:
      ``{"embed_tokens": [...], "lm_head": [...]}``, either key alone or both; the field then holds the input
      embedding's ids and ``output_token_indices`` the head's.
    output_token_indices: token ids whose rows of an untied output layer (``lm_head``, whose ``[d_model, vocab]``
      kernel holds them as columns) train in full the same way: what a new token needs on a model whose head is its
      own weight (a LLaMA with ``tie_word_embeddings: false``, T5 v1.1, FLAN-T5). PEFT writes it as
      ``trainable_token_indices: {"lm_head": [...]}``.
    """

    r: int
    lora_alpha: float
    lora_dropout: float = 0.0
    target_modules: Literal["all-linear"] | tuple[str, ...] = ()
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()
    init_lora_weights: bool | str = True
    trainable_token_indices: tuple[int, ...] | dict = ()  # a dict (PEFT's form) becomes the tuples it names
    output_token_indices: tuple[int, ...] = ()

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise LoraConfigError(f"lora r={self.r!r} must be a positive integer (the rank, e.g. 8)")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise LoraConfigError(f"lora_alpha={self.lora_alpha!r} must be a positive number (e.g. 2 * r)")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise LoraConfigError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if not isinstance(self.use_rslora, bool):
            raise LoraConfigError(f"use_rslora={self.use_rslora!r} must be true or false (true: scale "
                                  "lora_alpha / sqrt(r) in place of lora_alpha / r)")
        if not isinstance(self.use_dora, bool):
            raise LoraConfigError(f"use_dora={self.use_dora!r} must be true or false (true: DoRA, a trained "
                                  "magnitude per output channel beside A and B)")
        if not (self.init_lora_weights is True or self.init_lora_weights == PISSA):
            raise LoraConfigError(f"lora init_lora_weights={self.init_lora_weights!r} is not supported; use true (A "
                                  f"random, B zero) or {PISSA!r} (A and B from the kernel's principal singular "
                                  "directions)")
        if self.init_lora_weights == PISSA and self.use_dora:
            raise LoraConfigError("lora init_lora_weights='pissa' with use_dora=true is not supported; choose one")
        saved = () if self.modules_to_save is None else self.modules_to_save
        if isinstance(saved, str) or not all(isinstance(m, str) and m for m in saved):
            raise LoraConfigError(f"lora modules_to_save={self.modules_to_save!r} must be a list of module names, e.g. "
                                  "['layer_norm'] (every T5 norm) or ['lm_head'] (an untied output layer)")
        object.__setattr__(self, "modules_to_save", tuple(dict.fromkeys(saved)))
        targets = (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules
        targets = tuple(dict.fromkeys(targets))  # a list from YAML/JSON -> tuple, repeats dropped
        if ALL_LINEAR in targets and len(targets) > 1:
            raise LoraConfigError(f"lora target_modules {list(targets)}: {ALL_LINEAR!r} already names every "
                                  f"projection; give it alone (target_modules: {ALL_LINEAR}) or list the modules")
        if not targets or not all(isinstance(t, str) for t in targets):
            raise LoraConfigError(
                f"lora target_modules={self.target_modules!r} must be a non-empty list of module names, e.g. "
                f"{list(FAMILY_TARGETS['T5'][:1] + FAMILY_TARGETS['T5'][2:3])} (T5) or ['q_proj', 'v_proj'] (LLaMA)"
            )
        known = {ALL_LINEAR, OUTPUT_LAYER, *(name for names in FAMILY_TARGETS.values() for name in names)}
        unknown = [t for t in targets if t not in known]
        if unknown:
            listed = "; ".join(f"{family}: {[*names, OUTPUT_LAYER]}" for family, names in FAMILY_TARGETS.items())
            raise LoraConfigError(f"lora target_modules {unknown} are not module names llmjax can adapt ({listed})")
        object.__setattr__(self, "target_modules", targets)
        value, head, head_field = self.trainable_token_indices, self.output_token_indices, "output_token_indices"
        if isinstance(value, dict) and OUTPUT_LAYER in value:
            if head:
                raise LoraConfigError(f"lora trainable_token_indices names {OUTPUT_LAYER} and output_token_indices "
                                      f"is set too; give the output layer's ids once (either one)")
            head, head_field = value[OUTPUT_LAYER], f"trainable_token_indices[{OUTPUT_LAYER!r}]"
            value = {key: ids for key, ids in value.items() if key != OUTPUT_LAYER}
        object.__setattr__(self, "trainable_token_indices", _token_indices(value, "trainable_token_indices"))
        object.__setattr__(self, "output_token_indices", _token_indices(head, head_field))

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _token_indices(value, field: str) -> tuple[int, ...]:
    """``value`` as a tuple of distinct token ids (PEFT's list, or its dict naming the input embedding alone, which
    is what remains of ``trainable_token_indices`` once ``LoraConfig`` took the output layer's ids out)."""
    if value is None:
        return ()
    if isinstance(value, dict) and field == "trainable_token_indices":
        other = [key for key in value if key != INPUT_EMBEDDING]
        if other:
            raise LoraConfigError(
                f"lora {field} names {other}; llmjax trains token rows of the input embedding and of an untied "
                f"output layer (a list of ids, or {{{INPUT_EMBEDDING!r}: [...], {OUTPUT_LAYER!r}: [...]}})")
        value = value.get(INPUT_EMBEDDING) or ()
    ids = tuple(value) if isinstance(value, (list, tuple)) else None
    if ids is None or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise LoraConfigError(f"lora {field}={value!r} must be a list of token ids (integers >= 0), "
                              "e.g. [32000, 32001] for two tokens added to the vocabulary")
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise LoraConfigError(f"lora {field} repeats {repeated}; give each token id once")
    return ids


def lora_targets(model_config) -> tuple[str, ...]:
    """The projections inside this model's layers (what ``all-linear`` adapts): a T5 feed-forward is ``wi`` or,
    gated, ``wi_0`` and ``wi_1``; LLaMA-style decoders have all seven projections."""
    from llmjax.model_config import family_of

    if family_of(model_config) != "t5":
        return FAMILY_TARGETS["llama"]
    ffn = ("wi_0", "wi_1") if model_config.gated else ("wi",)
    return ("q", "k", "v", "o", *ffn, "wo")


def adaptable_targets(model_config) -> tuple[str, ...]:
    """Every module name ``target_modules`` may name on this model: its layers' projections and, when the
    output layer is its own weight (``tie_word_embeddings: false``), ``lm_head``."""
    head = () if model_config.tie_word_embeddings else (OUTPUT_LAYER,)
    return (*lora_targets(model_config), *head)


def resolve_targets(cfg: "LoraConfig", model_config) -> "LoraConfig":
    """``cfg`` with ``all-linear`` replaced by the module names it stands for on this model (what PEFT's
    ``all-linear`` adapts: every projection inside the layers); any other ``cfg`` unchanged."""
    if cfg.target_modules != (ALL_LINEAR,):
        return cfg
    return dataclasses.replace(cfg, target_modules=lora_targets(model_config))


def check_lora_targets(cfg: "LoraConfig", model_config) -> None:
    """Refuse targets the model does not have, listing the ones it has (before a run writes anything)."""
    have = adaptable_targets(model_config)
    missing = [t for t in resolve_targets(cfg, model_config).target_modules if t not in have]
    if missing == [OUTPUT_LAYER]:
        raise LoraConfigError("lora target_modules names lm_head, but this model ties its output layer to the input "
                              "embedding (tie_word_embeddings: true), so the head is the embedding itself, which "
                              "llmjax's LoRA does not adapt; drop lm_head from target_modules")
    if missing:
        family = "T5" if "q" in have else "llama"
        raise LoraConfigError(f"lora target_modules {missing} are not modules of this {family} model; "
                              f"its modules are {list(have)}")
    check_trainable_tokens(cfg, model_config)


def check_trainable_tokens(cfg: "LoraConfig", model_config) -> None:
    """Refuse token rows on a model whose rows PEFT's format cannot carry (the input embedding's of an untied T5, the
    output layer's of a tied model), rows of a head that LoRA adapts, and ids past the vocabulary (a weight that
    ``modules_to_save`` trains whole: :func:`llmjax.lora.token_sites`)."""
    from llmjax.model_config import family_of

    ids, head = cfg.trainable_token_indices, cfg.output_token_indices
    if ids and family_of(model_config) == "t5" and not model_config.tie_word_embeddings:
        raise LoraConfigError(
            "lora trainable_token_indices is not supported on a T5 with an untied output layer (T5 v1.1, FLAN-T5): "
            "PEFT wraps its shared embedding but ties the encoder's and decoder's embed_tokens to that wrapper only "
            "with tie_word_embeddings, so T5's stacks keep reading the weight itself and a PEFT adapter of these rows "
            "changes none of its outputs; it could not carry what llmjax trained. Train the output layer's rows "
            f"({{{OUTPUT_LAYER!r}: [...]}}), or give new tokens their input rows by full fine-tuning")
    if head and model_config.tie_word_embeddings:
        raise LoraConfigError(
            f"lora trainable_token_indices names {OUTPUT_LAYER} ({list(head)}), but this model ties its output layer "
            "to the input embedding (tie_word_embeddings: true): the head is the embedding, whose rows "
            f"trainable_token_indices trains (a list of ids, or {{{INPUT_EMBEDDING!r}: [...]}}) for the input and the "
            "head alike; list the ids there")
    if head and OUTPUT_LAYER in resolve_targets(cfg, model_config).target_modules:
        raise LoraConfigError(f"lora target_modules adapts {OUTPUT_LAYER} and trainable_token_indices trains some of "
                              "its rows; keep one of the two (peft refuses both)")
    for name, values in (("trainable_token_indices", ids), (f"trainable_token_indices[{OUTPUT_LAYER!r}]", head)):
        too_large = [i for i in values if i >= model_config.vocab_size]
        if too_large:
            raise LoraConfigError(f"lora {name} {too_large} are not token ids of this model (vocab_size "
                                  f"{model_config.vocab_size}); resize the vocabulary first or drop them")
