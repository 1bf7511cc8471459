"""Reward models: a model with a scalar head, its batches and loss, and reading one back to score texts.

A reward model is a T5 or decoder model plus a ``score`` head (``llmjax.models.heads``) on the final hidden
state after the last response token (``llmjax.rl.sequences.final_hidden``). ``stage: reward`` trains it
(``llmjax.stages.reward``); PPO and GRPO call :func:`reward_scores` inside their jitted rollouts; a lab
loads a trained one with :meth:`RewardModel.load` and scores texts with :meth:`RewardModel.score`.

Two kinds (``llmjax.rl_configs.RewardConfig``):

* ``classifier``: rows ``{"text", "label"}``; the text is the response of a scored batch with an EMPTY
  prompt (T5's encoder reads just eos, a decoder just bos), the head gives ``num_labels`` logits, the loss
  is their cross-entropy against ``label``, the reward the logit of ``wanted_label`` (the course reads the
  "nothate" logit of its hate-speech classifier).
* ``pairwise``: rows ``{"prompt", "chosen", "rejected"}``; the prompt is phrased with the summarization
  instruction the SFT stage trains dialogsum with (:data:`PAIR_PROMPT`, the course's "Summarize the following
  conversation."), so the reward model reads what the policy reads; one output, the Bradley-Terry loss
  ``-log sigmoid(r_chosen - r_rejected)``.

Batches (dicts of numpy arrays, ``B`` rows): classifier ``prompt_ids``/``prompt_mask`` ``[B, 1]``,
``response_ids``/``response_mask`` ``[B, T]``, ``label`` ``[B]`` int32; pairwise ``prompt_ids``/``prompt_mask``
``[B, P]``, ``chosen_ids``/``chosen_mask``/``rejected_ids``/``rejected_mask`` ``[B, T]``; both ``weight`` ``[B]``
fp32 (1 for a real row, 0 for a row that only pads an evaluation batch). Texts longer than
``prompt_length``/``response_length`` tokens are an error, never cut.

An export directory is the model as a Hugging Face directory (tokenizer beside it) plus
:data:`HEAD_FILE` (the head's ``kernel`` ``[width, outputs]`` and ``bias`` ``[outputs]``, fp32) and
:data:`CONFIG_FILE` (the reward config, label names and prompt template).
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.data.instructions import TEMPLATE_SETS
from llmjax.data.objectives import render_template
from llmjax.errors import DataError, UserError
from llmjax.loading import HEADS_KEY, ModelPathError, load_model
from llmjax.models.heads import SCORE, apply_head
from llmjax.rl.sequences import encode_prompts, encode_responses, final_hidden
from llmjax.rl_configs import RewardConfig

HEAD_FILE = "reward_head.safetensors"
CONFIG_FILE = "reward_config.json"
# The first dialogsum wording (the course's), with which the SFT stage also trains: what the policy reads.
PAIR_PROMPT = TEMPLATE_SETS["dialogsum"][0].prompt
FIELDS = {"classifier": ("text", "label"), "pairwise": ("prompt", "chosen", "rejected")}


class NotARewardModelError(UserError, ValueError):
    """A path given as a reward model holds a model without a reward head."""


def pair_prompt(prompt: str) -> str:
    """A preference pair's prompt (a dialogue) as the policy reads it: :data:`PAIR_PROMPT` filled in."""
    return render_template(PAIR_PROMPT, {"dialogue": prompt})


# -- the functional core ---------------------------------------------------------------------------------------

def head_outputs(model, params: dict, head: dict, batch: Mapping, *, rng=None, prefix: str = "response"):
    """``[B, outputs]`` fp32: the head on the state after the last ``{prefix}_ids`` token of ``batch``."""
    scored = {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"],
              "response_ids": batch[f"{prefix}_ids"], "response_mask": batch[f"{prefix}_mask"]}
    return apply_head(head, final_hidden(model, params, scored, rng=rng))


def reward_scores(model, params: dict, head: dict, cfg: RewardConfig, batch: Mapping,
                  probability: bool = False) -> jax.Array:
    """``[B]`` fp32 rewards of a scored batch (``llmjax.rl.sequences``): a classifier's ``wanted_label`` logit,
    a pairwise model's one output; with ``probability`` the wanted class's softmax probability (pairwise: the
    sigmoid of the output), a reward bounded in [0, 1]. Pure and jittable (PPO/GRPO call it in their rollout)."""
    outputs = head_outputs(model, params, head, batch)
    if not probability:
        return outputs[:, cfg.wanted_label]
    if cfg.kind == "pairwise":
        return jax.nn.sigmoid(outputs[:, 0])
    return jax.nn.softmax(outputs, axis=-1)[:, cfg.wanted_label]


def reward_loss_fn(model, cfg: RewardConfig):
    """The reward stage's ``LossFn`` (``llmjax.train.step``) on a tree of model params plus
    ``{HEADS_KEY: {"score": head}}``: sums over rows of the loss and of the accuracy (classifier: argmax equals
    the label; pairwise: chosen scores above rejected), ``weights`` = the rows that count. ``model`` may be
    any object with ``.apply`` and ``.config`` (LoRA with dropout passes one that reads the adapters); it gets
    the tree without the heads."""

    def loss_fn(params, batch, rng):
        head = params[HEADS_KEY][SCORE]
        model_tree = {k: v for k, v in params.items() if k != HEADS_KEY}
        weight = batch["weight"].astype(jnp.float32)
        if cfg.kind == "classifier":
            logits = head_outputs(model, model_tree, head, batch, rng=rng)
            losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None], axis=1)[:, 0]
            correct = jnp.argmax(logits, axis=1) == batch["label"]
        else:
            from llmjax.rl.losses import bradley_terry_loss

            chosen, rejected = _pair_scores(model, model_tree, head, batch, rng)
            losses = bradley_terry_loss(chosen, rejected)
            correct = chosen > rejected
        loss = jnp.sum(losses * weight)
        return loss, {"loss": loss, "accuracy": jnp.sum(correct * weight), "weights": jnp.sum(weight)}

    return loss_fn


def _pair_scores(model, params, head, batch, rng):
    """``(chosen [B], rejected [B])`` scores: both responses in one model call of ``2B`` rows."""
    both = {
        "prompt_ids": jnp.concatenate([batch["prompt_ids"]] * 2),
        "prompt_mask": jnp.concatenate([batch["prompt_mask"]] * 2),
        "response_ids": jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]]),
        "response_mask": jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]]),
    }
    scores = head_outputs(model, params, head, both, rng=rng)[:, 0]
    return jnp.split(scores, 2)


# -- rows -> batches -------------------------------------------------------------------------------------------

def check_rows(rows: Sequence[Mapping], kind: str, where: str) -> None:
    """Every row has the fields ``kind`` reads, as strings (a label may be an int or a label name)."""
    for index, row in enumerate(rows):
        missing = [name for name in FIELDS[kind] if name not in row]
        if missing:
            raise DataError(f"{where}, row {index}: missing field(s) {missing}; reward.kind={kind} needs rows with "
                            f"{list(FIELDS[kind])} (got {sorted(row)})")
        texts = [name for name in FIELDS[kind] if name != "label" and not isinstance(row[name], str)]
        if texts:
            raise DataError(f"{where}, row {index}: field {texts[0]!r} must be a string, got {type(row[texts[0]]).__name__}")


def label_ids(rows: Sequence[Mapping], num_labels: int, names: Sequence[str] | None, where: str) -> np.ndarray:
    """``[N]`` int32 class ids of classifier rows: an int in ``[0, num_labels)`` or one of the label ``names``."""
    ids = np.zeros(len(rows), np.int32)
    for index, row in enumerate(rows):
        label = row["label"]
        if isinstance(label, str) and names and label in names:
            ids[index] = list(names).index(label)
        elif isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= label < num_labels:
            ids[index] = label
        else:
            known = f" or one of {list(names)}" if names else ""
            raise DataError(f"{where}, row {index}: label {label!r} is not a class id in [0, {num_labels}){known}; "
                            "fix the row or reward.num_labels")
    return ids


def classifier_batch(model, tokenizer, texts: Sequence[str], cfg: RewardConfig, labels=None, weight=None,
                     where: str = "") -> dict:
    """Labelled texts -> a classifier batch (module docstring); ``labels`` None: zeros (scoring only); ``where``
    names the texts in errors."""
    prompt, prompt_mask = encode_prompts(model, tokenizer, [""] * len(texts), 1)
    response, response_mask = encode_responses(tokenizer, texts, cfg.response_length, model.config.pad_token_id,
                                               what=f"{where} text".strip())
    return {"prompt_ids": prompt, "prompt_mask": prompt_mask, "response_ids": response, "response_mask": response_mask,
            "label": np.zeros(len(texts), np.int32) if labels is None else np.asarray(labels, np.int32),
            "weight": np.ones(len(texts), np.float32) if weight is None else np.asarray(weight, np.float32)}


def pairwise_batch(model, tokenizer, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
                   cfg: RewardConfig, weight=None, where: str = "") -> dict:
    """Preference pairs -> a pairwise batch (module docstring); ``prompts`` as the policy reads them."""
    prompt, prompt_mask = encode_prompts(model, tokenizer, prompts, cfg.prompt_length,
                                         what=f"{where} prompt".strip())
    pad, budget = model.config.pad_token_id, cfg.response_length
    chosen_ids, chosen_mask = encode_responses(tokenizer, chosen, budget, pad,
                                               what=f"{where} chosen response".strip())
    rejected_ids, rejected_mask = encode_responses(tokenizer, rejected, budget, pad,
                                                   what=f"{where} rejected response".strip())
    return {"prompt_ids": prompt, "prompt_mask": prompt_mask, "chosen_ids": chosen_ids, "chosen_mask": chosen_mask,
            "rejected_ids": rejected_ids, "rejected_mask": rejected_mask,
            "weight": np.ones(len(prompts), np.float32) if weight is None else np.asarray(weight, np.float32)}


def rows_batch(model, tokenizer, rows: Sequence[Mapping], cfg: RewardConfig, labels: Sequence[str] | None,
               where: str) -> dict:
    """Checked rows of ``cfg.kind`` -> one batch of all of them (every text encoded, so a bad row fails now)."""
    check_rows(rows, cfg.kind, where)
    if cfg.kind == "classifier":
        return classifier_batch(model, tokenizer, [r["text"] for r in rows], cfg,
                                label_ids(rows, cfg.num_labels, labels, where), where=f"{where}:")
    return pairwise_batch(model, tokenizer, [pair_prompt(r["prompt"]) for r in rows], [r["chosen"] for r in rows],
                          [r["rejected"] for r in rows], cfg, where=f"{where}:")


# -- a trained reward model ------------------------------------------------------------------------------------

def reward_meta(cfg: RewardConfig, labels: Sequence[str] | None) -> dict:
    """What a reward run records (checkpoint ``meta["reward"]``, export :data:`CONFIG_FILE`)."""
    return {**dataclasses.asdict(cfg), "labels": None if labels is None else list(labels), "prompt_template": PAIR_PROMPT}


def save_head(directory: Path, head: Mapping, meta: Mapping) -> None:
    """Write :data:`HEAD_FILE` and :data:`CONFIG_FILE` into an export ``directory``."""
    import safetensors.numpy

    directory.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file({k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in head.items()},
                                str(directory / HEAD_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(dict(meta), indent=2) + "\n")


def _config_of(meta: Mapping) -> RewardConfig:
    fields = {f.name for f in dataclasses.fields(RewardConfig)}
    return RewardConfig(**{k: v for k, v in meta.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class RewardModel:
    """A trained reward model: ``model`` (flax module), ``params`` (host arrays), ``head`` (``{"kernel",
    "bias"}``), ``config``, ``tokenizer``, and the class names of a classifier (``labels``, or None)."""

    model: object
    params: dict
    head: dict
    config: RewardConfig
    tokenizer: object
    labels: tuple[str, ...] | None = None

    @classmethod
    def load(cls, path: str | Path) -> RewardModel:
        """Read a ``stage: reward`` run directory or checkpoint directory, or its export directory."""
        from llmjax.data.tokenizer import Tokenizer
        from llmjax.models.heads import head_width

        path = Path(path)
        if (path / CONFIG_FILE).is_file():
            import safetensors.numpy

            if not (path / HEAD_FILE).is_file():
                raise NotARewardModelError(f"{path} has {CONFIG_FILE} but no {HEAD_FILE}; export the reward run again")
            loaded = load_model(path)
            meta = json.loads((path / CONFIG_FILE).read_text())
            head = {k: np.asarray(v) for k, v in safetensors.numpy.load_file(str(path / HEAD_FILE)).items()}
        else:
            try:
                loaded = load_model(path)
            except ModelPathError as e:
                raise NotARewardModelError(f"{path} is not a reward model: {e}") from None
            meta = loaded.meta.get("reward")
            if loaded.kind == "hf" or meta is None or not (loaded.heads or {}).get(SCORE):
                what = "a Hugging Face directory without " + CONFIG_FILE if loaded.kind == "hf" else \
                    f"a checkpoint of stage {loaded.meta.get('stage')!r}"
                raise NotARewardModelError(f"{path} is not a reward model ({what}); pass a stage: reward run "
                                           "directory, its checkpoints, or its export directory")
            head = loaded.heads[SCORE]
        config = _config_of(meta)
        if set(head) != {"kernel", "bias"} or head["kernel"].shape != (head_width(loaded.model), config.num_labels):
            raise NotARewardModelError(f"{path}: the reward head ({ {k: v.shape for k, v in head.items()} }) does not "
                                       f"fit the model's width {head_width(loaded.model)} and {config.num_labels} outputs")
        if loaded.tokenizer_dir is None:
            raise NotARewardModelError(f"{path}: the reward model has no tokenizer beside it (spiece.model)")
        labels = tuple(meta["labels"]) if meta.get("labels") else None
        return cls(loaded.model, loaded.params, head, config, Tokenizer.load(loaded.tokenizer_dir), labels)

    def _batched(self, batch_of, count: int, batch_size: int):
        """``[count, outputs]`` head outputs over batches of ``batch_size`` rows (the last one padded, so one
        program serves all)."""
        outputs = []
        for start in range(0, count, batch_size):
            index = np.minimum(np.arange(start, start + batch_size), count - 1)
            out = _outputs_of(self.model, self.params, self.head, batch_of(index))
            outputs.append(np.asarray(out)[: min(batch_size, count - start)])
        return np.concatenate(outputs) if outputs else np.zeros((0, self.config.num_labels), np.float32)

    def score(self, prompts: Sequence[str] | None, responses: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """``[N]`` fp32 rewards of ``responses`` (after ``prompts`` as the policy read them; None: empty prompts,
        how a classifier was trained). Scoring is not training: the widths are the longest texts' (rounded up to a
        power of two, so a few programs serve all), whatever the training budgets were."""
        prompts = [""] * len(responses) if prompts is None else list(prompts)
        if len(prompts) != len(responses):
            raise UserError(f"{len(prompts)} prompts but {len(responses)} responses; give one response per prompt")
        prompt_ids, prompt_mask = encode_prompts(self.model, self.tokenizer, prompts, 1 << 30, bucket=True)
        longest = max((len(self.tokenizer.encode(text)) for text in responses), default=1)
        response_ids, response_mask = encode_responses(self.tokenizer, responses, 1 << (longest - 1).bit_length(),
                                                       self.model.config.pad_token_id)
        outputs = self._batched(lambda i: {"prompt_ids": prompt_ids[i], "prompt_mask": prompt_mask[i],
                                           "response_ids": response_ids[i], "response_mask": response_mask[i]},
                                len(responses), batch_size)
        return outputs[:, self.config.wanted_label].astype(np.float32)

    def accuracy(self, rows: Sequence[Mapping], batch_size: int = 32) -> float:
        """Held-out accuracy on rows of this model's kind: a classifier's argmax equals the label, a pairwise
        model scores ``chosen`` above ``rejected`` (prompts phrased as in training)."""
        batch = rows_batch(self.model, self.tokenizer, rows, self.config, self.labels, "accuracy rows")
        if self.config.kind == "classifier":
            outputs = self._batched(lambda i: {k: v[i] for k, v in batch.items()}, len(rows), batch_size)
            return float(np.mean(np.argmax(outputs, axis=1) == batch["label"]))
        scores = {}
        for side in ("chosen", "rejected"):
            scores[side] = self._batched(
                lambda i: {"prompt_ids": batch["prompt_ids"][i], "prompt_mask": batch["prompt_mask"][i],
                           "response_ids": batch[f"{side}_ids"][i], "response_mask": batch[f"{side}_mask"][i]},
                len(rows), batch_size)[:, 0]
        return float(np.mean(scores["chosen"] > scores["rejected"]))


@partial(jax.jit, static_argnums=0)
def _outputs_of(model, params, head, batch):
    """The jitted :func:`head_outputs` (one program per model and batch shape)."""
    return head_outputs(model, params, head, batch)
