"""Planning a run before paying for it: memory per device and compute budgets, from configs alone.

* :mod:`~llmjax.planning.params`: every parameter of a model from its config (exact counts, shardings);
* :mod:`~llmjax.planning.state`: weights, gradients and optimizer state per device (exact);
* :mod:`~llmjax.planning.activations`: activation bytes of a train step (a formula, documented there);
* :mod:`~llmjax.planning.memory`: all of it for a mesh, batch, precision, optimizer and remat policy;
* :mod:`~llmjax.planning.compute`: FLOPs, petaFLOP/s-days, wall time, Chinchilla-optimal sizes.

``llmjax calc memory`` and ``llmjax calc compute`` print them. Nothing here builds a model or allocates.
"""

from llmjax.planning.compute import (  # noqa: F401 (the package's interface)
    CHIPS, ComputePlan, chinchilla_tokens, compute_optimal, pf_days, plan_compute,
)
from llmjax.planning.memory import PRECISIONS, MemoryPlan, plan_memory  # noqa: F401
from llmjax.planning.params import PlanError, count_params, param_specs  # noqa: F401
