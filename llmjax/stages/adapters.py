"""Any stage with a ``lora:`` section trains LoRA adapters only: one transformation of the built Stage.

``with_lora(stage, lora_config)`` takes what a stage module built (model, loss, data, eval hook, base)
and returns the Stage the loop runs instead:

* tree:      the model's params with one more top-level part, ``{**model params, "lora": adapters}``
             (``ADAPTERS_KEY``; with ``modules_to_save`` it also holds their trained copies, and with
             ``trainable_token_indices`` those rows of the input embedding or an untied head, the base's weights below
             staying frozen);
             the adapters come from ``llmjax.lora.init`` on the boxed base inside ``init_tree``, so they are born
             sharded and a resume restores them through the loop's abstract target like any other leaf
* trainable: the adapter leaves only: the optimizer state and the checkpoints hold adapters alone
             (with a base, the checkpoint also records its path and sha256 and a resume checks them)
* loss:      the stage's loss rebuilt (``Stage.loss_for``) on the model computing each adapted ``Dense``
             factored, ``x @ W + scale * (dropout(x) @ A) @ B`` (``llmjax.lora.apply_factored``, PEFT's
             dropout), plus the stage's heads. A stage without ``loss_for`` (the RL stages) gets its own loss on
             the merged params ``W + scale * A @ B`` (``llmjax.lora.merge`` inside the jitted step; gradients
             reach A and B through it), with the model with adapters off as its ``reference`` (the base's
             arrays, never a second copy); it cannot take ``lora_dropout``, which a merge cannot express.
             Factored is the default because it is never slower and needs less memory: train steps of the two
             forms interleaved in the same runs (``benchmarks/lora_train.py``, ``form="merged"`` /
             ``"factored"``; ``benchmarks/results/lora_train_cpu.txt``) take the same time with r=8 on q and v
             (factored/merged CPU time 0.97-1.04x on T5 v1.1 small and the 60M decoder) and less with r=8 on
             all seven projections (0.92x on T5 small, 0.89x on the decoder; 1.10x the other way before
             ``lora.adapter_branch``'s hand-written backward); XLA's temporaries are 347 vs 430 MiB on T5
             small, q and v, batch 4 x 128 (``benchmarks/results/qlora_memory_cpu.txt``).
* eval hook: the stage's hook on the merged params
* export:    the merged model as a Hugging Face directory at ``export_dir`` (tokenizer beside it), and
             the adapters alone in PEFT's format in ``<export_dir>/adapter`` (``ADAPTER_SUBDIR``), which
             ``peft.PeftModel.from_pretrained`` applies to the ``init_from`` model
* meta:      the LoRA config rides in every checkpoint (``meta["lora"]``), so ``llmjax.loading.load_model``
             of a LoRA run's checkpoint gives the merged params
* adapters:  rank, scale and the modules adapted (``lora_identity``): a resume with other values is refused
             by name before anything is read (``Stage.adapters``)

The model's own code never sees the adapters; reward and PPO stages reuse this as SFT does.

With a ``quantize:`` section beside ``lora:`` (QLoRA-style, ``llmjax.adapter_configs.QuantizeConfig``) the tree
holds the base quantized (``llmjax.quantize``: int8 kernels and embeddings, fp32 per-channel scales), so the
frozen base sits in memory at about a quarter of its fp32 bytes; the adapters are drawn exactly as without it
(DoRA's magnitudes are the norms of the int8 kernels dequantized, so step 0 is the int8 model); ``modules_to_save``
may then name only modules whose weights stay float (norms), since the int8 ones are frozen.
The loss runs the int8 model (weight-only: each kernel dequantized on the fly inside its matmul) with each
adapted ``Dense`` computed factored (``llmjax.lora.apply_factored``: a merge cannot add a float update to int8
weights), so the stage must give ``loss_for``. The eval hook and the export see the base dequantized with the
adapters merged, ``meta["quantize"]`` records the section, and ``llmjax.loading`` merges a QLoRA checkpoint's
adapters into the same dequantized base. :func:`tree_bytes` measures what the tree holds.

``with_prompt_tuning(stage, cfg)`` does the same for a ``prompt_tuning:`` section: the tree gains
``soft_prompt`` (``SOFT_PROMPT_KEY``, fp32 ``[n, d_model]`` from ``llmjax.prompt_tuning.init`` on the base,
replicated), which alone trains; the loss and the eval hook pass it to the model call as ``soft_prompt=``
(the model stays the base); the export writes the base as a Hugging Face directory (tokenizer beside it)
and the soft prompt as a PEFT ``PROMPT_TUNING`` directory in ``<export_dir>/adapter``; ``meta["prompt_tuning"]``
records the config and ``llmjax.loading.load_model`` reads the prompt into ``LoadedModel.soft_prompt``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax

from llmjax import lora, prompt_tuning, quantize
from llmjax.adapter_configs import QuantizeConfig
from llmjax.config import ConfigError, RunConfig
from llmjax.loading import ADAPTERS_KEY, HEADS_KEY, REFERENCE_KEY, SOFT_PROMPT_KEY, model_params
from llmjax.train.loop import Stage
from llmjax.train.state import model_init_tree, split_params

ADAPTER_SUBDIR = "adapter"  # the PEFT adapter directory inside the export directory


def with_run_adapters(config: RunConfig, stage: Stage) -> Stage:
    """The stage a run config asks for: ``stage`` itself, or with its ``lora:`` or ``prompt_tuning:`` section
    applied."""
    if config.prompt_tuning is not None:
        return with_prompt_tuning(stage, config.prompt_tuning)
    return stage if config.lora is None else with_lora(stage, config.lora, config.quantize)


LORA_FORMS = ("auto", "merged", "factored")


def with_lora(stage: Stage, cfg: lora.LoraConfig, quantize_cfg: QuantizeConfig | None = None, *,
              form: str = "auto") -> Stage:
    """``stage`` training the LoRA adapters of ``cfg`` on its frozen model (see the module docstring), kept int8
    when ``quantize_cfg`` is given. ``cfg``'s targets were checked against the model with the run config.

    ``form`` (one of ``LORA_FORMS``) picks how the loss computes the adapted layers: ``"auto"``, the module
    docstring's rule (factored where the stage gives ``loss_for``, else merged); ``"merged"``
    (``W + scale * A @ B`` inside the loss; refused where the factored form is needed: an int8 base or
    ``lora_dropout``); or ``"factored"`` (the stage's ``loss_for`` on the model computing each adapted ``Dense``
    as ``x @ W + scale * (x @ A) @ B``: no merged kernel copy, no full-size kernel gradient).
    ``benchmarks/lora_train.py`` times the two explicit forms in the same run."""
    if form not in LORA_FORMS:
        raise ValueError(f"with_lora form must be one of {LORA_FORMS}, got {form!r}")
    model = stage.model
    base_tree = stage.init_tree or model_init_tree(model)
    int8_model = None if quantize_cfg is None else quantize.quantized_model(model, "int8")
    check_lora_fits(model.config, cfg, quantize_cfg)

    _check_pissa_base(cfg, stage.base is not None)
    pissa_start = None
    if cfg.init_lora_weights == lora.PISSA:
        # decomposed once on the host: an SVD inside the jitted, sharded init can deadlock XLA's CPU runtime
        pissa_start = lora.init(model, stage.base.params, cfg, jax.random.key(0))

    def init_tree(key, base):
        base_key, adapter_key = jax.random.split(key)
        params = base_tree(base_key, base)
        if int8_model is None:
            return {**params, ADAPTERS_KEY: lora.init(model, params, cfg, adapter_key, pissa_start=pissa_start)}
        # DoRA's magnitudes start as the norms of the kernels the loss computes with, the int8 ones dequantized
        # (so step 0 is the int8 base); plain LoRA reads only the shapes
        adapters = lora.init(model, _int8_rounded(model, params) if cfg.use_dora else params, cfg, adapter_key)
        return {**quantize.quantize(model, params, "int8")[1], ADAPTERS_KEY: adapters}

    def float_base(tree):
        """The model's params without the adapters, dequantized when the tree holds them int8."""
        params = model_params(tree)
        return params if int8_model is None else quantize.dequantize(int8_model, params)[1]

    def merged(tree):
        """The model's params with the adapters merged in: what the model computes with."""
        return lora.merge(float_base(tree), tree[ADAPTERS_KEY], cfg)

    def stage_view(tree):
        """What the stage's own functions read: the merged model, the stage's heads, and as its frozen
        reference the model with adapters off (the base's arrays themselves, never a copy)."""
        return {**merged(tree), **_stage_parts(tree), REFERENCE_KEY: model_params(tree)}

    needs_factored = int8_model is not None or cfg.lora_dropout > 0
    if form == "merged" and needs_factored:
        raise ValueError("with_lora form='merged' cannot run an int8 base or lora_dropout > 0: both need the "
                         "factored form")
    if stage.loss_for is None and int8_model is not None:
        raise ConfigError(f"quantize: is not supported by stage {stage.name!r}: it gives no loss_for, so its loss "
                          "cannot run the int8 base with factored adapters; drop the quantize section")
    if stage.loss_for is None and cfg.lora_dropout > 0:
        raise ConfigError(f"lora.lora_dropout={cfg.lora_dropout} is not supported by stage {stage.name!r}: it gives "
                          "no loss_for, so its adapters can only be merged into the weights inside the loss, which "
                          "cannot drop the adapter's input alone; set lora.lora_dropout=0")
    if stage.loss_for is None and form == "factored":
        raise ValueError(f"with_lora form='factored' needs a stage with loss_for; {stage.name!r} gives none")
    # An int8 base or lora_dropout lands here too: the checks above refused it under "merged" or without loss_for.
    if form != "merged" and stage.loss_for is not None:
        loss_fn = stage.loss_for(_FactoredModel(model if int8_model is None else int8_model, cfg))
    else:
        def loss_fn(tree, batch, rng):
            return stage.loss_fn(stage_view(tree), batch, rng)

    eval_hook = None
    if stage.eval_hook is not None:
        eval_hook = lambda tree, step: stage.eval_hook(merged(tree), step)  # noqa: E731

    def save_adapter(tree, directory: Path) -> None:
        lora.save_pretrained(model, tree[ADAPTERS_KEY], cfg, directory,
                             base_model_name_or_path=None if stage.base is None else stage.base.path)

    rollout = None
    if stage.rollout is not None:
        rollout = lambda tree, batch, step: stage.rollout(stage_view(tree), batch, step)  # noqa: E731
    quantize_section = {} if quantize_cfg is None else {"quantize": dataclasses.asdict(quantize_cfg)}
    return dataclasses.replace(
        stage, loss_fn=loss_fn, loss_for=None, is_trainable=is_adapter, init_tree=init_tree, eval_hook=eval_hook,
        export=_exporter(stage, merged, save_adapter), rollout=rollout,
        meta={**stage.meta, "lora": lora_meta(cfg), **quantize_section},
        adapters={**stage.adapters, "lora": lora_identity(cfg, model.config), **quantize_section},
    )


def check_run_adapters(config: RunConfig) -> None:
    """Refuse, before a run writes anything, a ``lora:`` section its model cannot hold (``run_stage`` calls this once
    the model config is known; the config itself checks what needs no model tables)."""
    if config.lora is not None:
        check_lora_fits(config.model, config.lora, config.quantize)
        _check_pissa_base(config.lora, config.init_from is not None)


def _check_pissa_base(cfg: lora.LoraConfig, has_base: bool) -> None:
    if cfg.init_lora_weights == lora.PISSA and not has_base:
        raise ConfigError("lora.init_lora_weights: pissa starts the adapters from the principal part of the "
                          "weights the run starts from; set init_from (a pre-trained model), or drop it")


def check_lora_fits(model_config, cfg: lora.LoraConfig, quantize_cfg: QuantizeConfig | None) -> None:
    """``cfg.modules_to_save`` names weights this model has and can train (:func:`llmjax.lora.saved_leaves`), and
    none that ``quantize:`` keeps int8; token rows of an embedding or head this model has (not
    int8); PiSSA runs on a float base."""
    int8_saved = [leaf.path for leaf in lora.saved_leaves(model_config, cfg) if leaf.path[-1] in quantize.SCALES]
    if lora.token_sites(model_config, cfg) and quantize_cfg is not None:
        raise ConfigError("lora.trainable_token_indices with quantize: is not supported: quantize: keeps the input "
                          "embedding and the output layer int8, which cannot take trained float rows; drop one of "
                          "them")
    if quantize_cfg is not None and cfg.init_lora_weights == lora.PISSA:
        raise ConfigError("lora.init_lora_weights: pissa with quantize: is not supported: PiSSA's principal part would "
                          "be taken from the float kernels and subtracted from their int8 rounding; drop one of them")
    if quantize_cfg is not None and int8_saved:
        raise ConfigError(f"lora.modules_to_save trains {'/'.join(int8_saved[0])} in full, which quantize: keeps int8 "
                          "and frozen; save only modules with float weights (norms), or drop the quantize section")


def _int8_rounded(model, params):
    """``params`` (boxed or not) with each value as the int8 model holds it, dequantized (``quantize.rounded``);
    the boxes kept."""
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    rounded = quantize.rounded(model, nn.meta.unbox(params))
    return jax.tree_util.tree_map(lambda box, value: box.replace_boxed(value) if is_box(box) else value, params,
                                  rounded, is_leaf=is_box)


def _stage_parts(tree: dict) -> dict:
    """The parts of a run's tree that belong to its stage rather than to the model or an adapter (heads)."""
    return {key: tree[key] for key in (HEADS_KEY,) if key in tree}


def _exporter(stage: Stage, model_params_of, save_adapter):
    """A run's ``export(state, out)``: the model (``model_params_of(tree)``) as a Hugging Face directory at ``out``
    with the stage's tokenizer beside it, and the adapter alone, ``save_adapter(tree, out / ADAPTER_SUBDIR)``."""

    def export(state, out: Path) -> str:
        from llmjax import hf

        tree = jax.device_get(state.full_params())
        out = Path(out)
        if jax.process_index() == 0:
            hf.save_pretrained(stage.model, jax.device_get(model_params(model_params_of(tree))), out)
            if stage.tokenizer is not None:
                stage.tokenizer.save_pretrained(out)
            save_adapter(tree, out / ADAPTER_SUBDIR)
        return str(out.absolute())

    return export


def is_adapter(path: tuple[str, ...]) -> bool:
    """The trainable filter of a LoRA run: the leaves under ``ADAPTERS_KEY`` but PiSSA's frozen starting point
    (``lora.FROZEN_LEAVES``, computed again from the base on resume), and the heads a reward or PPO stage adds
    (``HEADS_KEY``: a new head has nothing to start from, so it always trains)."""
    return path[0] == HEADS_KEY or (path[0] == ADAPTERS_KEY and path[-1] not in lora.FROZEN_LEAVES)


def lora_meta(cfg: lora.LoraConfig) -> dict:
    """The LoRA config as the JSON a checkpoint records (``llmjax.loading`` reads it back)."""
    return {f.name: list(v) if isinstance(v := getattr(cfg, f.name), tuple) else v for f in dataclasses.fields(cfg)}


# Recorded beside modules_to_save entries that peft's rule before 0.22 (a plain suffix, which llmjax followed until
# then) reads otherwise: a checkpoint of such entries from before holds other saved weights, and is refused by name.
MATCHED_AS = "the module named or one ending in '.' + entry (peft 0.22)"


def lora_identity(cfg: lora.LoraConfig, model_config) -> dict:
    """What a resumed LoRA run must share with its checkpoint (``Stage.adapters``): the rank, the scale and the
    modules adapted, ``all-linear`` resolved and in any order, DoRA, PiSSA, the modules saved whole (and, for
    entries PEFT's two rules read otherwise, the rule: :data:`MATCHED_AS`) and the token rows trained.
    ``lora_dropout`` may change, as a learning rate may."""
    cfg = lora.resolve_targets(cfg, model_config)
    identity = {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "use_rslora": cfg.use_rslora,
                "target_modules": sorted(cfg.target_modules)}
    # DoRA, PiSSA and modules_to_save change what trains; plain LoRA's identity stays as runs before them recorded it
    if cfg.use_dora:
        identity["use_dora"] = True
    if cfg.init_lora_weights == lora.PISSA:
        identity["init_lora_weights"] = lora.PISSA
    if cfg.modules_to_save:
        identity["modules_to_save"] = sorted(cfg.modules_to_save)
        if lora.rule_dependent(model_config, cfg.modules_to_save):  # a run before peft 0.22's rule took more
            identity["modules_to_save_matched_as"] = MATCHED_AS
    if cfg.trainable_token_indices:
        identity["trainable_token_indices"] = list(cfg.trainable_token_indices)
    if cfg.output_token_indices:
        identity["output_token_indices"] = list(cfg.output_token_indices)
    return identity


class _FactoredModel:
    """The model as a LoRA run's loss sees it: ``apply`` takes the run's tree (model params plus
    ``ADAPTERS_KEY``) as its params and computes each adapted ``Dense`` factored (``lora.apply_factored``)."""

    def __init__(self, model, cfg: lora.LoraConfig):
        self.model, self.cfg = model, cfg

    @property
    def config(self):
        return self.model.config

    def apply(self, variables, *args, rngs=None, **kwargs):
        tree = variables["params"]
        return lora.apply_factored(self.model, model_params(tree), tree[ADAPTERS_KEY], self.cfg, *args, rngs=rngs,
                                   **kwargs)


def with_prompt_tuning(stage: Stage, cfg: prompt_tuning.PromptTuningConfig) -> Stage:
    """``stage`` training a soft prompt of ``cfg`` before its frozen model's input (see the module docstring).
    A ``TEXT`` init reads the stage's tokenizer, which the exported config names (PEFT needs one)."""
    model = stage.model
    base_tree = stage.init_tree or model_init_tree(model)
    tokenizer_dir = stage.meta.get("tokenizer_dir")
    if cfg.prompt_tuning_init == "TEXT" and cfg.tokenizer_name_or_path is None and tokenizer_dir:
        cfg = dataclasses.replace(cfg, tokenizer_name_or_path=str(tokenizer_dir))
    if cfg.prompt_tuning_init == "TEXT":  # a text the tokenizer cannot use fails now, before the run starts
        prompt_tuning.text_token_ids(model, cfg, stage.tokenizer)

    def init_tree(key, base):
        base_key, prompt_key = jax.random.split(key)
        params = base_tree(base_key, base)
        soft_prompt = prompt_tuning.init(model, params, cfg, prompt_key, stage.tokenizer)
        return {**params, SOFT_PROMPT_KEY: soft_prompt}

    if stage.rollout is not None:
        raise ConfigError(f"prompt_tuning is not supported by stage {stage.name!r}: its rollouts sample from the "
                          "model, which would need the soft prompt in every sampling call; use lora: or full tuning")

    def loss_fn(tree, batch, rng):
        view = {**model_params(tree), **_stage_parts(tree), REFERENCE_KEY: model_params(tree)}
        return stage.loss_fn(view, batch, rng, soft_prompt=tree[SOFT_PROMPT_KEY])

    eval_hook = None
    if stage.eval_hook is not None:
        eval_hook = lambda tree, step: stage.eval_hook(model_params(tree), step,  # noqa: E731
                                                       soft_prompt=tree[SOFT_PROMPT_KEY])

    def save_adapter(tree, directory: Path) -> None:
        base_path = stage.base.path if stage.base is not None else str(directory.parent.absolute())
        prompt_tuning.save_pretrained(model, tree[SOFT_PROMPT_KEY], cfg, directory, base_model_name_or_path=base_path)

    return dataclasses.replace(
        stage, loss_fn=loss_fn, loss_for=None, is_trainable=is_soft_prompt, init_tree=init_tree, eval_hook=eval_hook,
        export=_exporter(stage, model_params, save_adapter),
        meta={**stage.meta, "prompt_tuning": dataclasses.asdict(cfg)},
        adapters={**stage.adapters, "prompt_tuning": {"num_virtual_tokens": cfg.num_virtual_tokens}},
    )


def is_soft_prompt(path: tuple[str, ...]) -> bool:
    """The trainable filter of a prompt-tuning run: the soft prompt, and the heads a stage adds."""
    return path[0] in (SOFT_PROMPT_KEY, HEADS_KEY)


def tree_bytes(stage: Stage) -> dict:
    """Bytes of the tree the loop builds for ``stage`` from its base, split as the loop splits it:
    ``{"frozen_bytes", "trainable_bytes"}`` (the frozen base, int8 under ``quantize:``; the adapters, heads,
    soft prompt). Shapes only (``jax.eval_shape``): nothing is computed or allocated."""
    init_tree = stage.init_tree or model_init_tree(stage.model)
    base = None if stage.base is None else jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), stage.base.params)
    tree = jax.eval_shape(init_tree, jax.random.key(0), base)
    trainable, frozen = split_params(tree, stage.is_trainable)
    return {"frozen_bytes": quantize.param_bytes(frozen), "trainable_bytes": quantize.param_bytes(trainable)}
