"""Any stage with a ``lora:`` section trains LoRA adapters only: one transformation of the built Stage.

``with_lora(stage, lora_config)`` takes what a stage module built (model, loss, data, eval hook, base)
and returns the Stage the loop runs instead:

* tree:      the model's params with one more top-level part, ``{**model params, "lora": adapters}``
             (``ADAPTERS_KEY``); the adapters come from ``llmjax.lora.init`` on the boxed base inside
             ``init_tree``, so they are born sharded and a resume restores them through the loop's
             abstract target like any other leaf
* trainable: the adapter leaves only: the optimizer state and the checkpoints hold adapters alone
             (with a base, the checkpoint also records its path and sha256 and a resume checks them)
* loss:      the stage's loss on the merged params ``W + scale * A @ B`` (``llmjax.lora.merge`` inside
             the jitted step; gradients reach A and B through the merge)
* eval hook: the stage's hook on the merged params
* export:    the merged model as a Hugging Face directory at ``export_dir`` (tokenizer beside it), and
             the adapters alone in PEFT's format in ``<export_dir>/adapter`` (``ADAPTER_SUBDIR``), which
             ``peft.PeftModel.from_pretrained`` applies to the ``init_from`` model
* meta:      the LoRA config rides in every checkpoint (``meta["lora"]``), so ``llmjax.loading.load_model``
             of a LoRA run's checkpoint gives the merged params

The model's own code never sees the adapters; reward and PPO stages reuse this as SFT does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from llmjax import lora
from llmjax.config import RunConfig
from llmjax.loading import ADAPTERS_KEY, model_params
from llmjax.train.loop import Stage
from llmjax.train.state import model_init_tree

ADAPTER_SUBDIR = "adapter"  # the PEFT adapter directory inside the export directory


def with_run_adapters(config: RunConfig, stage: Stage) -> Stage:
    """The stage a run config asks for: ``stage`` itself, or with its ``lora:`` section applied."""
    return stage if config.lora is None else with_lora(stage, config.lora)


def with_lora(stage: Stage, cfg: lora.LoraConfig) -> Stage:
    """``stage`` training the LoRA adapters of ``cfg`` on its frozen model (see the module docstring).
    ``cfg`` was checked against the model with the run config (``RunConfig``: targets it has, no dropout)."""
    model = stage.model
    base_tree = stage.init_tree or model_init_tree(model)

    def init_tree(key, base):
        base_key, adapter_key = jax.random.split(key)
        params = base_tree(base_key, base)
        return {**params, ADAPTERS_KEY: lora.init(model, params, cfg, adapter_key)}

    def merged(tree):
        """The model's params with the adapters merged in: what the model computes with."""
        return lora.merge(model_params(tree), tree[ADAPTERS_KEY], cfg)

    def loss_fn(tree, batch, rng):
        return stage.loss_fn(merged(tree), batch, rng)

    eval_hook = None
    if stage.eval_hook is not None:
        eval_hook = lambda tree, step: stage.eval_hook(merged(tree), step)  # noqa: E731

    def export(state, out: Path) -> str:
        from llmjax import hf

        tree = jax.device_get(state.full_params())
        out = Path(out)
        if jax.process_index() == 0:
            hf.save_pretrained(model, jax.device_get(merged(tree)), out)
            if stage.tokenizer is not None:
                stage.tokenizer.save_pretrained(out)
            lora.save_pretrained(model, tree[ADAPTERS_KEY], cfg, out / ADAPTER_SUBDIR)
        return str(out.absolute())

    return dataclasses.replace(
        stage, loss_fn=loss_fn, is_trainable=is_adapter, init_tree=init_tree, eval_hook=eval_hook, export=export,
        meta={**stage.meta, "lora": lora_meta(cfg)},
    )


def is_adapter(path: tuple[str, ...]) -> bool:
    """The trainable filter of a LoRA run: the leaves under ``ADAPTERS_KEY``."""
    return path[0] == ADAPTERS_KEY


def lora_meta(cfg: lora.LoraConfig) -> dict:
    """The LoRA config as the JSON a checkpoint records (``llmjax.loading`` reads it back)."""
    return {f.name: list(v) if isinstance(v := getattr(cfg, f.name), tuple) else v for f in dataclasses.fields(cfg)}

