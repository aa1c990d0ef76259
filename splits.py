"""The output splits of data_process.py: a training file and a held-out validation file,
written so that a crash never leaves anything that looks complete.

Each split is one SplitWriter (for pretraining a BinWriter), an atomic.AtomicFile: a .tmp file
while it grows, renamed to PATH by commit() only when the whole input is in. A run first
checks whether a previous one finished (already_done: its completion marker exists), removes
the previous outputs (clear_outputs) and, when it fails, removes everything of its own
(remove_outputs). check_kept refuses an output that nothing could use, and gives a requested
validation split at least one record (hold_out_one).

Which split a record goes to is decided by a hash of its bytes (is_val), and repeats are
found by another (doc_hash): both depend on the input alone, so the bytes written are the
same for any number of worker processes.
"""
import contextlib
import hashlib
import os
import zlib
from pathlib import Path

import numpy as np

from atomic import AtomicFile, naming_errors
from corpus import DataError


class SplitWriter:
    """One split's output file (atomic.AtomicFile: a .tmp file until committed) that counts its
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


def check_kept(writers, what, val_fraction, counts):
    """Refuse to finish with an empty output (nothing could use it), saying what was read
    (counts); hold out one record when the validation split got none."""
    train, kept = writers["train"], sum(w.records for w in writers.values())
    if kept == 0:
        raise DataError(f"{train.path}: no {what}s to write ({counts}); check the --input files and their fields")
    hold_out_one(writers, what)
    if train.records == 0:
        raise DataError(f"{train.path}: all {kept:,} {what}s were held out for validation "
                        f"(--val-fraction {val_fraction}); add more input or lower --val-fraction")


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
        if path.resolve() in inputs:
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
