"""llmjax: train, tune, evaluate and export language models with JAX.

``llmjax <command>`` is the only place that parses arguments or talks to the user directly.

Each subcommand is a small function registered in ``COMMANDS``; heavy imports happen inside
it so ``llmjax --help`` is instant. A user error (bad config, missing file, unsupported
checkpoint) is one line on stderr and exit code 2; set ``LLMJAX_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Callable

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "pretrain_t5_tiny.yaml"


from llmjax.errors import UserError  # noqa: E402  (re-exported: the one user-error type)


# ---------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------

def cmd_train(args) -> int:
    from llmjax.config import load_config
    from llmjax.stages import run_stage

    config_path = args.config or _default_config()
    config = load_config(config_path, args.overrides)
    summary = run_stage(config)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_export(args) -> int:
    from llmjax.train.checkpoint import export_checkpoint_to_hf

    out = export_checkpoint_to_hf(args.checkpoint, args.out, step=args.step)
    print(f"wrote Hugging Face model to {out}")
    return 0


def cmd_import(args) -> int:
    from llmjax.train.checkpoint import import_hf_to_checkpoint

    out = import_hf_to_checkpoint(args.hf_dir, args.out)
    print(f"wrote llmjax checkpoint to {out}")
    return 0


def cmd_lora_merge(args) -> int:
    from llmjax.loading import TOKENIZER_FILES
    from llmjax.lora import merge_into_hf_dir

    out = merge_into_hf_dir(args.base, args.adapter, args.out, copy_files=TOKENIZER_FILES)
    print(f"wrote {args.base} with adapter {args.adapter} merged to {out}")
    return 0


def cmd_quantize(args) -> int:
    from llmjax import quantize
    from llmjax.loading import TOKENIZER_FILES, load_model

    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise UserError(f"--out {args.out} exists and is not an empty directory; choose a new directory")
    loaded = load_model(args.model)
    if loaded.kind == "quantized":
        raise quantize.QuantizeError(f"{args.model} is already quantized ({loaded.config.quantization}); "
                                     "quantize the float model it came from")
    if loaded.soft_prompt is not None:
        raise quantize.QuantizeError(f"{args.model} is a prompt-tuning run, whose soft prompt a quantized directory "
                                     "does not hold; quantize its base (init_from) and pass the exported prompt "
                                     "with --adapter")
    qmodel, qparams = quantize.quantize(loaded.model, loaded.params, args.quantization)
    tokenizer = loaded.tokenizer_dir
    files = [] if tokenizer is None else [tokenizer / n for n in TOKENIZER_FILES if (tokenizer / n).is_file()]
    quantize.save(qmodel, qparams, args.out, tokenizer_files=files)
    before, after = quantize.param_bytes(loaded.params), quantize.param_bytes(qparams)
    print(f"wrote {args.quantization} model to {args.out}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB in "
          f"memory ({before / after:.2f}x smaller), {quantize.directory_bytes(args.out) / 2**20:.1f} MiB on disk")
    return 0


def cmd_tokenizer_train(args) -> int:
    from llmjax.data.sources import file_source
    from llmjax.data.tokenizer import train_tokenizer

    sources = [file_source(path, "text") for path in args.input]  # every row checked before training
    texts = (source[i]["text"] for source in sources for i in range(len(source)))
    tok = train_tokenizer(texts, args.out, args.vocab_size, num_extra_ids=args.num_extra_ids, seed=args.seed)
    print(f"trained tokenizer with {tok.vocab_size} ids -> {args.out}")
    return 0


def cmd_data_dialogsum(args) -> int:
    from llmjax.data.bundled.dialogsum import write_dialogsum

    write_dialogsum(args.out, num_examples=args.num_examples, seed=args.seed)
    print(f"wrote dialogue-summarization splits to {args.out}")
    return 0


def cmd_data_detox(args) -> int:
    from llmjax.data.bundled.detox import write_detox

    paths = write_detox(args.out, num_labels=args.num_labels, num_examples=args.num_examples, seed=args.seed)
    print(f"wrote toxicity labels and preference pairs ({len(paths)} files) to {args.out}")
    return 0


def cmd_data_corpus(args) -> int:
    from llmjax.data.bundled.corpus import write_corpus

    write_corpus(args.out, args.num_documents, seed=args.seed)
    print(f"wrote {args.num_documents} documents to {args.out}")
    return 0


def cmd_lifecycle(args) -> int:
    from llmjax.lab.lifecycle import LifecycleSettings, run_lifecycle

    run_lifecycle(args.out, LifecycleSettings.tiny() if args.tiny else LifecycleSettings(),
                  progress=not args.no_progress)
    return 0


def cmd_lab_summarize(args) -> int:
    import dataclasses

    from llmjax.lab.adapter_rows import AdapterRows, parse_ranks
    from llmjax.lab.summarize import LabSettings, run_lab

    rows = AdapterRows.tiny() if args.tiny else AdapterRows()
    if args.lora_ranks is not None:
        rows = dataclasses.replace(rows, lora_ranks=parse_ranks(args.lora_ranks))
    if args.no_prompt_tuning:
        rows = dataclasses.replace(rows, prompt_tuning=False)
    if args.qlora_ranks is not None:
        rows = dataclasses.replace(rows, qlora_ranks=parse_ranks(args.qlora_ranks))
    from llmjax.lab.detox import DetoxRows

    detox = DetoxRows.tiny() if args.tiny else DetoxRows()
    if args.no_detox:
        detox = dataclasses.replace(detox, enabled=False)
    from llmjax.lab.distill_rows import DistillRows

    distill = DistillRows.tiny() if args.tiny else DistillRows()
    if args.no_distill:
        distill = dataclasses.replace(distill, enabled=False)
    from llmjax.lab.instruction_base_rows import InstructionBaseRows

    instruction = InstructionBaseRows.tiny() if args.tiny else InstructionBaseRows()
    if args.no_instruction_base:
        instruction = dataclasses.replace(instruction, enabled=False)
    settings = LabSettings.tiny() if args.tiny else LabSettings()
    command = {"command": f"llmjax {shlex.join(args.argv)}"}  # report.md repeats the command line as given
    if args.instruction_base_only:
        from llmjax.lab.summarize import run_instruction_base_lab

        run_instruction_base_lab(args.out, settings, progress=not args.no_progress,
                                 rows=dataclasses.replace(instruction, enabled=True), command=command["command"])
        return 0
    if args.detox_only:
        from llmjax.lab.summarize import run_detox_lab

        run_detox_lab(args.out, settings, progress=not args.no_progress, detox_rows=detox, report_header=command)
        return 0
    run_lab(args.out, settings, progress=not args.no_progress, adapter_rows=rows, detox_rows=detox,
            distill_rows=distill, int8_from=None if args.no_int8 else "full_ft",
            report_header=command, instruction_base_rows=instruction)
    return 0


def cmd_generate(args) -> int:
    from llmjax.evaluate import build_prompts, default_max_input_tokens, generate_texts, load_examples, \
        load_for_inference, shot_pool_for, with_adapters

    model, params, tokenizer, run_prompt = load_for_inference(args.model)
    config = _generation_config(args)
    if args.dataset is not None:
        examples = load_examples(args.dataset, args.split, args.limit)
        template, pool = args.template or "summarize", shot_pool_for(args.dataset, args.split)
    else:
        texts = args.prompt if args.prompt is not None else _read_prompt_file(args.input_file)
        examples = [{"id": str(i), "dialogue": text} for i, text in enumerate(texts, 1)]
        template, pool = args.template, None
        if template is None and args.shots:
            raise UserError("--shots needs --template (shots are rendered by a prompt template)")
        if template is not None and args.shots:
            pool = load_examples("bundled", "train")
    if template is None:
        prompts = [example["dialogue"] for example in examples]
    else:
        budget = args.max_input_tokens or default_max_input_tokens(model, config)
        prompts, _ = build_prompts(model, tokenizer, examples, template, shots=args.shots, shot_pool=pool,
                                   shot_seed=args.shot_seed, max_input_tokens=budget)
    for adapter, _, variant, soft_prompt in with_adapters(model, params, args.adapter, run_prompt):
        if adapter is not None:
            print(f"=== adapter {adapter} ===")
        outputs = generate_texts(model, variant, tokenizer, prompts, generation_config=config,
                                 batch_size=args.batch_size, rng=_rng(args.seed), soft_prompt=soft_prompt)
        for example, prompt, output in zip(examples, prompts, outputs):
            print(f"--- {example['id']} ---")
            if args.show_prompt:
                print(f"prompt: {prompt}")
            print(output)
            if "summary" in example:
                print(f"reference: {example['summary']}")
    return 0


def cmd_evaluate(args) -> int:
    from llmjax.evaluate import compare_shots, load_examples, load_for_inference, scores_table, \
        shot_pool_for, with_adapters, write_report
    from llmjax.generate import resolve_config

    model, params, tokenizer, run_prompt = load_for_inference(args.model)
    config = _generation_config(args)
    examples = load_examples(args.data, args.split, args.limit)
    for adapter, adapter_dir, variant, soft_prompt in with_adapters(model, params, args.adapter, run_prompt):
        results = compare_shots(
            model, variant, tokenizer, examples, args.template, shot_counts=args.shots,
            shot_pool=shot_pool_for(args.data, args.split), shot_seed=args.shot_seed,
            max_input_tokens=args.max_input_tokens, generation_config=config, batch_size=args.batch_size,
            rng=_rng(args.seed), soft_prompt=soft_prompt,
        )
        settings = {"model": str(args.model), "data": str(args.data), "split": args.split, "limit": args.limit,
                    "shot_seed": args.shot_seed, "max_input_tokens": args.max_input_tokens,
                    "batch_size": args.batch_size, "seed": args.seed,
                    "generation_config": resolve_config(model, config).to_hf()}
        out = args.out
        if adapter is not None:
            settings["adapter"] = str(adapter_dir)
            print(f"=== adapter {adapter} ===")
            out = args.out if len(args.adapter) == 1 else args.out / adapter  # several: one report each
        paths = write_report(out, examples, results, args.template, settings, args.examples_shown)
        print(scores_table(results))
        print(f"wrote {paths['scores']}, {paths['predictions']} and {paths['report']}")
    return 0


def cmd_calc_memory(args) -> int:
    from llmjax.planning import plan_memory

    model, run = _calc_source(args.model)
    seq2seq = _is_seq2seq(model)
    length, input_length = _calc_lengths(args, model, run)
    plan = plan_memory(
        model, batch=args.batch or (run.train.batch_size if run else _default("train", "batch_size")),
        length=length, encoder_length=input_length if seq2seq else None, mesh=_calc_mesh(args.mesh, run),
        precision=args.precision or ("bf16" if model.dtype == "bfloat16" else "fp32"),
        optimizer=args.optimizer or (run.optim.name if run else _default("optim", "name")),
        remat=args.remat, momentum=args.momentum or bool(run and run.optim.name == "adafactor" and run.optim.b1),
    )
    print(json.dumps(plan.to_json(), indent=2) if args.json else plan.table())
    return 0


def cmd_calc_compute(args) -> int:
    from llmjax.planning import plan_compute

    if args.model is None and args.params is None:
        raise UserError("calc compute needs --model CONFIG_OR_DIR or --params N")
    model, run = _calc_source(args.model) if args.model is not None else (None, None)
    length, input_length = _calc_lengths(args, model, run) if model is not None else (None, None)
    plan = plan_compute(
        model, params=args.params, tokens=args.tokens, budget_pf_days=args.budget_pf_days, length=length,
        encoder_length=input_length if model is not None and _is_seq2seq(model) else None, chips=args.chips,
        chip=args.chip, peak_flops=args.peak_tflops * 1e12 if args.peak_tflops is not None else None, mfu=args.mfu,
    )
    print(json.dumps(plan.to_json(), indent=2) if args.json else plan.table())
    return 0


def _calc_source(path: Path):
    """``--model``: a model config YAML, a run config YAML, a Hugging Face or checkpoint directory ->
    ``(model config, run config or None)``."""
    import yaml

    from llmjax.config import load_config, load_section
    from llmjax.loading import read_model_config

    if path.is_dir():
        return read_model_config(path), None
    if not path.is_file():
        raise UserError(f"--model {path}: no such file or directory; pass a model or run config YAML "
                        "(configs/model/*.yaml, configs/*.yaml) or a Hugging Face or checkpoint directory")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"--model {path}: not a YAML file ({str(e).splitlines()[0]})") from None
    if isinstance(raw, dict) and "family" in raw:
        return load_section(path, "model"), None
    run = load_config(path)
    if run.model_resolved:  # a whole model section (a stage checks it against init_from when it runs)
        return run.model, run
    from llmjax.stages.init_source import model_against_source

    return model_against_source(run, read_model_config(run.init_from)), run


def _is_seq2seq(model) -> bool:
    from llmjax.models import model_family

    return model_family(model).seq2seq


def _default(section: str, field: str):
    """A run-config default (``llmjax.config``'s dataclasses hold them, in one place)."""
    from llmjax import config

    return getattr(config.SECTIONS[section](), field)


def _calc_lengths(args, model, run) -> tuple[int, int]:
    """``(target or sequence length, input length)``: the options, else the run config's data lengths, else the
    defaults (decoder-only: the model's context; T5: the data defaults)."""
    data = run.data if run else None
    if _is_seq2seq(model):
        return (args.length or (data.decoder_length if data else _default("data", "decoder_length")),
                args.input_length or (data.encoder_length if data else _default("data", "encoder_length")))
    if args.input_length is not None:
        raise UserError("--input-length is for encoder-decoder (T5) models; a decoder-only model reads --length")
    return args.length or (data.decoder_length if data else model.max_position_embeddings), 0


def _calc_mesh(text: str | None, run) -> dict[str, int]:
    """``data=2,fsdp=4,tensor=1`` -> sizes; none given: the run config's mesh, else one device."""
    if text is None:
        if run is None:
            return {}
        mesh = {"data": run.mesh.data, "fsdp": run.mesh.fsdp, "tensor": run.mesh.tensor}
        if -1 in mesh.values():
            raise UserError(f"the run config's mesh {mesh} has a -1 axis (all devices); give concrete sizes with "
                            "--mesh data=..,fsdp=..,tensor=..")
        return mesh
    mesh = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if not value.strip().isdigit():
            raise UserError(f"--mesh {text!r}: expected AXIS=SIZE pairs like data=2,fsdp=4,tensor=1")
        mesh[name.strip()] = int(value)
    return mesh


DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_MAX_NEW_TOKENS = 64
_DECODING_OPTIONS = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                     "repetition_penalty", "no_repeat_ngram_size", "num_beams", "length_penalty", "early_stopping")


def _add_decoding_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding (Hugging Face generate names; unset: the model's generation_config.json, "
                             "else Hugging Face defaults)")
    g.add_argument("--max-new-tokens", type=int, help=f"tokens to generate (default {DEFAULT_MAX_NEW_TOKENS})")
    g.add_argument("--min-new-tokens", type=int, help="no eos before this many new tokens")
    g.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None, help="sample instead of greedy/beam")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens when sampling (0: off)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]")
    g.add_argument("--repetition-penalty", type=float,
                   help="divide the scores of tokens already in the sequence by this (> 1: fewer repeats; 1: off)")
    g.add_argument("--no-repeat-ngram-size", type=int, help="no n-gram of this size occurs twice (0: off)")
    g.add_argument("--num-beams", type=int, help="beam search with this many beams (1: off)")
    g.add_argument("--length-penalty", type=float, help="beam score = log-prob / length**length_penalty")
    g.add_argument("--early-stopping", choices=("true", "false", "never"), help="beam search stopping rule")
    g.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling (default 0)")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    g.add_argument("--max-input-tokens", type=int,
                   help="prompt budget in tokens (default: 512 for T5, context length minus new tokens for decoders)")


def _add_adapter_option(p: argparse.ArgumentParser, several: str) -> None:
    p.add_argument("--adapter", action="append", type=Path, default=[], metavar="DIR",
                   help="PEFT adapter directory: LoRA (merged into the model) or prompt tuning (its soft prompt "
                        "before every prompt); repeat it, kinds mixed, to run each adapter in turn on the model "
                        f"loaded once ({several})")


def _generation_config(args):
    import dataclasses

    from llmjax.evaluate import load_generation_config

    base = load_generation_config(args.model)
    overrides = {name: getattr(args, name) for name in _DECODING_OPTIONS if getattr(args, name) is not None}
    if "early_stopping" in overrides:
        overrides["early_stopping"] = {"true": True, "false": False}.get(overrides["early_stopping"], "never")
    if "max_new_tokens" not in overrides and base.max_new_tokens is None:
        overrides["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    return dataclasses.replace(base, **overrides)


def _rng(seed: int):
    import jax

    return jax.random.key(seed)


def _read_prompt_file(path: Path) -> list[str]:
    """Prompts of a text file: blocks separated by blank lines (a block may span lines, like a dialogue)."""
    if not path.is_file():
        raise UserError(f"input file {path} does not exist")
    blocks = [block.strip() for block in path.read_text(encoding="utf-8").split("\n\n")]
    prompts = [block for block in blocks if block]
    if not prompts:
        raise UserError(f"input file {path} holds no prompts; write one prompt per block, blocks separated by a blank line")
    return prompts


def _default_config() -> Path:
    if not DEFAULT_CONFIG.is_file():
        raise UserError(f"bundled default config {DEFAULT_CONFIG} is missing; pass --config FILE")
    return DEFAULT_CONFIG


# ---------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="run a training stage from a YAML config (default: bundled tiny T5 pre-training)")
    p.add_argument("--config", type=Path, help=f"run config YAML (default {DEFAULT_CONFIG.name})")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=100 mesh.fsdp=4")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write a Hugging Face directory from an llmjax checkpoint")
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory (checkpoint.dir of a run)")
    p.add_argument("--out", required=True, type=Path, help="output Hugging Face directory")
    p.add_argument("--step", type=int, default=None, help="step to export (default: latest complete)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="convert a local Hugging Face directory (safetensors) to an llmjax checkpoint")
    p.add_argument("hf_dir", type=Path, help="Hugging Face model directory with config.json + *.safetensors")
    p.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    p.set_defaults(func=cmd_import)

    lora = sub.add_parser("lora", help="LoRA adapters (Hugging Face PEFT format)").add_subparsers(
        dest="lora_command", metavar="ACTION")
    p = lora.add_parser("merge", help="merge a PEFT LoRA adapter into its Hugging Face base model")
    p.add_argument("--base", required=True, type=Path, help="Hugging Face base model directory")
    p.add_argument("--adapter", required=True, type=Path, help="PEFT adapter directory (adapter_config.json + "
                                                                "adapter_model.safetensors)")
    p.add_argument("--out", required=True, type=Path, help="new Hugging Face directory for the merged model "
                                                            "(tokenizer files copied from --base)")
    p.set_defaults(func=cmd_lora_merge)

    p = sub.add_parser("quantize", help="int8 post-training quantization (per-output-channel weights) of a model")
    p.add_argument("--model", required=True, type=Path, help="Hugging Face directory, llmjax checkpoint or run "
                                                             "directory")
    p.add_argument("--out", required=True, type=Path, help="new directory for the quantized model (generate, "
                                                           "evaluate and --model options read it)")
    p.add_argument("--quantization", choices=["int8_dynamic", "int8"], default="int8_dynamic",
                   help="int8_dynamic (default, faster on CPU): activations quantized per token too, int8 dots; "
                        "int8: weight-only, activations stay in the compute dtype (bf16/fp32)")
    p.set_defaults(func=cmd_quantize)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_command", metavar="ACTION")
    p = tok.add_parser("train", help="train a SentencePiece tokenizer with T5 conventions")
    p.add_argument("--input", nargs="+", required=True, type=Path, help="text or JSONL ({'text': ...}) files")
    p.add_argument("--vocab-size", type=int, required=True, help="total vocabulary size including sentinels")
    p.add_argument("--out", required=True, type=Path, help="output directory (spiece.model + HF tokenizer files)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-extra-ids", type=int, default=100, help="number of <extra_id_N> sentinels")
    p.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="write the bundled datasets to files").add_subparsers(dest="data_command", metavar="DATASET")
    p = data.add_parser("dialogsum", help="generated DialogSum-shaped dialogue summarization splits (JSONL)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--num-examples", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_dialogsum)
    p = data.add_parser("detox", help="the detox lab's toxicity labels and preference pairs (JSONL: labels_{split}, "
                                      "pairs_{split})")
    p.add_argument("--out", required=True, type=Path, help="new or empty directory")
    p.add_argument("--num-labels", type=int, default=2000, help="labelled texts over the three splits")
    p.add_argument("--num-examples", type=int, default=4000, help="DialogSum-shaped dialogues the pairs' rude prompts come from")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_detox)
    p = data.add_parser("corpus", help="generated English pre-training corpus (JSONL)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--num-documents", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_corpus)

    p = sub.add_parser("lifecycle", help="the whole lifecycle on the bundled data: pretrain, SFT, LoRA, reward model, "
                       "PPO, int8, Hugging Face export, one report.md (minutes on a laptop CPU)")
    p.add_argument("--out", type=Path, default=Path("runs/lifecycle"), help="output directory (default runs/lifecycle; "
                   "a finished pre-training there is reused)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and a few steps (a smoke test, seconds)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the phase lines stay)")
    p.set_defaults(func=cmd_lifecycle)

    lab = sub.add_parser("lab", help="the course's labs in miniature").add_subparsers(dest="lab_command", metavar="LAB")
    p = lab.add_parser("summarize", help="pre-train a small T5, then zero/one/few-shot and fine-tuned dialogue "
                                         "summarization: results.json, predictions/, report.md, PNG curves")
    p.add_argument("--out", required=True, type=Path, help="output directory (a finished pre-training there is reused)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and a few steps (a smoke test, seconds)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the phase lines stay)")
    p.add_argument("--lora-ranks", metavar="R,R,...", help="ranks of the lora_r<r> rows (default 1,4,8,16,32; "
                                                         "--tiny: 1); 'none' for no LoRA rows")
    p.add_argument("--no-prompt-tuning", action="store_true", help="skip the prompt_tuning row")
    p.add_argument("--qlora-ranks", metavar="R,R,...", help="ranks of the qlora_r<r> rows: LoRA over the int8 base "
                   "(default 4; 'none' for no QLoRA row)")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 row (full_ft quantized: ROUGE, bytes, decode "
                   "speed)")
    p.add_argument("--no-distill", action="store_true", help="skip the distillation rows (distill, distill_labels)")
    p.add_argument("--no-instruction-base", action="store_true",
                   help="skip the instruction-base rows (instruct_zero_shot, instruct_full_ft, instruct_lora_r<r>: full "
                        "fine-tuning and LoRA from a base instruction-tuned on a sibling set, as the course's FLAN-T5)")
    p.add_argument("--instruction-base-only", action="store_true",
                   help="add only the instruction-base rows to the finished lab in --out (results.json and report.md "
                        "gain them; its other rows stay)")
    p.add_argument("--detox-only", action="store_true", help="only the detox rows, from the finished pre-training and "
                                                             "full_ft runs an earlier lab left in --out")
    p.add_argument("--no-detox", action="store_true", help="skip the detox rows (reward model, ppo, dpo, grpo, rlaif; "
                                                           "they need the judge extra: pip install 'llmjax[judge]')")
    p.set_defaults(func=cmd_lab_summarize)

    p = sub.add_parser("generate", help="generate text from a Hugging Face directory or an llmjax checkpoint")
    p.add_argument("--model", required=True, type=Path, help="Hugging Face directory, checkpoint directory or run directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", nargs="+", metavar="TEXT", help="prompt text(s)")
    source.add_argument("--input-file", type=Path, help="text file, one prompt per block (blank line between blocks)")
    source.add_argument("--dataset", metavar="bundled|PATH", help="dialogue data: 'bundled' or a DialogSum file/directory")
    p.add_argument("--split", default="test", help="dataset split (default test)")
    p.add_argument("--limit", type=int, default=5, help="dataset examples to run (default 5)")
    p.add_argument("--template", help="prompt template filling its {dialogue} slot with each text "
                                      "(default: raw prompts; 'summarize' for --dataset)")
    p.add_argument("--shots", type=int, default=0, help="solved examples before each prompt (needs a template)")
    p.add_argument("--shot-seed", type=int, default=0, help="seed choosing the shots")
    p.add_argument("--show-prompt", action="store_true", help="print each full prompt before its output")
    _add_adapter_option(p, "outputs under '=== adapter NAME ==='")
    _add_decoding_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="score a model on dialogue summarization: ROUGE, BLEU, exact match")
    p.add_argument("--model", required=True, type=Path, help="Hugging Face directory, checkpoint directory or run directory")
    p.add_argument("--data", default="bundled", metavar="bundled|PATH", help="'bundled' (default) or a DialogSum file/directory")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples (default all)")
    p.add_argument("--template", default="summarize", help="prompt template name (default summarize)")
    p.add_argument("--shots", type=int, nargs="+", default=[0], help="shot counts to compare, e.g. 0 1 2 (default 0)")
    p.add_argument("--shot-seed", type=int, default=0, help="seed choosing the shots")
    p.add_argument("--out", required=True, type=Path, help="directory for scores.json, predictions.jsonl, report.md")
    p.add_argument("--examples-shown", type=int, default=5, help="examples in report.md (default 5)")
    _add_adapter_option(p, "several: one report each in OUT/NAME")
    _add_decoding_options(p)
    p.set_defaults(func=cmd_evaluate)

    calc = sub.add_parser("calc", help="plan a run: memory per device, compute budget").add_subparsers(
        dest="calc_command", metavar="WHAT")
    model_help = ("model config YAML (configs/model/*.yaml), run config YAML (its batch, lengths, mesh and "
                  "optimizer are the defaults), or a Hugging Face / checkpoint directory")
    p = calc.add_parser("memory", help="bytes per device of weights, gradients, optimizer state and activations")
    p.add_argument("--model", required=True, type=Path, help=model_help)
    p.add_argument("--batch", type=int, help="global batch in sequences (default: the run's, else 32)")
    p.add_argument("--length", type=int, help="sequence length; T5: target length (default: the run's data lengths; "
                                              "decoder: its context; T5: 114)")
    p.add_argument("--input-length", type=int, help="T5 input (encoder) length (default: the run's, else 512)")
    p.add_argument("--mesh", metavar="data=D,fsdp=F,tensor=T", help="device mesh (default: the run's, else 1 device)")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8"),
                   help="fp32; bf16 mixed precision (fp32 master weights); int8 frozen weight-only base "
                        "(default: the model's dtype)")
    p.add_argument("--optimizer", choices=("adamw", "adafactor"), help="default: the run's, else adamw")
    p.add_argument("--momentum", action="store_true", help="Adafactor with a first moment (optim.b1)")
    p.add_argument("--remat", nargs="?", const="full", choices=("none", "full", "save_dots", "save_dots_no_batch"),
                   help="remat policy (bare --remat: full; default: the model config's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_calc_memory)

    p = calc.add_parser("compute", help="training FLOPs, petaFLOP/s-days, wall time, Chinchilla-optimal sizes")
    p.add_argument("--model", type=Path, help=model_help)
    p.add_argument("--params", type=float, help="a parameter count instead of --model (6*N*D only)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=float, help="training tokens (default: Chinchilla's 20 per parameter)")
    budget.add_argument("--budget-pf-days", type=float, help="compute budget in petaFLOP/s-days (by 6*N*D)")
    p.add_argument("--length", type=int, help="sequence length for the attention term (T5: target length)")
    p.add_argument("--input-length", type=int, help="T5 input length")
    p.add_argument("--chips", type=int, default=1, help="accelerators (default 1)")
    p.add_argument("--chip", default="h100", help="accelerator in the table (v100, a100, h100, h200, tpu-v4, "
                                                  "tpu-v5e, tpu-v5p; default h100)")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per chip instead of --chip")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilization (default 0.4)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_calc_compute)

    return parser


def _quiet_library_logs() -> None:
    """Drop what libraries log through absl and asyncio: orbax's background threads log each failed write
    (tracebacks included) and notes such as "directory is read only"; its asyncio tasks log their
    exceptions again. A failure reaches llmjax as an exception too, reported in one line;
    ``LLMJAX_DEBUG=1`` keeps the logs. (llmjax itself uses neither logger.)"""
    import logging

    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line as given (reports repeat it)
    func: Callable | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    if not os.environ.get("LLMJAX_DEBUG"):
        _quiet_library_logs()
    try:
        return func(args)
    except UserError as e:  # only the user's mistakes: anything else is a bug and keeps its traceback
        if os.environ.get("LLMJAX_DEBUG"):
            raise
        message = " ".join(str(e).split("\n"))
        print(f"llmjax {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
