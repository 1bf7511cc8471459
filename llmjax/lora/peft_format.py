"""LoRA adapters in Hugging Face PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

A PEFT LoRA directory stores, for each adapted ``nn.Linear`` (HF module ``M``, weight ``[out, in]``),
``base_model.model.M.lora_A.weight [r, in]`` and ``base_model.model.M.lora_B.weight [out, r]``: the
transposes of llmjax's ``lora_A [in, r]`` and ``lora_B [r, out]``, one pair per layer (a scanned stack
is split into its layers on save and stacked on load). ``peft.PeftModel.from_pretrained(hf_model, dir)``
loads what :func:`save_pretrained` writes, and :func:`from_pretrained` reads what ``peft`` writes.

PEFT's options that only choose *where* and *how strongly* plain LoRA acts are read, by PEFT's own matching
rules: ``rank_pattern`` and ``alpha_pattern`` (per-module rank and alpha), ``layers_to_transform`` /
``layers_pattern`` (some layers only), ``exclude_modules``, and ``target_modules`` as a regular expression or
as dotted module paths. llmjax holds every adapter in one uniform form (one rank, one scale, the named modules
in every layer), which computes the same function: a module of lower rank is zero-padded to the largest rank,
its own scale is folded into its ``lora_B``, and a layer or module the adapter leaves alone holds zero A and
B (which stay zero if trained further). Saving it again writes that uniform form, a plain adapter that
``peft`` loads with the same outputs. rsLoRA's scale (``use_rslora``) and ``target_modules: "all-linear"`` are
read and written; so is ``bias`` (``all``, ``lora_only``), which trains nothing on llmjax's bias-free models.
DoRA (``use_dora``) is read and written: each module's ``lora_magnitude_vector [out]`` beside A and B; a DoRA
adapter that leaves some layers of its modules alone is read with the base's params (a layer left alone takes its
base kernel's norms as magnitude, which an adapter file without the base cannot give). Every other option that
changes *what* is computed (a bias on ``lora_B``, replicated layers, ...) is refused with the option named, and so
is an adapter whose ``init_lora_weights`` changed its base at init (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA saved
without PEFT's conversion): it applies to that changed base, not to the one it names. llmjax's own PiSSA adapters
are saved in that conversion's form, a plain LoRA of rank ``2r`` for the unchanged base. An adapted untied
``lm_head`` is read and written like any module; the head's own weight, which ``peft`` stores beside its adapter
(``base_model.model.lm_head.base_layer.weight``, PEFT's ``save_embedding_layers``) and loads in place of the base's,
is read into the adapters as the head's weight (``lm_head/kernel``, which the merge and the factored forward use)
and written back. ``modules_to_save`` (whole modules trained beside the adapters) is read and written: each of
their weights under its own Hugging Face name, ``base_model.model.<module>.weight``, as ``peft`` saves them
(:func:`llmjax.lora.saved_leaves` says which). ``peft`` 0.22 changed which modules its entries pick (the plain
suffix before it, so ``layer_norm`` took ``final_layer_norm`` too): a file is read by the rule that wrote it, and
written with entries both rules read alike (:func:`_file_entries`, :func:`_portable_entries`).
``trainable_token_indices`` (rows of the input embedding trained in full: a decoder's, or a tied T5's ``shared``) is
read and written as ``base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta [n, d]`` (T5:
``base_model.model.shared.token_adapter...``), the rows themselves, as ``peft`` saves them; an untied output layer's
rows (``output_token_indices``; PEFT's dict form ``{"lm_head": [...]}``, alone or beside ``embed_tokens``) as
``base_model.model.lm_head.token_adapter.trainable_tokens_delta``. On a tied model the dict may name ``lm_head``
beside the input embedding with the same ids, which ``peft`` ties to the embedding's rows. On a T5 the dict form
naming ``embed_tokens`` is refused: ``peft`` then trains the encoder's and the decoder's rows apart.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import hf
from llmjax.adapter_configs import INPUT_EMBEDDING, OUTPUT_LAYER, adaptable_targets, check_lora_targets
from llmjax.errors import InputError
from llmjax.hf.io import (
    ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PEFT_TASK_TYPES, CheckpointError, read_adapter_dir, write_adapter_dir,
)
from llmjax.hf.mapping import tensor_mismatch
from llmjax.lora.core import (
    ALL_LINEAR, LORA_A, LORA_B, MAGNITUDE, PISSA, LoraConfig, LoraConfigError, Site, adapter_leaves, check_dora,
    TOKENS, merge, module_names, picked, pissa_as_lora, resolve_targets, saved_leaves, saves, sites, token_sites,
    unboxed,
)
from llmjax.models import model_family

PEFT_TYPE = "LORA"
_PREFIX = "base_model.model."
_SUFFIX_RULE_UNTIL = (0, 22)  # peft before 0.22 matched modules_to_save by plain suffix (core.saves' legacy rule)

# adapter_config.json options that change what the adapter computes: the values plain LoRA has (a JSON
# null, false, {} or [] where PEFT writes one of those), and what the option is, for the message. (The options
# that choose which modules are adapted, at what rank and alpha, are read: _plan.)
_PLAIN_LORA = {
    # Trained biases: llmjax's models have no bias in any projection or norm, so "all" and "lora_only" train
    # nothing there and save no tensor (peft's files hold plain LoRA; a bias tensor would be refused as unexpected).
    "bias": (("none", "all", "lora_only"), "trained biases"),
    "fan_in_fan_out": ((False, None), "Conv1D-style transposed weights"),
    "lora_bias": ((False, None), "a bias on lora_B"),
    "layer_replication": ((None, []), "replicated layers"),
    "target_parameters": ((None, []), "adapted nn.Parameters"),
    "use_qalora": ((False, None), "QA-LoRA"),
    "alora_invocation_tokens": ((None, []), "activated LoRA"),
    "use_bdlora": ((False, None), "block-diagonal LoRA"),
    "arrow_config": ((None, {}), "Arrow routing"),
    "megatron_config": ((None, {}), "Megatron parallel layers"),
}


# init_lora_weights values after which the adapter still applies to the unchanged base (they only draw A and B).
_BASE_KEEPING_INITS = ("gaussian", "eva", "orthogonal", "mica")


class AdapterError(CheckpointError):
    """A PEFT adapter directory llmjax cannot read for this model, with the reason and the fix."""


def _key(module: str, matrix: str) -> str:
    """The tensor name PEFT gives ``matrix`` of ``module`` (DoRA's magnitude is a bare parameter: no ``.weight``)."""
    return f"{_PREFIX}{module}.{matrix}" + ("" if matrix == MAGNITUDE else ".weight")


def _head_key(module: str) -> str:
    """Where PEFT stores the own weight of an adapted embedding-like layer (an output layer) when it saves it."""
    return f"{_PREFIX}{module}.base_layer.weight"


def _token_key(module: str) -> str:
    """Where PEFT stores the trained rows of ``trainable_token_indices`` for the embedding ``module``."""
    return f"{_PREFIX}{module}.token_adapter.{TOKENS}"


def _kernel_shape(config, site: Site) -> tuple[int, int]:
    """``(in, out)`` of one layer's kernel at ``site``."""
    return hf.weight_map(config).shapes[site.unscanned[0] + ("kernel",)]


def _at(tree, path: tuple[str, ...], what: str):
    node = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise ValueError(f"adapters have no {'/'.join(path)}/{what}, which the LoRA config adapts; "
                             "were they made by llmjax.lora.init for this model and config?")
        node = node[key]
    return node


def save_pretrained(model, adapters, cfg: LoraConfig, path: str | Path, base_model_name_or_path: str | None = None):
    """Write ``adapters`` (llmjax layout, any array kind, boxed or not) as a PEFT LoRA directory.

    ``base_model_name_or_path``: recorded in ``adapter_config.json`` (PEFT loads without it).
    Tensors are fp32, ``[r, in]`` (A) and ``[out, r]`` (B) per HF module, DoRA's ``[out]`` magnitude, and each
    ``modules_to_save`` weight in Hugging Face's layout. PiSSA adapters are written as PEFT writes them with
    ``path_initial_model_for_weight_conversion``: a plain LoRA of rank ``2r`` for the unchanged base
    (:func:`llmjax.lora.core.pissa_as_lora`).
    """
    tensors = {}
    cfg = resolve_targets(cfg, model.config)  # PEFT gets the modules all-linear stands for, as it saves its own
    if cfg.init_lora_weights == PISSA:  # PEFT's conversion for the unchanged base: plain LoRA of rank 2r
        adapters, cfg = pissa_as_lora(adapters, cfg)
    for site in sites(model.config, cfg):
        fan_in, fan_out = _kernel_shape(model.config, site)
        node = _at(adapters, site.path, LORA_A)
        check_dora(MAGNITUDE in node, cfg, site.path)
        shapes = {LORA_A: (fan_in, cfg.r), LORA_B: (cfg.r, fan_out), MAGNITUDE: (fan_out,)}
        for name in adapter_leaves(cfg):
            want = shapes[name]
            if name not in node:
                raise ValueError(f"adapters have no {'/'.join(site.path)}/{name}")
            value = np.asarray(jax.device_get(unboxed(node[name])), np.float32)
            layers = list(value) if site.stacked else [value]
            for module, layer in zip(site.hf_modules, layers, strict=True):
                if layer.shape != want:
                    raise ValueError(f"adapter {'/'.join(site.path)}/{name} has per-layer shape {layer.shape}, "
                                     f"expected {want} for r={cfg.r}")
                tensors[_key(module, name)] = np.ascontiguousarray(layer.T)  # a vector's .T is itself
        if "kernel" in node:  # a head's weight read from a PEFT adapter: written back where PEFT keeps it
            tensors[_head_key(site.hf_modules[0])] = np.ascontiguousarray(
                np.asarray(jax.device_get(unboxed(node["kernel"])), np.float32).T)
    for leaf in saved_leaves(model.config, cfg):
        value = np.asarray(jax.device_get(unboxed(_at(adapters, leaf.path, "(a modules_to_save copy)"))), np.float32)
        layers = list(value) if leaf.stacked else [value]
        for name, layer in zip(leaf.hf_names, layers, strict=True):
            tensors[_PREFIX + name] = np.ascontiguousarray(layer.T if leaf.transpose else layer)
    weight_shapes = hf.weight_map(model.config).shapes
    for tokens in token_sites(model.config, cfg):
        rows = np.asarray(jax.device_get(unboxed(_at(adapters, tokens.rows, "(the trained token rows)"))), np.float32)
        want = (len(tokens.indices), weight_shapes[tokens.weight][tokens.width_axis])
        if rows.shape != want:
            raise ValueError(f"adapter {'/'.join(tokens.rows)} has shape {rows.shape}, expected {want} for the "
                             f"token ids {list(tokens.indices)}")
        tensors[_token_key(tokens.hf_module)] = np.ascontiguousarray(rows)
    config = {
        "peft_type": PEFT_TYPE,
        "task_type": PEFT_TASK_TYPES[model_family(model.config).seq2seq],
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": list(cfg.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": _portable_entries(cfg.modules_to_save, model.config) or None,
        "trainable_token_indices": _written_token_indices(cfg),
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    write_adapter_dir(path, config, tensors)


def _written_token_indices(cfg: LoraConfig):
    """``trainable_token_indices`` as ``peft`` writes it: the list of the input embedding's ids, or with an output
    layer's ids PEFT's dict form, which names each module."""
    if not cfg.output_token_indices:
        return list(cfg.trainable_token_indices) or None
    embedding = {INPUT_EMBEDDING: list(cfg.trainable_token_indices)} if cfg.trainable_token_indices else {}
    return {**embedding, OUTPUT_LAYER: list(cfg.output_token_indices)}


def _portable_entries(entries, config) -> list[str]:
    """``modules_to_save`` entries that every ``peft`` reads as llmjax does: entries both PEFT rules (before and
    since 0.22, :func:`llmjax.lora.core.saves`) read alike are written as they are; else an entry they read alike
    is, and another is written, for each module it picks, as the shortest dotted tail of its name they read alike
    (LLaMA's ``norm`` -> ``model.norm``, which no ``input_layernorm`` ends with)."""
    names = module_names(config)

    def alike(*chosen):  # both rules pick the same modules
        return picked(names, chosen, legacy=True) == picked(names, chosen)

    if alike(*entries):
        return list(entries)
    out = []
    for entry in entries:
        if alike(entry):
            out.append(entry)
            continue
        for module in (m for m in names if saves(m, entry)):
            parts, depth = module.split("."), entry.count(".") + 1
            tails = (".".join(parts[start:]) for start in range(len(parts) - depth, -1, -1))
            tail = next((t for t in tails if alike(t)), None)
            if tail is None:  # no name of these models needs it; said rather than written ambiguously
                raise AdapterError(f"modules_to_save {entry!r} picks {module!r}, whose name other module names end "
                                   "with; peft before 0.22 would read it otherwise. Name the modules differently")
            out.append(tail)
    return list(dict.fromkeys(out))


def _legacy(raw: dict) -> bool:
    """Whether the ``peft`` that wrote ``raw`` matched ``modules_to_save`` by plain suffix: before 0.22, and any
    config without ``peft_version`` (written before 0.18, or by another tool)."""
    found = re.match(r"(\d+)\.(\d+)", str(raw.get("peft_version") or ""))
    return found is None or (int(found[1]), int(found[2])) < _SUFFIX_RULE_UNTIL


def _file_entries(raw: dict, model_config, keys=None) -> tuple[str, ...]:
    """``modules_to_save`` of a PEFT config as entries that pick, by llmjax's rule (``peft`` 0.22's), the modules
    the ``peft`` that wrote it picked. Before 0.22 ``peft`` matched a plain suffix, so T5's ``layer_norm`` took
    ``final_layer_norm`` too: such an entry becomes one per name it took, from the dotted part where the entry
    begins (``layer_norm``, ``final_layer_norm``). When the rules differ on this model, the file's tensor names
    (``keys``) say which rule wrote it (it holds the weights of every module it saved); else its ``peft_version``."""
    entries = raw.get("modules_to_save") or ()
    if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
        return entries  # LoraConfig says what is wrong with them
    entries, names = tuple(entries), module_names(model_config)
    if picked(names, entries, legacy=True) == picked(names, entries):  # the rules agree on this model
        return entries
    took = [(e, m) for e in entries for m in names if saves(m, e, legacy=True)]
    legacy = tuple(dict.fromkeys(m[m.rfind(".", 0, len(m) - len(e)) + 1:] for e, m in took))
    if keys is None:
        return legacy if _legacy(raw) else entries
    held = {_PREFIX + row.hf_name for row in hf.weight_map(model_config).rows
            if any(row.hf_name.startswith(m + ".") for _, m in took)}
    return legacy if held and held <= set(keys) else entries


def lora_config(raw: dict, model, file: str | Path) -> LoraConfig:
    """A PEFT ``adapter_config.json`` (``raw``, read from ``file``) -> the uniform :class:`LoraConfig` llmjax
    holds its adapter in for ``model`` (module docstring), refusing what plain LoRA is not."""
    return _plan(raw, model, file)[0]


def _check_options(raw: dict, model, file) -> None:
    """Refuse an adapter that is not LoRA for this kind of model, or uses an option plain LoRA cannot express."""
    if raw.get("peft_type") != PEFT_TYPE:
        raise AdapterError(f"{file}: peft_type={raw.get('peft_type')!r}; llmjax.lora reads LoRA adapters "
                           "(peft_type \"LORA\"); prompt-tuning directories go to llmjax.prompt_tuning")
    task = PEFT_TASK_TYPES[model_family(model.config).seq2seq]
    if raw.get("task_type") not in (None, task):
        raise AdapterError(f"{file}: task_type={raw['task_type']!r}, but this {type(model.config).__name__} model "
                           f"is {task}; the adapter was made for another kind of model")
    for option, (plain, meaning) in _PLAIN_LORA.items():
        if option in raw and raw[option] not in plain:
            raise AdapterError(
                f"{file}: {option}={json.dumps(raw[option])} ({meaning}) is not supported; llmjax loads plain "
                f"LoRA only ({option}: {json.dumps(plain[0])}). Merge the adapter with peft (merge_and_unload) "
                "and load the merged model instead, or train it without this option")
    init = raw.get("init_lora_weights", True)
    if not (init in (True, False, None) or init in _BASE_KEEPING_INITS):
        raise AdapterError(
            f"{file}: init_lora_weights={json.dumps(init)}: PEFT trained this adapter against a base it changed at "
            "init (PiSSA, OLoRA, CorDA, LoRA-GA and LoftQ take part of each weight into the adapter), so it does not "
            "apply to the unchanged base model; save it with peft's save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...), which writes a plain LoRA for the unchanged base")
    missing = [key for key in ("r", "lora_alpha") if key not in raw]
    if missing:
        raise AdapterError(f"{file}: missing {missing}; write the LoRA rank and alpha the adapter was trained with")
    for option in ("rank_pattern", "alpha_pattern"):
        pattern = raw.get(option) or {}
        if not (isinstance(pattern, dict) and all(isinstance(k, str) for k in pattern)):
            raise AdapterError(f"{file}: {option}={json.dumps(pattern)} must map module-name patterns to numbers")


def _targeted(raw: dict, every: list[str], file) -> list[str]:
    """The modules of ``every`` (each layer's projections and an untied ``lm_head``, full HF names) that PEFT
    adapts: ``target_modules``
    (a list of names or ``.``-suffixes, a regular expression matched against the whole name, or
    ``all-linear``), less ``exclude_modules``, in the layers ``layers_to_transform`` keeps."""
    targets = raw.get("target_modules")
    if targets == ALL_LINEAR:  # PEFT's shorthand leaves the output layer out
        chosen = [m for m in every if m != OUTPUT_LAYER]
    elif isinstance(targets, str):
        try:
            chosen = [m for m in every if re.fullmatch(targets, m)]
        except re.error as e:
            raise AdapterError(f"{file}: target_modules={targets!r} is not a valid regular expression ({e})") from None
        if not chosen:
            raise AdapterError(f"{file}: target_modules={targets!r} matches no module of this model (e.g. "
                               f"{every[0]!r}); was the adapter made for another model?")
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        for target in targets:
            if "." in target and not any(m == target or m.endswith(f".{target}") for m in every):
                raise AdapterError(f"{file}: target_modules entry {target!r} names no module of this model (e.g. "
                                   f"{every[0]!r}); was the adapter made for another model?")
        chosen = [m for m in every if m in targets or any(m.endswith(f".{t}") for t in targets)]
        chosen = [m for m in chosen if m in targets or _in_layers(raw, m, file)]  # PEFT: a full name skips the filter
    else:
        raise AdapterError(f"{file}: target_modules={json.dumps(targets)}; llmjax reads a list of module names such "
                           f"as [\"q\", \"v\"], \"{ALL_LINEAR}\" or a regular expression")
    excluded = raw.get("exclude_modules") or []
    if isinstance(excluded, str):
        chosen = [m for m in chosen if not re.fullmatch(excluded, m)]
    else:
        chosen = [m for m in chosen if not (m in excluded or any(m.endswith(f".{e}") for e in excluded))]
    if not chosen:
        raise AdapterError(f"{file}: target_modules, exclude_modules and layers_to_transform leave no module "
                           "adapted; the adapter changes nothing")
    return chosen


def _leaf(module: str) -> str:
    """The last part of an HF module name (``q`` of ``encoder.block.0.layer.0.SelfAttention.q``, ``lm_head``)."""
    return module.rsplit(".", 1)[-1]


def _in_layers(raw: dict, module: str, file) -> bool:
    """Whether ``layers_to_transform`` (with ``layers_pattern``) keeps ``module``'s layer, as PEFT decides it:
    the layer index is the first number after a ``.``-separated name (that pattern's name, when given)."""
    wanted = raw.get("layers_to_transform")
    if wanted is None or wanted == []:
        return True
    if isinstance(wanted, int) and not isinstance(wanted, bool):
        wanted = [wanted]
    if not (isinstance(wanted, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in wanted)):
        raise AdapterError(f"{file}: layers_to_transform={json.dumps(wanted)} must be a layer index or a list of them")
    patterns = raw.get("layers_pattern") or []
    patterns = [patterns] if isinstance(patterns, str) else patterns
    if not patterns:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        found = next(filter(None, (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module) for p in patterns)), None)
    return found is not None and int(found.group("idx")) in wanted


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that matches the end of the module
    name (as a regular expression, after a ``.``), else ``default``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _peft_token_indices(raw: dict, model_config):
    """``trainable_token_indices`` as ``LoraConfig`` reads it. PEFT's dict form may name a tied ``lm_head`` beside
    ``embed_tokens`` with the same ids: ``peft`` then ties the head's rows to the embedding's, which is what the list
    form means on a tied model, so the head's entry is dropped."""
    value = raw.get("trainable_token_indices")
    if isinstance(value, dict) and INPUT_EMBEDDING in value and model_family(model_config).seq2seq:
        raise LoraConfigError(
            f"trainable_token_indices names {INPUT_EMBEDDING!r}, which on a T5 peft matches twice: it wraps the "
            "encoder's and the decoder's embed_tokens apart and trains a set of rows for each, where the model has "
            "one shared embedding, as llmjax holds it; train the rows with the list form (peft's wrapper of shared, "
            "on a T5 whose head is tied to it)")
    if (isinstance(value, dict) and model_config.tie_word_embeddings and OUTPUT_LAYER in value
            and value[OUTPUT_LAYER] == value.get(INPUT_EMBEDDING)):
        return {key: ids for key, ids in value.items() if key != OUTPUT_LAYER}
    return value


def _plan(raw: dict, model, file, keys=None, base: bool = False) -> tuple[LoraConfig, dict[str, tuple[int, float]]]:
    """``(cfg, {module: (r, B factor)})``: the uniform config llmjax holds the adapter in, and for each module
    PEFT adapts (full HF name), its own rank and the factor ``its scale / cfg.scale`` its ``lora_B`` takes.
    ``keys``: the file's tensor names, which say which PEFT rule wrote ``modules_to_save`` (:func:`_file_entries`).
    ``base``: whether the base's params come with the read (a DoRA adapter of some layers needs them)."""
    _check_options(raw, model, file)
    every = [m for site in sites(model.config, LoraConfig(1, 1, target_modules=adaptable_targets(model.config)))
             for m in site.hf_modules]
    targets = raw.get("target_modules")
    plain = [t for t in targets if isinstance(t, str) and "." not in t] if isinstance(targets, list) else []
    if OUTPUT_LAYER in plain and model.config.tie_word_embeddings:
        raise AdapterError(f"{file}: the adapter adapts lm_head, which this model ties to its input embedding "
                           "(tie_word_embeddings: true); llmjax computes that head from the embedding and cannot "
                           "adapt it alone. Merge the adapter with peft (merge_and_unload) and load the merged model")
    if plain:  # a plain name no layer of this model has: say which names it has
        try:
            check_lora_targets(LoraConfig(1, 1, target_modules=plain), model.config)
        except LoraConfigError as e:
            raise AdapterError(f"{file}: {e}; was the adapter made for another model family?") from None
    chosen = _targeted(raw, every, file)
    use_rslora, use_dora = raw.get("use_rslora") or False, raw.get("use_dora") or False
    try:
        ranks = {m: _pattern_value(raw.get("rank_pattern") or {}, m, raw["r"]) for m in chosen}
        alphas = {m: _pattern_value(raw.get("alpha_pattern") or {}, m, raw["lora_alpha"]) for m in chosen}
        own = {m: LoraConfig(r=ranks[m], lora_alpha=alphas[m], use_rslora=use_rslora, target_modules=ALL_LINEAR)
               for m in chosen}  # checks each module's r and alpha
        names = [n for n in adaptable_targets(model.config) if any(_leaf(m) == n for m in chosen)]
        covered = set(chosen) == {m for m in every if _leaf(m) in names}
        if use_dora and not covered and not base:
            left = sorted({m for m in every if _leaf(m) in names} - set(chosen))
            raise AdapterError(
                f"{file}: a DoRA adapter that leaves some layers of its modules alone ({len(left)} of them, e.g. "
                f"{left[0]!r}) needs the base's params: llmjax holds one magnitude per layer of each adapted module, "
                "which for those layers is the base kernel's norms. Pass them (lora.from_pretrained(model, path, "
                "params)), as llmjax's loader and `llmjax lora merge` do")
        uniform = covered and len(
            {(c.r, c.scale) for c in own.values()}) == 1 and ranks[chosen[0]] == raw["r"]
        if uniform and targets == ALL_LINEAR:
            listed = ALL_LINEAR
        elif uniform and isinstance(targets, list) and all("." not in t for t in targets):
            listed = targets  # as written (the order kept)
        else:
            listed = names
        cfg = LoraConfig(r=max(ranks.values()), lora_alpha=raw["lora_alpha"],
                         lora_dropout=raw.get("lora_dropout") or 0.0, target_modules=listed, use_rslora=use_rslora,
                         use_dora=use_dora, modules_to_save=_file_entries(raw, model.config, keys),
                         trainable_token_indices=_peft_token_indices(raw, model.config))
        saved_leaves(model.config, cfg)  # the saved modules are this model's and can be held (else the reason)
        token_sites(model.config, cfg)  # and the token rows' weights (else the reason)
    except LoraConfigError as e:
        raise AdapterError(f"{file}: {e}") from None
    return cfg, {m: (own[m].r, own[m].scale / cfg.scale) for m in chosen}


def from_pretrained(model, path: str | Path, params=None) -> tuple[dict, LoraConfig]:
    """Read a PEFT LoRA directory for ``model`` -> ``(adapters, cfg)``; adapters are fp32 numpy arrays in
    the model's layout (stacked ``[L, ...]`` with ``scan_layers``), in llmjax's uniform form (module docstring).

    ``params``: the base's float params, needed only by a DoRA adapter that leaves some layers of its modules
    alone (``layers_to_transform``): such a layer holds zero A and B and the base kernel's column norms as its
    magnitude, which computes the base kernel itself.

    Every module PEFT adapts must be in the file with the shapes the model and its own rank give (A ``[r, in]``,
    B ``[out, r]``, DoRA's magnitude ``[out]``), as must every weight of ``modules_to_save`` and the rows of
    ``trainable_token_indices``, and nothing else may be; otherwise :class:`AdapterError` names the keys.
    """
    raw, tensors = read_adapter_dir(path)
    config_file, file = Path(path) / ADAPTER_CONFIG_NAME, Path(path) / ADAPTER_WEIGHTS_NAME
    cfg, own = _plan(raw, model, config_file, keys=tensors.keys(), base=params is not None)
    saved = saved_leaves(model.config, cfg)
    expected = {_key(m, name) for m in own for name in adapter_leaves(cfg)}
    expected |= {_PREFIX + name for leaf in saved for name in leaf.hf_names}
    token_rows = token_sites(model.config, cfg)
    expected |= {_token_key(tokens.hf_module) for tokens in token_rows}
    head = _head_key(OUTPUT_LAYER)  # PEFT stores an adapted head's own weight too (save_embedding_layers)
    allowed = expected | ({head} if OUTPUT_LAYER in own else set())
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - allowed)
    if missing or unexpected:
        raise AdapterError(
            f"{file}: tensors do not match target_modules {json.dumps(raw.get('target_modules'))} on this model: "
            f"{tensor_mismatch(missing, unexpected)}; was the adapter made for a model with this config.json (layer count, "
            "gated MLP)?")
    adapters: dict = {}
    for site in sites(model.config, cfg):
        fan_in, fan_out = _kernel_shape(model.config, site)
        a_layers, b_layers, m_layers = [], [], []
        for layer, module in enumerate(site.hf_modules):
            a, b = np.zeros((fan_in, cfg.r), np.float32), np.zeros((cfg.r, fan_out), np.float32)
            if cfg.use_dora and module not in own:  # a layer the DoRA adapter leaves alone: the base's norms
                m_layers.append(_base_norms(params, site, layer, file))
            if module in own:  # else a layer the adapter leaves alone: zero A and B
                rank, factor = own[module]
                for name, want in ((LORA_A, (rank, fan_in)), (LORA_B, (fan_out, rank))):
                    value = tensors[_key(module, name)]
                    if tuple(value.shape) != want:
                        raise AdapterError(
                            f"{file}: tensor {_key(module, name)!r} has shape {tuple(value.shape)}, expected {want} "
                            f"(r={rank} from {ADAPTER_CONFIG_NAME}); the adapter and its config, or the base model, "
                            "do not match")
                a[:, :rank] = np.asarray(tensors[_key(module, LORA_A)], np.float32).T
                b[:rank] = np.asarray(tensors[_key(module, LORA_B)], np.float32).T * np.float32(factor)
                if cfg.use_dora:
                    m = np.asarray(tensors[_key(module, MAGNITUDE)], np.float32)
                    if m.shape != (fan_out,):
                        raise AdapterError(f"{file}: tensor {_key(module, MAGNITUDE)!r} has shape {m.shape}, "
                                           f"expected ({fan_out},); the adapter and the base model do not match")
                    m_layers.append(m)
            a_layers.append(a)
            b_layers.append(b)
        node = adapters
        for key in site.path:
            node = node.setdefault(key, {})
        for name, layers in ((LORA_A, a_layers), (LORA_B, b_layers), (MAGNITUDE, m_layers)):
            if layers:
                node[name] = np.stack(layers) if site.stacked else layers[0]
        if site.hf_modules == (OUTPUT_LAYER,) and head in tensors:  # the weight the adapter applies to
            stored = np.asarray(tensors[head], np.float32)
            if stored.shape != (fan_out, fan_in):
                raise AdapterError(f"{file}: tensor {head!r} has shape {stored.shape}, expected {(fan_out, fan_in)} "
                                   "for this model's lm_head; the adapter and the base model do not match")
            node["kernel"] = np.ascontiguousarray(stored.T)
    shapes = hf.weight_map(model.config).shapes
    for leaf in saved:
        layers = []
        for name, path in zip(leaf.hf_names, leaf.unscanned, strict=True):
            stored = np.asarray(tensors[_PREFIX + name], np.float32)
            value = stored.T if leaf.transpose else stored
            if value.shape != shapes[path]:
                raise AdapterError(f"{file}: tensor {_PREFIX + name!r} has shape {stored.shape}, which does not fit "
                                   f"this model's {name} ({shapes[path]} in llmjax's layout); the adapter and the "
                                   "base model do not match")
            layers.append(value)
        node = adapters
        for key in leaf.path[:-1]:
            node = node.setdefault(key, {})
        node[leaf.path[-1]] = np.stack(layers) if leaf.stacked else layers[0]
    for tokens in token_rows:
        key = _token_key(tokens.hf_module)
        rows = np.asarray(tensors[key], np.float32)
        want = (len(tokens.indices), shapes[tokens.weight][tokens.width_axis])
        if rows.shape != want:
            raise AdapterError(f"{file}: tensor {key!r} has shape {rows.shape}, expected {want} for the "
                               f"trainable_token_indices {list(tokens.indices)} of {tokens.hf_module} on this model; "
                               "the adapter and its config, or the base model, do not match")
        node = adapters
        for part in tokens.rows[:-1]:
            node = node.setdefault(part, {})
        node[TOKENS] = rows
    return adapters, cfg


def _base_norms(params, site: Site, layer: int, file) -> np.ndarray:
    """The column norms of the base kernel of ``site`` in ``layer`` (its only one unless stacked), fp32."""
    kernel = unboxed(_at(params, site.path, "kernel")["kernel"])
    if not jnp.issubdtype(kernel.dtype, jnp.floating):  # bfloat16 included
        raise AdapterError(f"{file}: a DoRA adapter that leaves some layers alone needs the base's float kernels "
                           f"for their norms, but {'/'.join(site.path)}/kernel is {kernel.dtype}; load the base in "
                           "float")
    kernel = np.asarray(jax.device_get(kernel[layer] if site.stacked else kernel), np.float32)  # one layer moved
    return np.sqrt(np.sum(np.square(kernel), axis=-2))


def merge_into_hf_dir(base_dir: str | Path, adapter_dir: str | Path, out: str | Path,
                      copy_files: tuple[str, ...] = ()) -> Path:
    """Write the Hugging Face model ``base_dir`` with the PEFT adapter ``adapter_dir`` merged into ``out``.

    ``copy_files``: names copied from ``base_dir`` when present (the tokenizer's files). ``out`` must be
    absent or empty; everything is read and checked first and written into a temporary directory beside
    ``out``, renamed into place at the end, so a failure leaves nothing behind.
    """
    import shutil
    import tempfile

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out} exists and is not an empty directory; choose a new directory or remove it")
    model, params = hf.from_pretrained(base_dir, scan_layers=False)
    adapters, cfg = from_pretrained(model, adapter_dir, params)
    merged = merge(params, adapters, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf.save_pretrained(model, merged, staging)
        for name in copy_files:
            if (Path(base_dir) / name).is_file():
                shutil.copy2(Path(base_dir) / name, staging / name)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
