"""Configs of the preference, RL and distillation stages (``reward:``, ``ppo:``, ``dpo:``, ``grpo:``, ``distill:``
sections of a run config), kept in the core layer so ``llmjax.config`` builds and checks them; ``llmjax.rl`` and
the stages read them.

Every field has the default a user would reach for first; ``__post_init__`` refuses values that cannot work,
naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from llmjax.errors import InputError

KL_ESTIMATORS = ("k1", "k2", "k3")


class RLConfigError(InputError):
    """A ``reward``/``ppo``/``dpo``/``grpo``/``distill`` setting that cannot be used."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise RLConfigError(message)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """``stage: reward``: a model with a scalar head.

    kind:         ``classifier`` (labelled texts, cross-entropy over ``num_labels`` logits; the reward is the
                  logit of ``wanted_label``, as the course reads "nothate") or ``pairwise`` (``(prompt, chosen,
                  rejected)`` rows, Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected)``, one output)
    num_labels:   classifier outputs (pairwise: 1)
    wanted_label: the class whose logit is the reward
    prompt_length / response_length: token budgets of the prompt and the scored text; longer inputs are an
                  error, never cut
    """

    kind: Literal["classifier", "pairwise"] = "classifier"
    num_labels: int = 2
    wanted_label: int = 0
    prompt_length: int = 256
    response_length: int = 64

    def __post_init__(self):
        _require(self.kind in ("classifier", "pairwise"), f"reward.kind={self.kind!r}: use classifier or pairwise")
        if self.kind == "pairwise":
            _require(self.num_labels == 1, f"reward.kind=pairwise scores with one output; set reward.num_labels=1 "
                                           f"(got {self.num_labels})")
        else:
            _require(self.num_labels >= 2, f"reward.kind=classifier needs reward.num_labels >= 2, got {self.num_labels}")
        _require(0 <= self.wanted_label < self.num_labels,
                 f"reward.wanted_label={self.wanted_label} is not one of the {self.num_labels} outputs")
        _require(self.prompt_length > 0 and self.response_length > 0,
                 "reward.prompt_length and reward.response_length must be positive")

    @property
    def outputs(self) -> int:
        return self.num_labels


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How a rollout samples responses (shared by PPO and GRPO)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # What of the reward model's output is the reward: the logit of its wanted class (the course's choice) or
    # that class's probability, which is bounded: a policy cannot climb it further by hacking what the reward
    # model happens to like among texts it already finds clean.
    reward_score: Literal["logit", "probability"] = "logit"

    def check(self, section: str) -> None:
        _require(self.max_new_tokens > 0, f"{section}.max_new_tokens must be positive, got {self.max_new_tokens}")
        _require(self.temperature > 0, f"{section}.temperature must be > 0, got {self.temperature}")
        _require(self.top_k >= 0 and 0 < self.top_p <= 1, f"{section}.top_k must be >= 0 and top_p in (0, 1]")
        _require(self.reward_score in ("logit", "probability"),
                 f"{section}.reward_score={self.reward_score!r}: use logit or probability")


@dataclasses.dataclass(frozen=True)
class PPOConfig(SamplingConfig):
    """``stage: ppo`` (Schulman et al. 2017 with the RLHF recipe of Ziegler et al. 2019).

    reward_model:  a ``stage: reward`` run or its export; its head scores each response
    reward_sees_prompt: score ``(prompt, response)`` (True) or the response alone (False, as the course's
                   hate-speech classifier does)
    epochs, minibatches: passes over each rollout batch, and optimizer updates per pass
    gamma, lam:    GAE's discount and trace decay
    clip_range, clip_range_value: the policy ratio's and the value's clip
    vf_coef, ent_coef: ``L = L_policy + vf_coef * L_value - ent_coef * entropy`` (the course's c1, c2)
    kl_coef:       the KL penalty's starting coefficient; with ``adaptive_kl`` it moves toward ``target_kl``
                   over ``kl_horizon`` responses (Ziegler et al.'s controller)
    kl_estimator:  ``k1`` (log-ratio), ``k2``, ``k3`` per-token estimators
    whiten_advantages: normalise advantages over each rollout batch
    """

    reward_model: str = ""
    reward_sees_prompt: bool = False
    epochs: int = 4
    minibatches: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    kl_coef: float = 0.2
    adaptive_kl: bool = True
    target_kl: float = 6.0
    kl_horizon: int = 10000
    kl_estimator: str = "k1"
    whiten_advantages: bool = True
    prompt_length: int = 256

    def __post_init__(self):
        self.check("ppo")
        _require(bool(self.reward_model), "ppo.reward_model is required: a stage: reward run directory or its export")
        _require(self.epochs >= 1 and self.minibatches >= 1, "ppo.epochs and ppo.minibatches must be >= 1")
        _require(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "ppo.gamma and ppo.lam must be in [0, 1]")
        _require(self.clip_range > 0 and self.clip_range_value > 0, "ppo.clip_range and clip_range_value must be > 0")
        _require(self.vf_coef >= 0 and self.ent_coef >= 0 and self.kl_coef >= 0,
                 "ppo.vf_coef, ppo.ent_coef and ppo.kl_coef must be >= 0")
        _require(self.target_kl > 0 and self.kl_horizon > 0, "ppo.target_kl and ppo.kl_horizon must be > 0")
        _require(self.kl_estimator in KL_ESTIMATORS,
                 f"ppo.kl_estimator={self.kl_estimator!r}: use one of {list(KL_ESTIMATORS)}")
        _require(self.prompt_length > 0, "ppo.prompt_length must be positive")


@dataclasses.dataclass(frozen=True)
class GRPOConfig(SamplingConfig):
    """``stage: grpo`` (Shao et al. 2024): ``group_size`` responses per prompt, advantages normalised within
    each group, no value head; ``kl_coef`` weighs the ``k3`` KL to the reference inside the loss."""

    reward_model: str = ""
    reward_sees_prompt: bool = False
    group_size: int = 4
    epochs: int = 1
    minibatches: int = 1
    clip_range: float = 0.2
    kl_coef: float = 0.04
    prompt_length: int = 256

    def __post_init__(self):
        self.check("grpo")
        _require(bool(self.reward_model), "grpo.reward_model is required: a stage: reward run directory or its export")
        _require(self.group_size >= 2, f"grpo.group_size must be >= 2 (advantages compare samples), got {self.group_size}")
        _require(self.epochs >= 1 and self.minibatches >= 1, "grpo.epochs and grpo.minibatches must be >= 1")
        _require(self.clip_range > 0 and self.kl_coef >= 0, "grpo.clip_range must be > 0 and grpo.kl_coef >= 0")
        _require(self.prompt_length > 0, "grpo.prompt_length must be positive")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """``stage: dpo`` (Rafailov et al. 2023) on ``(prompt, chosen, rejected)`` rows: ``beta`` scales the
    implicit reward ``log pi/pi_ref``; the reference is the init model (under LoRA: adapters off)."""

    beta: float = 0.1
    prompt_length: int = 256
    response_length: int = 64

    def __post_init__(self):
        _require(self.beta > 0, f"dpo.beta must be > 0, got {self.beta}")
        _require(self.prompt_length > 0 and self.response_length > 0,
                 "dpo.prompt_length and dpo.response_length must be positive")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """``stage: distill`` (Hinton et al. 2015, the course's formulation): the run's model (the student) learns
    ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)`` per target token.

    teacher:     a Hugging Face directory or an llmjax checkpoint/run directory (``llmjax.loading``) of the same
                 family and vocabulary as the student; frozen, never checkpointed (its path and sha256 are)
    temperature: T > 0 softening both distributions (the course: above 1 spreads the teacher's mass)
    alpha:       the soft targets' share in [0, 1]; 0 trains on the labels alone
    """

    teacher: str = ""
    temperature: float = 2.0
    alpha: float = 0.5

    def __post_init__(self):
        _require(bool(self.teacher), "distill.teacher is required: a Hugging Face directory or an llmjax "
                                     "checkpoint/run directory of the model to distill from")
        _require(self.temperature > 0, f"distill.temperature must be > 0, got {self.temperature}")
        _require(0 <= self.alpha <= 1, f"distill.alpha must be in [0, 1], got {self.alpha}")


SECTIONS = {"reward": RewardConfig, "ppo": PPOConfig, "dpo": DPOConfig, "grpo": GRPOConfig, "distill": DistillConfig}
# Sections their stage cannot do without (the rest take their defaults when left out): what they must name.
REQUIRED = {"ppo": "ppo.reward_model (a stage: reward run or its export)",
            "grpo": "grpo.reward_model (a stage: reward run or its export)",
            "distill": "distill.teacher (a Hugging Face directory or llmjax checkpoint/run directory)"}
