"""The lab's detoxification rows (the course's Lab 3, in miniature): a reward model, then PPO, DPO, GRPO and
RLAIF from the fine-tuned summarizer.

The bundled DialogSum-shaped set has rude speakers in 30% of its dialogues, and half of their plain
references report the insult, so the ``full_ft`` summarizer sometimes carries insults into its summaries.

* ``reward_model``: the pre-trained T5 with a two-class head (``stage: reward``) trained on the bundled toxicity
  labels and on the summaries of the training dialogues' preference pairs (``reward_labels``); the reward is
  the logit of ``non_toxic``. Its entry: held-out ``accuracy`` on the labels' test split and
  ``summary_accuracy`` on the test split's pair summaries.
* ``ppo`` / ``grpo``: ``stage: ppo`` / ``stage: grpo`` from ``full_ft`` against that reward model; the frozen
  reference is ``full_ft``. GRPO's prompts: the ``dialogsum`` task's train split. PPO's (``ppo_prompts``): by
  default only its rude dialogues (``ppo_prompts.jsonl``), the ones whose summaries can carry an insult. A
  polite dialogue's summaries all score near 1, so they teach nothing; GRPO's group-relative advantage is zero
  on them, but PPO's is not: its learned value baseline is still poor in 60 steps, and on every polite prompt
  it adds noise. With all prompts PPO's cut of the judge's greedy toxicity depended on the lab's random start
  (38.5% from the scanned lab's ``full_ft``, 18.4% from the unrolled one's); with the rude ones it was 65% and
  67% from the same two (README: Lab).
* ``dpo``: ``stage: dpo`` from ``full_ft`` on the bundled preference pairs (same insult-free and insulting
  summary of a rude training dialogue).
* ``rlaif``: the course's Constitutional-AI step: two sampled summaries of each rude training dialogue from
  ``full_ft``, labelled chosen/rejected by the reward model instead of a person, then DPO on them.

Every policy row (``full_ft`` included, the "before") is measured the same way:

* ROUGE and BLEU of greedy summaries of the test split (``predictions/<row>.jsonl``, as every row);
* ``toxicity``: the independent judge's (``alt-profanity-check``, never trained on anything here) mean
  probability of the toxic class over the row's greedy summaries of the test split's rude dialogues (the
  generations of ``predictions/<row>.jsonl``, so the ROUGE and the toxicity of a row read one set of
  summaries); ``toxic_share``: the share the judge scores above 0.5;
* ``toxicity_sampled``: the same judge over ``toxicity_samples`` summaries per rude dialogue *sampled* at
  temperature 1 (as the course samples), saved with their scores in ``predictions/<row>_toxicity.jsonl``;
* ``kl``: a Monte-Carlo estimate of KL(row || full_ft) in nats per summary: the mean over those sampled
  summaries of the summed token log-ratio ``log pi(y|x) - log pi_ref(y|x)``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from llmjax.config import config_from_dict
from llmjax.data.tokenizer import Tokenizer
from llmjax.data.bundled.detox import rude_prompts, toxicity_labels
from llmjax.data.bundled.detox import preference_pairs
from llmjax.evaluate import build_prompts, load_model_for_inference, prompt_ids
from llmjax.lab.adapter_rows import run_measures, train_and_score, trained_to_end
from llmjax.lab.toxicity import judge_toxicity
from llmjax.rl import losses
from llmjax.rl.reward import RewardModel, pair_prompt
from llmjax.rl.rollout import sample_responses
from llmjax.rl.sequences import encode_prompts, response_outputs
from llmjax.stages import run_stage
from llmjax.generate import GenerationConfig

REWARD_ROW, POLICY_ROWS = "reward_model", ("ppo", "dpo", "grpo", "rlaif")
BASE_ROW = "full_ft"
PPO_PROMPTS = ("rude", "all")
TOXICITY_SEED = 1234


@dataclasses.dataclass(frozen=True)
class DetoxRows:
    """Which detox rows the lab runs and their settings."""

    enabled: bool = True
    reward_steps: int = 300
    reward_batch_size: int = 32
    reward_learning_rate: float = 3e-4
    ppo_steps: int = 60
    ppo_batch_size: int = 16
    ppo_learning_rate: float = 2e-5
    ppo_epochs: int = 4
    ppo_minibatches: int = 2
    ppo_kl_coef: float = 0.2
    ppo_prompts: str = "rude"     # "rude": the rude training dialogues only; "all": the dialogsum train split
    reward_score: str = "probability"  # PPO/GRPO reward: the non_toxic probability (bounded; see rl_configs)
    dpo_steps: int = 60
    dpo_batch_size: int = 16
    dpo_learning_rate: float = 1e-5
    dpo_beta: float = 0.1
    grpo_steps: int = 30
    grpo_batch_size: int = 4      # prompts per GRPO step, each sampled grpo_group_size times
    grpo_group_size: int = 4
    grpo_learning_rate: float = 2e-5
    policy_rows: tuple[str, ...] = ("ppo", "dpo", "grpo")  # which RL rows train from full_ft (RLAIF: ``rlaif``)
    rlaif: bool = True
    rlaif_prompts: int = 240      # rude training dialogues sampled twice and labelled by the reward model
    toxicity_limit: int | None = None  # rude test dialogues judged (None: all)
    toxicity_samples: int = 4     # summaries sampled per rude test dialogue (more samples, a steadier mean)

    @classmethod
    def tiny(cls) -> "DetoxRows":
        return cls(reward_steps=2, reward_batch_size=8, ppo_steps=2, ppo_batch_size=8, dpo_steps=2, dpo_batch_size=8,
                   grpo_steps=2, grpo_batch_size=8, rlaif_prompts=8, toxicity_limit=8)

    def row_names(self) -> list[str]:
        if not self.enabled:
            return []
        return [REWARD_ROW, *self.policy_rows] + (["rlaif"] if self.rlaif else [])

    def __post_init__(self):
        if self.ppo_prompts not in PPO_PROMPTS:
            raise ValueError(f"ppo_prompts={self.ppo_prompts!r}; choose one of {list(PPO_PROMPTS)}")
        unknown = sorted(set(self.policy_rows) - set(POLICY_ROWS[:-1]))
        if unknown:
            raise ValueError(f"unknown detox policy rows {unknown}; choose from {list(POLICY_ROWS[:-1])}")


# -- configs -------------------------------------------------------------------------------------------------

def _common(settings, run_dir: Path, tokenizer_dir: Path, steps: int, batch_size: int, learning_rate: float,
            log_every: int = 1) -> dict:
    return {
        "train": {"steps": steps, "batch_size": batch_size, "seed": settings.seed, "eval_every_steps": 0,
                  "log_every_steps": log_every, "output_dir": str(run_dir)},
        "optim": {"learning_rate": learning_rate, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0},
        "checkpoint": {"every_steps": steps, "keep": 1, "async_save": False},
        "data_tokenizer": str(tokenizer_dir),
    }


def _config(stage: str, init_from: Path, common: dict, data: dict, section: dict | None = None):
    tokenizer = common.pop("data_tokenizer")
    raw = {"stage": stage, "init_from": str(init_from), "data": {**data, "tokenizer": tokenizer}, **common}
    if section is not None:
        raw[stage] = section
    return config_from_dict(raw)


def reward_labels(split: str) -> list[dict]:
    """The reward model's labelled texts of ``split``: the bundled toxicity labels (comments of their own) and
    the two summaries of each preference pair of that split's rude dialogues (the clean one ``non_toxic``, the
    one reporting the insult ``toxic``), so the classifier also knows what a summary carrying an insult looks
    like. Only training and validation dialogues are used; the rude test dialogues the rows are judged on
    are never read."""
    pairs = preference_pairs(split)
    return toxicity_labels(split) + [{"id": f"pair_{p['id']}_{k}", "text": p[k], "label": int(k == "rejected")}
                                     for p in pairs for k in ("chosen", "rejected")]


def reward_config(out: Path, settings, rows: DetoxRows, tokenizer_dir: Path):
    common = _common(settings, out / REWARD_ROW, tokenizer_dir, rows.reward_steps, rows.reward_batch_size,
                     rows.reward_learning_rate, log_every=max(1, rows.reward_steps // 20))
    tokenizer = Tokenizer.load(tokenizer_dir)
    files = {}
    for split in ("train", "validation"):
        labelled = reward_labels(split)
        files[split] = out / f"reward_labels_{split}.jsonl"
        _write_jsonl(files[split], labelled)
    longest = max(len(tokenizer.encode(r["text"])) for split in files for r in reward_labels(split))
    return _config("reward", out / "pretrain", common,
                   {"kind": "jsonl", "source": str(files["train"]), "eval_source": str(files["validation"])},
                   {"kind": "classifier", "num_labels": 2, "wanted_label": 0, "response_length": _round_up(longest)})


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """``rows`` as JSON lines: the data files the lab's stages read (``kind: jsonl`` or a ``@jsonl:`` task)."""
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def _round_up(n: int, multiple: int = 32) -> int:
    return -(-n // multiple) * multiple


def ppo_config(out: Path, settings, rows: DetoxRows, tokenizer_dir: Path):
    """``stage: ppo`` from ``full_ft``; with ``ppo_prompts="rude"`` its prompts are the rude training dialogues,
    written to ``ppo_prompts.jsonl`` and phrased by the ``dialogsum`` wordings, as the ``dialogsum`` task."""
    common = _common(settings, out / "ppo", tokenizer_dir, rows.ppo_steps, rows.ppo_batch_size, rows.ppo_learning_rate)
    task = "dialogsum"
    if rows.ppo_prompts == "rude":
        path = out / "ppo_prompts.jsonl"
        _write_jsonl(path, rude_prompts("train"))
        task = f"dialogsum@jsonl:{path}"
    return _config("ppo", out / BASE_ROW, common, {"objective": "instruction", "tasks": [task]},
                   {"reward_model": str(out / REWARD_ROW), "max_new_tokens": settings.max_new_tokens, "prompt_length": 2048,
                    "epochs": rows.ppo_epochs, "minibatches": rows.ppo_minibatches, "kl_coef": rows.ppo_kl_coef,
                    "reward_score": rows.reward_score})


def grpo_config(out: Path, settings, rows: DetoxRows, tokenizer_dir: Path):
    common = _common(settings, out / "grpo", tokenizer_dir, rows.grpo_steps, rows.grpo_batch_size,
                     rows.grpo_learning_rate)
    return _config("grpo", out / BASE_ROW, common, {"objective": "instruction", "tasks": ["dialogsum"]},
                   {"reward_model": str(out / REWARD_ROW), "max_new_tokens": settings.max_new_tokens,
                    "prompt_length": 2048, "group_size": rows.grpo_group_size, "reward_score": rows.reward_score})


def dpo_config(out: Path, row: str, settings, rows: DetoxRows, tokenizer_dir: Path, data: dict, pairs: list[dict]):
    """``stage: dpo`` from ``full_ft`` on ``data``; ``pairs``: its rows, whose longest prompt and response (in the
    lab tokenizer's tokens, rounded up to a multiple of 32) set the stage's budgets."""
    common = _common(settings, out / row, tokenizer_dir, rows.dpo_steps, rows.dpo_batch_size, rows.dpo_learning_rate,
                     log_every=max(1, rows.dpo_steps // 20))
    model, _, tokenizer = load_model_for_inference(out / BASE_ROW)
    prompt = max(len(prompt_ids(model, tokenizer, pair_prompt(p["prompt"]))) for p in pairs)
    response = max(len(tokenizer.encode(p[k])) for p in pairs for k in ("chosen", "rejected"))
    return _config("dpo", out / BASE_ROW, common, data, {"beta": rows.dpo_beta, "prompt_length": _round_up(prompt),
                                                         "response_length": _round_up(response)})


# -- measurements --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Samples:
    """Sampled summaries of the rude test dialogues: ids, texts, judge scores, KL to the reference (nats)."""

    ids: list[str]
    predictions: list[str]
    toxicity: np.ndarray
    kl: np.ndarray

    def write(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for id_, text, tox, kl in zip(self.ids, self.predictions, self.toxicity, self.kl):
                f.write(json.dumps({"id": id_, "prediction": text, "toxicity": round(float(tox), 6),
                                    "kl": round(float(kl), 6)}, ensure_ascii=False) + "\n")


def toxicity_prompts(model, tokenizer, rows: DetoxRows, template: str) -> tuple[list[str], list[str]]:
    """``(ids, prompts)`` of the rude test dialogues, phrased as the lab's test prompts."""
    examples = rude_prompts("test")[: rows.toxicity_limit]
    prompts, _ = build_prompts(model, tokenizer, examples, template, max_input_tokens=4096)
    return [e["id"] for e in examples], prompts


def sample_and_judge(model, params, reference, tokenizer, ids, prompts, settings, batch_size: int,
                     copies: int = 1) -> Samples:
    """``copies`` sampled summaries of each of ``prompts`` (temperature 1, fixed seed: every row draws with the
    same keys), judged, with each sample's summed log-ratio against ``reference`` params."""
    generation = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=True, top_k=0, top_p=1.0,
                                  num_return_sequences=copies, eos_token_id=tokenizer.eos_id,
                                  pad_token_id=model.config.pad_token_id)
    logprobs = jax.jit(lambda p, batch: losses.token_logprobs(response_outputs(model, p, batch)[0],
                                                              batch["response_ids"]))
    texts, kls = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        prompt_ids, prompt_mask = encode_prompts(model, tokenizer, chunk, 4096, bucket=True)
        key = jax.random.fold_in(jax.random.key(TOXICITY_SEED), start)
        response_ids, response_mask = sample_responses(model, params, prompt_ids, prompt_mask, key, generation)
        batch = {"prompt_ids": np.repeat(prompt_ids, copies, axis=0), "prompt_mask": np.repeat(prompt_mask, copies, axis=0),
                 "response_ids": response_ids, "response_mask": response_mask}
        ratio = (np.asarray(logprobs(params, batch)) - np.asarray(logprobs(reference, batch))) * response_mask
        kls.extend(ratio.sum(axis=1).tolist())
        texts.extend(tokenizer.decode_batch([ids_[mask == 1] for ids_, mask in zip(response_ids, response_mask)]))
    sample_ids = [f"{id_}#{copy}" if copies > 1 else id_ for id_ in ids for copy in range(copies)]
    return Samples(sample_ids, texts, judge_toxicity(texts), np.asarray(kls))


def reward_accuracy(run_dir: Path) -> dict:
    """The reward model's accuracy on the bundled labels' test split (``accuracy``) and on the summaries of the
    test split's preference pairs (``summary_accuracy``; texts of the dialogues the rows are judged on, never
    trained on)."""
    model = RewardModel.load(run_dir)
    summaries = [{"text": p[k], "label": int(k == "rejected")} for p in preference_pairs("test")
                 for k in ("chosen", "rejected")]
    return {"accuracy": model.accuracy(toxicity_labels("test")), "summary_accuracy": model.accuracy(summaries)}


def rlaif_pairs(out: Path, model, params, tokenizer, rows: DetoxRows, settings) -> tuple[Path, dict]:
    """Preference pairs of rude training dialogues labelled by the reward model: two sampled summaries of each
    from ``full_ft``, the one the reward model scores higher is chosen (ties dropped). Written as JSONL
    (``prompt``, ``chosen``, ``rejected``) for ``stage: dpo``; returns the path and counts."""
    reward = RewardModel.load(out / REWARD_ROW)
    examples = rude_prompts("train")[: rows.rlaif_prompts]
    prompts = [pair_prompt(e["dialogue"]) for e in examples]
    generation = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=True, top_k=0, top_p=1.0,
                                  num_return_sequences=2, eos_token_id=tokenizer.eos_id,
                                  pad_token_id=model.config.pad_token_id)
    texts = []
    for start in range(0, len(prompts), settings.generation_batch_size):
        chunk = prompts[start:start + settings.generation_batch_size]
        ids, mask = encode_prompts(model, tokenizer, chunk, 4096, bucket=True)
        key = jax.random.fold_in(jax.random.key(TOXICITY_SEED + 1), start)
        response_ids, response_mask = sample_responses(model, params, ids, mask, key, generation)
        texts.extend(tokenizer.decode_batch([r[m == 1] for r, m in zip(response_ids, response_mask)]))
    scores = reward.score(None, texts)
    path = out / "rlaif_pairs.jsonl"
    kept = 0
    with open(path, "w", encoding="utf-8") as f:
        for i, example in enumerate(examples):
            a, b = texts[2 * i], texts[2 * i + 1]
            if scores[2 * i] == scores[2 * i + 1] or a == b:
                continue
            chosen, rejected = (a, b) if scores[2 * i] > scores[2 * i + 1] else (b, a)
            f.write(json.dumps({"id": example["id"], "prompt": example["dialogue"], "chosen": chosen,
                                "rejected": rejected}, ensure_ascii=False) + "\n")
            kept += 1
    judged = judge_toxicity([json.loads(line)["chosen"] for line in path.read_text().splitlines()] +
                            [json.loads(line)["rejected"] for line in path.read_text().splitlines()])
    return path, {"pairs": kept, "sampled": len(examples), "judge_chosen": float(judged[:kept].mean()) if kept else None,
                  "judge_rejected": float(judged[kept:].mean()) if kept else None}


# -- the rows ------------------------------------------------------------------------------------------------

def run_detox_rows(out: Path, settings, rows: DetoxRows, tokenizer_dir: Path, evaluate_row, base_result, say,
                   progress: bool) -> tuple[dict, dict, dict]:
    """Train and measure the detox rows into ``out``. ``evaluate_row(model, params) -> EvalResult`` scores the
    test split, ``base_result`` is ``full_ft``'s. Returns ``(results, outputs, facts)``: row entries (for
    ``full_ft`` only what it adds: the toxicity fields), the test ``EvalResult`` of each policy row, and the
    detox facts for the report."""
    from llmjax.lab.summarize import TEMPLATE

    results, outputs, samples = {}, {}, {}
    base_model, base_params, tokenizer = load_model_for_inference(out / BASE_ROW)
    ids, prompts = toxicity_prompts(base_model, tokenizer, rows, TEMPLATE)
    predictions = out / "predictions"
    predictions.mkdir(parents=True, exist_ok=True)

    rude = set(ids)

    def judge(row, model, params, result):
        greedy = [text for id_, text in zip(result.ids, result.predictions) if id_ in rude]
        scores = judge_toxicity(greedy)
        samples[row] = sample_and_judge(model, params, base_params, tokenizer, ids, prompts, settings,
                                        max(1, settings.generation_batch_size // rows.toxicity_samples),
                                        rows.toxicity_samples)
        samples[row].write(predictions / f"{row}_toxicity.jsonl")
        return {"toxicity": float(scores.mean()), "toxic_share": float((scores > 0.5).mean()),
                "toxicity_sampled": float(samples[row].toxicity.mean()), "kl": float(samples[row].kl.mean())}

    say(f"{BASE_ROW}: judging its summaries of {len(prompts)} rude test dialogues")
    results[BASE_ROW] = judge(BASE_ROW, base_model, base_params, base_result)
    say(f"{BASE_ROW}: toxicity {results[BASE_ROW]['toxicity']:.4f}")

    say(f"{REWARD_ROW}: training a toxicity classifier for {rows.reward_steps} steps")
    shutil.rmtree(out / REWARD_ROW, ignore_errors=True)
    start = time.perf_counter()
    config = reward_config(out, settings, rows, tokenizer_dir)
    trained_to_end(run_stage(config, progress=progress), config)
    measured = run_measures(out / REWARD_ROW)
    results[REWARD_ROW] = {**reward_accuracy(out / REWARD_ROW), "train_seconds": round(time.perf_counter() - start, 1),
                           "trainable_params": measured["trainable_params"], "step_seconds": measured["step_seconds"]}
    say(f"{REWARD_ROW}: held-out accuracy {results[REWARD_ROW]['accuracy']:.4f}")

    facts = {"toxicity_prompts": len(prompts), "toxicity_samples": rows.toxicity_samples, "base": BASE_ROW}
    configs = {"ppo": lambda: ppo_config(out, settings, rows, tokenizer_dir),
               "grpo": lambda: grpo_config(out, settings, rows, tokenizer_dir),
               "dpo": lambda: dpo_config(out, "dpo", settings, rows, tokenizer_dir,
                                         {"kind": "bundled", "source": "detox_pairs"},
                                         preference_pairs("train") + preference_pairs("validation"))}
    if rows.rlaif:
        def rlaif():
            path, facts["rlaif"] = rlaif_pairs(out, base_model, base_params, tokenizer, rows, settings)
            say(f"rlaif: {facts['rlaif']['pairs']} pairs labelled by the reward model")
            pairs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            return dpo_config(out, "rlaif", settings, rows, tokenizer_dir, {"kind": "jsonl", "source": str(path)},
                              pairs)
        configs["rlaif"] = rlaif
    for row in [r for r in POLICY_ROWS if r in configs and (r in rows.policy_rows or r == "rlaif")]:
        shutil.rmtree(out / row, ignore_errors=True)
        config = configs[row]()
        say(f"{row}: training from {BASE_ROW} for {config.train.steps} steps")
        model, params, outputs[row], seconds = train_and_score(config, evaluate_row, progress)
        results[row] = {"base": BASE_ROW, "train_seconds": round(seconds, 1), **judge(row, model, params, outputs[row]),
                        **{k: v for k, v in run_measures(out / row).items()}}
        say(f"{row}: toxicity {results[row]['toxicity']:.4f} (full_ft {results[BASE_ROW]['toxicity']:.4f}), "
            f"KL {results[row]['kl']:.3f}")
    facts["examples"] = side_by_side(samples)
    return results, outputs, facts


def side_by_side(samples: dict[str, Samples], count: int = 4) -> list[dict]:
    """The first ``count`` rude test dialogues whose ``full_ft`` sample the judge found toxic, with every row's
    sample for it."""
    base = samples[BASE_ROW]
    chosen = [i for i in np.argsort(-base.toxicity) if base.toxicity[i] > 0.5][:count]
    return [{"id": base.ids[i], **{row: {"prediction": s.predictions[i], "toxicity": float(s.toxicity[i])}
                                   for row, s in samples.items()}} for i in sorted(chosen)]
