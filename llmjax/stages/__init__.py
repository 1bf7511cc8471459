"""Training stages: each module defines one (data + loss + trainable filter + init source) and runs the loop.

The run config's ``stage:`` names the stage (default ``pretrain``); ``run_stage(config)`` looks it up in
:data:`STAGES` and runs it. A stage module has
``build_stage(config, loaded=None) -> llmjax.train.loop.Stage`` (``loaded``: its ``init_from`` already read by
``llmjax.stages.init_source.resolve_init``); the one loop runs every stage.
"""

from __future__ import annotations

from llmjax.config import ConfigError, RunConfig

# stage name -> module under llmjax.stages
STAGES = {"pretrain": "pretrain", "sft": "sft", "reward": "reward", "ppo": "ppo", "dpo": "dpo", "grpo": "grpo",
          "distill": "distill"}


def stage_module(name: str):
    """The module of stage ``name``; an unknown name is a ConfigError listing the stages."""
    import importlib

    if name not in STAGES:
        raise ConfigError(f"stage={name!r} is not a training stage; choose one of {sorted(STAGES)}")
    return importlib.import_module(f"llmjax.stages.{STAGES[name]}")


def run_stage(config: RunConfig, *, progress: bool = True) -> dict:
    """Run the stage ``config`` describes; returns its summary dict (see ``llmjax.train.loop.train``).

    Joins a multi-process run first when the launcher set ``JAX_COORDINATOR_ADDRESS`` (and
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``); a single process is left alone.
    """
    from llmjax.sharding import initialize_distributed

    stage = stage_module(config.stage)
    initialize_distributed()
    import jax

    # A bad mesh or batch for these devices fails here, before the stage writes anything.
    config = config.for_devices(jax.device_count(), jax.process_count())
    from llmjax.stages.init_source import resolve_init
    from llmjax.train.loop import train

    config, loaded = resolve_init(config)
    from llmjax.stages.adapters import check_run_adapters

    check_run_adapters(config)  # a lora: section the model cannot hold fails before the stage writes anything
    return train(stage.build_stage(config, loaded), config, progress=progress)
