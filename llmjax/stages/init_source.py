"""Where a stage's initial parameters come from: ``init_from`` read once, checked against the run's model.

``resolve_init(config)`` -> ``(config, loaded)``: with ``init_from`` unset nothing changes (random init);
with it set the model is read by the one loader (``llmjax.loading.load_model``: a Hugging Face
directory, an llmjax checkpoint directory or a run directory) and the run's ``model`` section is
resolved against it:

* omitted (or only keys without ``family``): the init source's model config, with those keys
  overriding it;
* a whole section (``family`` given, e.g. ``include: model/t5_tiny.yaml``): it must describe the same
  model as the init source.

Either way only the fields in :data:`RUNTIME_FIELDS` (compute dtype, dropout, activation
recomputation, layer scanning) may differ from the init source: every other field shapes or
numbers the weights, and a difference is a ``ConfigError`` naming the field and both values (a field
left null, which asks for a derived value, takes the init source's).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

from llmjax.config import ConfigError, RunConfig
from llmjax.data.tokenizer import Tokenizer
from llmjax.loading import LoadedModel, load_model, model_sha256
from llmjax.model_config import family_of
from llmjax.models import build_model, to_layout
from llmjax.train.lm_loss import lm_loss_fn
from llmjax.train.loop import Base, Stage
from llmjax.train.state import TrainableFilter, trainable_filter

# Model-config fields that change how the model computes, not what its weights are.
RUNTIME_FIELDS = frozenset({"dtype", "dropout_rate", "attention_dropout", "remat_policy", "scan_layers"})


def resolve_init(config: RunConfig) -> tuple[RunConfig, LoadedModel | None]:
    """The run config with its model resolved against ``init_from``, and the loaded init source (or None)."""
    if config.init_from is None:
        return config, None
    loaded = load_model(config.init_from)
    source = loaded.config
    model = model_against_source(config, source)
    if model.scan_layers != source.scan_layers:  # the same weights in the run's layer layout
        loaded = dataclasses.replace(loaded, model=build_model(model), params=to_layout(loaded.params, source, model))
    return dataclasses.replace(config, model=model), loaded


def model_against_source(config: RunConfig, source):
    """The run's model config resolved against ``source``, its init source's model config (module docstring);
    needs no weights, so a planner can call it on ``llmjax.loading.read_model_config(config.init_from)``."""
    if source.quantization is not None:
        raise ConfigError(f"init_from={config.init_from} is a quantized model ({source.quantization}); training starts "
                          "from float weights: set init_from to the float model it came from (with lora:, add a "
                          "quantize: section to keep the frozen base int8 while training)")
    if config.model_resolved:
        if family_of(config.model) != family_of(source):
            raise ConfigError(f"model.family={family_of(config.model)!r} but init_from={config.init_from} holds a "
                              f"{family_of(source)!r} model; drop the model section to take the init source's")
        overrides = dataclasses.asdict(config.model)
    else:
        overrides = dict(config.model)
        overrides.pop("family", None)
    known = {f.name for f in dataclasses.fields(source)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"model keys {unknown} do not apply to init_from's {family_of(source)} model; remove them")
    # None asks for a derived value (T5's num_decoder_layers = num_layers, ...): the source's stands.
    different = [(k, v, getattr(source, k)) for k, v in overrides.items()
                 if k not in RUNTIME_FIELDS and v is not None and v != getattr(source, k)]
    if different:
        name, ours, theirs = different[0]
        raise ConfigError(
            f"model.{name}={ours!r} but init_from={config.init_from} has {name}={theirs!r} "
            f"({len(different)} field(s) differ: {[d[0] for d in different]}); only {sorted(RUNTIME_FIELDS)} may "
            "differ from the init source: drop the model section (or those keys) to take its config")
    runtime = {k: v for k, v in overrides.items() if k in RUNTIME_FIELDS}
    return dataclasses.replace(source, **runtime)


def base_of(loaded: LoadedModel | None) -> Base | None:
    """The loop's :class:`Base` of an init source: its params, path and sha256."""
    if loaded is None:
        return None
    return Base(params=loaded.params, path=str(Path(loaded.path).absolute()), sha256=model_sha256(loaded),
                step=loaded.step)


def init_tokenizer(config: RunConfig, loaded: LoadedModel | None) -> tuple[Tokenizer, Path]:
    """``data.tokenizer`` when set, else the init source's tokenizer; ``(tokenizer, its directory)``."""
    if config.data.tokenizer:
        path = Path(config.data.tokenizer)
        directory = path if path.is_dir() else path.parent
    elif loaded is not None and loaded.tokenizer_dir is not None:
        directory = Path(loaded.tokenizer_dir)
    else:
        raise ConfigError(f"stage {config.stage!r} needs a tokenizer: set data.tokenizer, or init_from a model "
                          "whose directory (or checkpoint metadata) has one")
    if not (directory / "spiece.model").is_file():
        raise ConfigError(f"tokenizer directory {directory} has no spiece.model; set data.tokenizer to one that does")
    return Tokenizer.load(directory), directory.absolute()


def run_trainable_filter(config: RunConfig) -> TrainableFilter:
    """``train.trainable`` / ``train.frozen`` as the loop's filter (everything trains by default)."""
    return trainable_filter(config.train.trainable, config.train.frozen)


def lm_stage(config: RunConfig, loaded: LoadedModel | None, loss_for=None, **fields) -> Stage:
    """The Stage of a run that trains a language model's loss on its data (pretrain, SFT, distill): the family's
    token cross-entropy with the run's z-loss and label smoothing (or ``loss_for(model) -> LossFn``), the run's
    trainable filter, ``loaded`` as the base, and the run's ``lora:`` / ``prompt_tuning:`` section applied
    (``llmjax.stages.adapters``). ``fields``: the rest of the Stage (``name``, ``model``, data, hooks,
    tokenizer, meta)."""
    from llmjax.stages.adapters import with_run_adapters

    if loss_for is None:
        loss_for = partial(lm_loss_fn, z_loss=config.optim.z_loss, label_smoothing=config.optim.label_smoothing)
    return with_run_adapters(config, Stage(loss_fn=loss_for(fields["model"]), loss_for=loss_for,
                                           is_trainable=run_trainable_filter(config), base=base_of(loaded), **fields))
