"""``llmjax lab summarize``: the course's dialogue-summarization labs on a small T5, start to finish.

1. **Pre-train** a small T5 (``LabSettings``) with span corruption on the bundled corpus, or reuse the
   run in ``DIR/pretrain`` when it has finished. Its tokenizer (``DIR/tokenizer``) is trained on the
   corpus and the DialogSum training dialogues, so summaries never decode to unknown pieces.
2. **In-context rows** (Lab 1): zero-, one- and few-shot prompts of the pre-trained model on the
   bundled DialogSum-shaped test split (``llmjax.evaluate``), shots from the train split.
3. **Full fine-tuning** (Lab 2): every weight trains on the ``dialogsum`` instruction task
   (``stage: sft``, ``init_from`` the pre-trained run: ``llmjax.stages.sft``); the run is cut into ``curve_points``
   segments (each follows the whole run's schedule: ``optim.schedule_steps``, so the cut changes nothing) and after each the
   validation ROUGE and the pre-training held-out loss are measured: the curves of the report.
4. **Forgetting**: the same SFT with a share of span-corruption examples in the mixture (row
   ``full_ft_mixed``); the held-out span-corruption loss before SFT, after SFT and after mixed SFT.
5. **Parameter-efficient rows** (``llmjax.lab.adapter_rows``): the full fine-tuning run with a ``lora:``
   section, one row ``lora_r<r>`` per rank of a sweep, and with a ``prompt_tuning:`` section (``prompt_tuning``).
6. **Detoxification rows** (Lab 3, ``llmjax.lab.detox``): a reward model on the bundled toxicity labels, then
   ``ppo``, ``dpo``, ``grpo`` and ``rlaif`` from ``full_ft``, judged by an independent toxicity classifier.
7. **Distillation rows** (``llmjax.lab.distill_rows``): a half-width student distilled from ``full_ft`` and the
   same student trained on the labels alone.
8. **Instruction-base rows** (``llmjax.lab.instruction_base_rows``): the course's PEFT comparison from a base
   instruction-tuned on a sibling summarization set (FLAN-T5's stand-in): its zero-shot score, full fine-tuning
   and LoRA from it. ``--instruction-base-only`` adds them to a lab that has finished.

Outputs (``llmjax.lab.report``): ``results.json``, ``predictions/<row>.jsonl``, ``report.md``, PNG curves.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import jax

from llmjax import environment
from llmjax.config import RunConfig, config_from_dict, config_to_dict, load_config
from llmjax.data.bundled.corpus import bundled_documents
from llmjax.data.bundled.dialogsum import bundled_dialogsum
from llmjax.data.objectives import document_span_corruption_fn
from llmjax.data.sources import DataIterator
from llmjax.data.tokenizer import Tokenizer, train_tokenizer
from llmjax.errors import UserError
from llmjax.evaluate import evaluate_dataset, load_model_for_inference
from llmjax.generate import GenerationConfig
from llmjax.lab import report
from llmjax.lab.adapter_rows import AdapterRows, run_adapter_row, run_measures, trained_to_end
from llmjax.lab.detox import BASE_ROW, DetoxRows, run_detox_rows
from llmjax.lab.distill_rows import DistillRows, run_distill_rows, student_model
from llmjax.lab.instruction_base_rows import ROW_PREFIX, InstructionBaseRows, run_instruction_base_rows
from llmjax.lab.int8_row import INT8_ROW, int8_row
from llmjax.loading import newest_complete_step
from llmjax.stages import run_stage
from llmjax.stages.sft import build_stage as build_sft_stage
from llmjax.train.lm_loss import lm_loss_fn
from llmjax.train.loop import train
from llmjax.train.state import count_params

TEMPLATE = "summarize"  # the course's prompt; also the first wording the SFT task trains on
SHOT_ROWS = {"zero_shot": 0, "one_shot": 1, "few_shot": 2}


@dataclasses.dataclass(frozen=True)
class LabSettings:
    """Model size and schedule of the lab (defaults: the full run; ``tiny()``: the test's)."""

    d_model: int = 128                 # 2+2 layers: 1.05M parameters; LoRA r <= 4 on q, v trains <= 2% of them
    d_kv: int = 32
    d_ff: int = 256
    num_heads: int = 4
    num_layers: int = 2
    scan_layers: bool = False          # unrolled: a lab SFT step 23% shorter here than scanned (0.366 s against
                                       # 0.473 s), what brings the issue-10 rows under 15 minutes (README: Lab)
    vocab_size: int = 1024             # tokenizer ids, the 100 sentinels included
    pretrain_steps: int = 200
    pretrain_batch_size: int = 16
    pretrain_learning_rate: float = 3e-3
    sft_steps: int = 1000
    sft_batch_size: int = 16
    sft_learning_rate: float = 3e-3
    sft_schedule: str = "cosine"       # after warmup, decaying over sft_steps (optim.schedule_steps); a constant
                                       # rate leaves a model that ignores the dialogue (README: Lab)
    sft_encoder_length: int = 320      # prompt + dialogue: ~183 tokens on average, 340 at most (~0.03% cut)
    sft_decoder_length: int = 96       # summary + eos: ~53 tokens on average (~0.1% cut: data_truncated_* metrics)
    curve_points: int = 4              # SFT segments, each followed by validation ROUGE + held-out loss
    mixture_share: float = 0.25        # span-corruption share of the mixed SFT's examples (0: no full_ft_mixed row)
    test_limit: int | None = None      # None: the whole test split (400)
    validation_limit: int = 48         # validation examples scored at each curve point
    heldout_batches: int = 8           # span-corruption batches of corpus_heldout per held-out loss
    max_new_tokens: int = 96
    generation_batch_size: int = 32
    seed: int = 0

    @classmethod
    def tiny(cls) -> "LabSettings":
        """Settings for tests and smoke runs: a 1+1-layer d_model=32 T5, a handful of steps, 8 test examples."""
        return cls(d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=1, vocab_size=256, pretrain_steps=4,
                   pretrain_batch_size=8, sft_steps=4, sft_batch_size=8, sft_encoder_length=128,
                   sft_decoder_length=48, curve_points=1, test_limit=8, validation_limit=4, heldout_batches=2,
                   max_new_tokens=8, generation_batch_size=8)

    def model(self) -> dict:
        return {"family": "t5", "vocab_size": self.vocab_size, "d_model": self.d_model, "d_kv": self.d_kv,
                "d_ff": self.d_ff, "num_layers": self.num_layers, "num_heads": self.num_heads,
                "dropout_rate": 0.0, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
                "scan_layers": self.scan_layers}


def say(message: str) -> None:
    """Progress between the phases (the loop's bars show progress inside them)."""
    print(f"[lab {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- pre-training --------------------------------------------------------------

def lab_tokenizer(out: Path, settings: LabSettings) -> Path:
    """``out/tokenizer``: trained once on the corpus and the DialogSum train dialogues+summaries, then reused."""
    directory = out / "tokenizer"
    if (directory / "spiece.model").is_file() and Tokenizer.load(directory).vocab_size == settings.vocab_size:
        return directory
    texts = [row["text"] for row in bundled_documents("corpus")[:5000]]
    texts += [f"{e['dialogue']}\n{e['summary']}" for e in bundled_dialogsum("train")]
    train_tokenizer(texts, directory, vocab_size=settings.vocab_size, seed=settings.seed)
    return directory


def pretrain_config(out: Path, settings: LabSettings, tokenizer_dir: Path) -> RunConfig:
    steps = settings.pretrain_steps
    return config_from_dict({
        "model": settings.model(),
        "data": {"kind": "bundled", "source": "corpus", "eval_source": "corpus_heldout",
                 "tokenizer": str(tokenizer_dir), "objective": "span_corruption",
                 "encoder_length": 128, "decoder_length": 32},
        "train": {"steps": steps, "batch_size": settings.pretrain_batch_size, "seed": settings.seed,
                  "eval_every_steps": max(1, steps // 4), "eval_steps": 4, "log_every_steps": max(1, steps // 40),
                  "output_dir": str(out / "pretrain")},
        "optim": {"learning_rate": settings.pretrain_learning_rate, "schedule": "cosine",
                  "warmup_steps": max(1, steps // 20), "weight_decay": 0.01, "z_loss": 1e-4},
        "checkpoint": {"every_steps": steps, "keep": 1, "async_save": False},
    })


def finished_steps(run_dir: Path) -> int:
    """The newest completely saved checkpoint step of a run directory, 0 when it has none."""
    return newest_complete_step(run_dir) or 0


def same_run(saved: Path, config: RunConfig) -> bool:
    """Whether the run directory's saved ``config.yaml`` trains what ``config`` trains (model, data, optimizer,
    steps, batch, seed: every section but the mesh and the checkpoint/logging cadence)."""
    if not (saved / "config.yaml").is_file():
        return False
    keys = ("stage", "init_from", "model", "data", "optim")
    old, new = config_to_dict(load_config(saved / "config.yaml")), config_to_dict(config)
    for raw in (old, new):  # the lab's tokenizer is always DIR/tokenizer: how DIR was spelled (relative to another
        raw["data"].pop("tokenizer", None)  # working directory, absolute) is not a setting of the run
    train_keys = ("steps", "batch_size", "seed")
    return (all(old.get(k) == new.get(k) for k in keys)
            and all(old["train"].get(k) == new["train"].get(k) for k in train_keys))


def pretrain(out: Path, settings: LabSettings, progress: bool) -> float:
    """Pre-train into ``out/pretrain`` unless it already holds this run, finished (an unfinished one resumes);
    seconds spent. A pre-training of other settings (an earlier lab's model size, data or schedule) is replaced."""
    tokenizer_dir = lab_tokenizer(out, settings)
    config = pretrain_config(out, settings, tokenizer_dir)
    if same_run(out / "pretrain", config):
        if finished_steps(out / "pretrain") >= settings.pretrain_steps:
            say(f"reusing the pre-trained model in {out / 'pretrain'}")
            return 0.0
        say(f"resuming the pre-training in {out / 'pretrain'}")  # the loop restores its newest checkpoint
    elif (out / "pretrain").exists():
        say(f"{out / 'pretrain'} holds a pre-training of other settings: training the lab's again")
        shutil.rmtree(out / "pretrain")
    say(f"pre-training a T5 (d_model={settings.d_model}) for {settings.pretrain_steps} steps on the bundled corpus")
    start = time.perf_counter()
    trained_to_end(run_stage(config, progress=progress), config)
    return time.perf_counter() - start


# -- measurements ----------------------------------------------------------------

def heldout_batches(model, tokenizer, settings: LabSettings) -> list[dict]:
    """Fixed span-corruption batches of ``corpus_heldout`` (the pre-training objective's held-out data)."""
    example_fn = document_span_corruption_fn(tokenizer, 128, 32, model.config.decoder_start_token_id)
    iterator = DataIterator(bundled_documents("corpus_heldout"), example_fn, batch_size=16, decoder_length=32,
                            encoder_length=128, pack=True, seed=settings.seed, shuffle=False, num_epochs=1)
    return [batch for batch, _ in zip(iterator, range(settings.heldout_batches))]


def heldout_loss(model, params, batches: list[dict]) -> float:
    """Mean per-token cross-entropy of ``params`` on ``batches`` (no z-loss)."""
    loss_fn = jax.jit(lm_loss_fn(model))
    loss = weights = 0.0
    for batch in batches:
        sums = jax.device_get(loss_fn(params, batch, None)[1])
        loss, weights = loss + float(sums["loss"]), weights + float(sums["weights"])
    return loss / weights


def evaluate_row(model, params, tokenizer, examples, settings: LabSettings, shots: int = 0, soft_prompt=None):
    generation = GenerationConfig(max_new_tokens=settings.max_new_tokens)
    return evaluate_dataset(model, params, tokenizer, examples, TEMPLATE, shots=shots,
                            shot_pool=bundled_dialogsum("train"), generation_config=generation,
                            batch_size=settings.generation_batch_size, soft_prompt=soft_prompt)


def row_entry(result, trainable: int, total: int, seconds: float, **extra) -> dict:
    scores = result.scores
    return {**{key: scores[key] for key in report.SCORE_KEYS}, "rougeL_first_ref": scores["rougeL_first_ref"],
            "trainable_params": trainable, "trainable_fraction": trainable / total,
            "train_seconds": round(seconds, 1), **extra}


# -- supervised fine-tuning ------------------------------------------------------

def sft_config(run_dir: Path, settings: LabSettings, tasks: tuple[str, ...], rates: tuple[float, ...],
               steps: int, tokenizer_dir: Path) -> RunConfig:
    return config_from_dict({
        "stage": "sft", "init_from": str(run_dir.parent / "pretrain"),
        "model": settings.model(),
        "data": {"tasks": list(tasks), "task_rates": list(rates), "objective": "instruction",
                 "tokenizer": str(tokenizer_dir), "encoder_length": settings.sft_encoder_length,
                 "decoder_length": settings.sft_decoder_length},
        "train": {"steps": steps, "batch_size": settings.sft_batch_size, "seed": settings.seed,
                  "eval_every_steps": steps, "eval_steps": 4, "log_every_steps": max(1, settings.sft_steps // 50),
                  "output_dir": str(run_dir)},
        # schedule_steps: every segment of the curve follows the whole run's schedule, as one run would.
        "optim": {"learning_rate": settings.sft_learning_rate, "schedule": settings.sft_schedule,
                  "schedule_steps": settings.sft_steps,
                  "warmup_steps": max(1, settings.sft_steps // 20), "weight_decay": 0.0},
        "checkpoint": {"every_steps": steps, "keep": 1, "async_save": False},
    })


def fine_tune(out: Path, name: str, base, tokenizer_dir: Path, tasks, rates, settings: LabSettings,
              held_out: list[dict], progress: bool) -> dict:
    """SFT from the pre-trained ``base`` in ``out/name``, measured after each segment.

    Returns ``{"model", "params", "seconds", "curve": [{"step", "val_rougeL", "heldout_loss"}, ...]}``.
    """
    model, _, tokenizer = base  # the stage reads the pre-trained weights itself (init_from)
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)  # only the pre-training is reused; a fine-tuning row reruns
    ends = sorted({round(settings.sft_steps * (i + 1) / settings.curve_points) for i in range(settings.curve_points)})
    validation = bundled_dialogsum("validation")[: settings.validation_limit]
    curve, seconds, stage = [], 0.0, None
    for end in ends:
        config = sft_config(run_dir, settings, tasks, rates, end, tokenizer_dir)
        if stage is None:  # the SFT stage (llmjax.stages.sft), from the pre-trained run; full fine-tuning
            stage = build_sft_stage(config)
        say(f"{name}: fine-tuning to step {end} of {settings.sft_steps} ({', '.join(tasks)})")
        start = time.perf_counter()
        trained_to_end(train(stage, config, progress=progress), config)
        seconds += time.perf_counter() - start
        # The run's own model: its layer layout may differ from the pre-training's (scan_layers is a runtime field).
        tuned_model, tuned, _ = load_model_for_inference(run_dir)
        score = evaluate_row(tuned_model, tuned, tokenizer, validation, settings).scores["rougeL"]
        loss = heldout_loss(tuned_model, tuned, held_out)
        curve.append({"step": end, "val_rougeL": score, "heldout_loss": loss})
        say(f"{name} step {end}: validation ROUGE-L {score:.4f}, pre-training held-out loss {loss:.4f}")
    return {"model": tuned_model, "params": tuned, "seconds": seconds, "curve": curve}


def step_costs(run_dir: Path) -> dict:
    """A fine-tuning run's ``optimizer_state_bytes`` and median ``step_seconds`` (``adapter_rows.run_measures``)."""
    measured = run_measures(run_dir)
    return {key: measured[key] for key in ("optimizer_state_bytes", "step_seconds")}


# -- the lab ---------------------------------------------------------------------

def add_detox_rows(out: Path, settings: LabSettings, detox_rows: DetoxRows, tokenizer, test, results: dict,
                   outputs: dict, total: int, progress: bool) -> dict:
    """Run the detox rows from ``out/full_ft`` and add them to ``results`` / ``outputs`` (``full_ft``'s entry gains
    its toxicity fields, each policy row the lab's score fields); returns the detox facts."""
    detox_results, detox_outputs, facts = run_detox_rows(
        out, settings, detox_rows, out / "tokenizer", lambda m, p: evaluate_row(m, p, tokenizer, test, settings),
        outputs[BASE_ROW], say, progress)
    results[BASE_ROW].update(detox_results.pop(BASE_ROW))
    for row, entry in detox_results.items():
        if row in detox_outputs:
            outputs[row] = detox_outputs[row]
            entry = row_entry(outputs[row], entry["trainable_params"], total, entry["train_seconds"],
                              **{k: v for k, v in entry.items() if k not in ("trainable_params", "train_seconds")})
        results[row] = entry
    return facts


def add_int8_row(out: Path, source_row: str, tokenizer, test, settings: LabSettings, results: dict, outputs: dict,
                 total: int) -> None:
    """The ``int8`` row (``llmjax.lab.int8_row``) of ``source_row``'s model (its run in ``out/source_row``), added
    to ``results`` / ``outputs``."""
    model, params, _ = load_model_for_inference(out / source_row)
    say(f"{INT8_ROW}: quantizing {source_row} to int8, then its test summaries and decode speed against float32")
    extra, outputs[INT8_ROW] = int8_row(out, source_row, model, params, tokenizer, test, TEMPLATE,
                                        lambda m, p: evaluate_row(m, p, tokenizer, test, settings),
                                        outputs[source_row].predictions)
    results[INT8_ROW] = row_entry(outputs[INT8_ROW], 0, total, 0.0, **extra)
    speed = extra["decode_tokens_per_sec"]["1"]
    say(f"{INT8_ROW}: ROUGE-L {results[INT8_ROW]['rougeL']:.4f} ({source_row} {results[source_row]['rougeL']:.4f}), "
        f"{extra['float_memory_bytes'] / extra['memory_bytes']:.1f}x fewer weight bytes, "
        f"{extra['summaries_identical_to_base']:.0%} of summaries identical, batch-1 decode "
        f"{speed['int8'] / speed['float']:.2f}x float32")


def started_on() -> dict:
    """``llmjax.environment.describe()``, said as the lab's first phase line: the lab's numbers repeat to the bit on
    the same kind of machine, not across processors (``labs/experiments/README.md``)."""
    described = environment.describe()
    say(f"running on {environment.one_line(described)}")
    return described


def run_detox_lab(out: str | Path, settings: LabSettings = LabSettings(), progress: bool = True,
                  detox_rows: DetoxRows = DetoxRows(), report_header: dict | None = None) -> dict:
    """Only the detox rows, from the finished ``full_ft`` run (and pre-training) a whole lab left in ``out``:
    ``full_ft`` rescored on the test split, then the reward model, PPO, DPO, GRPO and RLAIF rows. Writes
    ``results.json``, ``predictions/``, ``report.md`` (the detox section) and ``detox.png``."""
    out = Path(out)
    if finished_steps(out / BASE_ROW) < settings.sft_steps or finished_steps(out / "pretrain") < settings.pretrain_steps:
        raise UserError(f"{out} holds no finished lab (pretrain and {BASE_ROW} runs); run `llmjax lab summarize "
                        f"--out {out}` first")
    started = time.perf_counter()
    ran_on = started_on()
    model, params, tokenizer = load_model_for_inference(out / BASE_ROW)
    test = bundled_dialogsum("test")[: settings.test_limit]
    say(f"{BASE_ROW}: generating {len(test)} test summaries")
    outputs = {BASE_ROW: evaluate_row(model, params, tokenizer, test, settings)}
    total = count_params(params)
    results = {BASE_ROW: row_entry(outputs[BASE_ROW], total, total, 0.0)}
    facts_detox = add_detox_rows(out, settings, detox_rows, tokenizer, test, results, outputs, total, progress)
    facts = {**(report_header or {}), "settings": dataclasses.asdict(settings), "total_params": total, "detox": facts_detox,
             "detox_rows": dataclasses.asdict(detox_rows), "lab_seconds": round(time.perf_counter() - started, 1),
             "environment": ran_on}
    report.write_detox_outputs(out, outputs, results, facts)
    say(f"done in {facts['lab_seconds']:.0f} s: {out / 'report.md'}")
    return results


def add_instruction_base_rows(out: Path, settings: LabSettings, rows: InstructionBaseRows, tokenizer, test,
                              results: dict, outputs: dict, progress: bool) -> dict:
    """Run the instruction-base rows (from ``out/pretrain``) and add them to ``results`` / ``outputs``; returns
    their facts. A finished base of the same settings from the same pre-trained model is reused."""
    full_ft_config = sft_config(out / "full_ft", settings, ("dialogsum",), (), settings.sft_steps, out / "tokenizer")

    def finished_base(run_dir: Path, config: RunConfig) -> bool:
        return same_run(run_dir, config) and finished_steps(run_dir) >= config.train.steps

    rows_results, rows_outputs, facts = run_instruction_base_rows(
        out, rows, full_ft_config, lambda m, p: evaluate_row(m, p, tokenizer, test, settings), row_entry, say,
        progress, finished_base)
    results.update(rows_results)
    outputs.update(rows_outputs)
    return facts


def run_instruction_base_lab(out: str | Path, settings: LabSettings = LabSettings(), progress: bool = True,
                             rows: InstructionBaseRows = InstructionBaseRows(), command: str | None = None) -> dict:
    """Add the instruction-base rows to the finished lab in ``out``: its pre-training is reused (or trained again
    when only its results are there; ``report.md`` says whether that gave the lab's model), the rows train and
    score, and ``results.json``, their predictions, ``lora_sweep.png`` and ``report.md`` are rewritten with them;
    the other rows and their curves stay as the lab left them. ``command``: the command line, which the report names."""
    out = Path(out)
    saved_path = out / "results.json"
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
    lab_facts = saved.pop("_lab", None)
    if lab_facts is None or "full_ft" not in saved:
        raise UserError(f"{out} holds no finished lab (results.json with a full_ft row); run `llmjax lab summarize "
                        f"--out {out}` first")
    if lab_facts["settings"] != dataclasses.asdict(settings):
        raise UserError(f"the lab in {out} ran with other settings than these; add the rows with the settings it ran "
                        "with (--tiny, or not, as that run)")
    started = time.perf_counter()
    ran_on = started_on()
    reused = pretrain(out, settings, progress) == 0.0
    model, params, tokenizer = load_model_for_inference(out / "pretrain")
    # The rows' starting point against the lab's: a pre-training run again with the same code on the same kind of
    # machine gives the same model (its held-out loss then equals the lab's before_sft); the report says which.
    start_loss = heldout_loss(model, params, heldout_batches(model, tokenizer, settings))
    test = bundled_dialogsum("test")[: settings.test_limit]
    results = {row: entry for row, entry in saved.items() if not row.startswith(ROW_PREFIX)}  # earlier ones go
    outputs = {row: report.read_predictions(out / "predictions" / f"{row}.jsonl") for row in results
               if (out / "predictions" / f"{row}.jsonl").is_file()}
    facts = add_instruction_base_rows(out, settings, rows, tokenizer, test, results, outputs, progress)
    lab_facts["instruction_base"] = {**facts, "seconds": round(time.perf_counter() - started, 1),
                                     "pretrained_heldout_loss": start_loss, "pretrain_reused": reused,
                                     "environment": ran_on,
                                     **({"command": command} if command else {})}
    report.write_outputs(out, test, outputs, results, lab_facts, plots=False)
    say(f"done in {lab_facts['instruction_base']['seconds']:.0f} s: {out / 'report.md'} (the pre-trained model's "
        f"held-out loss {start_loss:.6f}, the lab's {lab_facts['forgetting']['before_sft']:.6f})")
    return results


def run_lab(out: str | Path, settings: LabSettings = LabSettings(), progress: bool = True,
            adapter_rows: AdapterRows = AdapterRows(), detox_rows: DetoxRows = DetoxRows(),
            distill_rows: DistillRows = DistillRows(), report_header: dict | None = None,
            int8_from: str | None = "full_ft", instruction_base_rows: InstructionBaseRows = InstructionBaseRows()
            ) -> dict:
    """Run the whole lab into ``out`` (``adapter_rows``: which parameter-efficient rows; ``detox_rows``: the
    reward model and the RL rows; ``distill_rows``: a smaller student distilled from ``full_ft`` and the same
    student on the labels alone; ``int8_from``: the row whose model the ``int8`` row quantizes, None for no int8
    row; ``instruction_base_rows``: full fine-tuning and LoRA from an instruction-tuned base; ``report_header``:
    ``title``/``command`` of ``report.md`` when another command runs the lab); returns the ``results.json``
    mapping."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ran_on = started_on()
    pretrain_seconds = pretrain(out, settings, progress)
    model, params, tokenizer = load_model_for_inference(out / "pretrain")
    tokenizer_dir = out / "tokenizer"
    total = count_params(params)
    test = bundled_dialogsum("test")[: settings.test_limit]
    held_out = heldout_batches(model, tokenizer, settings)

    results, outputs = {}, {}
    for row, shots in SHOT_ROWS.items():
        say(f"{row}: generating {len(test)} test summaries with {shots}-shot prompts")
        outputs[row] = evaluate_row(model, params, tokenizer, test, settings, shots)
        results[row] = row_entry(outputs[row], 0, total, 0.0)
        say(f"{row}: ROUGE-L {results[row]['rougeL']:.4f}")

    before = heldout_loss(model, params, held_out)
    runs = {"full_ft": (("dialogsum",), ()),
            "full_ft_mixed": (("dialogsum", "span_corruption"), (1 - settings.mixture_share, settings.mixture_share))}
    if settings.mixture_share == 0:  # no mixed row: the forgetting section reports before/after SFT only
        del runs["full_ft_mixed"]
    curves = {}
    for row, (tasks, rates) in runs.items():
        tuned = fine_tune(out, row, (model, params, tokenizer), tokenizer_dir, tasks, rates, settings, held_out,
                          progress)
        curves[row] = tuned["curve"]
        say(f"{row}: generating {len(test)} test summaries")
        outputs[row] = evaluate_row(tuned["model"], tuned["params"], tokenizer, test, settings)
        results[row] = row_entry(outputs[row], total, total, tuned["seconds"],
                                 heldout_loss=tuned["curve"][-1]["heldout_loss"], tasks=list(tasks),
                                 task_rates=list(rates), **step_costs(out / row))
        say(f"{row}: ROUGE-L {results[row]['rougeL']:.4f}")
    first_rows_seconds = time.perf_counter() - started  # the instruction-tuning issue's rows, its 15-minute budget

    adapter_names = adapter_rows.row_names()
    full_ft_config = sft_config(out / "full_ft", settings, runs["full_ft"][0], runs["full_ft"][1], settings.sft_steps,
                                tokenizer_dir)

    def measure(tuned_model, tuned_params, soft_prompt):
        return (evaluate_row(tuned_model, tuned_params, tokenizer, test, settings, soft_prompt=soft_prompt),
                heldout_loss(tuned_model, tuned_params, held_out))

    for i, row in enumerate(adapter_names, 1):
        tuned = run_adapter_row(out, row, adapter_rows, full_ft_config, measure,
                                lambda message: say(f"[{i}/{len(adapter_names)}] {message}"), progress)
        outputs[row] = tuned["result"]
        trainable = tuned["trainable_params"]
        results[row] = row_entry(outputs[row], trainable, total + trainable, tuned["seconds"],
                                 heldout_loss=tuned["heldout_loss"], optimizer_state_bytes=tuned["optimizer_state_bytes"],
                                 step_seconds=tuned["step_seconds"], frozen_base_bytes=tuned["frozen_base_bytes"],
                                 **adapter_rows.row_settings(row))
        say(f"[{i}/{len(adapter_names)}] {row}: ROUGE-L {results[row]['rougeL']:.4f} "
            f"({results[row]['trainable_fraction']:.2%} of the parameters trained)")

    facts_instruction = None
    if instruction_base_rows.enabled:
        facts_instruction = add_instruction_base_rows(out, settings, instruction_base_rows, tokenizer, test, results,
                                                      outputs, progress)

    facts_distill = None
    if distill_rows.enabled:
        student = student_model(settings.model(), distill_rows.student_width)
        distill_results, distill_outputs, facts_distill = run_distill_rows(
            out, settings, distill_rows, out / "full_ft", student, tokenizer_dir,
            lambda m, p: evaluate_row(m, p, tokenizer, test, settings), row_entry, say, progress)
        results.update(distill_results)
        outputs.update(distill_outputs)

    if detox_rows.enabled:
        say(f"detox rows: reward model, then {', '.join(detox_rows.row_names()[1:])} from full_ft")
        facts_detox = add_detox_rows(out, settings, detox_rows, tokenizer, test, results, outputs, total, progress)

    if int8_from is not None and int8_from in outputs:  # full_ft by default; the lifecycle's PPO policy
        add_int8_row(out, int8_from, tokenizer, test, settings, results, outputs, total)

    forgetting = {"before_sft": before, "after_sft": results["full_ft"]["heldout_loss"],
                  "after_mixed_sft": results["full_ft_mixed"]["heldout_loss"] if "full_ft_mixed" in results else None,
                  "mixture_share": settings.mixture_share}
    facts = {**(report_header or {}), "settings": dataclasses.asdict(settings), "total_params": total, "pretrain_seconds": round(pretrain_seconds, 1),
             "lab_seconds": round(time.perf_counter() - started, 1),
             "first_rows_seconds": round(first_rows_seconds, 1), "forgetting": forgetting,
             "curves": curves, "pretrain_dir": str(out / "pretrain"), "adapter_rows": dataclasses.asdict(adapter_rows),
             "environment": ran_on}
    if facts_distill is not None:
        facts["distill"] = facts_distill
    if facts_instruction is not None:
        facts["instruction_base"] = facts_instruction
    if detox_rows.enabled:
        facts.update(detox=facts_detox, detox_rows=dataclasses.asdict(detox_rows))
    report.write_outputs(out, test, outputs, results, facts)
    say(f"done in {facts['lab_seconds']:.0f} s: {out / 'report.md'}")
    return results
