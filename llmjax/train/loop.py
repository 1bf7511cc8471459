"""The training loop every stage runs: data -> step -> metrics, eval, checkpoints, signals, export.

A stage hands the loop a :class:`Stage` (model, loss, data, trainable filter, init
params); the loop owns everything else and never imports a stage. It speaks to the
user only through its progress bar and metrics writers.

Resume is exact: the checkpoint holds params, optimizer state, step, the rng and
the data iterator's position, and a step's randomness is ``fold_in(rng, step)``, so a
resumed run computes bitwise what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax

from llmjax import environment, sharding
from llmjax.models import model_family, step_flops
from llmjax.config import ConfigError, MeshConfig, RunConfig, config_to_dict
from llmjax.errors import UserError
from llmjax.loading import model_params
from llmjax.train.checkpoint import Checkpointer, model_meta
from llmjax.train.metrics import MetricsWriter, Throughput, measure_matmul_peak_flops
from llmjax.train.optim import make_optimizer
from llmjax.train.state import (
    InitTree, TrainableFilter, abstract_train_state, frozen_params_from_base, init_train_state, place_model_params,
    train_everything,
)
from llmjax.train.step import LossFn, compile_step, finish_eval, make_eval_step, make_train_step


class NonFiniteLossError(UserError, FloatingPointError, ValueError):
    """The loss or gradient became NaN/inf under ``train.nan_policy=abort`` (the message says what to change)."""


class BaseChangedError(UserError, ValueError):
    """A resumed run's base model (``init_from``) is not the one its checkpoints were trained from."""


@dataclasses.dataclass(frozen=True)
class Base:
    """The weights a run starts from (``init_from``): the model's full param tree as host arrays, where
    they were read and their sha256 (``llmjax.loading.model_sha256``). Checkpoints of a run with a base
    leave its frozen params out and record ``path``/``sha256``; a resume rebuilds them from the base
    after checking the hash."""

    params: dict
    path: str
    sha256: str
    step: int | None = None  # the checkpoint step read; None for a Hugging Face directory


@dataclasses.dataclass(frozen=True)
class FrozenModel:
    """A second model a stage's loss reads and never trains (a distillation teacher).

    Its params (``model``'s full tree, host arrays) ride in the state's frozen half under the top-level
    ``key``, each sharded by its own logical axes, so the jitted step reads them like any frozen leaf. They
    are never in the optimizer state nor in a checkpoint: the checkpoint's metadata records ``path`` and
    ``sha256`` (``meta["frozen_models"][key]``), and a resume checks the hash and places them again.
    """

    key: str
    model: nn.Module
    params: dict
    path: str
    sha256: str


@dataclasses.dataclass
class Stage:
    """What a stage hands the loop.

    train_data:   iterator of host batches (dicts of ``[local_batch, length]`` numpy arrays, this
                  process's rows) with ``state() -> dict`` and ``restore(dict)`` (see ``DataIterator``).
    eval_data:    ``() -> iterator`` of host batches, a fresh pass each call; None: no eval.
    is_trainable: which leaves of the tree train (``llmjax.train.state``); the rest are frozen.
    base:         the init source's weights (:class:`Base`), or None: random from ``train.seed``.
    init_tree:    ``(key, boxed base or None) -> full tree`` the loss reads (``llmjax.train.state.InitTree``;
                  default: the base, else ``model.init``). A stage with parts outside the model (adapters,
                  soft prompt, heads) adds them here: the same function builds the fresh state and, through
                  ``eval_shape``, the restore target, so every part initialises and resumes exactly.
    loss_for:     ``(model-like) -> loss`` rebuilding ``loss_fn`` for another object with ``.apply(variables,
                  ...)`` and ``.config`` (how LoRA with dropout computes its adapters factored, in
                  ``llmjax.stages.adapters``), or None: the loss is only ``loss_fn``.
    export:       ``(state, out_dir) -> str`` writing the trained model (default: the merged params as a
                  Hugging Face directory plus the tokenizer).
    eval_hook:    ``(full params, step) -> {name: float}`` run every ``eval_hook_every_steps`` steps and
                  written as split ``eval_hook_split`` (SFT: ROUGE of generations); None: none.
    tokenizer:    object with ``save_pretrained(dir)`` exported beside the model, or None.
    meta:         extra JSON saved in every checkpoint (e.g. ``tokenizer_dir``).
    adapters:     JSON naming what the trainable parts outside the model are and how the model reads them (a
                  LoRA run: rank, alpha, scale rule, the modules adapted; a soft prompt's length), or empty. Saved
                  in every checkpoint with the run's ``train.trainable`` / ``train.frozen`` (``meta["trained_parts"]``);
                  a resume that gives other values is refused naming them, as the checkpoint's trained part would
                  mean something else or not fit.
    frozen_models: other models the loss reads under their ``key`` of the tree (:class:`FrozenModel`); the
                  rest of the stage (``eval_hook``, ``rollout``, ``export``) sees them in the full params too.
    rollout:      ``(full params, host batch, step) -> (host batch, {name: float})``, or None. When set, each
                  batch of ``train_data`` (e.g. prompts) goes through it before the step: an RL stage samples
                  from the current policy and returns the experience the step trains on, plus statistics
                  the loop logs with the step's metrics. Its randomness must depend on ``step`` only, so a
                  resumed run repeats it; any state it keeps rides in ``train_data.state()``.
    epochs, minibatches: optimizer updates per batch: ``epochs`` passes over each batch in a fresh order,
                  each split into ``minibatches`` updates (PPO's inner loop); 1, 1: one update per step.
    """

    name: str
    model: nn.Module
    loss_fn: LossFn
    train_data: Any
    eval_data: Callable[[], Iterator[dict]] | None = None
    is_trainable: TrainableFilter = train_everything
    base: Base | None = None
    init_tree: InitTree | None = None
    loss_for: Callable[[Any], LossFn] | None = None
    export: Callable[[Any, Path], str] | None = None
    eval_hook: Callable[[dict, int], dict] | None = None
    eval_hook_every_steps: int = 0
    eval_hook_split: str = "generate"
    tokenizer: Any = None
    meta: dict = dataclasses.field(default_factory=dict)
    adapters: dict = dataclasses.field(default_factory=dict)
    rollout: Callable[[dict, dict, int], tuple[dict, dict]] | None = None
    frozen_models: tuple[FrozenModel, ...] = ()
    epochs: int = 1
    minibatches: int = 1

    @property
    def updates_per_step(self) -> int:
        return self.epochs * self.minibatches


def train(stage: Stage, config: RunConfig, *, mesh=None, progress: bool = True,
          peak_flops_per_sec: float | None = None) -> dict:
    """Run ``config.train.steps`` steps of ``stage`` (resuming from ``checkpoint.dir`` if asked).

    Returns a summary dict: ``start_step``, ``step``, ``loss`` (last logged), ``eval_loss``
    (last eval or None), ``skipped_steps``, ``interrupted`` (signal name or None),
    ``checkpoint`` (last saved step dir), ``export`` (HF dir or None), ``tokens_per_sec``, ``mfu``.
    Raises ``NonFiniteLossError`` under ``nan_policy=abort`` naming the step.
    """
    if mesh is None:
        config = config.for_devices(jax.device_count(), jax.process_count())
        mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    else:  # the given mesh replaces the config's, and the batch is checked against it
        config = dataclasses.replace(config, mesh=MeshConfig(**dict(mesh.shape)))
    tc = config.train
    # The schedule runs over optimizer updates, which a stage with several per batch (PPO) multiplies.
    tx, schedule = make_optimizer(config.optim, (config.optim.schedule_steps or tc.steps) * stage.updates_per_step)
    checkpointer = Checkpointer(config.checkpoint_dir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    # What the checkpoint's trainable tree is and how the model reads it: a resume must give the same.
    trained_parts = {**stage.adapters, "train": {"trainable": list(tc.trainable), "frozen": list(tc.frozen)}}
    meta = model_meta(stage.model, stage=stage.name, run_config=config_to_dict(config), **stage.meta,
                      trained_parts=trained_parts)
    if stage.base is not None:
        meta["base"] = {"path": stage.base.path, "step": stage.base.step, "sha256": stage.base.sha256}
    if stage.frozen_models:
        meta["frozen_models"] = {m.key: {"path": m.path, "sha256": m.sha256} for m in stage.frozen_models}
    meta["environment"] = environment.describe()  # what wrote each checkpoint (process 0's machine)
    output_dir = Path(tc.output_dir)
    summary: dict[str, Any] = {"interrupted": None, "eval_loss": None, "export": None, "loss": None}

    with sharding.activate(mesh), _StopSignals() as stop:
        state, shardings, notes = _initial_state(stage, config, tx, mesh, checkpointer, trained_parts)
        writer = MetricsWriter(output_dir)  # after a refused resume, no new metrics file
        for note in notes:
            _print(note, progress)
        summary["start_step"] = start_step = int(jax.device_get(state.step))
        if writer.enabled:
            _record_environment(output_dir, start_step, meta["environment"])
        batch_sharding = sharding.batch_sharding(mesh)
        train_step = compile_step(
            make_train_step(stage.loss_fn, tx, microbatches=tc.microbatches, learning_rate_fn=schedule,
                            epochs=stage.epochs, minibatches=stage.minibatches),
            updates_state=True, state_shardings=shardings, batch_sharding=batch_sharding,
        )
        eval_step = compile_step(make_eval_step(stage.loss_fn), updates_state=False,
                                 state_shardings=shardings, batch_sharding=batch_sharding)
        throughput = _throughput(stage, config, peak_flops_per_sec)
        bar = _progress_bar(progress, tc.steps, start_step)
        pending = None  # (step, metrics) of the previous step, read after the next one is dispatched
        step = start_step
        saved_step = start_step if checkpointer.has_step(start_step) else None
        noted: set[str] = set()  # data notes said once per run
        try:
            while step < tc.steps and not stop.signal_name:
                try:
                    batch = next(stage.train_data)
                except StopIteration:
                    _print(f"training data ran out after step {step}; stopping early", progress)
                    break
                rollout_stats = {}
                if stage.rollout is not None:
                    batch, rollout_stats = stage.rollout(state.full_params(), batch, step)
                state, metrics = train_step(state, sharding.shard_batch(batch, mesh))
                step += 1
                if step == start_step + 1:
                    throughput.reset()  # the first call compiled the step: not training throughput
                else:
                    throughput.add_step()
                if pending is not None:
                    _check_finite(*pending, tc.nan_policy, progress)
                pending = (step, metrics)
                if step % tc.log_every_steps == 0 or step == tc.steps:
                    _check_finite(*pending, tc.nan_policy, progress)
                    pending = None
                    logged = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    logged.update(rollout_stats)
                    logged.update(_data_stats(stage.train_data, tc, progress, noted))
                    logged.update(throughput.report())
                    writer.write(step, logged, "train")
                    summary.update(loss=logged["loss"], tokens_per_sec=logged.get("tokens_per_sec"),
                                   mfu=logged.get("mfu"))
                    if bar is not None:
                        bar.set_postfix(loss=f"{logged['loss']:.4f}", tok_s=f"{logged.get('tokens_per_sec', 0):.0f}")
                if bar is not None:
                    bar.update(1)
                if tc.eval_every_steps and stage.eval_data and step % tc.eval_every_steps == 0:
                    summary["eval_loss"] = _evaluate(stage, eval_step, state, mesh, tc.eval_steps, writer, step)
                    throughput.reset()  # eval time is not training throughput
                if stage.eval_hook and stage.eval_hook_every_steps and step % stage.eval_hook_every_steps == 0:
                    hooked = {k: float(v) for k, v in stage.eval_hook(state.full_params(), step).items()}
                    writer.write(step, hooked, stage.eval_hook_split)
                    summary[stage.eval_hook_split] = hooked
                    throughput.reset()
                if step % config.checkpoint.every_steps == 0:
                    if pending is not None:  # under nan_policy=abort a non-finite step must never be saved
                        _check_finite(*pending, tc.nan_policy, progress)
                        pending = None
                    checkpointer.save(_saved_part(state, stage), stage.train_data.state(), meta)
                    saved_step = step
                    throughput.reset()
            if pending is not None:
                _check_finite(*pending, tc.nan_policy, progress)
            if stop.signal_name:
                summary["interrupted"] = stop.signal_name
                _print(f"received {stop.signal_name} at step {step}: saving a checkpoint and stopping", progress)
            if saved_step != step:
                checkpointer.save(_saved_part(state, stage), stage.train_data.state(), meta)
        finally:
            if bar is not None:
                bar.close()
            writer.close()
            checkpointer.close()  # finishes a background save (and its manifest) even on an error

        summary.update(step=step, skipped_steps=int(jax.device_get(state.skipped_steps)),
                       checkpoint=str(checkpointer.step_dir(step)))
    # Outside the mesh context: the export rebuilds abstract params, which must not pick up its rules.
    if config.export_dir is not None and not summary["interrupted"]:
        summary["export"] = (stage.export or partial(_export, stage))(state, config.export_dir)
    return summary


# -- pieces of the loop ----------------------------------------------------------

def _initial_state(stage: Stage, config: RunConfig, tx, mesh, checkpointer: Checkpointer, trained_parts: dict):
    """Resume from the newest good checkpoint (refused when its ``trained_parts`` differ), or build a fresh state;
    ``(state, shardings, notes)``."""
    notes = []
    steps = checkpointer.all_steps()
    if steps and not config.train.resume:
        raise ConfigError(
            f"checkpoint dir {checkpointer.directory} already has checkpoints (newest step {steps[-1]}) and "
            "train.resume=false; set train.resume=true to continue it or point checkpoint.dir elsewhere"
        )
    base = None if stage.base is None else stage.base.params
    if steps:
        abstract = abstract_train_state(stage.model, tx, stage.is_trainable, mesh, stage.init_tree,
                                        has_base=base is not None)
        restored = checkpointer.restore_latest(_saved_part(abstract, stage), fallback=True,
                                               check_meta=partial(_check_resumable, stage, checkpointer, trained_parts))
        notes.extend(f"skipped unusable checkpoint: {reason}" for reason in restored.skipped)
        state = restored.state
        if base is not None:  # the frozen part was left out of the checkpoint: rebuild it from the base
            state = state.replace(frozen_params=frozen_params_from_base(
                stage.model, stage.is_trainable, config.train.seed, mesh, base, stage.init_tree))
        if restored.data_state:
            stage.train_data.restore(restored.data_state)
        shardings = jax.tree_util.tree_map(lambda a: a.sharding, abstract)
        notes.append(f"resumed from step {restored.step} ({checkpointer.step_dir(restored.step)})")
        return (*_with_frozen_models(stage, state, shardings, mesh), notes)
    state, shardings = init_train_state(
        stage.model, tx, stage.is_trainable, config.train.seed, mesh, params=base, init_tree=stage.init_tree
    )
    return (*_with_frozen_models(stage, state, shardings, mesh), notes)


def _with_frozen_models(stage: Stage, state, shardings, mesh):
    """``(state, shardings)`` with the stage's frozen models placed in the frozen half under their keys."""
    if not stage.frozen_models:
        return state, shardings
    frozen, frozen_shardings = dict(state.frozen_params), dict(shardings.frozen_params)
    for part in stage.frozen_models:
        if part.key in frozen:
            raise ValueError(f"frozen model key {part.key!r} is already a part of the stage's tree")
        frozen[part.key], frozen_shardings[part.key] = place_model_params(part.model, part.params, mesh)
    return state.replace(frozen_params=frozen), shardings.replace(frozen_params=frozen_shardings)


def _saved_part(state, stage: Stage):
    """What a checkpoint holds: the whole state, or, for a run with a base, all but the frozen params
    (they are the base's, rebuilt from it on resume); never a frozen model (placed again on resume)."""
    if stage.base is not None:
        return state.replace(frozen_params={})
    if stage.frozen_models:
        keys = {part.key for part in stage.frozen_models}
        return state.replace(frozen_params={k: v for k, v in state.frozen_params.items() if k not in keys})
    return state


def _record_environment(output_dir: Path, start_step: int, described: dict) -> None:
    """Append ``{"start_step", "time", **environment.describe()}`` to ``<output_dir>/environment.jsonl``: one line
    per start or resume, so a run resumed on another machine or another jax says so."""
    line = {"start_step": start_step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **described}
    with open(output_dir / "environment.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def _check_resumable(stage: Stage, checkpointer: Checkpointer, trained_parts: dict, step: int, meta: dict) -> None:
    """Refuse, before any array is read, a checkpoint this stage cannot continue: another base, other frozen
    models, other trainable parts."""
    where = f"checkpoint step {step} in {checkpointer.directory}"
    _check_base(stage, meta, where)
    _check_frozen_models(stage, meta, where)
    _check_trained_parts(trained_parts, meta, where)


def _check_base(stage: Stage, meta: dict, where: str) -> None:
    """Refuse to resume a checkpoint against a base other than the one it was trained from."""
    saved = meta.get("base")
    if saved is None and stage.base is None:
        return
    if saved is None:
        raise BaseChangedError(f"{where} was trained without a base model, but this run has init_from="
                               f"{stage.base.path}; drop init_from or point checkpoint.dir elsewhere")
    if stage.base is None:
        raise BaseChangedError(f"{where} was trained from the base model {saved['path']}; set init_from to it "
                               "to resume, or point checkpoint.dir elsewhere")
    if saved["sha256"] != stage.base.sha256:
        raise BaseChangedError(
            f"base model changed: {where} was trained from {saved['path']} (sha256 {saved['sha256'][:16]}...), "
            f"but init_from={stage.base.path} now has sha256 {stage.base.sha256[:16]}...; restore that base "
            "or start a new run (another checkpoint.dir)")


def _check_frozen_models(stage: Stage, meta: dict, where: str) -> None:
    """Refuse to resume a checkpoint whose frozen models (a teacher) differ from this run's."""
    saved = meta.get("frozen_models") or {}
    ours = {part.key: part for part in stage.frozen_models}
    if set(saved) != set(ours):
        raise BaseChangedError(f"{where} was trained with frozen models {sorted(saved)}, but this run has "
                               f"{sorted(ours)}; point checkpoint.dir elsewhere to start a new run")
    for key, part in ours.items():
        if saved[key]["sha256"] != part.sha256:
            raise BaseChangedError(
                f"the {key} model changed: {where} was trained with {saved[key]['path']} (sha256 "
                f"{saved[key]['sha256'][:16]}...), but this run's {key} {part.path} has sha256 {part.sha256[:16]}...; "
                "restore that model or start a new run (another checkpoint.dir)")


def _check_trained_parts(ours: dict, meta: dict, where: str) -> None:
    """Refuse to resume a checkpoint whose trainable parts differ from this run's: its adapters
    (``Stage.adapters``) or its ``train.trainable`` / ``train.frozen`` filters. A checkpoint written before
    llmjax recorded them (no ``meta["trained_parts"]``) is not checked."""
    if "trained_parts" not in meta:
        return
    saved = meta["trained_parts"]
    differ = []
    for section in sorted(set(saved) | set(ours)):
        if section not in saved or section not in ours:
            differ.append(f"a {section}: section (checkpoint: {saved.get(section, 'none')}, "
                          f"this run: {ours.get(section, 'none')})")
            continue
        differ.extend(f"{section}.{key} (checkpoint: {saved[section].get(key)}, this run: {ours[section].get(key)})"
                      for key in sorted(set(saved[section]) | set(ours[section]))
                      if saved[section].get(key) != ours[section].get(key))
    if differ:
        raise ConfigError(
            f"{where} was trained with other trainable parts than this run's config gives: {'; '.join(differ)}; "
            "set them back to resume, or point checkpoint.dir (or train.output_dir) elsewhere to start a new run")


def _check_finite(step: int, metrics: dict, policy: str, progress: bool) -> None:
    if float(jax.device_get(metrics["finite"])) == 1.0:
        return
    loss, grad_norm = float(jax.device_get(metrics["loss"])), float(jax.device_get(metrics["grad_norm"]))
    if policy == "abort":
        raise NonFiniteLossError(
            f"non-finite loss at step {step} (loss={loss}, grad_norm={grad_norm}); the update was discarded and "
            "training stopped. Lower optim.learning_rate, check the data, or set train.nan_policy=skip"
        )
    skipped = int(jax.device_get(metrics["skipped_steps"]))
    _print(f"step {step}: non-finite loss (loss={loss}, grad_norm={grad_norm}), update skipped "
           f"({skipped} skipped so far)", progress)


def _evaluate(stage: Stage, eval_step, state, mesh, max_batches: int, writer: MetricsWriter, step: int) -> float:
    totals: dict[str, float] = {}
    for index, batch in enumerate(stage.eval_data()):
        if max_batches and index >= max_batches:
            break
        sums = jax.device_get(eval_step(state, sharding.shard_batch(batch, mesh)))
        for name, value in sums.items():
            totals[name] = totals.get(name, 0.0) + float(value)
    if not totals:
        return float("nan")
    means = finish_eval(totals)
    writer.write(step, means, "eval")
    return means["loss"]


def _throughput(stage: Stage, config: RunConfig, peak_flops_per_sec: float | None) -> Throughput:
    dc, batch_size = config.data, config.train.batch_size
    encoder_length = dc.encoder_length if model_family(stage.model.config).seq2seq else None
    virtual = config.prompt_tuning.num_virtual_tokens if config.prompt_tuning is not None else 0  # the soft prompt
    flops = step_flops(stage.model.config, batch_size, dc.decoder_length, encoder_length, virtual)
    if peak_flops_per_sec is None and jax.process_index() == 0:
        # CPU "devices" (fake ones included) share the host's cores, which one matmul already uses.
        devices = 1 if jax.default_backend() == "cpu" else jax.device_count()
        peak_flops_per_sec = measure_matmul_peak_flops(dtype=jax.numpy.dtype(stage.model.config.dtype)) * devices
    return Throughput(flops.tokens, flops.total, peak_flops_per_sec)


def _data_stats(data, tc, progress: bool, noted: set) -> dict[str, float]:
    """The training data's own counters (``DataIterator.stats``: examples, examples cut to the row length),
    prefixed ``data_``; the first cut is also said once, with the fix, so truncation is never silent."""
    stats = data.stats() if callable(getattr(data, "stats", None)) else {}
    for key, count in stats.items():
        if key.startswith("truncated_") and count > 0 and key not in noted:
            noted.add(key)
            side = key.removeprefix("truncated_").removesuffix("_examples")
            _print(f"note: {count:.0f} of the first {stats['examples']:.0f} training examples were cut to "
                   f"data.{side}_length; raise it to keep them whole (metrics: data_{key})", progress)
    return {f"data_{key}": value for key, value in stats.items()}


def _export(stage: Stage, state, out: Path) -> str:
    from llmjax import hf

    # The model's own params: a stage's heads and frozen reference copy are not part of the exported model.
    params = jax.device_get(model_params(state.full_params()))
    if jax.process_index() == 0:
        hf.save_pretrained(stage.model, params, out)
        if stage.tokenizer is not None:
            stage.tokenizer.save_pretrained(out)
    return str(Path(out).absolute())


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _print(message: str, progress: bool) -> None:
    if jax.process_index() != 0:
        return
    if progress:
        from tqdm import tqdm

        tqdm.write(message)
    else:
        print(message, flush=True)


class _StopSignals(contextlib.AbstractContextManager):
    """Turn SIGTERM/SIGINT into a flag the loop checks after each step (previous handlers restored on exit)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        self.signal_name = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
