"""The pretraining data pipeline: text corpora -> uint16 token ids in NAME.bin, in parallel.

The input is cut into tasks (iter_tasks) at points that depend on the input alone: byte ranges
of whole lines that a worker reads itself (uncompressed JSONL and text), or raw items that the
main process read (every other format). Worker processes parse and tokenize them
(encode_chunk -> EncodedChunk); the main process takes their results in input order
(corpus.map_ordered), drops repeated documents (--dedup) and appends each split's ids to its
.bin (write_bins). So the bytes written are the same for any number of workers.

Outputs appear only when complete: the .bin files are written as .tmp and renamed once all the
input is in, then the .json metas are written, the train meta last of all, so NAME.json exists
only after a finished run (and a rerun without --force skips it).
"""
import time
from collections import Counter
from dataclasses import dataclass
from itertools import compress
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from atomic import write_json_atomic
from chatglm_tokenizer import Tokenizer
from corpus import BadCounter, DataError, document_text, input_format, iter_raw, map_ordered, parse_items, unescape_template
from presets import preset_text_field
from splits import BinWriter, check_kept, clear_outputs, doc_hash, is_val, remove_outputs


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


# -----------------------------------------------------------------------------
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


# -----------------------------------------------------------------------------
# in the main process

def write_pretrain_data(files, tokenizer, paths, cfg):
    """Text corpora -> NAME.bin + NAME.json, and a held-out share -> NAME_val.bin + NAME_val.json
    (paths: pretrain_paths; cfg: the flags of data_process.py pretrain). NAME.json, which marks
    a finished run, is removed first and written last."""
    outputs = [paths["train"][1], paths["val"][1], paths["train"][0], paths["val"][0]]  # the marker first
    clear_outputs(outputs, files)
    settings = encode_settings(cfg, tokenizer)
    bins, t0 = {}, time.time()
    try:
        bins["train"] = BinWriter(paths["train"][0])
        if cfg.val_fraction > 0:
            bins["val"] = BinWriter(paths["val"][0])
        stats, bad = write_bins(files, settings, bins, cfg)
        check_kept(bins, "document", cfg.val_fraction, f"read {stats['read']:,} records, {bad.count:,} bad, "
                   f"{stats['short']:,} shorter than --min-tokens {cfg.min_tokens}, {stats['duplicate']:,} duplicates")
        for b in bins.values():  # every .bin complete before a meta names it
            b.out.commit()
        seconds = time.time() - t0
        summary = dict(documents_read=stats["read"], dropped_short=stats["short"], dropped_duplicate=stats["duplicate"],
                       skipped_bad=bad.count, seconds=round(seconds, 2), workers=cfg.workers)
        write_metas(paths, bins, files, settings, tokenizer, summary)
    except BaseException:
        remove_outputs(bins.values(), outputs)
        raise
    print_pretrain_summary(bins, stats, bad, cfg, seconds)


def pretrain_paths(out):
    """{split: (.bin path, .json path)} for --out NAME (or NAME.bin)."""
    out = out[:-4] if out.endswith(".bin") else out
    return {split: (Path(f"{out}{suffix}.bin"), Path(f"{out}{suffix}.json")) for split, suffix in (("train", ""), ("val", "_val"))}


def encode_settings(cfg, tokenizer):
    """The workers' settings: a preset's text field is the default field, and the template's
    escapes \\n and \\t become a newline and a tab."""
    text_field = cfg.text_field or preset_text_field(cfg.preset)
    template = unescape_template(cfg.template)
    return EncodeSettings(tokenizer_path=str(tokenizer.path), vocab_size=tokenizer.vocab_size,
                          min_tokens=cfg.min_tokens, text_field=text_field, template=template,
                          val_fraction=cfg.val_fraction, dedup=cfg.dedup)


def write_bins(files, settings, bins, cfg):
    """Encode the files on cfg.workers processes and append the documents of every chunk to
    their split's BinWriter in input order, without repeats (--dedup). Returns (stats, the
    BadCounter): it stops the run at a bad record, or counts them (--skip-bad)."""
    stats, bad = Counter(), BadCounter(cfg.skip_bad)
    seen = set() if settings.dedup else None  # hashes of the documents so far
    t0 = time.time()
    chunks = map_ordered(encode_chunk, iter_tasks(files, cfg.chunk_bytes), cfg.workers, init_worker, (settings,))
    with tqdm(unit="doc", unit_scale=True, desc=f"pretrain {bins['train'].path.name}", smoothing=0.1) as pbar:
        for chunk, line_offset in with_line_offsets(chunks):  # (the bar is closed on errors too)
            report_problems(chunk, line_offset, bad)
            new = first_seen(chunk, seen)
            stats.update(read=chunk.n_read, short=chunk.n_short, duplicate=int((~new).sum()))
            append_chunk(chunk, new, bins)
            tokens = sum(b.bytes // 2 for b in bins.values())
            pbar.update(chunk.n_read)
            pbar.set_postfix_str(f"{tokens / max(time.time() - t0, 1e-9) / 1e3:,.0f}k tok/s", refresh=False)
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


def print_pretrain_summary(bins, stats, bad, cfg, seconds):
    tokens = sum(b.bytes // 2 for b in bins.values())
    print(f"read {stats['read']:,} documents in {seconds:.1f}s ({stats['read'] / seconds:,.0f} docs/s, "
          f"{tokens / seconds:,.0f} tokens/s, {cfg.workers} workers)")
    for split, b in bins.items():
        print(f"  {split:5s} {b.path}: {b.records:,} documents, {b.bytes // 2:,} tokens, {b.bytes:,} bytes")
    print(f"  dropped: {stats['short']:,} with < {cfg.min_tokens} tokens, {stats['duplicate']:,} duplicates"
          + (f", {bad.count:,} bad records skipped" if cfg.skip_bad else ""))
    for message in bad.examples:
        print(f"    e.g. {message}")

