"""ROUGE's time: ``llmjax.text_metrics.rouge`` against rouge-score's own stemming scorer, on the saved lab's rows.

Both score every row of ``labs/summarize/predictions`` (400 test summaries, three references each) for ROUGE-1/2/L/
Lsum with Porter stemming, best reference per example, as the lab and ``llmjax evaluate`` do. The reference is
``rouge_scorer.RougeScorer(types, use_stemmer=True)``, which tokenizes and stems every text on every call; llmjax's
tokenizer gives the same tokens and remembers each word's stem and each text's tokens. The scores must be equal to
the bit (the script stops otherwise). Each side runs in its own process, first the reference, so neither finds the
other's work remembered.

    python benchmarks/rouge.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root: llmjax

from llmjax import environment, text_metrics  # noqa: E402

PREDICTIONS = ROOT / "labs" / "summarize" / "predictions"


def rows() -> dict[str, tuple[list[str], list[list[str]]]]:
    out = {}
    for path in sorted(PREDICTIONS.glob("*.jsonl")):
        saved = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        if saved and "references" in saved[0]:
            out[path.stem] = ([r["prediction"] for r in saved], [r["references"] for r in saved])
    return out


def reference_rouge(predictions, references) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(text_metrics.ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(text_metrics.ROUGE_TYPES, 0.0)
    for prediction, refs in zip(predictions, references):
        scores = scorer.score_multi([text_metrics.sentences_per_line(r) for r in refs],
                                    text_metrics.sentences_per_line(prediction))
        for rouge_type in totals:
            totals[rouge_type] += scores[rouge_type].fmeasure
    return {rouge_type: total / len(predictions) for rouge_type, total in totals.items()}


def score(side: str) -> None:
    """Score every row with one side; print its seconds (process CPU time and wall) and scores as JSON."""
    scorer = reference_rouge if side == "rouge-score" else text_metrics.rouge
    data = rows()
    wall, cpu = time.perf_counter(), time.process_time()
    scores = {row: scorer(*pair) for row, pair in data.items()}
    print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "scores": scores}))


def main() -> None:
    if len(sys.argv) == 2:
        score(sys.argv[1])
        return
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {environment.one_line()}")
    print(f"load average at start (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    data = rows()
    print(f"rows: {len(data)} of {PREDICTIONS.relative_to(ROOT)}, {sum(len(p) for p, _ in data.values())} summaries")
    result = {}
    for side in ("rouge-score", "llmjax"):
        run = subprocess.run([sys.executable, __file__, side], capture_output=True, text=True, check=True)
        result[side] = json.loads(run.stdout.splitlines()[-1])
        print(f"  {side:12s} {result[side]['wall']:7.1f} s wall, {result[side]['cpu']:7.1f} CPU-s")
    if result["llmjax"]["scores"] != result["rouge-score"]["scores"]:
        raise SystemExit("the scores differ: llmjax's tokenizer is not rouge-score's")
    print("scores: equal to the bit on every row and type")
    print(f"llmjax / rouge-score: wall {result['llmjax']['wall'] / result['rouge-score']['wall']:.2f}x, "
          f"CPU {result['llmjax']['cpu'] / result['rouge-score']['cpu']:.2f}x")
    print(f"load average at end (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
