"""Does LoRA near full fine-tuning from a base whose decoder writes whole texts and copies from its input?

The lab's LoRA rows write word salad (README: Lab): adapters on 1% of a 1M-parameter T5 pre-trained only with
span corruption never learn the summaries' language, whose decoder has only ever written short masked spans.
T5's answer for prompt tuning was "LM adaptation" (continued pre-training on a language-modelling objective);
BART's denoising makes the decoder rewrite the whole input, which also trains it to copy from the encoder,
what a summary does with names, times and amounts. This experiment gives the lab's pre-trained model that:

1. the lab's pre-training (``llmjax.lab.summarize.pretrain``: same model, tokenizer, corpus and schedule);
2. a **denoising base**: ``--base-steps`` steps (the lab's SFT schedule) of whole-text reconstruction: the
   input is a chunk of at most ``--chunk-words`` words with spans of words (Poisson(3) lengths, ``--noise`` of
   the words) each replaced by one sentinel, the target the whole chunk. The chunks come from the bundled
   corpus and, with ``--texts``, the lab's training dialogues and training summaries as plain text (no pairing:
   each chunk reconstructs only itself);
3. from that base, each ``--rows`` entry as in ``lora_from_instruction_base.py`` (``full@LR``, ``r<R>@LR`` on
   q and v with ``lora_alpha = 2R``, ``r<R>all@LR`` on every dense kernel), ``--sft-steps`` steps of the lab's
   SFT on ``dialogsum``.

Every model summarizes the first ``--test-limit`` test dialogues, greedy (``OUT/predictions/<row>.jsonl``,
rescorable); ``OUT/results.json`` holds ROUGE-L, the trainable share and the last logged training loss.

    .venv/bin/python labs/experiments/lora_from_denoising_base.py --out runs/lora_denoising_base
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from llmjax.data.bundled.corpus import bundled_documents
from llmjax.data.bundled.dialogsum import bundled_dialogsum
from llmjax.data.tokenizer import Tokenizer
from llmjax.lab import summarize as lab

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_from_instruction_base import row_lora, score_run, sft  # noqa: E402  (the sibling experiment's)


def noised(words: list[str], noise: float, rng: np.random.Generator) -> str:
    """``words`` with spans (Poisson(3) lengths, at least 1) covering about ``noise`` of them each replaced by
    one T5 sentinel, numbered in order."""
    masked, out, sentinel, i = round(noise * len(words)), [], 0, 0
    starts = set(rng.choice(len(words), size=max(1, masked // 3), replace=False).tolist())
    while i < len(words):
        if i in starts and masked > 0:
            length = min(max(1, int(rng.poisson(3))), masked, len(words) - i)
            out.append(f"<extra_id_{sentinel}>")
            sentinel, masked, i = sentinel + 1, masked - length, i + length
        else:
            out.append(words[i])
            i += 1
    return " ".join(out)


def denoising_set(out: Path, texts: set[str], chunk_words: int, noise: float, seed: int) -> str:
    """Write ``out/denoise/{train,validation}.jsonl`` (``inputs``: the noised chunk, ``targets``: the chunk);
    returns the task spec."""
    rng = np.random.default_rng(seed)
    sources = {"train": [d["text"] for d in bundled_documents("corpus")],
               "validation": [d["text"] for d in bundled_documents("corpus_heldout")]}
    train = bundled_dialogsum("train")
    if "dialogues" in texts:
        sources["train"] += [e["dialogue"] for e in train]
    if "summaries" in texts:
        sources["train"] += [e["summary"] for e in train]
    (out / "denoise").mkdir(parents=True, exist_ok=True)
    for split, documents in sources.items():
        rows = []
        for text in documents:
            words = text.split()
            for start in range(0, len(words), chunk_words):
                chunk = words[start:start + chunk_words]
                if len(chunk) >= 8:
                    rows.append({"inputs": noised(chunk, noise, rng), "targets": " ".join(chunk)})
        rng.shuffle(rows)
        with open(out / "denoise" / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        lab.say(f"denoising {split}: {len(rows)} chunks")
    return f"inputs_targets@jsonl:{out / 'denoise'}/{{split}}.jsonl"


def last_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"][-1]["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/lora_denoising_base")
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--texts", default="dialogues,summaries", help="besides the corpus: dialogues, summaries")
    parser.add_argument("--chunk-words", type=int, default=32)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--rows", default="full@3e-3,r4@3e-3")
    parser.add_argument("--sft-steps", type=int, default=1000)
    parser.add_argument("--test-limit", type=int, default=200)
    args = parser.parse_args()
    out, settings = Path(args.out), lab.LabSettings()
    out.mkdir(parents=True, exist_ok=True)
    lab.pretrain(out, settings, progress=False)
    tokenizer_dir = out / "tokenizer"
    tokenizer = Tokenizer.load(tokenizer_dir)
    test = bundled_dialogsum("test")[: args.test_limit]
    results = {"_settings": vars(args)}

    def score(name: str, run_dir: Path, **extra) -> None:
        result, measures = score_run(run_dir, out / "predictions" / f"{name}.jsonl", tokenizer, test, settings)
        results[name] = {"rougeL": result.scores["rougeL"], **measures, "final_train_loss": last_loss(run_dir),
                         **extra}
        lab.say(f"{name}: {json.dumps(results[name])}")
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    (out / "predictions").mkdir(exist_ok=True)
    task = denoising_set(out, set(filter(None, args.texts.split(","))), args.chunk_words, args.noise, seed=0)
    base = out / "denoising_base"
    seconds = round(sft(base, out / "pretrain", (task,), (), args.base_steps, 3e-3, settings, tokenizer_dir))
    score("base_zero_shot", base, train_seconds=seconds)
    for row in args.rows.split(","):
        kind, _, rate = row.partition("@")
        lora = row_lora(kind)
        name = ("lora_" + kind if lora else "full_ft") + ("" if float(rate) == 3e-3 else f"_lr{rate}")
        seconds = round(sft(out / name, base, ("dialogsum",), (), args.sft_steps, float(rate), settings,
                            tokenizer_dir, lora))
        score(name, out / name, learning_rate=float(rate), lora=lora, train_seconds=seconds)


if __name__ == "__main__":
    main()
