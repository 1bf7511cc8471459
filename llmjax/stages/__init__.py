"""Training stages: each module defines one (data + loss + trainable filter + init source) and runs the loop.

``run_stage(config)`` picks the stage from the run config; the CLI calls it.
"""

from __future__ import annotations

from llmjax.config import ConfigError, RunConfig

# data.objective -> stage module (under llmjax.stages) that trains with it
STAGE_FOR_OBJECTIVE = {"span_corruption": "pretrain", "causal_lm": "pretrain"}


def run_stage(config: RunConfig, *, progress: bool = True) -> dict:
    """Run the stage ``config`` describes; returns its summary dict (see ``llmjax.train.loop.train``).

    Joins a multi-process run first when the launcher set ``JAX_COORDINATOR_ADDRESS`` (and
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``); a single process is left alone.
    """
    import importlib

    from llmjax.sharding import initialize_distributed

    initialize_distributed()
    import jax

    # A bad mesh or batch for these devices fails here, before the stage writes anything.
    config = config.for_devices(jax.device_count(), jax.process_count())

    objective = config.data.objective
    if objective not in STAGE_FOR_OBJECTIVE:
        raise ConfigError(
            f"no training stage handles data.objective={objective!r} yet; available: {sorted(STAGE_FOR_OBJECTIVE)}"
        )
    stage = importlib.import_module(f"llmjax.stages.{STAGE_FOR_OBJECTIVE[objective]}")
    return stage.run(config, progress=progress)
