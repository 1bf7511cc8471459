r"""Does LoRA near full fine-tuning when its base already knows a sibling task? (The lab's PEFT question, README: Lab.)

The course's LoRA adapts FLAN-T5, a model instruction-tuned on many tasks, chat summaries among them, before it
ever sees DialogSum. The lab's base has only seen span corruption. This experiment gives the lab's model a small
stand-in for that instruction tuning and measures full fine-tuning and LoRA from it, as the course does:

1. the lab's pre-training (``llmjax.lab.summarize.pretrain``: same model, tokenizer, corpus and schedule);
2. an **instruction-tuned base**: SFT from it on a SAMSum-shaped sibling set (the bundled generator with another
   seed, speakers named with first names instead of ``#PersonN#`` tags, only every other scenario topic, no
   dialogue that the lab's splits hold), 75% of the examples, plus 25% span corruption, ``--base-steps`` steps of
   the lab's SFT schedule;
3. from that base, each ``--rows`` entry: the lab's SFT on ``dialogsum`` (1000 steps, 16 rows, cosine): ``full@LR``
   trains everything, ``r<R>@LR`` LoRA rank R on q and v (``lora_alpha`` = 2R, as the lab's rows),
   ``r<R>all@LR`` LoRA on every dense kernel, ``r<R>[m1+m2+...]@LR`` on the listed modules; ``d`` in place of
   ``r`` (``d2[q+v]@LR``) trains DoRA (``use_dora``) instead of plain LoRA, ``p`` PiSSA (``init_lora_weights:
   pissa``); ``lm_head`` among the listed modules adapts the untied output layer too; ``KIND@LR/STEPS`` trains STEPS
   steps instead of the lab's 1000 (its cosine decay stretched over them). ``--frozen shared+lm_head`` keeps the
   full rows' embedding and output layer frozen (``train.frozen``).

Each model (the base zero-shot included) summarizes the first ``--test-limit`` test dialogues, greedy. ROUGE-L is
reported on all of them and apart on the topics the base saw and those it did not. Writes ``OUT/results.json``
and ``OUT/predictions/<row>.jsonl`` (rescorable); the trained runs stay in ``OUT/<row>/``. The saved run's
``results.json``, predictions and phase lines are in ``labs/experiments/lora_from_instruction_base/``
(``tests/lab/test_experiments.py`` rescores them). ``--topics all`` tunes the base on every scenario topic instead;
that run's (``--base-steps 2000``, its later rows added with ``--add-rows``) is in
``labs/experiments/lora_from_instruction_base_all_topics/`` (its two 2000-step rows added on 2026-12-07 by the third
command below, from the same base built again, its three LoRA+ rows by the two after it, and its DoRA rows and
rows at other ``--train-seed``s, later that day, by the sixth to ninth; its rows with every norm trained whole,
``--modules-to-save layer_norm+final_layer_norm``, and its PiSSA rows by the tenth to thirteenth). Those norm rows
ran under ``peft`` 0.21's rule for ``modules_to_save``, a plain suffix by which ``layer_norm`` alone took
``final_layer_norm`` too, so their saved configs and names say ``layer_norm``; since ``peft`` 0.22 (and llmjax with
it) the same modules take both names, and the rows' names end ``_save_layer_norm_final_layer_norm``.
``--d-model`` widens the lab's T5
(``d_kv`` and ``d_ff`` in proportion), so that 2% of it holds more adapter parameters; ``--base-lr`` sets the pre-training's and the
base's learning rate (the lab's 3e-3 trains the 256-wide model far worse than half of it). That run is in
``labs/experiments/lora_from_instruction_base_wide/``. The all-topics experiment run again on 2026-12-07 on an AMD EPYC
machine, whose base differs from the Intel Xeon's (zero-shot 0.657 against 0.637), with the output layer adapted
too and the full rows' vocabulary layers frozen, is in ``labs/experiments/lora_from_instruction_base_all_topics_epyc/``
(the commands below from ``runs/lora_epyc``, in order). The lab's two compared instruction-base rows at two more
``--train-seed``s on all 400 test dialogues, from the base the lab built on that machine (its ``pretrain/``,
``tokenizer/`` and ``instruct_base/``, the last as ``instruction_base/``, copied into ``runs/epyc400`` beside a
``results.json`` of ``{"_settings": {"rows": ""}}``), are in ``labs/experiments/instruction_base_lab_epyc_seeds/``
(the last two commands).

    .venv/bin/python labs/experiments/lora_from_instruction_base.py --out runs/lora_instruction_base
    .venv/bin/python labs/experiments/lora_from_instruction_base.py --out runs/lora_all_topics --topics all \
        --base-steps 2000 --rows "full@3e-3,r4@3e-4,r4@3e-3,r1all@1e-3,r4@1e-2,r6@6e-3,r1all@3e-3,\
r2[q+v+o+wi_0+wi_1+wo]@3e-3,r2[q+v+o+wi_0+wi_1+wo]@6e-3,r1all@6e-3,r2[q+v+o+wi_0+wi_1+wo]@1.2e-2"
    .venv/bin/python labs/experiments/lora_from_instruction_base.py --out runs/lora_all_topics_2000 --topics all \
        --base-steps 2000 --rows "r2[q+v+o+wi_0+wi_1+wo]@6e-3/2000,full@3e-3/2000"
    .venv/bin/python labs/experiments/lora_from_instruction_base.py --out runs/lora_all_topics_2000 --topics all \
        --base-steps 2000 --add-rows --loraplus-ratio 4 --rows "r2[q+v+o+wi_0+wi_1+wo]@3e-3,r2[q+v+o+wi_0+wi_1+wo]@6e-3"
    .venv/bin/python labs/experiments/lora_from_instruction_base.py --out runs/lora_all_topics_2000 --topics all \
        --base-steps 2000 --add-rows --loraplus-ratio 16 --rows "r2[q+v+o+wi_0+wi_1+wo]@1.5e-3"
    .venv/bin/python labs/experiments/lora_from_instruction_base.py --out runs/lora_all_topics_2000 --topics all \
        --base-steps 2000 --add-rows --rows "d2[q+v+wi_0+wi_1+wo]@6e-3,r2[q+v+wi_0+wi_1+wo]@6e-3,d1all@6e-3"
    .venv/bin/python labs/experiments/lora_from_instruction_base.py --out runs/lora_all_topics_2000 --topics all \
        --base-steps 2000 --add-rows --loraplus-ratio 4 --rows "d2[q+v+wi_0+wi_1+wo]@3e-3"
    .venv/bin/python labs/experiments/lora_from_instruction_base.py --out runs/lora_all_topics_2000 --topics all \
        --base-steps 2000 --add-rows --train-seed 1 --rows "r2[q+v+o+wi_0+wi_1+wo]@6e-3,full@3e-3,d2[q+v+wi_0+wi_1+wo]@6e-3"
    .venv/bin/python labs/experiments/lora_from_instruction_base.py --out runs/lora_all_topics_2000 --topics all \
        --base-steps 2000 --add-rows --train-seed 2 --rows "r2[q+v+o+wi_0+wi_1+wo]@6e-3,full@3e-3"
    .venv/bin/python labs/experiments/lora_from_instruction_base.py --out runs/lora_all_topics_2000 --topics all \
        --base-steps 2000 --add-rows --modules-to-save layer_norm+final_layer_norm --rows "r2[q+v+o+wi_0+wi_1+wo]@6e-3"
    .venv/bin/python labs/experiments/lora_from_instruction_base.py --out runs/lora_all_topics_2000 --topics all \
        --base-steps 2000 --add-rows --modules-to-save layer_norm+final_layer_norm --train-seed 1 \
        --rows "r2[q+v+o+wi_0+wi_1+wo]@6e-3"
    .venv/bin/python labs/experiments/lora_from_instruction_base.py --out runs/lora_all_topics_2000 --topics all \
        --base-steps 2000 --add-rows --modules-to-save layer_norm+final_layer_norm --train-seed 2 \
        --rows "r2[q+v+o+wi_0+wi_1+wo]@6e-3"
    .venv/bin/python labs/experiments/lora_from_instruction_base.py --out runs/lora_all_topics_2000 --topics all \
        --base-steps 2000 --add-rows --rows "p2[q+v+o+wi_0+wi_1+wo]@6e-3,p2[q+v+o+wi_0+wi_1+wo]@2e-3,p2[q+v+o+wi_0+wi_1+wo]@1e-3"
    .venv/bin/python labs/experiments/lora_from_instruction_base.py --out runs/lora_wide --topics all \
        --base-steps 2000 --d-model 256 --base-lr 1.5e-3 --rows "full@1.5e-3,r4[q+v+o+wi_0+wi_1+wo]@6e-3,full@3e-3,full@7.5e-4"
    .venv/bin/python labs/experiments/lora_from_instruction_base.py --out runs/lora_epyc --topics all \
        --base-steps 2000 --frozen shared+lm_head --rows "full@3e-3"
    .venv/bin/python labs/experiments/lora_from_instruction_base.py --out runs/lora_epyc --topics all \
        --base-steps 2000 --add-rows --rows "r2[q+v+o+wi_0+wi_1+wo+lm_head]@6e-3"
    .venv/bin/python labs/experiments/lora_from_instruction_base.py --out runs/lora_epyc --topics all \
        --base-steps 2000 --add-rows --rows "full@3e-3,r2[q+v+o+wi_0+wi_1+wo]@6e-3"
    .venv/bin/python labs/experiments/lora_from_instruction_base.py --out runs/lora_epyc --topics all \
        --base-steps 2000 --add-rows --train-seed 1 --rows "r2[q+v+o+wi_0+wi_1+wo+lm_head]@6e-3,full@3e-3"
    .venv/bin/python labs/experiments/lora_from_instruction_base.py --out runs/lora_epyc --topics all \
        --base-steps 2000 --add-rows --train-seed 1 --rows "r2[q+v+o+wi_0+wi_1+wo]@6e-3"
    .venv/bin/python labs/experiments/lora_from_instruction_base.py --out runs/lora_epyc --topics all \
        --base-steps 2000 --add-rows --train-seed 2 --rows "full@3e-3,r2[q+v+o+wi_0+wi_1+wo]@6e-3"
    .venv/bin/python labs/experiments/lora_from_instruction_base.py --out runs/epyc400 --topics all \
        --base-steps 2000 --add-rows --test-limit 400 --train-seed 1 --rows "full@3e-3,r2[q+v+o+wi_0+wi_1+wo]@6e-3"
    .venv/bin/python labs/experiments/lora_from_instruction_base.py --out runs/epyc400 --topics all \
        --base-steps 2000 --add-rows --test-limit 400 --train-seed 2 --rows "full@3e-3,r2[q+v+o+wi_0+wi_1+wo]@6e-3"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from llmjax import text_metrics
from llmjax.config import config_from_dict, config_to_dict, load_config
from llmjax.data.bundled.dialogsum import bundled_dialogsum
from llmjax.data.tokenizer import Tokenizer
from llmjax.lab import report
from llmjax.lab import summarize as lab
from llmjax.lab.adapter_rows import run_measures, trained_to_end
from llmjax.lab.instruction_base_rows import sibling_set
from llmjax.lab.summarize import LabSettings
from llmjax.loading import load_model
from llmjax.stages import run_stage
from llmjax.train.state import count_params

EVERY_DENSE = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]


def sft(run_dir: Path, init: Path, tasks, rates, steps: int, learning_rate: float, settings, tokenizer_dir,
        lora: dict | None = None, loraplus_lr_ratio: float | None = None, seed: int | None = None,
        frozen: tuple[str, ...] = ()):
    """The lab's SFT config (``summarize.sft_config``) from ``init``, at ``learning_rate``, ``steps`` long
    (``seed``: its ``train.seed`` in place of the lab's; ``frozen``: its ``train.frozen``)."""
    settings = dataclasses.replace(settings, sft_steps=steps, sft_learning_rate=learning_rate)
    raw = config_to_dict(lab.sft_config(run_dir, settings, tuple(tasks), tuple(rates), steps, tokenizer_dir))
    raw["init_from"] = str(init)
    if lora:
        raw["lora"] = lora
        raw["optim"]["loraplus_lr_ratio"] = loraplus_lr_ratio
    if seed is not None:
        raw["train"]["seed"] = seed
    if frozen:
        raw["train"]["frozen"] = list(frozen)
    config = config_from_dict(raw)
    start = time.perf_counter()
    trained_to_end(run_stage(config, progress=False), config)
    return time.perf_counter() - start


def row_lora(kind: str) -> dict | None:
    """``full`` -> None; ``r4`` -> LoRA r=4 on q, v; ``r1all`` -> r=1 on every dense kernel; ``r2[q+v+wo]`` -> r=2 on
    the listed modules; ``d...`` as ``r...`` with DoRA, ``p...`` with PiSSA's init."""
    if kind == "full":
        return None
    if kind.startswith("d"):
        return {**row_lora("r" + kind[1:]), "use_dora": True}
    if kind.startswith("p"):
        return {**row_lora("r" + kind[1:]), "init_lora_weights": "pissa"}
    rank, _, listed = kind[1:].partition("[")
    if listed:
        targets = listed.removesuffix("]").split("+")
    else:
        targets = EVERY_DENSE if rank.endswith("all") else ["q", "v"]
    rank = int(rank.removesuffix("all"))
    return {"r": rank, "lora_alpha": 2 * rank, "target_modules": targets}


def row_name(kind: str, rate: str, steps: int | None = None) -> str:
    """``lora_r4``, ``lora_r1all``, ``lora_r2_q_v_wo`` (``r2[q+v+wo]``), ``full_ft``; ``_lr<rate>`` unless 3e-3,
    ``_steps<N>`` when the row trains other than the lab's steps."""
    prefixes = {"d": "dora_r", "p": "pissa_r", "r": "lora_r"}
    name = "full_ft" if kind == "full" else prefixes[kind[0]] + kind[1:]
    name = name.replace("[", "_").replace("+", "_").removesuffix("]")
    return name + ("" if float(rate) == 3e-3 else f"_lr{rate}") + ("" if steps is None else f"_steps{steps}")


def score_run(run_dir: Path, predictions: Path, tokenizer, test, settings):
    """Greedy summaries of ``test`` by the run in ``run_dir`` (LoRA adapters merged in), written to
    ``predictions``: ``(evaluation result, {"trainable_params", "trainable_fraction"})``, the fraction PEFT's
    trainable% as the lab's."""
    loaded = load_model(run_dir)
    total = count_params(loaded.params)
    trainable = run_measures(run_dir)["trainable_params"]  # what the run's checkpoint trained
    adds = load_config(run_dir / "config.yaml").lora is not None  # adapters add to the base's parameters
    fraction = trainable / (total + trainable) if adds else trainable / total
    result = lab.evaluate_row(loaded.model, loaded.params, tokenizer, test, settings)
    report.write_predictions(predictions, result)
    return result, {"trainable_params": trainable, "trainable_fraction": fraction}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/lora_instruction_base")
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--topics", choices=("half", "all"), default="half")
    parser.add_argument("--rows", default="full@3e-3,r4@3e-3,r1all@3e-3")
    parser.add_argument("--test-limit", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1, help="the sibling set's generator seed (the lab's is 0)")
    parser.add_argument("--d-model", type=int, default=LabSettings.d_model,
                        help="the lab's T5 at another width: d_kv = d_model / heads, d_ff = 2 d_model (as the lab's)")
    parser.add_argument("--base-lr", type=float, default=LabSettings.pretrain_learning_rate,
                        help="the pre-training's and the instruction base's peak learning rate")
    parser.add_argument("--loraplus-ratio", type=float, default=None,
                        help="LoRA+: the LoRA rows' lora_B learning rate is their rate times this (row names gain _lp<R>)")
    parser.add_argument("--modules-to-save", default=None,
                        help="LoRA rows also train these modules in full (lora.modules_to_save; '+'-separated, e.g. "
                             "layer_norm+final_layer_norm for every T5 norm); names gain _save_<modules>")
    parser.add_argument("--train-seed", type=int, default=None,
                        help="the rows' train.seed (data order, adapter init) in place of the lab's; names gain _seed<N>")
    parser.add_argument("--frozen", default=None,
                        help="full rows keep these params frozen (train.frozen regexes, '+'-separated, e.g. "
                             "shared+lm_head); names gain _frozen_<patterns>")
    parser.add_argument("--rescore", action="store_true",
                        help="train nothing: score the runs already in --out again (train_seconds kept from there)")
    parser.add_argument("--add-rows", action="store_true",
                        help="keep --out's results and its finished base; train and score only the --rows entries")
    args = parser.parse_args()
    out, settings = Path(args.out), LabSettings()
    if args.d_model != settings.d_model:
        settings = dataclasses.replace(settings, d_model=args.d_model, d_kv=args.d_model // settings.num_heads,
                                       d_ff=2 * args.d_model)
    settings = dataclasses.replace(settings, pretrain_learning_rate=args.base_lr)
    out.mkdir(parents=True, exist_ok=True)
    if not args.rescore:
        lab.pretrain(out, settings, progress=False)
    tokenizer_dir = out / "tokenizer"
    tokenizer = Tokenizer.load(tokenizer_dir)
    task, seen_topics = sibling_set(out, args.seed, args.topics)
    test = bundled_dialogsum("test")[: args.test_limit]
    seen = [i for i, e in enumerate(test) if e["topic"] in seen_topics]
    before = json.loads((out / "results.json").read_text()) if args.rescore or args.add_rows else {}
    results = {"_settings": {**vars(args), "seen_topics": sorted(seen_topics), "test_seen": len(seen)}}
    if args.add_rows:
        if lab.finished_steps(out / "instruction_base") < args.base_steps:
            raise SystemExit(f"--add-rows: {out / 'instruction_base'} holds no finished base of {args.base_steps} steps")
        results = {**before, "_settings": {**before["_settings"], "rows": before["_settings"]["rows"] + "," + args.rows}}

    def train_or_reuse(name: str, *sft_args, **sft_kwargs):
        """Train (the seconds it took), or with --rescore the seconds the earlier run recorded."""
        return before[name]["train_seconds"] if args.rescore else round(sft(*sft_args, **sft_kwargs))

    def score(name: str, run_dir: Path, **extra) -> None:
        result, measures = score_run(run_dir, out / "predictions" / f"{name}.jsonl", tokenizer, test, settings)
        extra = {**measures, **extra}
        part = {}
        for part_name, keep in (("seen", set(seen)), ("unseen", set(range(len(test))) - set(seen))):
            if keep:
                part[f"rougeL_{part_name}_topics"] = text_metrics.rouge(
                    [p for i, p in enumerate(result.predictions) if i in keep],
                    [r for i, r in enumerate(result.references) if i in keep])["rougeL"]
        results[name] = {"rougeL": result.scores["rougeL"], **part, **extra}
        lab.say(f"{name}: {json.dumps(results[name])}")
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    (out / "predictions").mkdir(exist_ok=True)
    base = out / "instruction_base"
    if not args.add_rows:
        seconds = train_or_reuse("base_zero_shot", base, out / "pretrain", (task, "span_corruption"), (0.75, 0.25),
                                 args.base_steps, args.base_lr, settings, tokenizer_dir)
        score("base_zero_shot", base, train_seconds=seconds)
    for row in args.rows.split(","):
        kind, _, rate = row.partition("@")
        rate, _, steps = rate.partition("/")
        steps = int(steps) if steps and int(steps) != settings.sft_steps else None
        lora = row_lora(kind)
        if lora and args.modules_to_save:
            lora["modules_to_save"] = args.modules_to_save.split("+")
        ratio = args.loraplus_ratio if lora else None
        name = row_name(kind, rate, steps) + ("" if ratio is None else f"_lp{ratio:g}")
        name += f"_save_{'_'.join(lora['modules_to_save'])}" if lora and args.modules_to_save else ""
        frozen = tuple(args.frozen.split("+")) if args.frozen and not lora else ()
        name += f"_frozen_{'_'.join(frozen)}" if frozen else ""
        name += "" if args.train_seed is None else f"_seed{args.train_seed}"
        seconds = train_or_reuse(name, out / name, base, ("dialogsum",), (), steps or settings.sft_steps, float(rate),
                                 settings, tokenizer_dir, lora, ratio, args.train_seed, frozen)
        score(name, out / name, learning_rate=float(rate), lora=lora, train_seconds=seconds,
              **({} if steps is None else {"steps": steps}), **({} if ratio is None else {"loraplus_lr_ratio": ratio}),
              **({} if args.train_seed is None else {"train_seed": args.train_seed}),
              **({"frozen": list(frozen)} if frozen else {}))


if __name__ == "__main__":
    main()
