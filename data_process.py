"""Raw corpora -> training data.

  python data_process.py pretrain  --input PATH_OR_GLOB... --out data/pretrain/NAME
      text corpora -> NAME.bin (flat little-endian uint16 ids, eos after every document)
      + NAME.json meta; a held-out fraction of documents -> NAME_val.bin + NAME_val.json
  python data_process.py sft       --input PATH_OR_GLOB... --out data/sft/NAME.jsonl
      Alpaca / prompt-answer / conversation sets -> JSONL {"prompt","answer"} (+ NAME_val.jsonl)
  python data_process.py eval      --input PATH_OR_GLOB... --out data/eval/NAME.jsonl
      QA sets -> JSONL {"question","answer"}
  python data_process.py tokenizer --input PATH_OR_GLOB... --vocab-size N --out PATH.model
      an own SentencePiece vocabulary trained on a sample of the corpus

Inputs are files, directories or globs of JSONL, JSON arrays, CSV/TSV, Parquet or plain text
(one document per line), each optionally gzip-compressed. --preset NAME downloads a public
corpus from the Hugging Face Hub into data/raw first.
"""
import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import time
import unicodedata
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import compress
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from atomic import AtomicFile, WriteError, naming_errors, write_json_atomic
from chatglm_tokenizer import Tokenizer, TokenizerNotFound, load_tokenizer, train_sentencepiece
from corpus import (TEXT_FIELDS, BadCounter, DataError, document_text, expand_inputs, input_format, iter_raw,
                    iter_records, known_format, map_ordered, parse_items, string_field, utf8)
from prompt import context_prompt

# -----------------------------------------------------------------------------
# defaults (command-line flags override all but the field lists and SUBSTRING_MIN_CHARS)
WORKERS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # usable cores
CHUNK_BYTES = 1 << 20  # input text per task handed to a worker
MIN_TOKENS = 6  # documents with fewer tokens are dropped (eos not counted), as upstream drops those of <= 5
PRETRAIN_VAL_FRACTION = 0.005
SFT_VAL_FRACTION = 0.01
RAW_DIR = "data/raw"  # where presets download to
TOKENIZER_SAMPLE_DOCS = 200_000
# fields tried in order when none is named on the command line
PROMPT_FIELDS = ("prompt", "question", "query", "q")
ANSWER_FIELDS = ("answer", "response", "output", "target", "a")
SUBSTRING_MIN_CHARS = 8  # eval questions this long are also caught inside longer prompts

PRESETS = {  # name -> Hub dataset repo, the files to take, how to read them
    "pretrain": {
        "wikipedia-cn": dict(repo="pleisto/wikipedia-cn-20230720-filtered", files=["*.json"], text_field="completion"),
        "medical": dict(repo="shibing624/medical", files=["pretrain/*"], text_field="text"),
    },
    "sft": {
        "alpaca-zh": dict(repo="shibing624/alpaca-zh", files=["*.json"]),
        "belle-0.5m": dict(repo="BelleGroup/train_0.5M_CN", files=["*.json"]),
        "medical": dict(repo="shibing624/medical", files=["finetune/train_zh*", "finetune/valid_zh*"]),
    },
    "eval": {
        "medical": dict(repo="shibing624/medical", files=["finetune/test_zh*"]),
    },
}


# -----------------------------------------------------------------------------
# inputs: --input specs and --preset downloads

def resolve_inputs(args, kind):
    """--input specs plus the files a --preset downloads."""
    files = expand_inputs(args.input or [])
    for name in args.preset or []:
        files += download_preset(kind, name, Path(args.raw_dir))
    if not files:
        raise DataError("no input: pass --input PATH_OR_GLOB... or --preset NAME")
    return files


def download_preset(kind, name, raw_dir):
    if name not in PRESETS[kind]:
        raise DataError(f"unknown {kind} preset {name!r} (known: {', '.join(PRESETS[kind])})")
    preset = PRESETS[kind][name]
    local_dir = raw_dir / preset["repo"].replace("/", "__")
    print(f"preset {name}: downloading {preset['files']} of the Hub dataset {preset['repo']} into {local_dir}")
    try:
        from huggingface_hub import snapshot_download
        snapshot_download(repo_id=preset["repo"], repo_type="dataset", allow_patterns=preset["files"],
                          local_dir=local_dir)  # shows its own progress bars
    except Exception as e:  # offline, no access, missing package: all end the same way
        raise DataError(
            f"preset {name}: downloading the Hub dataset {preset['repo']} failed ({type(e).__name__}: {e}).\n"
            f"Without network, fetch its files {preset['files']} elsewhere, e.g.\n"
            f"  hf download {preset['repo']} --repo-type dataset "
            + " ".join(f"--include '{p}'" for p in preset["files"]) +
            f" --local-dir {local_dir}\nthen pass them with --input.") from None
    files = sorted(p for pattern in preset["files"] for p in local_dir.glob(pattern) if p.is_file() and known_format(p))
    if not files:
        raise DataError(f"preset {name}: no input files matching {preset['files']} in {local_dir}")
    return files


# -----------------------------------------------------------------------------
# output helpers: everything is written under a temporary name and renamed when complete

class SplitWriter:
    """One split's output file (atomic.AtomicFile: PATH.tmp until committed) that counts its
    records and keeps the last one's bytes, so that the record can move to the validation
    split when the hash held none out (hold_out_one)."""

    def __init__(self, path):
        self.out = AtomicFile(path, "wb")
        self.path = self.out.path
        self.records, self.bytes, self.last = 0, 0, b""

    def append(self, data, n_records, last):
        """Append n_records whole records (bytes), the last of which is `last`."""
        if n_records:
            self.out.write(data)
            self.records, self.bytes, self.last = self.records + n_records, self.bytes + len(data), last

    def pop_last(self):
        """Take the last record back out of the file; returns its bytes (once: then last is empty)."""
        last = self.last
        with naming_errors(self.path):
            self.out.f.truncate(self.bytes - len(last))  # flushes first; the position stays at the end
            self.out.f.seek(0, os.SEEK_END)
        self.records, self.bytes, self.last = self.records - 1, self.bytes - len(last), b""
        return last


def largest_id(data):
    return int(np.frombuffer(data, dtype="<u2").max(initial=0))


class BinWriter(SplitWriter):
    """A .bin split: its records are documents of uint16 ids, and it knows their largest id
    (recorded in the meta; dataset.py checks it against the model's vocabulary)."""

    def __init__(self, path):
        super().__init__(path)
        self.max_before_last = 0  # the largest id of every document but the last

    def append_ids(self, ids, lengths):
        """Append documents: their ids one after another, and their lengths."""
        if len(lengths):
            cut = len(ids) - int(lengths[-1])
            self.max_before_last = max(self.max_before_last, largest_id(self.last), largest_id(ids[:cut]))
            self.append(ids.tobytes(), len(lengths), ids[cut:].tobytes())

    @property
    def max_id(self):
        return max(self.max_before_last, largest_id(self.last))


def hold_out_one(writers, what):
    """A requested validation split gets at least one record: when the hash picked none, the
    last training record moves there. That depends on the input alone, so the output stays the
    same for any worker count. Raises when there are too few records to spare one."""
    train, val = writers["train"], writers.get("val")
    if val is None or val.records:
        return
    if train.records < 2:
        raise DataError(f"{val.path}: cannot hold out a validation {what}: only {train.records} {what}(s) kept "
                        f"in all; add more input, or pass --val-fraction 0 for no validation split")
    last = train.pop_last()
    val.append(last, 1, last)  # (for a BinWriter too: val is empty, so its largest id is last's)
    print(f"  the hash held out none of the {train.records + 1:,} {what}s for validation: "
          f"the last one went to {val.path.name}")


def check_kept(writers, what, args, counts):
    """Refuse to finish with an empty output (nothing could use it), saying what was read
    (counts); hold out one record when the validation split got none."""
    train, kept = writers["train"], sum(w.records for w in writers.values())
    if kept == 0:
        raise DataError(f"{train.path}: no {what}s to write ({counts}); check the --input files and their fields")
    hold_out_one(writers, what)
    if train.records == 0:
        raise DataError(f"{train.path}: all {kept:,} {what}s were held out for validation "
                        f"(--val-fraction {args.val_fraction}); add more input or lower --val-fraction")


def remove_outputs(writers, paths):
    """After a failure: remove every output of this run, temporary or finished, so nothing
    half-done looks complete (clear_outputs removed the previous run's before it began)."""
    for w in writers:
        w.out.discard()
    for path in paths:
        with contextlib.suppress(OSError):  # the error being raised says more than this one would
            path.unlink(missing_ok=True)


def already_done(done_marker, force, what):
    """Whether a previous run finished (done_marker exists): then it is skipped, unless --force."""
    if done_marker.exists() and not force:
        print(f"{what}: {done_marker} exists, skipping (--force redoes it)")
        return True
    return False


def clear_outputs(outputs, files):
    """Remove previous outputs (the completion marker first), so a crash of this run never
    leaves old and new files mixed; refuse to overwrite an input."""
    inputs = {p.resolve() for p in files}
    for path in outputs:
        if path.resolve() in inputs or Path(str(path) + ".tmp").resolve() in inputs:
            raise DataError(f"output {path} is also an input; choose another --out")
    for path in outputs:
        with naming_errors(path):
            path.unlink(missing_ok=True)


def doc_hash(data):
    """64-bit key for exact-duplicate removal."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def is_val(data, fraction):
    """Deterministic held-out choice by a (cheap) hash of the bytes."""
    return zlib.crc32(data) < fraction * (1 << 32)


# -----------------------------------------------------------------------------
# pretrain: the input is cut into tasks (iter_tasks) that worker processes parse and tokenize
# (encode_chunk); the main process takes their results in input order, drops repeated
# documents and appends each split's ids to its .bin (write_bins). Outputs appear only when
# complete: the .bin files are written as .tmp and renamed once all the input is in, then the
# .json metas are written, the train meta last of all, so NAME.json exists only after a
# finished run (and a rerun without --force skips it).

class Task(NamedTuple):
    """A piece of one input file for a worker: a byte range (start, end) of whole lines that
    the worker reads itself (uncompressed JSONL and text), or the raw items [(line_no, item)]
    that the main process read (every other format)."""
    path: Path
    fmt: str
    byte_range: tuple | None = None
    items: list | None = None


@dataclass(frozen=True)
class EncodeSettings:
    """What every worker needs to turn records into documents and documents into ids alike;
    sent once, when the worker starts."""
    tokenizer_path: str
    vocab_size: int  # every id must be below it (and so fit uint16)
    min_tokens: int  # documents with fewer tokens (eos not counted) are dropped
    text_field: str | None
    template: str | None
    val_fraction: float
    dedup: bool  # hash every document, for the main process to drop repeats


@dataclass
class EncodedChunk:
    """A worker's result for one task, in what the main process needs to write it in input
    order. Its line numbers count from the task's first line when relative_lines (a byte
    range: the worker cannot know where in the file it starts), else from the file's."""
    path: Path
    relative_lines: bool
    n_lines: int  # lines a byte range spans: where the file's next range starts
    held_out: np.ndarray  # per kept document, in input order: True if it goes to val
    hashes: np.ndarray | None  # per kept document, in input order: doc_hash (with --dedup)
    n_read: int  # records read, bad ones included
    n_short: int  # documents dropped for fewer than min_tokens tokens
    bad: list  # (line_no, message) per bad record
    out_of_vocab: tuple | None  # (line_no, message) of the first kept document with an id >= vocab_size
    train: tuple  # (uint16 ids of the split's kept documents, each followed by eos; their lengths)
    val: tuple


def iter_tasks(files, chunk_bytes):
    """Work for the pool, cut at points that depend on the input only, never on the worker
    count (so the output does not either)."""
    for path in files:
        fmt = input_format(path)
        if fmt in ("jsonl", "text") and not path.name.endswith(".gz"):
            yield from byte_range_tasks(path, fmt, chunk_bytes)
        else:
            yield from item_tasks(path, fmt, chunk_bytes)


def byte_range_tasks(path, fmt, chunk_bytes):
    """Ranges of about chunk_bytes, each ending at a line end, for the workers to read: the
    main process only seeks, it never reads the data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = 0
        while start < size:
            f.seek(min(start + chunk_bytes, size))
            f.readline()  # on to the start of the next line
            yield Task(path, fmt, byte_range=(start, f.tell()))
            start = f.tell()


def item_tasks(path, fmt, chunk_bytes):
    """The file's raw items, read here, in tasks of about chunk_bytes of text."""
    items, size = [], 0
    for line_no, item in iter_raw(path, fmt):
        items.append((line_no, item))
        size += len(item) if isinstance(item, bytes) else sum(len(v) for v in item.values() if isinstance(v, str))
        if size >= chunk_bytes:
            yield Task(path, fmt, items=items)
            items, size = [], 0
    if items:
        yield Task(path, fmt, items=items)


# in the worker processes

_worker = {}  # in each worker process: its EncodeSettings and Tokenizer


def init_worker(settings):
    _worker.update(settings=settings, tokenizer=Tokenizer(settings.tokenizer_path))


def encode_chunk(task):
    """One Task -> its EncodedChunk; runs in a worker process."""
    settings = _worker["settings"]
    items, n_lines = read_task(task)
    bad = []
    texts, lines, held_out, hashes = parse_documents(task.fmt, items, settings, bad)
    encoded = _worker["tokenizer"].encode_batch_numpy(texts, num_threads=1, eos=True)  # the pool is the parallelism
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    keep = lengths > settings.min_tokens
    in_train, in_val = keep & ~held_out, keep & held_out
    train_ids, val_ids = concat_ids(encoded, in_train), concat_ids(encoded, in_val)
    out_of_vocab = None
    if max(train_ids.max(initial=0), val_ids.max(initial=0)) >= settings.vocab_size:  # before uint16 cuts them
        out_of_vocab = first_out_of_vocab(encoded, keep, lines, settings.vocab_size)
    return EncodedChunk(path=task.path, relative_lines=task.byte_range is not None, n_lines=n_lines,
                        held_out=held_out[keep], hashes=hashes[keep] if settings.dedup else None,
                        n_read=len(texts) + len(bad), n_short=int((~keep).sum()), bad=bad, out_of_vocab=out_of_vocab,
                        train=(train_ids.astype("<u2"), lengths[in_train]), val=(val_ids.astype("<u2"), lengths[in_val]))


def read_task(task):
    """The task's raw items, and the number of lines its byte range spans (0 for items)."""
    if task.byte_range is None:
        return task.items, 0
    start, end = task.byte_range
    with open(task.path, "rb") as f:
        f.seek(start)
        block = f.read(end - start)
    items = [(i, line) for i, line in enumerate(block.split(b"\n"), 1) if line and not line.isspace()]
    return items, block.count(b"\n")


def parse_documents(fmt, items, settings, bad):
    """Raw items -> per document, in input order: its text, line, held-out flag and (with
    --dedup) hash. Bad records are appended to `bad` as (line_no, message)."""
    texts, lines, held_out, hashes = [], [], [], []
    for line_no, record in parse_items(fmt, items, lambda line_no, message: bad.append((line_no, message))):
        try:
            text, text_bytes = document_text(record, settings.text_field, settings.template)
        except DataError as e:
            bad.append((line_no, str(e)))
            continue
        texts.append(text)
        lines.append(line_no)
        held_out.append(is_val(text_bytes, settings.val_fraction))
        if settings.dedup:
            hashes.append(doc_hash(text_bytes))
    return texts, lines, np.asarray(held_out, dtype=bool), np.asarray(hashes, dtype=np.uint64)


def concat_ids(encoded, mask):
    """The id arrays of the documents in `mask`, one after another."""
    return np.concatenate(list(compress(encoded, mask)) or [np.empty(0, dtype=np.int32)])


def first_out_of_vocab(encoded, keep, lines, vocab_size):
    """Every id must be < vocab_size (and so fit uint16) before it is written: (line, message)
    of the first kept document breaking that."""
    for doc, kept, line in zip(encoded, keep, lines):
        if kept and doc.max() >= vocab_size:
            return line, (f"token id {doc.max()} is outside the vocabulary (vocab size {vocab_size}); "
                          f"is the tokenizer the right one?")
    return None


# in the main process

def cmd_pretrain(args):
    """Text corpora -> NAME.bin + NAME.json, and a held-out share -> NAME_val.bin + NAME_val.json;
    NAME.json, which marks a finished run, is removed first and written last."""
    paths = pretrain_paths(args.out)
    if already_done(paths["train"][1], args.force, "pretrain"):
        return
    tokenizer = load_tokenizer(args.tokenizer)
    files = resolve_inputs(args, "pretrain")
    outputs = [paths["train"][1], paths["val"][1], paths["train"][0], paths["val"][0]]  # the marker first
    clear_outputs(outputs, files)
    settings = encode_settings(args, tokenizer)
    bins, t0 = {}, time.time()
    try:
        bins["train"] = BinWriter(paths["train"][0])
        if args.val_fraction > 0:
            bins["val"] = BinWriter(paths["val"][0])
        stats, bad = write_bins(files, settings, bins, args)
        check_kept(bins, "document", args, f"read {stats['read']:,} records, {bad.count:,} bad, {stats['short']:,} "
                   f"shorter than --min-tokens {args.min_tokens}, {stats['duplicate']:,} duplicates")
        for b in bins.values():  # every .bin complete before a meta names it
            b.out.commit()
        seconds = time.time() - t0
        summary = dict(documents_read=stats["read"], dropped_short=stats["short"], dropped_duplicate=stats["duplicate"],
                       skipped_bad=bad.count, seconds=round(seconds, 2), workers=args.workers)
        write_metas(paths, bins, files, settings, tokenizer, summary)
    except BaseException:
        remove_outputs(bins.values(), outputs)
        raise
    print_pretrain_summary(bins, stats, bad, args, seconds)


def pretrain_paths(out):
    """{split: (.bin path, .json path)} for --out NAME (or NAME.bin)."""
    out = out[:-4] if out.endswith(".bin") else out
    return {split: (Path(f"{out}{suffix}.bin"), Path(f"{out}{suffix}.json")) for split, suffix in (("train", ""), ("val", "_val"))}


def encode_settings(args, tokenizer):
    """The workers' settings: a preset's text field is the default field, and the template's
    escapes \\n and \\t become a newline and a tab."""
    text_field = args.text_field or next((PRESETS["pretrain"][p].get("text_field") for p in args.preset or []), None)
    template = args.template.replace("\\n", "\n").replace("\\t", "\t") if args.template else None
    return EncodeSettings(tokenizer_path=str(tokenizer.path), vocab_size=tokenizer.vocab_size,
                          min_tokens=args.min_tokens, text_field=text_field, template=template,
                          val_fraction=args.val_fraction, dedup=args.dedup)


def write_bins(files, settings, bins, args):
    """Encode the files on args.workers processes and append the documents of every chunk to
    their split's BinWriter in input order, without repeats (--dedup). Returns (stats, the
    BadCounter): it stops the run at a bad record, or counts them (--skip-bad)."""
    stats, bad = Counter(), BadCounter(args.skip_bad)
    seen = set() if settings.dedup else None  # hashes of the documents so far
    pbar = tqdm(unit="doc", unit_scale=True, desc=f"pretrain {bins['train'].path.name}", smoothing=0.1)
    t0 = time.time()
    chunks = map_ordered(encode_chunk, iter_tasks(files, args.chunk_bytes), args.workers, init_worker, (settings,))
    for chunk, line_offset in with_line_offsets(chunks):
        report_problems(chunk, line_offset, bad)
        new = first_seen(chunk, seen)
        stats.update(read=chunk.n_read, short=chunk.n_short, duplicate=int((~new).sum()))
        append_chunk(chunk, new, bins)
        tokens = sum(b.bytes // 2 for b in bins.values())
        pbar.update(chunk.n_read)
        pbar.set_postfix_str(f"{tokens / max(time.time() - t0, 1e-9) / 1e3:,.0f}k tok/s", refresh=False)
    pbar.close()
    return stats, bad


def with_line_offsets(chunks):
    """(chunk, offset) per chunk: the chunk's line numbers + offset are its file's. A byte
    range counts lines from its own start, so its offset is the lines of the earlier ranges."""
    path, first_line = None, 0
    for chunk in chunks:
        if chunk.path != path:
            path, first_line = chunk.path, 0
        yield chunk, first_line if chunk.relative_lines else 0
        first_line += chunk.n_lines


def report_problems(chunk, line_offset, bad):
    """Stop at an id outside the vocabulary; hand the bad records to `bad`, with file and line."""
    if chunk.out_of_vocab:
        line_no, message = chunk.out_of_vocab
        raise DataError(f"{chunk.path}:{line_no + line_offset}: {message}")
    for line_no, message in chunk.bad:
        bad(chunk.path, line_no + line_offset, message)


def first_seen(chunk, seen):
    """Per kept document of the chunk, in input order: False if an earlier one had its hash.
    `seen` collects the hashes; None (no --dedup) lets every document through."""
    new = np.ones(len(chunk.held_out), dtype=bool)
    if seen is not None:
        for i, h in enumerate(chunk.hashes.tolist()):
            new[i] = h not in seen
            seen.add(h)
    return new


def append_chunk(chunk, new, bins):
    """Append the chunk's documents marked in `new` to their split's .bin."""
    for split, (ids, lengths), in_split in (("train", chunk.train, ~chunk.held_out), ("val", chunk.val, chunk.held_out)):
        new_in_split = new[in_split]
        if not new_in_split.all():  # repeats: drop their ids
            ids, lengths = ids[np.repeat(new_in_split, lengths)], lengths[new_in_split]
        if split in bins:
            bins[split].append_ids(ids, lengths)


def write_metas(paths, bins, files, settings, tokenizer, summary):
    """A .json per split that describes its .bin; the train meta last: it marks completion."""
    for split in sorted(bins, key=lambda s: s == "train"):
        meta = dict(tokenizer=tokenizer.identity(), vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
                    dtype="uint16", n_tokens=bins[split].bytes // 2, max_id=bins[split].max_id,
                    n_documents=bins[split].records,
                    split=split, sources=[str(p) for p in files], val_fraction=settings.val_fraction,
                    min_tokens=settings.min_tokens, dedup=settings.dedup, text_field=settings.text_field,
                    template=settings.template, summary=summary)
        write_json_atomic(paths[split][1], meta)


def print_pretrain_summary(bins, stats, bad, args, seconds):
    tokens = sum(b.bytes // 2 for b in bins.values())
    print(f"read {stats['read']:,} documents in {seconds:.1f}s ({stats['read'] / seconds:,.0f} docs/s, "
          f"{tokens / seconds:,.0f} tokens/s, {args.workers} workers)")
    for split, b in bins.items():
        print(f"  {split:5s} {b.path}: {b.records:,} documents, {b.bytes // 2:,} tokens, {b.bytes:,} bytes")
    print(f"  dropped: {stats['short']:,} with < {args.min_tokens} tokens, {stats['duplicate']:,} duplicates"
          + (f", {bad.count:,} bad records skipped" if args.skip_bad else ""))
    for message in bad.examples:
        print(f"    e.g. {message}")


# -----------------------------------------------------------------------------
# sft / eval: records -> (prompt, answer) examples -> filters -> normalized JSONL

def alpaca_question(instruction, input_text):
    return instruction if not input_text.strip() else instruction + "\n" + input_text


USER_ROLES, ASSISTANT_ROLES = {"human", "user"}, {"gpt", "assistant", "bot", "chatgpt"}


def conversation_examples(messages):
    """ShareGPT {from,value} or chat {role,content} turns -> one example per assistant turn, its
    prompt made by prompt.context_prompt from the turns before it and the last system text."""
    if not isinstance(messages, list):
        raise DataError("'conversations' must be a list of turns")
    system, turns, question = "", [], None
    examples = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"turn {i} is not an object")
        role = str(m.get("from", m.get("role", ""))).lower()
        text = string_field(m, "value" if "value" in m else "content").strip()
        if role == "system":
            system = text
        elif role in USER_ROLES and question is None:
            question = text
        elif role in ASSISTANT_ROLES and question is not None:
            examples.append((context_prompt(turns, question, system), text))
            turns.append((question, text))
            question = None
        else:
            raise DataError(f"turn {i} ({role or 'no role'}): turns must alternate user and assistant")
    return examples


def record_examples(record, prompt_field=None, answer_field=None):
    """One input record -> [(prompt, answer)]."""
    if not (prompt_field or answer_field):
        if "conversations" in record or "messages" in record:
            return conversation_examples(record.get("conversations", record.get("messages")))
        if "instruction" in record:
            history = record.get("history") or []
            if not all(isinstance(t, (list, tuple)) and len(t) == 2 for t in history):
                raise DataError("'history' must be a list of [question, answer] pairs")
            question = alpaca_question(string_field(record, "instruction").strip(),
                                       string_field(record, "input", required=False).strip())
            return [(context_prompt(history, question), string_field(record, "output").strip())]
    prompt_field = prompt_field or next((f for f in PROMPT_FIELDS if f in record), PROMPT_FIELDS[0])
    answer_field = answer_field or next((f for f in ANSWER_FIELDS if f in record), ANSWER_FIELDS[0])
    return [(string_field(record, prompt_field).strip(), string_field(record, answer_field).strip())]


def normalize_question(text):
    """Comparison key: NFKC, lower case, no whitespace, punctuation or symbols."""
    return re.sub(r"[\W_]+", "", unicodedata.normalize("NFKC", text).lower())


class QuestionIndex:
    """Normalized evaluation questions; a prompt matches one if it equals it or contains it."""

    def __init__(self, questions):
        self.exact = set()
        self.by_start = defaultdict(list)  # first SUBSTRING_MIN_CHARS chars -> questions
        for q in map(normalize_question, questions):
            self.exact.add(q)
            if len(q) >= SUBSTRING_MIN_CHARS:
                self.by_start[q[:SUBSTRING_MIN_CHARS]].append(q)

    def __len__(self):
        return len(self.exact)

    def matches(self, prompt):
        key = normalize_question(prompt)
        if key in self.exact:
            return True
        for i in range(len(key) - SUBSTRING_MIN_CHARS + 1):
            for q in self.by_start.get(key[i:i + SUBSTRING_MIN_CHARS], ()):
                if key.startswith(q, i):
                    return True
        return False


def iter_examples(files, args, bad):
    for path in files:
        for line_no, record in iter_records(path, bad):
            try:
                examples = record_examples(record, args.prompt_field, args.answer_field)
                for prompt, answer in examples:
                    utf8(prompt + answer)
            except DataError as e:
                bad(path, line_no, str(e))
                continue
            yield from examples


def length_reason(prompt, answer, tokenizer, args):
    """Why an example fails the token-length filters, or None."""
    n_prompt, n_answer = len(tokenizer.encode(prompt)), len(tokenizer.encode(answer))
    if args.max_prompt_tokens and n_prompt > args.max_prompt_tokens:
        return "prompt_too_long"
    if args.max_answer_tokens and n_answer > args.max_answer_tokens:
        return "answer_too_long"
    if args.min_answer_tokens and n_answer < args.min_answer_tokens:
        return "answer_too_short"
    if args.max_tokens and n_prompt + n_answer + 2 > args.max_tokens:  # + bos + eos
        return "too_long"
    return None


def write_examples(examples, outputs, kind, excluded, tokenizer, args):
    """Filter the (prompt, answer) examples and append each kept one to its split as a JSON
    line; returns the counts: read, and dropped per reason."""
    keys = ("prompt", "answer") if kind == "sft" else ("question", "answer")
    stats, seen = Counter(), set()
    for prompt, answer in tqdm(examples, unit="ex", desc=f"{kind} {outputs['train'].path.name}"):
        stats["read"] += 1
        reason = ("empty" if not prompt or not answer else
                  "in_eval_set" if excluded and excluded.matches(prompt) else
                  length_reason(prompt, answer, tokenizer, args) if tokenizer else None)
        if reason is None and args.dedup:
            h = doc_hash(f"{prompt}\0{answer}".encode("utf-8"))
            reason = "duplicate" if h in seen else None
            seen.add(h)
        if reason:
            stats[reason] += 1
            continue
        split = "val" if "val" in outputs and is_val(prompt.encode("utf-8"), args.val_fraction) else "train"
        line = (json.dumps(dict(zip(keys, (prompt, answer))), ensure_ascii=False) + "\n").encode("utf-8")
        outputs[split].append(line, 1, line)
    return stats


def cmd_examples(args, kind):
    """sft and eval: write normalized JSONL (and a validation split for sft)."""
    out = Path(args.out if args.out.endswith(".jsonl") else args.out + ".jsonl")
    val_out = out.with_name(out.stem + "_val.jsonl")
    val_fraction = getattr(args, "val_fraction", 0.0)
    if already_done(out, args.force, kind):
        return
    files = resolve_inputs(args, kind)
    clear_outputs([out, val_out], files)
    length_filters = any((args.max_prompt_tokens, args.max_answer_tokens, args.min_answer_tokens, args.max_tokens))
    tokenizer = load_tokenizer(args.tokenizer) if length_filters else None
    excluded = QuestionIndex(q for q, _ in iter_examples(expand_inputs([args.exclude_questions]), args, BadCounter(False))) \
        if args.exclude_questions else None
    bad = BadCounter(args.skip_bad)
    outputs = {}
    try:
        outputs["train"] = SplitWriter(out)
        if val_fraction > 0:
            outputs["val"] = SplitWriter(val_out)
        stats = write_examples(iter_examples(files, args, bad), outputs, kind, excluded, tokenizer, args)
        check_kept(outputs, "example", args, f"read {stats['read']:,} examples"
                   + "".join(f", {n:,} {reason}" for reason, n in stats.items() if reason != "read")
                   + (f", {bad.count:,} bad records" if bad.count else ""))
        for split in sorted(outputs, key=lambda s: s == "train"):  # the main file last: it marks completion
            outputs[split].out.commit()
    except BaseException:
        remove_outputs(outputs.values(), [out, val_out])
        raise
    print(f"{kind}: read {stats['read']:,} examples from {len(files)} files; wrote {outputs['train'].records:,} to {out}"
          + (f" and {outputs['val'].records:,} to {val_out}" if val_fraction > 0 else ""))
    dropped = {r: stats[r] for r in ("empty", "in_eval_set", "duplicate", "prompt_too_long", "answer_too_long",
                                     "answer_too_short", "too_long") if stats[r]}
    if excluded:
        print(f"  excluded {stats['in_eval_set']:,} examples whose question is in {args.exclude_questions} "
              f"({len(excluded):,} questions)")
    print(f"  dropped: {dropped or 'none'}" + (f"; {bad.count:,} bad records skipped" if args.skip_bad else ""))
    for message in bad.examples:
        print(f"    e.g. {message}")


# -----------------------------------------------------------------------------
# tokenizer: train an own SentencePiece vocabulary on a sample of documents

def cmd_tokenizer(args):
    out = Path(args.out)
    if already_done(out, args.force, "tokenizer"):
        return
    files = resolve_inputs(args, "pretrain")
    clear_outputs([out], files)
    template = args.template.replace("\\n", "\n") if args.template else None
    rng = random.Random(args.seed)
    sample, seen = [], 0
    bad = BadCounter(args.skip_bad)
    for path in tqdm(files, unit="file", desc="sampling documents"):
        for line_no, record in iter_records(path, bad):
            try:
                text = document_text(record, args.text_field, template)[0]
            except DataError as e:
                bad(path, line_no, str(e))
                continue
            seen += 1  # reservoir sampling: a uniform sample whatever the corpus size
            if len(sample) < args.sample_docs:
                sample.append(text)
            elif (j := rng.randrange(seen)) < args.sample_docs:
                sample[j] = text
    lines = [line for doc in sample for line in doc.splitlines() if line.strip()]
    print(f"tokenizer: training a {args.vocab_size}-piece {args.model_type} vocabulary on {len(sample):,} of "
          f"{seen:,} documents ({len(lines):,} lines)")
    try:
        train_sentencepiece(lines, args.vocab_size, out, model_type=args.model_type,
                            character_coverage=args.character_coverage)
    except (RuntimeError, ValueError) as e:  # e.g. a vocabulary too small for the characters seen
        raise DataError(f"sentencepiece training failed: {e}") from None
    print(f"tokenizer: wrote {out}; pass it as --tokenizer {out}")


# -----------------------------------------------------------------------------
# command line

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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", formatter_class=argparse.ArgumentDefaultsHelpFormatter, help="text corpora -> uint16 token .bin + .json meta")
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

    p = sub.add_parser("sft", formatter_class=argparse.ArgumentDefaultsHelpFormatter, help="SFT sets -> normalized JSONL {prompt, answer}")
    add_example_flags(p, "sft")
    p.add_argument("--val-fraction", type=float, default=SFT_VAL_FRACTION, help="share of examples held out to NAME_val.jsonl (chosen by hash of the prompt)")

    p = sub.add_parser("eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter, help="QA sets -> JSONL {question, answer}")
    add_example_flags(p, "eval")

    p = sub.add_parser("tokenizer", formatter_class=argparse.ArgumentDefaultsHelpFormatter, help="train an own SentencePiece vocabulary")
    add_input_flags(p, "pretrain")
    add_text_flags(p)
    p.add_argument("--vocab-size", type=int, required=True, help="number of pieces (at most 65535, so uint16 holds every id)")
    p.add_argument("--out", required=True, help="output PATH.model")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"], help="SentencePiece model type")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters that get their own piece (0.98-1); the rest fall back to bytes. "
                        "Lower it when a small vocabulary cannot hold every Chinese character seen")
    p.add_argument("--sample-docs", type=int, default=TOKENIZER_SAMPLE_DOCS, help="documents sampled (uniformly) for training")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    commands = {"pretrain": cmd_pretrain, "sft": lambda a: cmd_examples(a, "sft"),
                "eval": lambda a: cmd_examples(a, "eval"), "tokenizer": cmd_tokenizer}
    try:
        commands[args.command](args)
    except (DataError, TokenizerNotFound, WriteError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
