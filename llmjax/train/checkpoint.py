"""Checkpoints: orbax save/restore of the train state, data-iterator state and run metadata.

The layout of ``checkpoint.dir`` and the reading of a step's parameters (what inference and the
next stage need) live in ``llmjax.loading``, below the training code; this module writes steps
and restores whole train states.

Atomic: orbax writes a step into a temporary directory and renames it when complete,
so a step directory either exists whole or not at all. The manifest is written after
the rename; a step without one (the run died in between) or whose files do not match
it (truncated, corrupted) is refused with ``CheckpointCorruptError`` naming the step and
path. ``restore_latest(..., fallback=True)`` then tries the previous step and says so.

Retention keeps the newest ``keep`` complete (manifest-verified-at-save) steps and is
applied only after the newest manifest is written, so the newest complete checkpoint
is never deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

from llmjax.errors import InputError, UserError
from llmjax.loading import (  # noqa: F401 (MANIFEST, CheckpointCorruptError, model_meta re-exported)
    MANIFEST, TOKENIZER_FILES, CheckpointCorruptError, ModelPathError, has_tokenizer, load_model, model_meta,
    open_manager, read_checkpoint_params, read_step_meta, sha256, step_files, verify_step_dir,
)
from llmjax.train.state import TrainState

log = logging.getLogger(__name__)


class CheckpointSaveError(UserError, OSError):
    """A checkpoint step could not be written (disk full, no permission); earlier steps are intact."""


@dataclasses.dataclass
class Restored:
    """What ``restore``/``restore_latest`` return."""

    step: int
    state: Any               # TrainState (or a nested dict of params for ``restore_params``)
    data_state: dict | None  # the data iterator's ``state()`` at save time
    meta: dict
    skipped: list[str] = dataclasses.field(default_factory=list)  # newer steps refused, with reasons


class Checkpointer:
    """Save and restore train states under one directory. See the module docstring.

    ``keep``: complete checkpoints to keep (None: all). ``async_save``: ``save`` returns once
    the arrays are copied off the devices and writes in the background; the manifest and
    retention follow when that write is done (at the next ``save``, ``wait_until_finished``
    or ``close``).
    """

    def __init__(self, directory: str | Path, keep: int | None = 3, async_save: bool = False,
                 verify_on_restore: bool = True):
        if keep is not None and keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1 or null (the newest checkpoint is always kept), got {keep}")
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.verify_on_restore = verify_on_restore
        self.async_save = async_save
        self._unfinished: int | None = None  # step written asynchronously, manifest not yet written
        self._manager = open_manager(self.directory, async_save=async_save)

    # -- saving -------------------------------------------------------------
    def save(self, state: TrainState, data_state: dict | None, meta: dict) -> Path:
        """Write ``state`` at its step, then (once written) its manifest, then apply retention.

        Raises ``CheckpointSaveError`` (one line: what failed, where, the last complete step) when the
        disk cannot take the step: checked before writing, and for failures while writing.
        """
        self.wait_until_finished()
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            if self.has_step(step):
                return self.step_dir(step)  # the same step saved twice (e.g. final save after a periodic one)
            self._manager.delete(step)  # an incomplete leftover of this step: write it again
        state_dict = flax.serialization.to_state_dict(state)
        self._check_free_space(step, sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree_util.tree_leaves(state_dict)))
        with self._save_errors(step):
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeSave(state_dict),
                    data=ocp.args.JsonSave({"per_process": _gather_from_processes(data_state or {})}),
                    meta=ocp.args.JsonSave(meta),
                ),
            )
        self._unfinished = step
        if not self.async_save:
            self.wait_until_finished()
        return self.step_dir(step)

    def wait_until_finished(self) -> None:
        """Block until a background save is written, then write its manifest and apply retention."""
        if self._unfinished is None:
            return
        step, self._unfinished = self._unfinished, None
        with self._save_errors(step):
            self._manager.wait_until_finished()
            if jax.process_index() == 0:
                _write_manifest(self.step_dir(step), step)
        _sync(f"llmjax_manifest_{step}")
        self._apply_retention()

    def _check_free_space(self, step: int, state_bytes: int) -> None:
        """Refuse a save the disk cannot hold before orbax starts it (a failed write leaves a mess of
        background-thread errors behind); the state's array bytes bound what the step needs."""
        free = _free_bytes(self.directory)
        if free < state_bytes:
            raise CheckpointSaveError(self._save_failure(
                step, f"it needs about {_megabytes(state_bytes)} and the disk has {_megabytes(free)} free"))

    @contextlib.contextmanager
    def _save_errors(self, step: int):
        """Turn an OS-level write failure (disk full, permission, quota) into ``CheckpointSaveError``.

        Orbax reports tensorstore's failures as ``ValueError`` text carrying ``os_error_code``.
        """
        try:
            yield
        except Exception as e:  # noqa: BLE001 - only OS failures are converted; the rest re-raised as is
            code = e.errno if isinstance(e, OSError) else _os_error_code(str(e))
            if code is None:
                raise
            raise CheckpointSaveError(self._save_failure(step, os.strerror(code))) from None

    def _save_failure(self, step: int, reason: str) -> str:
        complete = [s for s in self.all_steps() if s != step and self.has_step(s)]
        last = (f"the last complete checkpoint is step {complete[-1]} ({self.step_dir(complete[-1])}); free space "
                "or set checkpoint.dir elsewhere and rerun to resume from it") if complete else \
            "there is no complete checkpoint yet; free space or set checkpoint.dir elsewhere"
        return f"saving checkpoint step {step} to {self.directory} failed: {reason}; {last}"

    def _apply_retention(self) -> None:
        if self.keep is None:
            return
        complete = [s for s in self.all_steps() if self.has_step(s)]
        if not complete:
            return
        kept = set(complete[-self.keep:])
        newest_complete = complete[-1]
        for step in self.all_steps():
            if step < newest_complete and step not in kept:
                self._manager.delete(step)

    # -- inspecting ---------------------------------------------------------
    def all_steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def has_step(self, step: int) -> bool:
        """True when ``step`` was saved completely (its manifest exists; files not re-hashed)."""
        return (self.step_dir(step) / MANIFEST).is_file()

    def verify(self, step: int) -> None:
        """Raise ``CheckpointCorruptError`` unless every file of ``step`` matches its manifest."""
        verify_step_dir(self.step_dir(step), step)

    # -- restoring ----------------------------------------------------------
    def restore(self, step: int, abstract_state: TrainState,
                check_meta: Callable[[int, dict], None] | None = None) -> Restored:
        """Restore ``step`` into the shapes, dtypes and shardings of ``abstract_state``.

        ``abstract_state``: a TrainState of ``jax.ShapeDtypeStruct`` with ``sharding`` set,
        so every array lands directly on its devices. ``check_meta(step, meta)``: called with the step's
        metadata before any array is read, to refuse a checkpoint this run cannot continue with its own
        error (a changed base or adapter config) rather than a mismatch of trees or shapes.
        """
        if self.verify_on_restore:
            self.verify(step)
        if check_meta is not None:
            check_meta(step, read_step_meta(self._manager, step))
        target = flax.serialization.to_state_dict(abstract_state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        state = flax.serialization.from_state_dict(abstract_state, restored["state"])
        return Restored(step, state, _this_process(restored["data"], self.step_dir(step)), restored["meta"])

    def restore_latest(self, abstract_state: TrainState, fallback: bool = False,
                       check_meta: Callable[[int, dict], None] | None = None) -> Restored | None:
        """Restore the newest step (``check_meta`` as in ``restore``); None when the directory has no checkpoint.

        With ``fallback``, a newest step that fails verification is moved aside
        (``quarantine``) with a warning naming it and the reason, and the previous one is
        tried; ``Restored.skipped`` lists what was skipped.
        """
        skipped: list[str] = []
        for step in reversed(self.all_steps()):
            try:
                restored = self.restore(step, abstract_state, check_meta)
            except CheckpointCorruptError as e:
                if not fallback:
                    raise CheckpointCorruptError(
                        f"{e}; set checkpoint.fallback=true to resume from the previous checkpoint instead"
                    ) from None
                moved = self.quarantine(step) if jax.process_index() == 0 else None
                _sync(f"llmjax_quarantine_{step}")
                skipped.append(f"{e} (moved to {moved})")
                warnings.warn(f"{e}; moved it to {moved} and falling back to the previous checkpoint", stacklevel=2)
                continue
            restored.skipped = skipped
            return restored
        if skipped:
            raise CheckpointCorruptError(
                f"no usable checkpoint in {self.directory}: " + "; ".join(skipped)
            )
        return None

    def restore_params(self, step: int | None = None) -> Restored:
        """Only the model parameters (trainable and frozen merged) of ``step`` (default: newest
        complete), as host arrays (``llmjax.loading.read_checkpoint_params``)."""
        step, params, meta = read_checkpoint_params(self.directory, step, self._manager)
        return Restored(step, params, None, meta)

    def quarantine(self, step: int) -> Path:
        """Move a bad step aside (``<dir>/corrupt/<step>``) so it is neither resumed nor overwritten."""
        target = self.directory / "corrupt" / str(step)
        target.parent.mkdir(exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        self.step_dir(step).rename(target)
        self._manager.reload()
        return target

    def close(self) -> None:
        self.wait_until_finished()
        self._manager.close()


# -- integrity ----------------------------------------------------------------

def _free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def _megabytes(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"


def _os_error_code(message: str) -> int | None:
    match = re.search(r"os_error_code='?(\d+)", message)
    return int(match.group(1)) if match else None


def _write_manifest(step_dir: Path, step: int) -> None:
    files = {
        str(p.relative_to(step_dir)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in step_files(step_dir)
    }
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1))
    tmp.rename(step_dir / MANIFEST)  # atomic: a manifest is whole or absent


def _gather_from_processes(data_state: dict) -> list[dict]:
    """Every process's data-iterator state, in process order (``DataIterator``'s is the same on all of them;
    a stage's own iterator may differ per process)."""
    if jax.process_count() == 1:
        return [data_state]
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(data_state).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([encoded.size], np.int64)).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: encoded.size] = encoded
    gathered = multihost_utils.process_allgather(padded).reshape(len(lengths), -1)
    return [json.loads(row[:n].tobytes()) for row, n in zip(gathered, lengths)]


def _this_process(data_item: dict | None, where: Path) -> dict | None:
    """This process's data-iterator state from a checkpoint's ``data`` item."""
    per_process = (data_item or {}).get("per_process")
    if not per_process:
        return None
    if all(state == per_process[0] for state in per_process):
        return per_process[0] or None  # a layout-independent state (DataIterator's) resumes on any layout
    if len(per_process) != jax.process_count():
        raise InputError(
            f"checkpoint {where} was written by {len(per_process)} processes but this run has "
            f"{jax.process_count()}; resume with the same number of processes so the data order is the same"
        )
    return per_process[jax.process_index()] or None


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# -- Hugging Face bridge --------------------------------------------------------

def export_checkpoint_to_hf(checkpoint_dir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Write a Hugging Face directory (config, safetensors, tokenizer if recorded) from a checkpoint
    (or run) directory; ``step`` default: the newest complete one."""
    from llmjax import hf

    loaded = load_model(checkpoint_dir, step)
    if loaded.kind != "checkpoint":
        raise ModelPathError(f"{checkpoint_dir} is a Hugging Face directory already; pass an llmjax checkpoint "
                             "or run directory to export")
    hf.save_pretrained(loaded.model, loaded.params, out)
    _copy_tokenizer(loaded.tokenizer_dir, Path(out))
    return Path(out)


def import_hf_to_checkpoint(hf_dir: str | Path, out: str | Path) -> Path:
    """Write a Hugging Face directory as an llmjax checkpoint (step 0, params only, all trainable)."""
    from llmjax import hf

    model, params = hf.from_pretrained(hf_dir)
    state = TrainState(
        step=np.zeros((), np.int32), params=params, frozen_params={}, opt_state={},
        rng=np.zeros((2,), np.uint32), skipped_steps=np.zeros((), np.int32),
    )
    tokenizer_dir = str(Path(hf_dir).absolute()) if has_tokenizer(Path(hf_dir)) else None
    checkpointer = Checkpointer(out)
    checkpointer.save(state, None, model_meta(model, tokenizer_dir=tokenizer_dir, stage="import"))
    checkpointer.close()
    return Path(out)


def _copy_tokenizer(source: Path | None, out: Path) -> None:
    if source is None:
        return
    if not source.is_dir():
        log.warning("tokenizer directory %s recorded in the checkpoint is gone; exported without a tokenizer", source)
        return
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
