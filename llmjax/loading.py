"""One loader for a model to start from: a Hugging Face directory or an llmjax checkpoint.

``load_model(path)`` -> :class:`LoadedModel` (model, host params, and what a stage needs besides:
the model config, where the tokenizer is, which step was read). ``path`` may be

* a Hugging Face directory: ``config.json`` + ``model.safetensors`` (``llmjax.hf.from_pretrained``);
* an llmjax checkpoint directory (a run's ``checkpoint.dir``, holding numbered step directories);
* a run directory (``train.output_dir``, holding ``checkpoints/``);
* a quantized model directory (``llmjax quantize``: int8 weights, ``llmjax.quantize``), read as the
  quantized model (``LoadedModel.model.config.quantization`` set) with its int8 params.

Inference (``evaluate``, ``generate``), export and every stage's init source read models through
this module, so none of them needs the training code. It also owns what a reader must know of
the checkpoint layout that ``llmjax.train.checkpoint`` writes::

    <step>/state/...              TrainState as a nested dict (orbax PyTree): params, frozen_params, ...
    <step>/data/...               data-iterator state (JSON)
    <step>/meta/...               model family + config, tokenizer dir, stage (JSON)
    <step>/llmjax_manifest.json   size and sha256 of every file above, written last

A LoRA run's params hold one more top-level part, ``lora`` (:data:`ADAPTERS_KEY`: the adapters, at the
targeted kernels' paths), and its metadata the LoRA config (``meta["lora"]``); reading such a checkpoint
gives the model's params with the adapters merged in. A prompt-tuning run's params hold ``soft_prompt``
(:data:`SOFT_PROMPT_KEY`, ``[n, d_model]``), which no weight can absorb: it is read into
``LoadedModel.soft_prompt`` for the model call's ``soft_prompt=``.

A QLoRA run (``quantize:`` beside ``lora:``) trained its adapters on the int8 base; its metadata records
``meta["quantize"]``, and its adapters are merged into that base dequantized (the weights they were trained
against), not into the float original.

A step is complete when its manifest exists; its files are checked against the manifest before
they are read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from llmjax.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "llmjax_manifest.json"
ADAPTERS_KEY = "lora"  # a LoRA run's tree: the model's params plus this top-level part (llmjax.stages.adapters)
SOFT_PROMPT_KEY = "soft_prompt"  # a prompt-tuning run's tree: the model's params plus its soft prompt [n, d]
HEADS_KEY = "heads"  # a reward or PPO run's tree: {"score": ...} / {"value": ...} heads (llmjax.models.heads)
REFERENCE_KEY = "reference"  # a full-fine-tuning PPO/DPO/GRPO run's frozen copy of the initial model params
TEACHER_KEY = "teacher"  # a distillation run's frozen teacher params (llmjax.stages.distill; never checkpointed)
# tree parts that are not model params
EXTRA_KEYS = (ADAPTERS_KEY, SOFT_PROMPT_KEY, HEADS_KEY, REFERENCE_KEY, TEACHER_KEY)
ITEMS = ("state", "data", "meta")  # the orbax items of one step
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model")


class CheckpointCorruptError(UserError, ValueError):
    """A checkpoint step is incomplete, truncated or corrupted."""


class ModelPathError(UserError, FileNotFoundError):
    """A path given as a model is missing or is neither a Hugging Face directory nor an llmjax checkpoint."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model read from disk.

    model:          flax module built from the stored config (``llmjax.models.build_model``)
    params:         nested dict of host numpy arrays (``param_dtype``, fp32 by default); trainable and
                    frozen parameters of a checkpoint merged
    kind:           ``"hf"``, ``"checkpoint"`` or ``"quantized"``
    path:           the directory read: the HF or quantized directory, or the checkpoint directory (for a run
                    directory, its ``checkpoints/``)
    step:           the checkpoint step read; None for a HF directory
    tokenizer_dir:  the directory holding the tokenizer (the HF directory itself when it has one; the
                    one a checkpoint's metadata records), or None
    meta:           the checkpoint's metadata (family, model_config, stage, run_config, ...); {} for HF
    soft_prompt:    a prompt-tuning run's trained soft prompt, fp32 ``[n, d_model]``; None otherwise
    heads:          a reward or PPO run's heads (``{"score": {...}}``, ``{"value": {...}}``,
                    ``llmjax.models.heads``) as host arrays; None otherwise
    """

    model: object
    params: dict
    kind: str
    path: Path
    step: int | None = None
    tokenizer_dir: Path | None = None
    meta: dict = dataclasses.field(default_factory=dict)
    soft_prompt: np.ndarray | None = None
    heads: dict | None = None

    @property
    def config(self):
        """The model config dataclass (``T5Config`` / ``DecoderConfig``)."""
        return self.model.config


def load_model(path: str | Path, step: int | None = None) -> LoadedModel:
    """Read the model at ``path`` (see the module docstring); ``step`` picks a checkpoint step (default:
    the newest complete one) and must be None for a Hugging Face directory."""
    path = Path(path)
    from llmjax import quantize

    if path.is_dir() and quantize.is_quantized_dir(path):
        if step is not None:
            raise ModelPathError(f"{path} is a quantized model directory, which has no steps; drop the step ({step})")
        model, params = quantize.load(path)
        return LoadedModel(model, params, "quantized", path.absolute(),
                           tokenizer_dir=path if has_tokenizer(path) else None)
    checkpoint_dir = _checkpoint_dir_of(path)
    if checkpoint_dir is None:
        if step is not None:
            raise ModelPathError(f"{path} is a Hugging Face directory, which has no steps; drop the step ({step})")
        from llmjax import hf

        model, params = hf.from_pretrained(path)
        params = jax.tree_util.tree_map(np.asarray, params)
        return LoadedModel(model, params, "hf", path, tokenizer_dir=path if has_tokenizer(path) else None)
    step, params, meta = read_checkpoint_params(checkpoint_dir, step)
    model = model_from_meta(meta)
    if meta.get("base"):
        # A run with a frozen base saved only what trained: lay that over the base it names, in the run's
        # layer layout (an unscanned Hugging Face base under a scanned run, or the other way round).
        from llmjax.models import to_layout

        base = load_model(meta["base"]["path"], meta["base"].get("step"))
        base_params = to_layout(base.params, base.config, model.config)
        if meta.get("quantize"):  # QLoRA: the adapters were trained on the int8 base
            base_params = quantize.round_trip(model, base_params)
        params = overlay_params(base_params, params)
    heads = jax.tree_util.tree_map(np.asarray, params[HEADS_KEY]) if HEADS_KEY in params else None
    if meta.get("lora"):
        params = merge_adapters(params, meta["lora"])
    soft_prompt = None
    if SOFT_PROMPT_KEY in params:
        soft_prompt = np.asarray(params[SOFT_PROMPT_KEY], np.float32)
    tokenizer_dir = meta.get("tokenizer_dir")
    return LoadedModel(model, model_params(params), "checkpoint", checkpoint_dir, step,
                       Path(tokenizer_dir) if tokenizer_dir else None, meta, soft_prompt, heads)


def _checkpoint_dir_of(path: Path) -> Path | None:
    """None for a Hugging Face directory, the checkpoint directory for an llmjax checkpoint or run directory;
    anything else is a :class:`ModelPathError`."""
    if not path.is_dir():
        raise ModelPathError(f"model directory {path} does not exist; pass a Hugging Face directory "
                             "(config.json + model.safetensors) or an llmjax checkpoint or run directory")
    if is_hf_dir(path):
        return None
    checkpoint_dir = find_checkpoint_dir(path)
    if checkpoint_dir is None:
        raise ModelPathError(
            f"{path} is neither a Hugging Face directory (no config.json) nor an llmjax checkpoint directory "
            "(no numbered step directories, no checkpoints/); pass one of those"
        )
    return checkpoint_dir


def read_model_config(path: str | Path):
    """The model config of the model at ``path`` (what :func:`load_model` would build) without reading a weight:
    a Hugging Face directory's ``config.json``, or the newest complete checkpoint step's metadata."""
    path = Path(path)
    from llmjax import quantize

    if path.is_dir() and quantize.is_quantized_dir(path):
        return quantize.read_config(path)
    checkpoint_dir = _checkpoint_dir_of(path)
    if checkpoint_dir is None:
        from llmjax import hf

        hf_config = hf.read_config(path)
        return hf.family_for_model_type(hf_config.get("model_type")).config_from_hf(hf_config)
    manager = open_manager(checkpoint_dir, read_only=True)
    try:
        complete = complete_steps(checkpoint_dir, manager.all_steps())
        if not complete:
            raise CheckpointCorruptError(f"no complete checkpoint in {checkpoint_dir} (no step has a {MANIFEST})")
        meta = read_step_meta(manager, complete[-1])
    finally:
        manager.close()
    return model_from_meta(meta).config


HF_MODEL_FILE_SUFFIXES = (".safetensors", ".safetensors.index.json")


def model_files(loaded: LoadedModel) -> list[Path]:
    """The files that make up the weights and config of a loaded model, in a fixed order: a Hugging Face
    directory's ``config.json`` and safetensors (index included); a checkpoint step's manifest, which holds
    the size and sha256 of every file of the step (so it stands for them, and is cheap to hash)."""
    if loaded.kind == "quantized":
        from llmjax import quantize

        return [loaded.path / quantize.CONFIG_NAME, loaded.path / quantize.WEIGHTS_NAME]
    if loaded.kind == "hf":
        return [loaded.path / "config.json"] + sorted(
            p for p in loaded.path.iterdir() if p.is_file() and p.name.endswith(HF_MODEL_FILE_SUFFIXES))
    return [loaded.path / str(loaded.step) / MANIFEST]


def model_sha256(loaded: LoadedModel) -> str:
    """sha256 over ``model_files(loaded)``: each file's name and bytes (read in 1 MiB chunks), in order.

    Deterministic for the same files wherever the directory lies; any changed weight, config or added
    shard changes it. A run whose base is frozen records it and checks it on resume.
    """
    digest = hashlib.sha256()
    for file in model_files(loaded):
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())  # name and length frame the bytes
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def find_checkpoint_dir(path: Path) -> Path | None:
    """``path`` itself when it holds numbered step directories, else its ``checkpoints/`` if that does."""
    for candidate in (path, path / "checkpoints"):
        if candidate.is_dir() and any(child.is_dir() and child.name.isdigit() for child in candidate.iterdir()):
            return candidate.absolute()
    return None


# -- checkpoints ------------------------------------------------------------------

def read_step_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    """The metadata (``meta`` item) of checkpoint ``step`` alone; no array is read."""
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def open_manager(directory: str | Path, async_save: bool = False, read_only: bool = False) -> ocp.CheckpointManager:
    """The orbax manager of a checkpoint directory, with the items of the layout above."""
    return ocp.CheckpointManager(
        Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None, create=not read_only, read_only=read_only, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,  # leftovers of a run killed while saving
        ),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
    )


def complete_steps(directory: Path, steps) -> list[int]:
    """Of ``steps`` saved in ``directory``, the ones saved completely (their manifest exists), sorted."""
    return [s for s in sorted(steps) if (Path(directory) / str(s) / MANIFEST).is_file()]


def newest_complete_step(path: Path) -> int | None:
    """The newest completely saved step of a checkpoint or run directory, None when it has none.

    Read-only: opens the checkpoints without creating or cleaning anything.
    """
    directory = find_checkpoint_dir(Path(path)) if Path(path).is_dir() else None
    if directory is None:
        return None
    manager = open_manager(directory, read_only=True)
    try:
        return max(complete_steps(directory, manager.all_steps()), default=None)
    finally:
        manager.close()


def read_checkpoint_params(directory: str | Path, step: int | None = None,
                           manager: ocp.CheckpointManager | None = None) -> tuple[int, dict, dict]:
    """``(step, params, meta)`` of one step: trainable and frozen parameters merged, as host numpy arrays.

    ``step`` None: the newest complete step (newer incomplete ones are skipped with a warning). The
    step's files are verified against its manifest first. ``manager``: an open manager of
    ``directory`` to reuse (the ``Checkpointer``'s).
    """
    directory = Path(directory).absolute()
    own = manager is None
    manager = open_manager(directory, read_only=True) if own else manager
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise ModelPathError(f"no checkpoint in {directory} (expected numbered step directories)")
        if step is None:
            complete = complete_steps(directory, steps)
            if not complete:
                raise CheckpointCorruptError(f"no complete checkpoint in {directory}: no step has a {MANIFEST} "
                                             f"(steps {steps}; the run stopped while saving?)")
            step = complete[-1]
            if step != steps[-1]:
                log.warning("skipping incomplete checkpoint steps %s in %s; reading step %d",
                            [s for s in steps if s > step], directory, step)
        elif step not in steps:
            raise ModelPathError(f"checkpoint step {step} not in {directory}; available: {steps}")
        verify_step_dir(directory / str(step), step)
        metadata = manager.item_metadata(step)["state"]
        wanted = {k: metadata[k] for k in ("params", "frozen_params") if k in metadata}
        target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), wanted)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    target,
                    restore_args=jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target),
                    partial_restore=True,
                ),
                meta=ocp.args.JsonRestore(),
            ),
        )
    finally:
        if own:
            manager.close()
    state = restored["state"]
    return step, merge_params(state.get("params") or {}, state.get("frozen_params") or {}), restored["meta"]


def merge_params(trainable: dict, frozen: dict) -> dict:
    """The union of two disjoint nested dicts: a train state's trainable and frozen parameters
    (``llmjax.train.state`` splits them; reading a checkpoint puts them back together)."""
    merged = dict(frozen)
    for key, value in trainable.items():
        if key not in merged:
            merged[key] = value
        elif isinstance(value, dict) and isinstance(merged[key], dict):
            merged[key] = merge_params(value, merged[key])
        else:
            raise ValueError(f"parameter {key!r} is both trainable and frozen")
    return merged


def model_params(tree: dict) -> dict:
    """The model's own params of a run's tree (adapters, soft prompt, heads and reference copy left out)."""
    return {key: value for key, value in tree.items() if key not in EXTRA_KEYS}


def merge_adapters(tree: dict, lora_meta: dict) -> dict:
    """A LoRA run's params (model params plus ``ADAPTERS_KEY``) and its recorded LoRA config -> the model's
    params with the adapters merged in, as host numpy arrays."""
    from llmjax import lora

    if ADAPTERS_KEY not in tree:
        raise CheckpointCorruptError(f"checkpoint metadata records a LoRA config but its params have no "
                                     f"{ADAPTERS_KEY!r} part")
    cfg = lora.LoraConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in lora_meta.items()})
    params = model_params(tree)  # PiSSA's frozen starting point is not checkpointed: computed again from the base
    merged = lora.merge(params, lora.pissa_initial(params, tree[ADAPTERS_KEY], cfg), cfg)
    return jax.tree_util.tree_map(np.asarray, merged)


def overlay_params(base: dict, top: dict) -> dict:
    """``base`` with every leaf that ``top`` has replaced by ``top``'s (nested dicts)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = overlay_params(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def model_from_meta(meta: dict):
    """Rebuild the flax model recorded in a checkpoint's metadata."""
    from llmjax.models import MODEL_CONFIGS, build_model

    family = meta.get("family")
    if family not in MODEL_CONFIGS:
        raise CheckpointCorruptError(
            f"checkpoint metadata names model family {family!r}; known: {sorted(MODEL_CONFIGS)}"
        )
    try:
        config = MODEL_CONFIGS[family](**meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointCorruptError(f"checkpoint metadata has an unusable model config ({e})") from None
    return build_model(config)


def model_meta(model, **extra) -> dict:
    """The metadata a checkpoint needs to rebuild ``model`` (plus ``extra`` JSON fields)."""
    from llmjax.models import family_of

    return {"family": family_of(model.config), "model_config": dataclasses.asdict(model.config), **extra}


# -- integrity ----------------------------------------------------------------------

def step_files(step_dir: Path) -> list[Path]:
    """Every file of a step directory that its manifest covers (all but the manifest)."""
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_step_dir(step_dir: Path, step: int) -> None:
    """Check every file of a step directory against its manifest (size, then sha256)."""
    where = f"checkpoint step {step} at {step_dir}"
    manifest_path = step_dir / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointCorruptError(f"{where} is incomplete: {MANIFEST} is missing (the run stopped while saving?)")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointCorruptError(f"{where} has an unreadable {MANIFEST}: {e}") from None
    for name, expected in files.items():
        path = step_dir / name
        if not path.is_file():
            raise CheckpointCorruptError(f"{where} is incomplete: file {name} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointCorruptError(
                f"{where} is truncated or corrupted: file {name} has {size} bytes, the manifest says {expected['bytes']}"
            )
        if sha256(path) != expected["sha256"]:
            raise CheckpointCorruptError(f"{where} is corrupted: file {name} does not match its sha256 checksum")
