"""Compute budgets: training FLOPs, petaFLOP/s-days, wall time on a number of chips, Chinchilla sizes.

Two FLOP counts, both forward + backward:

* ``6 N D`` (Kaplan et al. 2020, Hoffmann et al. 2022): ``N`` every parameter, ``D`` tokens; the
  scaling laws and the course's figures use it, and so do :func:`chinchilla_tokens` and
  :func:`compute_optimal`;
* the matmul count of ``llmjax.models.flops`` (what the training metrics' MFU divides by): ``6`` times
  the matmul parameters (embedding lookups excluded, LM head included) per token, plus the attention
  term ``12 * layers * d_attn * keys`` per query token (scores and weighted values, full square).
  Wall time uses this one: at a stated MFU it is the time the run's own MFU figure would describe.

A petaFLOP/s-day is 1e15 FLOP/s for 86,400 s = 8.64e19 FLOPs (the course: about eight V100s at full
efficiency for a day). Chinchilla: compute-optimal training sees about 20 tokens per parameter, so a
budget ``C = 6 N D = 6 N (20 N) = 120 N^2`` is best spent on ``N = sqrt(C / 120)`` parameters.
"""

from __future__ import annotations

import dataclasses
import math

from llmjax.model_config import family_of
from llmjax.models.flops import StepFlops, decoder_step_flops, t5_step_flops
from llmjax.planning.params import PlanError, count_params

PF_DAY = 1e15 * 86400
CHINCHILLA_TOKENS_PER_PARAM = 20

# Peak dense 16-bit (bf16/fp16) matrix FLOP/s per chip, without sparsity, from the vendors' datasheets:
CHIPS = {
    "v100": 125e12,   # NVIDIA V100 SXM2 datasheet: 125 TFLOPS tensor (fp16)
    "a100": 312e12,   # NVIDIA A100 datasheet: 312 TFLOPS bf16 tensor core (624 is with sparsity)
    "h100": 989e12,   # NVIDIA H100 SXM datasheet: 1,979 TFLOPS bf16 with sparsity, half of it dense
    "h200": 989e12,   # NVIDIA H200 datasheet: the H100's tensor cores (1,979 with sparsity)
    "tpu-v4": 275e12,   # Google Cloud TPU v4 documentation: 275 TFLOPS bf16 per chip
    "tpu-v5e": 197e12,  # Google Cloud TPU v5e documentation: 197 TFLOPS bf16 per chip
    "tpu-v5p": 459e12,  # Google Cloud TPU v5p documentation: 459 TFLOPS bf16 per chip
}


def chinchilla_tokens(params: float) -> float:
    """Compute-optimal training tokens for ``params`` parameters (about 20 a parameter)."""
    return CHINCHILLA_TOKENS_PER_PARAM * params


def compute_optimal(budget_flops: float) -> tuple[float, float]:
    """``(parameters, tokens)`` that spend ``budget_flops`` compute-optimally: ``N = sqrt(C / 120)``, ``D = 20 N``."""
    if budget_flops <= 0:
        raise PlanError(f"a compute budget must be positive, got {budget_flops}")
    params = math.sqrt(budget_flops / (6 * CHINCHILLA_TOKENS_PER_PARAM))
    return params, chinchilla_tokens(params)


def pf_days(flops: float) -> float:
    """FLOPs -> petaFLOP/s-days."""
    return flops / PF_DAY


def chip_peak(chip: str | None, peak_flops: float | None) -> float:
    """Peak FLOP/s per chip: ``peak_flops`` if given, else the table's entry for ``chip``."""
    if peak_flops is not None:
        if peak_flops <= 0:
            raise PlanError(f"peak FLOP/s must be positive, got {peak_flops}")
        return peak_flops
    if chip not in CHIPS:
        raise PlanError(f"unknown chip {chip!r}; use one of {sorted(CHIPS)} or give the peak FLOP/s per chip")
    return CHIPS[chip]


def wall_seconds(flops: float, chips: int, peak_flops: float, mfu: float) -> float:
    """Seconds to do ``flops`` on ``chips`` accelerators of ``peak_flops`` each at model FLOP utilization ``mfu``."""
    if chips < 1:
        raise PlanError(f"the number of chips must be >= 1, got {chips}")
    if not 0 < mfu <= 1:
        raise PlanError(f"MFU is a fraction in (0, 1], got {mfu}")
    return flops / (chips * peak_flops * mfu)


def sequence_flops(config, length: int, encoder_length: int | None = None) -> StepFlops:
    """Matmul FLOPs (forward + backward) of one training sequence (``llmjax.models.flops``)."""
    if family_of(config) == "t5":
        if encoder_length is None:
            raise PlanError("a T5 model reads an input and a target: give the input length too")
        return t5_step_flops(config, 1, encoder_length, length)
    return decoder_step_flops(config, 1, length)


@dataclasses.dataclass(frozen=True)
class ComputePlan:
    """A training run's compute: tokens, FLOPs by both counts, petaFLOP/s-days and wall time."""

    params: int
    tokens: float
    flops_6nd: float
    flops_matmul: float       # llmjax.models.flops: dense + attention
    attention_fraction: float  # of flops_matmul
    chips: int
    chip: str
    peak_flops: float
    mfu: float
    chinchilla_tokens: float
    optimal_params_for_budget: float  # compute-optimal size for this run's 6ND budget
    from_config: bool = True  # False: a bare parameter count, no matmul/attention count

    @property
    def pf_days(self) -> float:
        return pf_days(self.flops_matmul)

    @property
    def wall_seconds(self) -> float:
        return wall_seconds(self.flops_matmul, self.chips, self.peak_flops, self.mfu)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(pf_days=self.pf_days, pf_days_6nd=pf_days(self.flops_6nd), wall_seconds=self.wall_seconds,
                   wall_days=self.wall_seconds / 86400)
        return out

    def table(self) -> str:
        rows = [
            ("parameters", f"{self.params:,}"),
            ("training tokens", f"{self.tokens:.4g} ({self.tokens / self.params:.1f} per parameter)"),
            ("FLOPs, 6*N*D", f"{self.flops_6nd:.4g} ({pf_days(self.flops_6nd):.4g} petaFLOP/s-days)"),
            ("FLOPs, matmuls + attention", f"{self.flops_matmul:.4g} ({self.pf_days:.4g} petaFLOP/s-days; "
                                           f"attention {100 * self.attention_fraction:.1f}%)"
             if self.from_config else "no model config: 6*N*D is the count"),
            ("wall time", f"{_duration(self.wall_seconds)} on {self.chips} x {self.chip} "
                          f"({self.peak_flops / 1e12:.0f} TFLOP/s peak) at MFU {self.mfu:.2f}"),
            ("Chinchilla-optimal tokens", f"{self.chinchilla_tokens:.4g} (20 per parameter)"),
            ("compute-optimal size for this budget", f"{self.optimal_params_for_budget:.4g} parameters "
                                                     f"(N = sqrt(C/120))"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} minutes"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:.1f} days"


def plan_compute(config, *, params: float | None = None, tokens: float | None = None,
                 budget_pf_days: float | None = None, length: int | None = None, encoder_length: int | None = None,
                 chips: int = 1, chip: str = "h100", peak_flops: float | None = None, mfu: float = 0.4) -> ComputePlan:
    """Compute of training ``config``'s model (or, with ``config`` None, any model of ``params`` parameters,
    counted by ``6 N D`` alone) on ``tokens`` tokens, or on as many as ``budget_pf_days`` buys (by ``6 N D``);
    neither: the Chinchilla-optimal 20 per parameter. ``length`` (and T5's ``encoder_length``) set the
    attention term; a T5 token is an input or a target token."""
    if (config is None) == (params is None):
        raise PlanError("give a model config or a parameter count (--model or --params), one of them")
    if tokens is not None and budget_pf_days is not None:
        raise PlanError("give either a number of training tokens or a budget in petaFLOP/s-days, not both")
    if params is not None and params <= 0:
        raise PlanError(f"the parameter count must be positive, got {params}")
    params = count_params(config) if config is not None else params
    if budget_pf_days is not None:
        if budget_pf_days <= 0:
            raise PlanError(f"a budget must be positive, got {budget_pf_days} petaFLOP/s-days")
        tokens = budget_pf_days * PF_DAY / (6 * params)
    elif tokens is None:
        tokens = chinchilla_tokens(params)
    if tokens <= 0:
        raise PlanError(f"the number of training tokens must be positive, got {tokens}")
    peak = chip_peak(chip, peak_flops)
    wall_seconds(0.0, chips, peak, mfu)  # checks chips and MFU before anything is reported
    flops_6nd = 6 * params * tokens
    if config is None:
        matmul, attention_fraction = flops_6nd, 0.0
    else:
        if length is None or length < 1 or (encoder_length is not None and encoder_length < 1):
            raise PlanError(f"sequence lengths must be positive, got length={length}, input length={encoder_length}")
        per_sequence = sequence_flops(config, length, encoder_length)
        matmul = per_sequence.total * tokens / per_sequence.tokens
        attention_fraction = per_sequence.attention / per_sequence.total
    return ComputePlan(
        params=int(params), tokens=tokens, flops_6nd=flops_6nd, flops_matmul=matmul,
        attention_fraction=attention_fraction, chips=chips, chip=chip if peak_flops is None else "custom",
        peak_flops=peak, mfu=mfu, chinchilla_tokens=chinchilla_tokens(params),
        optimal_params_for_budget=compute_optimal(flops_6nd)[0], from_config=config is not None,
    )
