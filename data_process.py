"""Raw corpora -> training data.

  python data_process.py pretrain  --input PATH_OR_GLOB... --out data/pretrain/NAME
      text corpora -> NAME.bin (flat little-endian uint16 ids, eos after every document)
      + NAME.json meta; a held-out fraction of documents -> NAME_val.bin + NAME_val.json
  python data_process.py sft       --input PATH_OR_GLOB... --out data/sft/NAME.jsonl
      Alpaca / prompt-answer / conversation sets -> JSONL {"prompt","answer"} (+ NAME_val.jsonl)
  python data_process.py eval      --input PATH_OR_GLOB... --out data/eval/NAME.jsonl
      QA sets -> JSONL {"question","answer"}
  python data_process.py prefs     --input PATH_OR_GLOB... --out data/prefs/NAME.jsonl
      preference pairs -> JSONL {"prompt","chosen","rejected"} (+ NAME_val.jsonl), for dpo.py
  python data_process.py tokenizer --input PATH_OR_GLOB... --vocab-size N --out PATH.model
      an own SentencePiece vocabulary trained on a sample of the corpus

Inputs are files, directories or globs of JSONL, JSON arrays, CSV/TSV, Parquet or plain text
(one document per line), each optionally gzip-compressed. --preset NAME downloads a public
corpus from the Hugging Face Hub into data/raw first.
"""
import argparse
import os
from pathlib import Path

import cli
from chatglm_tokenizer import load_tokenizer, train_sentencepiece
from corpus import TEXT_FIELDS, BadCounter, DataError, sample_documents, unescape_template
from presets import PRESETS, resolve_inputs
from qa_examples import ANSWER_FIELDS, PROMPT_FIELDS, example_paths, write_example_data
from refusal import one_line_refusals
from splits import already_done, clear_outputs
from tokenize_corpus import pretrain_paths, write_pretrain_data

# -----------------------------------------------------------------------------
# defaults (the command-line flags below override them)
WORKERS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # usable cores
CHUNK_BYTES = 1 << 20  # input text per task handed to a worker
MIN_TOKENS = 6  # documents with fewer tokens are dropped (eos not counted), as upstream drops those of <= 5
PRETRAIN_VAL_FRACTION = 0.005
SFT_VAL_FRACTION = 0.01
PREFS_VAL_FRACTION = 0.1  # preference sets are small: a tenth gives reward accuracy enough pairs
RAW_DIR = "data/raw"  # where presets download to
TOKENIZER_SAMPLE_DOCS = 200_000
CHARACTER_COVERAGE = 0.9995


# -----------------------------------------------------------------------------
# the commands: each a few lines here; the work is in modules named for it. corpus.py reads
# the inputs, presets.py downloads them, tokenize_corpus.py is pretrain's parallel tokenizing,
# qa_examples.py makes the sft and eval examples, splits.py writes the train and validation
# outputs so that nothing half-done looks finished, chatglm_tokenizer trains a vocabulary.

def cmd_pretrain(cfg):
    """Text corpora -> NAME.bin + NAME.json (+ NAME_val.bin + NAME_val.json): tokenize_corpus.py."""
    paths = pretrain_paths(cfg.out)
    if already_done(paths["train"][1], cfg.force, "pretrain"):
        return
    tokenizer = load_tokenizer(cfg.tokenizer)
    files = resolve_inputs(cfg.input, cfg.preset, cfg.raw_dir, "pretrain")
    write_pretrain_data(files, tokenizer, paths, cfg)


def cmd_examples(cfg):
    """sft, eval and prefs: normalized JSONL (and a validation split for sft and prefs): qa_examples.py."""
    paths = example_paths(cfg.out)
    if already_done(paths["train"], cfg.force, cfg.command):
        return
    files = resolve_inputs(cfg.input, cfg.preset, cfg.raw_dir, cfg.command)
    write_example_data(files, paths, cfg.command, cfg)


def cmd_tokenizer(cfg):
    """An own SentencePiece vocabulary, trained on a uniform sample of the corpus's documents."""
    out = Path(cfg.out)
    if already_done(out, cfg.force, "tokenizer"):
        return
    files = resolve_inputs(cfg.input, cfg.preset, cfg.raw_dir, "pretrain")
    clear_outputs([out], files)
    sample, seen = sample_documents(files, cfg.sample_docs, cfg.text_field, unescape_template(cfg.template),
                                    BadCounter(cfg.skip_bad), cfg.seed)
    lines = [line for doc in sample for line in doc.splitlines() if line.strip()]
    print(f"tokenizer: training a {cfg.vocab_size}-piece {cfg.model_type} vocabulary on {len(sample):,} of "
          f"{seen:,} documents ({len(lines):,} lines)")
    try:
        train_sentencepiece(lines, cfg.vocab_size, out, model_type=cfg.model_type,
                            character_coverage=cfg.character_coverage)
    except (RuntimeError, ValueError) as e:  # e.g. a vocabulary too small for the characters seen
        raise DataError(f"sentencepiece training failed: {e}") from None
    print(f"tokenizer: wrote {out}; pass it as --tokenizer {out}")


COMMANDS = {"pretrain": cmd_pretrain, "sft": cmd_examples, "eval": cmd_examples, "prefs": cmd_examples,
            "tokenizer": cmd_tokenizer}


# -----------------------------------------------------------------------------
# the command line

def add_input_flags(p, kind):
    p.add_argument("--input", nargs="+", default=[], metavar="PATH_OR_GLOB",
                   help="input files, directories or globs (JSONL, JSON array, CSV/TSV, Parquet, text; optionally .gz)")
    p.add_argument("--preset", nargs="+", choices=sorted(PRESETS[kind]), default=[],
                   help="download public corpora from the Hugging Face Hub into --raw-dir and use them as input")
    p.add_argument("--raw-dir", default=RAW_DIR, help="where presets download to")
    p.add_argument("--force", action="store_true", help="redo outputs that a previous run finished")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip malformed records (bad JSON, missing field, non-UTF-8), count and report them, instead of stopping")


def add_text_flags(p):
    p.add_argument("--text-field", default=None,
                   help=f"record field holding the document text (default: the first of {', '.join(TEXT_FIELDS)})")
    p.add_argument("--template", default=None,
                   help="document text from several fields instead, e.g. '{title}\\n{summary}\\n{sections}' (lists are joined by lines)")


def add_example_flags(p, kind):
    add_input_flags(p, kind)
    p.add_argument("--out", required=True, help=f"output JSONL, e.g. data/{kind}/NAME.jsonl")
    p.add_argument("--prompt-field", default=None,
                   help=f"column/field of the prompt (default: Alpaca instruction+input, a conversation, or the first of {', '.join(PROMPT_FIELDS)})")
    if kind == "prefs":  # the answers are the chosen and rejected fields
        p.set_defaults(answer_field=None)
    else:
        p.add_argument("--answer-field", default=None, help=f"column/field of the answer (default: the first of {', '.join(ANSWER_FIELDS)})")
    p.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=True, help="drop exact duplicate (prompt, answer) pairs")
    p.add_argument("--exclude-questions", default=None, metavar="EVAL.jsonl",
                   help="drop examples whose prompt equals or contains a question of this evaluation set (normalized)")
    p.add_argument("--tokenizer", default=None, help="tokenizer model for the length filters")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="drop examples with a longer prompt")
    p.add_argument("--max-answer-tokens", type=int, default=None, help="drop examples with a longer answer")
    p.add_argument("--min-answer-tokens", type=int, default=None, help="drop examples with a shorter answer")
    p.add_argument("--max-tokens", type=int, default=None, help="drop examples longer than this encoded (prompt + bos + answer + eos)")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", formatter_class=cli.HelpFormatter, help="text corpora -> uint16 token .bin + .json meta")
    add_input_flags(p, "pretrain")
    add_text_flags(p)
    p.add_argument("--out", required=True, help="output NAME: writes NAME.bin, NAME.json, NAME_val.bin, NAME_val.json")
    p.add_argument("--tokenizer", default=None, help="tokenizer model (default: BABYLLAMA_TOKENIZER, chatglm_tokenizer/tokenizer.model, or a download)")
    p.add_argument("--workers", type=int, default=WORKERS, help="tokenizer processes (default: all cores); the output is the same for any count")
    p.add_argument("--val-fraction", type=float, default=PRETRAIN_VAL_FRACTION, help="share of documents held out to NAME_val.bin (chosen by hash)")
    p.add_argument("--min-tokens", type=int, default=MIN_TOKENS, help="drop documents with fewer tokens")
    p.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=False,
                   help="drop exact duplicate documents (keeps 8 bytes per unique document in memory)")
    p.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES, help="input bytes per task handed to a worker")

    p = sub.add_parser("sft", formatter_class=cli.HelpFormatter, help="SFT sets -> normalized JSONL {prompt, answer}")
    add_example_flags(p, "sft")
    p.add_argument("--val-fraction", type=float, default=SFT_VAL_FRACTION, help="share of examples held out to NAME_val.jsonl (chosen by hash of the prompt)")

    p = sub.add_parser("eval", formatter_class=cli.HelpFormatter, help="QA sets -> JSONL {question, answer}")
    add_example_flags(p, "eval")
    p.set_defaults(val_fraction=0.0)  # no validation split

    p = sub.add_parser("prefs", formatter_class=cli.HelpFormatter,
                       help="preference pairs -> normalized JSONL {prompt, chosen, rejected}")
    add_example_flags(p, "prefs")
    p.add_argument("--val-fraction", type=float, default=PREFS_VAL_FRACTION,
                   help="share of pairs held out to NAME_val.jsonl (chosen by hash of the prompt)")

    p = sub.add_parser("tokenizer", formatter_class=cli.HelpFormatter, help="train an own SentencePiece vocabulary")
    add_input_flags(p, "pretrain")
    add_text_flags(p)
    p.add_argument("--vocab-size", type=int, required=True, help="number of pieces (at most 65535, so uint16 holds every id)")
    p.add_argument("--out", required=True, help="output PATH.model")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"], help="SentencePiece model type")
    p.add_argument("--character-coverage", type=float, default=CHARACTER_COVERAGE,
                   help="share of characters that get their own piece (0.98-1); the rest fall back to bytes. "
                        "Lower it when a small vocabulary cannot hold every Chinese character seen")
    p.add_argument("--sample-docs", type=int, default=TOKENIZER_SAMPLE_DOCS, help="documents sampled (uniformly) for training")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    return parser


def main(argv=None):
    cfg = build_parser().parse_args(argv)
    with one_line_refusals("data_process.py"):
        print(cli.config_line(cfg))  # the run's header: every setting, defaults included
        COMMANDS[cfg.command](cfg)


if __name__ == "__main__":
    main()
