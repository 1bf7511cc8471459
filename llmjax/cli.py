"""``llmjax <command>``: the only place that parses arguments or talks to the user directly.

Each subcommand is a small function registered in ``COMMANDS``; heavy imports happen inside
it so ``llmjax --help`` is instant. A user error (bad config, missing file, unsupported
checkpoint) is one line on stderr and exit code 2; set ``LLMJAX_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "pretrain_t5_tiny.yaml"


class UserError(Exception):
    """An error the user can fix; printed as one line."""


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


def cmd_tokenizer_train(args) -> int:
    from llmjax.data.tokenizer import read_texts, train_tokenizer

    tok = train_tokenizer(read_texts(args.input), args.out, args.vocab_size,
                          num_extra_ids=args.num_extra_ids, seed=args.seed)
    print(f"trained tokenizer with {tok.vocab_size} ids -> {args.out}")
    return 0


def cmd_data_dialogsum(args) -> int:
    from llmjax.data.dialogsum import write_dialogsum

    write_dialogsum(args.out, num_examples=args.num_examples, seed=args.seed)
    print(f"wrote dialogue-summarization splits to {args.out}")
    return 0


def cmd_data_corpus(args) -> int:
    from llmjax.data.bundled.corpus import write_corpus

    write_corpus(args.out, args.num_documents, seed=args.seed)
    print(f"wrote {args.num_documents} documents to {args.out}")
    return 0


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
    p = data.add_parser("corpus", help="generated English pre-training corpus (JSONL)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--num-documents", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_corpus)

    return parser


def _user_error_types() -> tuple[type[BaseException], ...]:
    # ValueError covers config, checkpoint, data and tokenizer validation errors across the package.
    return (UserError, ValueError, FileNotFoundError, NotADirectoryError, KeyError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except _user_error_types() as e:
        if os.environ.get("LLMJAX_DEBUG"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"llmjax {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
