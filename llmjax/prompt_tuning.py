"""Prompt tuning: ``num_virtual_tokens`` trained embeddings put before the input, in PEFT's format both ways.

The soft prompt is one fp32 array ``[n, d_model]`` that the model call takes as ``soft_prompt=`` (see
``llmjax.models.soft_prompt``): T5 puts it before the encoder input, a decoder before its input. Names and
semantics are Hugging Face PEFT's ``PROMPT_TUNING`` (``peft.PromptTuningConfig``):

* ``init(model, params, cfg, key, tokenizer=None) -> [n, d_model]``: ``RANDOM`` draws N(0, 1) (a fresh
  ``torch.nn.Embedding``), ``SAMPLE_VOCAB`` takes the vocabulary embeddings of ``n`` uniformly drawn token
  ids, ``TEXT`` the embeddings of ``prompt_tuning_init_text``'s tokens (as the model's prompts are
  tokenized: T5 ``text + eos``, a decoder ``bos + text``), cut to ``n`` or repeated until there are ``n``.
* ``save_pretrained(model, soft_prompt, cfg, path)`` / ``from_pretrained(model, path) -> (soft_prompt, cfg)``:
  ``adapter_config.json`` + ``adapter_model.safetensors`` holding ``prompt_embeddings``
  ``[n * num_transformer_submodules, d_model]``. PEFT gives an encoder-decoder (``SEQ_2_SEQ_LM``) two
  submodules and prepends only the first ``n`` rows to the encoder input (the other ``n`` are never read
  by prompt tuning); a ``CAUSAL_LM`` has one. We read the first ``n`` rows and write our prompt in both halves.
"""

from __future__ import annotations

import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llmjax.adapter_configs import INITS, PromptTuningConfig, PromptTuningError  # noqa: F401 (re-exported)
from llmjax.hf.io import PEFT_TASK_TYPES, read_adapter_dir, write_adapter_dir
from llmjax.models import model_family

PEFT_TYPE = "PROMPT_TUNING"
WEIGHTS_KEY = "prompt_embeddings"


def init(model, params: dict, cfg: PromptTuningConfig, key: jax.Array, tokenizer=None) -> jax.Array:
    """A fresh soft prompt, fp32 ``[num_virtual_tokens, d_model]`` (PEFT's inits, see the module docstring).

    ``params``: the model's params, plain or boxed (the vocabulary embedding is read for ``SAMPLE_VOCAB``/``TEXT``);
    ``tokenizer``: an ``llmjax.data.tokenizer.Tokenizer`` for ``TEXT`` (default: ``cfg.tokenizer_name_or_path``).
    Traceable: the text is tokenized on the host, so this runs under ``jit`` with traced params.
    """
    family = model_family(model.config)
    n, width = cfg.num_virtual_tokens, family.width(model.config)
    if cfg.prompt_tuning_init == "RANDOM":
        return jax.random.normal(key, (n, width), jnp.float32)
    embedding = params
    for name in family.embedding_path:
        embedding = embedding[name]
    if isinstance(embedding, nn.Partitioned):  # a stage's boxed tree (the value, no sharding constraint)
        embedding = embedding.value
    vocab = embedding.shape[0]
    if cfg.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = jax.random.randint(key, (n,), 0, vocab)
    else:
        ids = jnp.asarray(text_token_ids(model, cfg, tokenizer), jnp.int32)
    return jnp.take(embedding, ids, axis=0).astype(jnp.float32)


def text_token_ids(model, cfg: PromptTuningConfig, tokenizer=None) -> list[int]:
    """The ``n`` token ids of a ``TEXT`` init: the text's tokens cut to ``n`` or repeated (PEFT's rule)."""
    if tokenizer is None:
        if not cfg.tokenizer_name_or_path:
            raise PromptTuningError("prompt_tuning_init=TEXT needs a tokenizer: pass tokenizer= or set "
                                    "tokenizer_name_or_path to a directory with spiece.model")
        from llmjax.data.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(cfg.tokenizer_name_or_path)
    ids = model_family(model.config).prompt_ids(model.config, tokenizer, cfg.prompt_tuning_init_text)
    vocab = model.config.vocab_size
    if not ids:
        raise PromptTuningError(f"prompt_tuning_init_text {cfg.prompt_tuning_init_text!r} gives no tokens; "
                                "give a text with words in it")
    if max(ids) >= vocab:
        raise PromptTuningError(f"the tokenizer gives ids up to {max(ids)} but the model has {vocab} embeddings; "
                                "use the model's own tokenizer")
    n = cfg.num_virtual_tokens
    return (ids * math.ceil(n / len(ids)))[:n]


# -- PEFT's PROMPT_TUNING directory ----------------------------------------------------------------------

def _task_type(model) -> tuple[str, int]:
    """PEFT's ``task_type`` for the model and its default ``num_transformer_submodules``."""
    seq2seq = model_family(model.config).seq2seq
    return PEFT_TASK_TYPES[seq2seq], 2 if seq2seq else 1


def _first(hf_config: dict, *names: str):
    return next((hf_config[name] for name in names if name in hf_config), None)


def save_pretrained(model, soft_prompt, cfg: PromptTuningConfig, path: str | Path,
                    base_model_name_or_path: str | None = None) -> None:
    """Write ``soft_prompt`` ``[n, d_model]`` as a PEFT ``PROMPT_TUNING`` directory that
    ``peft.PeftModel.from_pretrained(transformers_model, path)`` loads with the same logits."""
    from llmjax.hf import family_for_config

    width = model_family(model.config).width(model.config)
    prompt = np.asarray(jax.device_get(soft_prompt), np.float32)
    if prompt.shape != (cfg.num_virtual_tokens, width):
        raise PromptTuningError(f"soft_prompt has shape {prompt.shape}; this config and model need "
                                f"[num_virtual_tokens={cfg.num_virtual_tokens}, d_model={width}]")
    if not np.isfinite(prompt).all():
        raise PromptTuningError("soft_prompt holds NaN or inf values; refusing to save it")
    if cfg.prompt_tuning_init == "TEXT" and not cfg.tokenizer_name_or_path:
        raise PromptTuningError("peft refuses to load a TEXT-initialised config without tokenizer_name_or_path; "
                                "set it in the PromptTuningConfig (the tokenizer directory)")
    task_type, submodules = _task_type(model)
    hf_config = family_for_config(model.config).config_to_hf(model.config)
    config = {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": _first(hf_config, "num_attention_heads", "num_heads"),
        "num_layers": _first(hf_config, "num_hidden_layers", "num_layers"),
        "num_transformer_submodules": submodules,
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "peft_type": PEFT_TYPE,
        "prompt_tuning_init": cfg.prompt_tuning_init,
        "prompt_tuning_init_text": cfg.prompt_tuning_init_text,
        "revision": None,
        "task_type": task_type,
        "token_dim": width,
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": cfg.tokenizer_name_or_path,
    }
    write_adapter_dir(path, config, {WEIGHTS_KEY: np.concatenate([prompt] * submodules, axis=0)})


def from_pretrained(model, path: str | Path) -> tuple[np.ndarray, PromptTuningConfig]:
    """Read a PEFT ``PROMPT_TUNING`` directory written for ``model``'s architecture ->
    ``(soft_prompt fp32 [n, d_model] numpy, cfg)``; a directory that does not fit is a PromptTuningError."""
    config, tensors = read_adapter_dir(path)
    where = Path(path) / "adapter_config.json"
    peft_type = config.get("peft_type")
    if peft_type != PEFT_TYPE:
        raise PromptTuningError(f"{where}: peft_type is {peft_type!r}, not {PEFT_TYPE!r}; "
                                "llmjax.prompt_tuning reads prompt-tuning adapters (LoRA ones: llmjax.lora)")
    task_type, default_submodules = _task_type(model)
    if config.get("task_type") != task_type:
        raise PromptTuningError(f"{where}: task_type is {config.get('task_type')!r} but this model is a "
                                f"{task_type}; use the adapter made for this kind of model")
    width = model_family(model.config).width(model.config)
    n, token_dim = config.get("num_virtual_tokens"), config.get("token_dim")
    if token_dim is not None and token_dim != width:
        raise PromptTuningError(f"{where}: token_dim={token_dim} but the model's embeddings are {width} wide; "
                                "the adapter was made for another model")
    submodules = config.get("num_transformer_submodules") or default_submodules
    if not isinstance(n, int) or n < 1 or not isinstance(submodules, int) or submodules < 1:
        raise PromptTuningError(f"{where}: num_virtual_tokens={n!r} and num_transformer_submodules={submodules!r} "
                                "must be integers >= 1")
    names = sorted(tensors)
    if names != [WEIGHTS_KEY]:
        raise PromptTuningError(f"{Path(path)}: expected exactly one tensor {WEIGHTS_KEY!r} in the adapter weights, "
                                f"found {names}")
    embeddings = tensors[WEIGHTS_KEY]
    if embeddings.shape != (n * submodules, width):
        raise PromptTuningError(f"{Path(path)}: {WEIGHTS_KEY} has shape {tuple(embeddings.shape)}; the config "
                                f"says [num_virtual_tokens * num_transformer_submodules = {n * submodules}, {width}]")
    if not np.issubdtype(embeddings.dtype, np.floating) and embeddings.dtype.name != "bfloat16":
        raise PromptTuningError(f"{Path(path)}: {WEIGHTS_KEY} holds {embeddings.dtype}, expected floats")
    prompt = np.asarray(embeddings[:n], np.float32)  # the encoder's (or the decoder-only model's) rows
    if not np.isfinite(prompt).all():
        raise PromptTuningError(f"{Path(path)}: {WEIGHTS_KEY} holds NaN or inf values")
    init_kind = config.get("prompt_tuning_init") or "RANDOM"
    cfg = PromptTuningConfig(
        num_virtual_tokens=n,
        prompt_tuning_init=init_kind,
        prompt_tuning_init_text=config.get("prompt_tuning_init_text") if init_kind == "TEXT" else None,
        tokenizer_name_or_path=config.get("tokenizer_name_or_path"),
    )
    return prompt, cfg
