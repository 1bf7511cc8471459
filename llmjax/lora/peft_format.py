"""LoRA adapters in Hugging Face PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

A PEFT LoRA directory stores, for each adapted ``nn.Linear`` (HF module ``M``, weight ``[out, in]``),
``base_model.model.M.lora_A.weight [r, in]`` and ``base_model.model.M.lora_B.weight [out, r]``: the
transposes of llmjax's ``lora_A [in, r]`` and ``lora_B [r, out]``, one pair per layer (a scanned stack
is split into its layers on save and stacked on load). ``peft.PeftModel.from_pretrained(hf_model, dir)``
loads what :func:`save_pretrained` writes, and :func:`from_pretrained` reads what ``peft`` writes,
refusing, with the option named, every PEFT feature that would change the model in a way plain LoRA
does not (DoRA, biases, per-layer ranks, extra trained modules, ...). rsLoRA's scale (``use_rslora``) and
``target_modules: "all-linear"`` are read and written.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from llmjax import hf
from llmjax.errors import InputError
from llmjax.hf.io import (
    ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PEFT_TASK_TYPES, CheckpointError, read_adapter_dir, write_adapter_dir,
)
from llmjax.hf.mapping import tensor_mismatch
from llmjax.lora.core import (
    ALL_LINEAR, LORA_A, LORA_B, LoraConfig, LoraConfigError, Site, merge, resolve_targets, sites, unboxed,
)
from llmjax.models import model_family

PEFT_TYPE = "LORA"
_PREFIX = "base_model.model."

# adapter_config.json options that change what the adapter computes: the values plain LoRA has (a JSON
# null, false, {} or [] where PEFT writes one of those), and what the option is, for the message.
_PLAIN_LORA = {
    "bias": (("none",), "trained biases"),
    "use_dora": ((False, None), "DoRA (weight-decomposed LoRA)"),
    "fan_in_fan_out": ((False, None), "Conv1D-style transposed weights"),
    "lora_bias": ((False, None), "a bias on lora_B"),
    "modules_to_save": ((None, []), "fully trained extra modules"),
    "layers_to_transform": ((None, []), "adapting only some layers"),
    "layers_pattern": ((None, [], ""), "adapting only some layers"),
    "exclude_modules": ((None, []), "excluded modules"),
    "rank_pattern": (({}, None), "per-module ranks"),
    "alpha_pattern": (({}, None), "per-module alphas"),
    "layer_replication": ((None, []), "replicated layers"),
    "target_parameters": ((None, []), "adapted nn.Parameters"),
    "trainable_token_indices": ((None, [], {}), "trainable token embeddings"),
    "use_qalora": ((False, None), "QA-LoRA"),
    "alora_invocation_tokens": ((None, []), "activated LoRA"),
    "use_bdlora": ((False, None), "block-diagonal LoRA"),
    "arrow_config": ((None, {}), "Arrow routing"),
    "megatron_config": ((None, {}), "Megatron parallel layers"),
}


class AdapterError(CheckpointError):
    """A PEFT adapter directory llmjax cannot read for this model, with the reason and the fix."""


def _key(module: str, matrix: str) -> str:
    return f"{_PREFIX}{module}.{matrix}.weight"


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
    Tensors are fp32, ``[r, in]`` (A) and ``[out, r]`` (B) per HF module.
    """
    tensors = {}
    cfg = resolve_targets(cfg, model.config)  # PEFT gets the modules all-linear stands for, as it saves its own
    for site in sites(model.config, cfg):
        fan_in, fan_out = _kernel_shape(model.config, site)
        node = _at(adapters, site.path, LORA_A)
        for name, want in ((LORA_A, (fan_in, cfg.r)), (LORA_B, (cfg.r, fan_out))):
            if name not in node:
                raise ValueError(f"adapters have no {'/'.join(site.path)}/{name}")
            value = np.asarray(jax.device_get(unboxed(node[name])), np.float32)
            layers = list(value) if site.stacked else [value]
            for module, layer in zip(site.hf_modules, layers, strict=True):
                if layer.shape != want:
                    raise ValueError(f"adapter {'/'.join(site.path)}/{name} has per-layer shape {layer.shape}, "
                                     f"expected {want} for r={cfg.r}")
                tensors[_key(module, name)] = np.ascontiguousarray(layer.T)
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
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    write_adapter_dir(path, config, tensors)


def lora_config(raw: dict, model, file: str | Path) -> LoraConfig:
    """A PEFT ``adapter_config.json`` (``raw``, read from ``file``) -> :class:`LoraConfig` for ``model``, refusing
    what plain LoRA is not."""
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
    targets = raw.get("target_modules")
    if not (isinstance(targets, list) or targets == ALL_LINEAR):
        raise AdapterError(
            f"{file}: target_modules={json.dumps(targets)}; llmjax reads a list of module names such as "
            f"[\"q\", \"v\"] or \"{ALL_LINEAR}\" (a regular expression is not supported: list the modules)")
    missing = [key for key in ("r", "lora_alpha") if key not in raw]
    if missing:
        raise AdapterError(f"{file}: missing {missing}; write the LoRA rank and alpha the adapter was trained with")
    if isinstance(targets, list) and any(isinstance(t, str) and "." in t for t in targets):
        targets = _module_names(targets, model.config, file)
    try:
        return LoraConfig(r=raw["r"], lora_alpha=raw["lora_alpha"], lora_dropout=raw.get("lora_dropout") or 0.0,
                          target_modules=targets,
                          use_rslora=raw.get("use_rslora") or False)
    except LoraConfigError as e:
        raise AdapterError(f"{file}: {e}") from None


def _module_names(targets: list, config, file) -> list[str]:
    """``target_modules`` that name modules by dotted path (``model.layers.0.mlp.up_proj``, as peft saves
    ``all-linear``; ``self_attn.q_proj``) -> the module names they amount to, matched as PEFT does (a target
    is the whole module name or a ``.``-separated suffix of it). Each name must then be adapted in every
    layer: LoRA on only some layers is refused."""
    every = [m for site in sites(config, LoraConfig(1, 1, target_modules=ALL_LINEAR)) for m in site.hf_modules]
    matched = set()
    for target in targets:
        hits = {m for m in every if m == target or m.endswith(f".{target}")}
        if not hits:
            raise AdapterError(f"{file}: target_modules entry {target!r} names no module of this model (e.g. "
                               f"{every[0]!r}); was the adapter made for another model?")
        matched |= hits
    names = sorted({m.rsplit(".", 1)[1] for m in matched})
    partial = [n for n in names if {m for m in every if m.rsplit(".", 1)[1] == n} - matched]
    if partial:
        raise AdapterError(f"{file}: target_modules adapt {partial} in only some of the layers; llmjax adapts a "
                           "module in every layer (adapting only some layers is not supported). Merge the adapter "
                           "with peft (merge_and_unload) and load the merged model instead")
    return names


def from_pretrained(model, path: str | Path) -> tuple[dict, LoraConfig]:
    """Read a PEFT LoRA directory for ``model`` -> ``(adapters, cfg)``; adapters are fp32 numpy arrays in
    the model's layout (stacked ``[L, ...]`` with ``scan_layers``).

    Every adapted module of the config must be in the file with the shapes the model gives (A ``[r, in]``,
    B ``[out, r]``) and nothing else may be; otherwise :class:`AdapterError` names the keys.
    """
    raw, tensors = read_adapter_dir(path)
    config_file, file = Path(path) / ADAPTER_CONFIG_NAME, Path(path) / ADAPTER_WEIGHTS_NAME
    cfg = lora_config(raw, model, config_file)
    try:
        targeted = sites(model.config, cfg)
    except LoraConfigError as e:
        raise AdapterError(f"{config_file}: {e}; was the adapter made for another model family?") from None
    expected = {_key(m, name) for site in targeted for m in site.hf_modules for name in (LORA_A, LORA_B)}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise AdapterError(
            f"{file}: tensors do not match target_modules {list(cfg.target_modules)} on this model: "
            f"{tensor_mismatch(missing, unexpected)}; was the adapter made for a model with this config.json (layer count, "
            "gated MLP)?")
    adapters: dict = {}
    for site in targeted:
        fan_in, fan_out = _kernel_shape(model.config, site)
        node = adapters
        for key in site.path:
            node = node.setdefault(key, {})
        for name, want in ((LORA_A, (cfg.r, fan_in)), (LORA_B, (fan_out, cfg.r))):
            layers = []
            for module in site.hf_modules:
                value = tensors[_key(module, name)]
                if tuple(value.shape) != want:
                    raise AdapterError(f"{file}: tensor {_key(module, name)!r} has shape {tuple(value.shape)}, "
                                       f"expected {want} (r={cfg.r} from {ADAPTER_CONFIG_NAME}); the adapter and "
                                       "its config, or the base model, do not match")
                layers.append(np.asarray(value, np.float32).T)
            node[name] = np.stack(layers) if site.stacked else layers[0]
    return adapters, cfg


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
    adapters, cfg = from_pretrained(model, adapter_dir)
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
