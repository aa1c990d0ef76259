"""Atomic writes: the one way every output file of the project is written.

A file is written as NAME.RANDOM.tmp beside NAME and renamed to NAME only once it is complete
and on disk, so a reader never sees half a file: after a crash, NAME is either the previous
complete file or the new complete one, never a mix. The temporary file is created exclusively
(O_EXCL, O_NOFOLLOW) under a name nobody can predict, so a file or link planted in a shared
out dir can never be written through. A write that fails (disk full, read-only file system, no
permission) removes its NAME.tmp and raises WriteError, whose message names the file and
says what went wrong in words a user can act on.

    with AtomicFile("out/x.bin", "wb") as out:   # renamed into place when the block ends
        out.write(data)                           # normally; removed if it raises
    write_text_atomic("out/metrics.jsonl", text)
    write_json_atomic("out/x.json", obj)
"""
import contextlib
import errno
import json
import os
import secrets
from pathlib import Path

from refusal import Refusal

# errno -> what it means for the user who wanted to write a file
WRITE_PROBLEMS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file is larger than this file system or ulimit allows",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


class WriteError(Refusal):
    """An output file could not be written; the message names it and what to do."""


def write_error(error, path):
    """An OSError met while writing path -> a WriteError that says what happened in words."""
    problem = WRITE_PROBLEMS.get(error.errno, error.strerror or str(error))
    advice = "free some space and run again" if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else \
        "choose a writable output directory"
    return WriteError(f"cannot write {path}: {problem}; {advice}")


@contextlib.contextmanager
def naming_errors(path):
    """Turn an OSError raised inside the block into a WriteError naming path."""
    try:
        yield
    except OSError as e:
        raise write_error(e, path) from None


def exclusive(path, flags):
    """open()'s opener for temporary files: create a new file or fail, never follow a link."""
    return os.open(path, flags | os.O_EXCL | os.O_NOFOLLOW, 0o666)


class AtomicFile:
    """A file written as PATH.RANDOM.tmp and renamed to PATH by commit(); discard() removes the
    .tmp. As a context manager it commits when the block ends normally and discards when it
    raises. Write with .write(); code that needs the file object itself (torch.save) uses .f."""

    def __init__(self, path, mode="w"):
        self.path = Path(path)
        self.tmp = self.path.with_name(f"{self.path.name}.{secrets.token_hex(4)}.tmp")
        with naming_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(self.tmp, mode, opener=exclusive, **({} if "b" in mode else {"encoding": "utf-8"}))

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.discard()
            raise write_error(e, self.path) from None

    def commit(self):
        """Make PATH the complete file: flush, fsync (so a power cut cannot leave a renamed but
        empty file), close, rename."""
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.discard()
            raise write_error(e, self.path) from None

    def discard(self):
        with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
            self.f.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
            return False
        self.discard()
        # torch.save hides a failed write behind a RuntimeError of its own: the OSError is its context
        cause = exc if isinstance(exc, OSError) else exc.__context__
        if isinstance(cause, OSError):
            raise write_error(cause, self.path) from None
        return False


def write_text_atomic(path, text):
    with AtomicFile(path, "w") as out:
        out.write(text)


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")
