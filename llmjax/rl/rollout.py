"""Rollouts shared by PPO and GRPO: sample responses from the current policy, score them, read the reference.

* :func:`sample_responses`: ``copies`` sampled responses per prompt (the jitted sampler of
  ``llmjax.generate`` with the KV cache), as a scored batch's ``response_ids`` / ``response_mask``
  ``[B * copies, max_new_tokens]``: each row up to and including its first eos.
* :class:`RewardInputs`: how the reward model reads a response: alone (behind its own family's empty prompt,
  as the course's hate-speech classifier reads a completion) or after the policy's prompt.
* :class:`PromptData`: the stage's ``train_data``: batches of encoded prompts plus the state an RL stage keeps
  between rollouts (PPO's adaptive KL coefficient), all in ``state()``, so a resume continues it exactly.

A rollout's randomness is ``fold_in(key(seed), step)``: a resumed run samples what the uninterrupted one did.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import InputError
from llmjax.evaluate import prompt_ids
from llmjax.generate import GenerationConfig, generate
from llmjax.models import model_family
from llmjax.rl.sequences import responses_of_generation

ROLLOUT_STREAM = 0x5A17  # folded into the seed key so rollout samples never reuse the step's dropout keys


def rollout_key(seed: int, step: int) -> jax.Array:
    """The sampling key of the rollout before step ``step + 1``: a function of the seed and the step only."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), ROLLOUT_STREAM), step)


def sampling_config(model, tokenizer, cfg, copies: int = 1) -> GenerationConfig:
    """The ``GenerationConfig`` of a rollout from a ``ppo:``/``grpo:`` section's sampling fields."""
    return GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature,
                            top_k=cfg.top_k, top_p=cfg.top_p, num_return_sequences=copies,
                            eos_token_id=tokenizer.eos_id, pad_token_id=model.config.pad_token_id)


def sample_responses(model, params, prompt_ids_, prompt_mask, key, generation: GenerationConfig):
    """``(response_ids, response_mask)`` int32 numpy ``[B * copies, max_new_tokens]`` sampled from ``params``.

    Rows of one prompt are consecutive (prompt p's copies are rows ``p*copies ..``), as GRPO's groups need."""
    tokens = generate(model, params, prompt_ids_, prompt_mask, rng=key, generation_config=generation)
    prefix = 1 if model_family(model.config).seq2seq else prompt_ids_.shape[1]
    new = np.asarray(jax.device_get(tokens))[:, prefix:]
    width = generation.max_new_tokens
    if new.shape[1] < width:  # everything ended early: pad to the fixed width every step compiles for
        new = np.pad(new, ((0, 0), (0, width - new.shape[1])), constant_values=model.config.pad_token_id)
    return responses_of_generation(new, generation.eos_token_id, model.config.pad_token_id)


class RewardInputs:
    """The reward model's view of ``(prompt, response)`` rows, built once per stage.

    ``sees_prompt=False``: the response behind the reward model's own empty prompt (T5: ``eos``; a decoder:
    ``bos``). ``True``: the policy's encoded prompt, which needs the reward model to be of the policy's family.
    The response tokens pass as they are, so both must share the tokenizer (checked here).
    """

    PROBE = "A probe sentence, 123 #Person1#: checks the vocabulary!"

    def __init__(self, reward, policy_model, tokenizer, sees_prompt: bool):
        self.sees_prompt = sees_prompt
        if reward.tokenizer.encode(self.PROBE) != tokenizer.encode(self.PROBE) or \
                reward.model.config.vocab_size != policy_model.config.vocab_size:
            raise InputError("the reward model's tokenizer is not the policy's: responses are passed to it as token "
                             "ids, so train the reward model from the same tokenizer (data.tokenizer) as the policy")
        seq2seq = model_family(reward.model.config).seq2seq
        if sees_prompt and seq2seq != model_family(policy_model.config).seq2seq:
            raise InputError("reward_sees_prompt=true needs a reward model of the policy's family (the prompt is "
                             "passed encoded as the policy reads it); set it to false or train a matching reward model")
        self.empty = np.asarray(prompt_ids(reward.model, reward.tokenizer, ""), np.int32)

    def batch(self, scored: dict) -> dict:
        """The scored batch the reward model reads from the policy's scored batch ``scored`` (jittable)."""
        response_ids, response_mask = scored["response_ids"], scored["response_mask"]
        if self.sees_prompt:
            prompt, mask = scored["prompt_ids"], scored["prompt_mask"]
        else:
            rows = response_ids.shape[0]
            prompt = jnp.broadcast_to(jnp.asarray(self.empty), (rows, self.empty.size))
            mask = jnp.ones_like(prompt)
        return {"prompt_ids": prompt, "prompt_mask": mask, "response_ids": response_ids,
                "response_mask": response_mask}


class PromptData:
    """An RL stage's ``train_data``: the batches of ``prompts`` (a ``RowBatches``) plus ``extra`` state the
    stage updates between rollouts (e.g. ``{"kl_coef": 0.2}``), saved and restored with the data position."""

    def __init__(self, prompts, **extra):
        self.prompts, self.extra = prompts, dict(extra)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self.prompts)

    def state(self) -> dict:
        return {**self.prompts.state(), **self.extra}

    def restore(self, state) -> None:
        self.prompts.restore(state)
        for key in self.extra:
            if key in state:
                self.extra[key] = state[key]
