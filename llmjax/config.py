"""A training run as nested frozen dataclasses: YAML in, ``a.b=c`` overrides, typed and validated.

A run config is a YAML mapping with the sections of :class:`RunConfig` (``model``, ``data``, ``train``,
``optim``, ``checkpoint``, ``mesh``, and the optional ``lora`` or ``prompt_tuning``). Any mapping may say
``include: other.yaml`` (a path relative to the file that says it): the included mapping is loaded first and
the keys beside ``include`` override it. That is how a run names a model size or a mesh preset without
restating it::

    model: {include: model/t5_tiny.yaml, dropout_rate: 0.0}
    mesh: {include: mesh/single.yaml}

The ``model`` section is ``family`` (a key of ``llmjax.model_config.MODEL_CONFIGS``) plus that family's config
fields; its defaults live in the family's dataclass only. Unknown keys and wrong types are errors that
name the key, the closest valid key and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from llmjax import rl_configs
from llmjax.adapter_configs import LoraConfig, PromptTuningConfig, QuantizeConfig, check_lora_targets
from llmjax.errors import UserError
from llmjax.model_config import MODEL_CONFIGS, family_of

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG_PATH = CONFIGS_DIR / "pretrain_t5_tiny.yaml"
INCLUDE_KEY = "include"


class ConfigError(UserError, ValueError):
    """A user-facing configuration mistake; the message says which key and how to fix it.

    ``problems``: each problem found (several when a config was checked in one pass); the message lists them.
    """

    def __init__(self, *problems: str):
        self.problems = list(problems)
        if len(problems) == 1:
            message = problems[0]
        else:
            message = f"{len(problems)} problems: " + "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        super().__init__(message)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where examples come from and how they become token batches.

    ``encoder_length`` / ``decoder_length`` are the fixed lengths of the ``encoder_*`` / ``decoder_*``
    batch features (decoder-only models use ``decoder_length`` only).
    """

    kind: Literal["bundled", "jsonl", "parquet", "text", "hf", "tfds"] = "bundled"
    source: str = "corpus"             # bundled dataset name, file path/glob, or dataset name
    eval_source: str | None = None     # same kind; None: no eval data
    text_field: str = "text"           # span_corruption / causal_lm read this field
    tasks: tuple[str, ...] = ()        # instruction: "dialogsum" or "TEMPLATES@KIND:SOURCE" (data/instruction_pipeline.py)
    task_rates: tuple[float, ...] = ()  # instruction: one mixing rate per task; empty: proportional to task sizes
    tokenizer: str | None = None       # saved tokenizer directory; None: train one on `source`
    tokenizer_vocab_size: int = 32000  # ids of a trained tokenizer, the 100 sentinels included
    objective: Literal["span_corruption", "causal_lm", "instruction"] = "span_corruption"
    encoder_length: int = 512
    decoder_length: int = 114
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    packing: bool = True

    def __post_init__(self):
        _check_choices(self, "data")
        _require(self.encoder_length > 0 and self.decoder_length > 0,
                 f"data.encoder_length/decoder_length must be positive, got "
                 f"{self.encoder_length}/{self.decoder_length}")
        _require(0.0 < self.noise_density < 1.0,
                 f"data.noise_density must be in (0, 1), got {self.noise_density}")
        _require(self.mean_noise_span_length >= 1.0,
                 f"data.mean_noise_span_length must be >= 1, got {self.mean_noise_span_length}")
        _require(self.tokenizer_vocab_size > 0,
                 f"data.tokenizer_vocab_size must be positive, got {self.tokenizer_vocab_size}")
        instruction = self.objective == "instruction"
        _require(instruction == bool(self.tasks),
                 "data.objective=instruction needs data.tasks (e.g. [dialogsum])" if instruction else
                 f"data.tasks is for data.objective=instruction, not {self.objective!r}; remove it")
        _require(not self.task_rates or len(self.task_rates) == len(self.tasks),
                 f"data.task_rates has {len(self.task_rates)} rates for {len(self.tasks)} data.tasks; give one per task")
        _require(all(rate >= 0 for rate in self.task_rates) and (not self.task_rates or sum(self.task_rates) > 0),
                 f"data.task_rates must be >= 0 with a positive sum, got {list(self.task_rates)}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: how long, how big, how often. ``batch_size`` is global (all hosts, all microbatches)."""

    steps: int = 1000
    batch_size: int = 32
    seed: int = 0
    microbatches: int = 1            # gradient accumulation: batch_size is split into this many scans
    eval_every_steps: int = 0        # 0: no periodic eval
    eval_steps: int = 10             # batches per eval
    log_every_steps: int = 10
    nan_policy: Literal["abort", "skip"] = "abort"
    resume: bool = True              # continue from the latest checkpoint in checkpoint.dir if any
    export_hf: str | None = None     # write a Hugging Face directory here at the end; relative: inside output_dir
    output_dir: str = "runs/default"  # metrics, tokenizer and the resolved config
    trainable: tuple[str, ...] = ()  # regexes (re.search on "a/b/kernel" param paths) of what trains; empty: all
    frozen: tuple[str, ...] = ()     # regexes of params kept frozen (applied after `trainable`), e.g. [embed]
    rouge_every_steps: int = 0       # sft: ROUGE of generations on a fixed eval sample every N steps; 0: never
    rouge_examples: int = 16         # sft: size of that sample (the first eval-split examples)

    def __post_init__(self):
        _check_choices(self, "train")
        for name in ("steps", "batch_size", "microbatches", "log_every_steps"):
            _require(getattr(self, name) > 0, f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("eval_every_steps", "eval_steps", "rouge_every_steps"):
            _require(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        _require(self.rouge_examples > 0, f"train.rouge_examples must be positive, got {self.rouge_examples}")
        for pattern in (*self.trainable, *self.frozen):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"train.trainable/frozen: {pattern!r} is not a regular expression ({e})") from None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer, learning-rate schedule and loss regularizers.

    ``b1``/``b2``/``eps`` left ``null`` take the optimizer's own default (optax's). For Adafactor,
    ``b1`` is the momentum (none by default, as in T5) and ``adafactor_decay_rate`` replaces ``b2``.
    Every schedule warms up linearly from 0 over ``warmup_steps``; ``rsqrt`` then decays as
    ``learning_rate * sqrt(warmup_steps / step)`` (T5's inverse square root).
    """

    name: Literal["adamw", "adafactor"] = "adamw"
    learning_rate: float = 1e-3
    schedule: Literal["constant", "cosine", "linear", "rsqrt"] = "cosine"
    warmup_steps: int = 0
    final_lr_fraction: float = 0.0   # cosine/linear end at learning_rate * this
    schedule_steps: int | None = None  # horizon of the decay (default train.steps): a run trained in segments
                                       # sets the whole run's length, so each segment follows the same schedule
    weight_decay: float = 0.0        # decoupled, multiplied by the learning rate
    decay_norms_and_biases: bool = False
    decay_embeddings: bool = False
    b1: float | None = None
    b2: float | None = None
    eps: float | None = None
    adafactor_decay_rate: float = 0.8
    clip_grad_norm: float | None = 1.0  # global norm; null: no clipping
    z_loss: float = 0.0              # t5x uses 1e-4
    label_smoothing: float = 0.0
    loraplus_lr_ratio: float | None = None  # LoRA+ (Hayou et al. 2024; peft's create_loraplus_optimizer): the
                                            # lora_B matrices' learning rate is learning_rate times this; with lora:

    def __post_init__(self):
        _check_choices(self, "optim")
        _require(self.learning_rate > 0, f"optim.learning_rate must be positive, got {self.learning_rate}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.schedule_steps is None or self.schedule_steps > 0,
                 f"optim.schedule_steps must be positive or null, got {self.schedule_steps}")
        _require(0.0 <= self.final_lr_fraction <= 1.0,
                 f"optim.final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.clip_grad_norm is None or self.clip_grad_norm > 0,
                 f"optim.clip_grad_norm must be positive or null, got {self.clip_grad_norm}")
        _require(self.z_loss >= 0, f"optim.z_loss must be >= 0, got {self.z_loss}")
        _require(0.0 <= self.label_smoothing < 1.0,
                 f"optim.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _require(self.loraplus_lr_ratio is None or self.loraplus_lr_ratio > 0,
                 f"optim.loraplus_lr_ratio must be positive or null, got {self.loraplus_lr_ratio}")
        _require(not (self.name == "adafactor" and self.b2 is not None),
                 "optim.b2 applies to adamw only; for adafactor set optim.adafactor_decay_rate instead")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints. ``dir`` null: ``<train.output_dir>/checkpoints``. ``keep`` null: keep all."""

    dir: str | None = None
    every_steps: int = 1000
    keep: int | None = 3
    async_save: bool = True

    def __post_init__(self):
        _require(self.every_steps > 0, f"checkpoint.every_steps must be positive, got {self.every_steps}")
        _require(self.keep is None or self.keep > 0, f"checkpoint.keep must be positive or null, got {self.keep}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape over the axes (data, fsdp, tensor). One axis may be -1: all remaining devices.

    The one place that says whether a mesh is valid: the sizes here, and against the devices in
    :meth:`resolve` (``llmjax.sharding.make_mesh`` builds every mesh through it). The default puts all
    devices on ``data``: data parallelism replicates the weights, so it runs any model on any device
    count, where fsdp and tensor split weight dimensions that must divide by the axis size.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = dataclasses.asdict(self)
        bad = {k: v for k, v in sizes.items() if v != -1 and (not isinstance(v, int) or v < 1)}
        _require(not bad, f"mesh sizes must be >= 1 or -1 (all remaining devices), got {bad}")
        fill = [k for k, v in sizes.items() if v == -1]
        _require(len(fill) <= 1, f"only one mesh axis may be -1, got {fill}; give the others explicit sizes")

    @property
    def data_parallel_size(self) -> int | None:
        """Devices the batch is split over (data * fsdp), or None while one of them is -1."""
        return None if -1 in (self.data, self.fsdp) else self.data * self.fsdp

    def resolve(self, device_count: int, process_count: int = 1) -> MeshConfig:
        """The concrete mesh for ``device_count`` devices: the -1 axis filled, the product checked.

        Each process feeds its own rows of the batch, so with several processes the batch axes
        (data * fsdp) must be a multiple of the process count.
        """
        sizes = dataclasses.asdict(self)
        fixed = math.prod(size for size in sizes.values() if size != -1)
        fill = [name for name, size in sizes.items() if size == -1]
        if fill:
            _require(device_count % fixed == 0,
                     f"mesh {sizes}: {device_count} devices are not divisible by the fixed axes' product "
                     f"{fixed}; change mesh.data/fsdp/tensor")
            sizes[fill[0]] = device_count // fixed
        _require(math.prod(sizes.values()) == device_count,
                 f"mesh data*fsdp*tensor = {self.data}*{self.fsdp}*{self.tensor} = {fixed} but there are "
                 f"{device_count} devices; make the product {device_count} or set one axis to -1")
        resolved = MeshConfig(**sizes)
        _require(resolved.data_parallel_size % process_count == 0,
                 f"mesh data*fsdp = {resolved.data_parallel_size} is not a multiple of the {process_count} "
                 f"processes, so the processes cannot each feed their own rows; change mesh.data/fsdp")
        return resolved


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs.

    ``stage``: the training stage (a name of ``llmjax.stages.STAGES``). ``init_from``: a Hugging Face
    directory or an llmjax checkpoint/run directory the stage starts from (None: random init).
    ``model`` is the family's config (``T5Config``/``DecoderConfig``); with ``init_from`` it may also be a
    plain dict of keys to override on the init source's config (``{}``: take it whole), which the stage
    resolves (``llmjax.stages.base.resolve_init``) before anything is built.
    """

    model: Any
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    stage: str = "pretrain"
    init_from: str | None = None
    lora: Any = None  # llmjax.lora.LoraConfig: the stage trains LoRA adapters only; None: no LoRA
    prompt_tuning: Any = None  # llmjax.prompt_tuning.PromptTuningConfig: the stage trains a soft prompt only
    quantize: Any = None  # llmjax.adapter_configs.QuantizeConfig: with lora:, the frozen base is kept int8 (QLoRA)
    # The preference/RL stages' own settings (llmjax.rl_configs): each belongs to the stage of its name.
    reward: Any = None  # RewardConfig (stage: reward; default settings when left out)
    ppo: Any = None     # PPOConfig (stage: ppo; required, it names the reward model)
    dpo: Any = None     # DPOConfig (stage: dpo; default settings when left out)
    grpo: Any = None    # GRPOConfig (stage: grpo; required, it names the reward model)
    distill: Any = None  # DistillConfig (stage: distill; required, it names the teacher)

    def __post_init__(self):
        _check_stage_sections(self)
        if self.lora is not None:
            _require(not self.train.trainable and not self.train.frozen,
                     "lora: trains the adapters only, so train.trainable/train.frozen do not apply; remove them "
                     "(or drop the lora section to choose what trains)")
        if self.prompt_tuning is not None:
            _check_prompt_tuning(self)
        _require(self.optim.loraplus_lr_ratio is None or self.lora is not None,
                 "optim.loraplus_lr_ratio sets the learning rate of LoRA's B matrices (LoRA+); add a lora: section, "
                 "or drop it")
        _require(self.quantize is None or self.lora is not None,
                 "quantize: keeps the frozen base of a LoRA run in int8 (QLoRA); add a lora: section, or drop "
                 "quantize: (to quantize a model for inference, run `llmjax quantize`)")
        if isinstance(self.model, dict):
            _require(self.init_from is not None, "the model section needs model.family (or set init_from to take "
                                                 "the model from a Hugging Face dir or checkpoint)")
            _check_batch_fits_mesh(self.train, self.mesh.data_parallel_size)
            return
        family_of(self.model)  # raises on a non-model config
        _require(self.model.quantization is None,
                 f"model.quantization={self.model.quantization!r}: training needs float weights; drop it (quantize "
                 "a trained model with `llmjax quantize`, or keep a LoRA run's frozen base int8 with a quantize: "
                 "section)")
        if self.lora is not None:
            _check_lora(self.lora, self.model)
        if self.data.tokenizer is None and self.init_from is None and self.distill is None:  # (distill: the teacher's)
            _require(self.data.tokenizer_vocab_size <= self.model.vocab_size,
                     f"data.tokenizer_vocab_size={self.data.tokenizer_vocab_size} exceeds model.vocab_size="
                     f"{self.model.vocab_size}: token ids would index past the embedding; lower one or raise the other")
        _check_batch_fits_mesh(self.train, self.mesh.data_parallel_size)
        if self.optim.schedule in ("cosine", "linear"):
            _require(self.optim.warmup_steps < self.train.steps,
                     f"optim.warmup_steps={self.optim.warmup_steps} must be < train.steps={self.train.steps} "
                     f"for the {self.optim.schedule!r} schedule to have steps left to decay over")

    @property
    def family(self) -> str:
        return family_of(self.model)

    @property
    def model_resolved(self) -> bool:
        """False while ``model`` is still a dict of overrides on ``init_from``'s config."""
        return not isinstance(self.model, dict)

    def for_devices(self, device_count: int, process_count: int = 1) -> RunConfig:
        """This config with a concrete mesh for the devices at hand (the batch checked against it)."""
        return dataclasses.replace(self, mesh=self.mesh.resolve(device_count, process_count))

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.train.output_dir) / "checkpoints"

    @property
    def export_dir(self) -> Path | None:
        """``train.export_hf`` resolved: a relative path lies inside ``train.output_dir``, so runs with
        different output dirs never export over each other."""
        return None if self.train.export_hf is None else Path(self.train.output_dir) / self.train.export_hf


TOP_LEVEL_KEYS = {"stage": str, "init_from": str | None}  # scalars beside the sections
SECTIONS = {"data": DataConfig, "train": TrainConfig, "optim": OptimConfig,
            "checkpoint": CheckpointConfig, "mesh": MeshConfig}
# Sections a run may leave out (None): they turn a stage into something else (lora: adapters only).
# prompt_tuning: a soft prompt only. quantize: (with lora) an int8 frozen base.
# reward/ppo/dpo/grpo/distill: the settings of the stage of that name.
OPTIONAL_SECTIONS = ("lora", "prompt_tuning", "quantize", *rl_configs.SECTIONS)


def _optional_section_class(name: str):
    """The dataclass of an optional section (``llmjax.adapter_configs`` and ``llmjax.rl_configs``)."""
    return {"lora": LoraConfig, "prompt_tuning": PromptTuningConfig, "quantize": QuantizeConfig,
            **rl_configs.SECTIONS}[name]


def _check_stage_sections(config: RunConfig) -> None:
    """A stage's own section belongs to that stage: ``ppo:`` under ``stage: sft`` is a mistake, not ignored;
    ``reward``/``dpo`` without their section take its defaults; ``ppo``/``grpo``/``distill`` need theirs (the reward
    model, the teacher)."""
    for name in rl_configs.SECTIONS:
        if getattr(config, name) is not None and config.stage != name:
            raise ConfigError(f"the {name}: section configures stage: {name}, but stage is {config.stage!r}; "
                              f"remove the section or set stage: {name}")
    if config.stage in rl_configs.SECTIONS and getattr(config, config.stage) is None:
        if config.stage in rl_configs.REQUIRED:
            raise ConfigError(f"stage: {config.stage} needs a {config.stage}: section naming at least "
                              f"{rl_configs.REQUIRED[config.stage]}")
        object.__setattr__(config, config.stage, rl_configs.SECTIONS[config.stage]())


def _check_prompt_tuning(config: RunConfig) -> None:
    """A ``prompt_tuning`` section the stages can train (``llmjax.stages.adapters``)."""
    _require(config.lora is None, "lora and prompt_tuning are both set; a run trains one kind of adapter: "
                                  "drop one of the two sections")
    _require(not config.train.trainable and not config.train.frozen,
             "prompt_tuning: trains the soft prompt only, so train.trainable/train.frozen do not apply; remove them")
    _require(not config.data.packing, "prompt_tuning puts the soft prompt before each row's one example, which "
                                      "packed rows do not have; set data.packing=false")


def _check_lora(lora, model) -> None:
    """A ``lora`` section that fits this model (``llmjax.stages.adapters`` trains it)."""
    check_lora_targets(lora, model)  # every target is a module of this model (the error names the ones it has)


def _check_batch_fits_mesh(train: TrainConfig, data_parallel_size: int | None) -> None:
    """The one batch-divisibility check: each microbatch is split evenly over the data-parallel devices
    (data * fsdp; None until the mesh is resolved, then only the microbatches are checked)."""
    if data_parallel_size is None:
        _require(train.batch_size % train.microbatches == 0,
                 f"train.batch_size={train.batch_size} is not divisible by train.microbatches="
                 f"{train.microbatches}; pick a batch size that is a multiple of it")
        return
    per_step = train.microbatches * data_parallel_size
    _require(train.batch_size % per_step == 0,
             f"train.batch_size={train.batch_size} must be divisible by train.microbatches * "
             f"(mesh.data * mesh.fsdp) = {train.microbatches} * {data_parallel_size} = {per_step}; "
             f"change the batch size, the microbatches or the mesh")


# ----------------------------------------------------------------------------------------------------
# YAML -> dict (includes, overrides) -> dataclasses


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a run config YAML (default: the bundled tiny T5 pre-training run), apply ``a.b=c`` overrides."""
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    raw = _read_yaml_mapping(path)
    for override in overrides:
        _apply_override(raw, override)
    return config_from_dict(_resolve_includes(raw, path.parent, str(path)))


def load_section(path: str | Path, section: str):
    """One section from its own YAML file (``configs/model/t5_small.yaml`` -> ``T5Config``)."""
    path = Path(path)
    raw = _resolve_includes(_read_yaml_mapping(path), path.parent, str(path))
    return _build_section(section, raw)


def config_from_dict(raw: dict) -> RunConfig:
    """Nested plain dict (includes already resolved) -> validated :class:`RunConfig`.

    Every problem the sections show on their own is found in one pass (unknown keys first), so a user
    fixing a config sees them all at once; checks across sections follow once each section is valid.
    """
    problems = _unknown_keys(raw, ["model", *SECTIONS, *OPTIONAL_SECTIONS, *TOP_LEVEL_KEYS], "")
    top = {}
    for key, hint in TOP_LEVEL_KEYS.items():
        if key in raw:
            try:
                top[key] = _coerce(raw[key], hint, key)
            except ConfigError as e:
                problems.extend(e.problems)
    init_from = top.get("init_from")
    if "model" not in raw and init_from is None:
        problems.append("missing section 'model': add e.g. `model: {include: model/t5_tiny.yaml}` "
                        "(or set init_from to start from a Hugging Face dir or checkpoint)")
    sections = {}
    for name in ["model", *SECTIONS]:
        if name == "model" and init_from is not None and "family" not in raw.get("model", {}):
            # Overrides on the init source's config, checked when the stage reads it.
            sections[name] = _model_overrides(raw.get("model", {}), problems)
        elif name in raw or name != "model":
            try:
                sections[name] = _build_section(name, raw.get(name, {}))
            except ConfigError as e:
                problems.extend(e.problems)
    for name in OPTIONAL_SECTIONS:
        if raw.get(name) is not None:
            try:
                sections[name] = _build_section(name, raw[name])
            except ConfigError as e:
                problems.extend(e.problems)
    _raise_all(problems)
    return _construct(RunConfig, {**sections, **top})


def _model_overrides(raw, problems: list[str]) -> dict:
    """A model section without ``family`` under ``init_from``: a mapping of keys every family has or one has."""
    if not isinstance(raw, dict):
        problems.append(f"model: expected a mapping of keys, got {raw!r}")
        return {}
    known = {f.name for cls in MODEL_CONFIGS.values() for f in dataclasses.fields(cls)}
    problems.extend(_unknown_keys({k: v for k, v in raw.items() if k not in known}, sorted(known), "model"))
    return dict(raw)


def config_to_dict(config: RunConfig) -> dict:
    """The resolved config as plain YAML-able data; ``config_from_dict`` gives the same config back."""
    out = {"stage": config.stage, "init_from": config.init_from}
    if config.model_resolved:
        out["model"] = {"family": config.family, **_dataclass_to_dict(config.model)}
    else:
        out["model"] = dict(config.model)
    for name in SECTIONS:
        out[name] = _dataclass_to_dict(getattr(config, name))
    for name in OPTIONAL_SECTIONS:
        if getattr(config, name) is not None:
            out[name] = _dataclass_to_dict(getattr(config, name))
    return out


def dump_config(config: RunConfig, path: str | Path) -> None:
    """Write the fully resolved config (no includes) as YAML, e.g. next to checkpoints."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def _dataclass_to_dict(obj) -> dict:
    return {f.name: list(v) if isinstance(v := getattr(obj, f.name), tuple) else v
            for f in dataclasses.fields(obj)}


def _read_yaml_mapping(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def _resolve_includes(node, base_dir: Path, where: str):
    """Replace every ``include: file`` in nested mappings by that file's mapping, local keys winning."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    merged = {}
    if INCLUDE_KEY in node:
        target = node.pop(INCLUDE_KEY)
        if not isinstance(target, str):
            raise ConfigError(f"{where}: `include` must be a file path string, got {target!r}")
        include_path = (base_dir / target).resolve()
        if not include_path.is_file():
            raise ConfigError(f"{where}: included file {target!r} not found (looked at {include_path}); "
                              f"include paths are relative to the file that includes them")
        merged = _resolve_includes(_read_yaml_mapping(include_path), include_path.parent, str(include_path))
    for key, value in node.items():
        value = _resolve_includes(value, base_dir, where)
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _apply_override(raw: dict, override: str) -> None:
    """``train.steps=100`` -> raw["train"]["steps"] = 100, the value typed as a YAML scalar."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(f"override {override!r} must look like key=value, e.g. train.steps=100")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({e.problem})") from e
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[:depth + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build_section(name: str, raw):
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {raw!r}")
    if name in OPTIONAL_SECTIONS:
        return _build_dataclass(_optional_section_class(name), raw, name)
    if name != "model":
        return _build_dataclass(SECTIONS[name], raw, name)
    raw = dict(raw)
    family = raw.pop("family", None)
    if family is None:
        raise ConfigError(f"model.family is required: one of {sorted(MODEL_CONFIGS)}")
    if family not in MODEL_CONFIGS:
        raise ConfigError(f"model.family={family!r} is unknown{_closest(str(family), MODEL_CONFIGS)}; "
                          f"use one of {sorted(MODEL_CONFIGS)}")
    return _build_dataclass(MODEL_CONFIGS[family], raw, "model")


def _build_dataclass(cls, raw: dict, prefix: str):
    problems = _unknown_keys(raw, [f.name for f in dataclasses.fields(cls)], prefix)
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        if key in hints:
            try:
                values[key] = _coerce(value, hints[key], f"{prefix}.{key}")
            except ConfigError as e:
                problems.extend(e.problems)
    _raise_all(problems)
    return _construct(cls, values)


def _raise_all(problems: list[str]) -> None:
    """One ConfigError listing every problem (one line: the CLI prints it as the error)."""
    if problems:
        raise ConfigError(*problems)


def _construct(cls, values: dict):
    """``cls(**values)``, its validation errors (model configs raise ValueError) reported as ConfigError."""
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e


def _unknown_keys(raw: dict, valid: list[str], prefix: str) -> list[str]:
    """One message per key of ``raw`` not in ``valid``, naming the closest valid key."""
    problems = []
    for key in raw:
        if key not in valid:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            problems.append(f"unknown config key {dotted!r}{_closest(str(key), valid, prefix)}; "
                            f"valid keys{' in ' + prefix if prefix else ''}: {', '.join(valid)}")
    return problems


def _closest(key: str, valid, prefix: str = "") -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    if not match:
        return ""
    return f" (did you mean {(prefix + '.' if prefix else '') + match[0]!r}?)"


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value, hint, key: str, nullable: bool = False):
    """Check ``value`` against a field's type hint; ints widen to float, '1e-4' (YAML 1.1 string) to float."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key, nullable=True)
        problems = []
        for option in inner:  # the first type the value fits (e.g. a list of names, or one named choice)
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                problems.extend(e.problems)
        raise ConfigError("; or ".join(problems))
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not allowed{_closest(str(value), [str(c) for c in choices])}; "
                              f"use one of {list(choices)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
        return tuple(_coerce(v, typing.get_args(hint)[0], f"{key}[{i}]") for i, v in enumerate(value))
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, hint):
        return value
    expected = "float" if hint is float else hint.__name__
    raise ConfigError(f"{key}: expected {expected}{' or null' if nullable else ''}, "
                      f"got {value!r} ({type(value).__name__})")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_choices(obj, prefix: str) -> None:
    """Literal-typed fields hold one of their choices (also when built in Python, not from YAML)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if typing.get_origin(hints[f.name]) is Literal:
            _coerce(getattr(obj, f.name), hints[f.name], f"{prefix}.{f.name}")
