"""Knowledge distillation (``stage: distill``, Hinton et al. 2015): the run's model, the student, learns from a
frozen teacher's softened distribution and from the labels.

The stage is SFT's (``llmjax.stages.sft.instruction_stage``: the same instruction data, held-out loss, ROUGE
hook, init source and export) with another loss and a second, frozen model:

* data:      ``data.tasks`` / ``data.task_rates`` through the SFT data path (train split; validation for the
             held-out loss), the target tokens and loss weights of each batch as SFT trains on them
* loss:      per target token ``distill.alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)``
             (``llmjax.losses.distillation_loss``, fp32, ``T = distill.temperature``), plus the run's z-loss;
             summed with the batch's loss weights and divided by the target-token count like every loss.
             Logged per token: ``loss``, ``kl`` (at T, unscaled), ``ce``, ``z_loss``
* teacher:   ``distill.teacher``, a Hugging Face directory or llmjax checkpoint/run directory read by
             ``llmjax.loading.load_model``: the same family as the student (one batch feeds both) and the same
             vocabulary and special ids (the distributions compare id by id), else a ``ConfigError``. Its params
             sit in the state's frozen half under ``TEACHER_KEY`` (``llmjax.train.loop.FrozenModel``: sharded by
             their logical axes, its logits computed inside the jitted step, never in the optimizer state nor
             in a checkpoint, whose metadata records its path and sha256; a resume checks them)
* student:   ``model:`` (random init from ``train.seed``) or ``init_from``; may be smaller than the teacher.
             Full training (``train.trainable`` / ``train.frozen`` choose among its params); no ``lora:`` or
             ``prompt_tuning:``
* tokenizer: ``data.tokenizer``, else the student's init source's, else the teacher's; it must be the
             teacher's when the teacher has one
* export:    the student as a Hugging Face directory with the tokenizer beside it; nothing of the teacher.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from llmjax.config import ConfigError, RunConfig
from llmjax.losses import distillation_loss
from llmjax.loading import TEACHER_KEY, LoadedModel, load_model, model_params, model_sha256
from llmjax.model_config import family_of
from llmjax.stages.init_source import resolve_init
from llmjax.stages.sft import instruction_stage
from llmjax.train.lm_loss import lm_logits
from llmjax.train.loop import FrozenModel, Stage
from llmjax.train.step import LossFn

# Config fields teacher and student must share: the vocabulary and the ids the batches are built with.
SHARED_FIELDS = ("vocab_size", "pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id")


def build_stage(config: RunConfig, loaded: LoadedModel | None = None) -> Stage:
    """The distillation stage of ``config``. ``loaded``: its ``init_from`` (the student's start) already read by
    ``resolve_init`` (``config`` then resolved too); None: read it here."""
    if loaded is None:
        config, loaded = resolve_init(config)
    cfg = config.distill
    if config.lora is not None or config.prompt_tuning is not None:
        raise ConfigError("stage: distill trains the whole student; drop the lora/prompt_tuning section "
                          "(train.trainable / train.frozen choose among the student's params)")
    teacher = load_model(cfg.teacher)
    check_teacher(config.model, teacher, cfg.teacher)
    config = with_teacher_tokenizer(config, loaded, teacher)
    z_loss, label_smoothing = config.optim.z_loss, config.optim.label_smoothing
    frozen = FrozenModel(key=TEACHER_KEY, model=teacher.model, params=teacher.params,
                         path=str(Path(teacher.path).absolute()), sha256=model_sha256(teacher))
    return instruction_stage(
        config, loaded, name="distill",
        loss_for=lambda student: distill_loss_fn(student, teacher.model, cfg.temperature, cfg.alpha, z_loss=z_loss,
                                                 label_smoothing=label_smoothing),
        frozen_models=(frozen,), meta={"distill": dataclasses.asdict(cfg)},
    )


def check_teacher(student_config, teacher: LoadedModel, where: str) -> None:
    """The teacher reads the student's batches and its logits compare id by id: same family, same vocabulary
    and special ids (a ``ConfigError`` naming the first difference otherwise)."""
    if family_of(teacher.config) != family_of(student_config):
        raise ConfigError(f"distill.teacher={where} is a {family_of(teacher.config)!r} model but the student "
                          f"(model:) is {family_of(student_config)!r}; distill between models of one family")
    for name in SHARED_FIELDS:
        ours, theirs = getattr(student_config, name, None), getattr(teacher.config, name, None)
        if ours != theirs:
            raise ConfigError(f"model.{name}={ours!r} but distill.teacher={where} has {name}={theirs!r}; the student "
                              f"must share the teacher's tokenizer and vocabulary: set model.{name}={theirs!r}")


def with_teacher_tokenizer(config: RunConfig, loaded: LoadedModel | None, teacher: LoadedModel) -> RunConfig:
    """``config`` whose tokenizer is the teacher's: ``data.tokenizer`` (or the student's init source's) when
    it is the same file, the teacher's when neither names one; a different tokenizer is a ``ConfigError``."""
    if config.data.tokenizer:
        ours = Path(config.data.tokenizer)
        ours = ours if ours.is_dir() else ours.parent
    elif loaded is not None and loaded.tokenizer_dir is not None:
        ours = Path(loaded.tokenizer_dir)
    elif teacher.tokenizer_dir is not None:
        return dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=str(teacher.tokenizer_dir)))
    else:
        raise ConfigError(f"stage: distill needs a tokenizer and neither data.tokenizer, init_from nor "
                          f"distill.teacher={teacher.path} has one; set data.tokenizer to the teacher's")
    if teacher.tokenizer_dir is not None and not _same_file(ours / "spiece.model",
                                                            Path(teacher.tokenizer_dir) / "spiece.model"):
        raise ConfigError(f"the run's tokenizer ({ours}) is not the teacher's ({teacher.tokenizer_dir}); the student "
                          "must share the teacher's tokenizer: set data.tokenizer to the teacher's (or drop it)")
    return config


def _same_file(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()


def distill_loss_fn(student, teacher, temperature: float, alpha: float, *, z_loss: float = 0.0,
                    label_smoothing: float = 0.0) -> LossFn:
    """The stage's ``LossFn`` (``llmjax.train.step``) on a tree of the student's params plus ``TEACHER_KEY``:
    ``llmjax.losses.distillation_loss`` of the student's logits (dropout from ``rng``) against the teacher's
    (deterministic, constants) on the batch contract; sums over target tokens, ``weights`` their count."""

    def loss_fn(tree, batch, rng):
        student_logits = lm_logits(student, model_params(tree), batch, rng)
        teacher_logits = lm_logits(teacher, jax.lax.stop_gradient(tree[TEACHER_KEY]), batch)
        return distillation_loss(student_logits, teacher_logits, batch["decoder_target_tokens"],
                                 batch["decoder_loss_weights"], temperature=temperature, alpha=alpha, z_loss=z_loss,
                                 label_smoothing=label_smoothing)

    return loss_fn
