"""Reading training corpora: every input file as a stream of records, in bounded memory.

Formats. An input file is JSONL (one JSON object per line; also .ndjson, and a .json file that
does not start with "["), a JSON array of objects, CSV or TSV with a header row, Parquet, or
plain text (one document per line); all but Parquet may be gzip-compressed (NAME.jsonl.gz).
The file name tells the format (FORMATS); input_format() looks inside a .json file.

Records. iter_records(path, bad) yields (line_no, record dict) for every record of a file,
numbered by the line it starts on (the row, in Parquet), so every message can say file:line.
A bad record (malformed JSON, not an object, non-UTF-8 bytes, a missing field) goes to `bad`:
a BadCounter stops the run at the first, or with --skip-bad counts them and goes on.
document_text() makes a record into a document's text: one field, or a template of several;
sample_documents() draws a uniform sample of a corpus's documents (for training a vocabulary).

Streaming, bounded memory. No file is read whole: line formats go line by line, Parquet in
batches, and a JSON array, one value that may be gigabytes long, element by element
(iter_json_array). Memory follows the largest record, never the size of the corpus.

Two stages. iter_raw() only cuts a file into raw items (a line's bytes, or a parsed dict) and
parse_items() makes them records, so the cheap cutting can run in one process and the costly
parsing (and what follows it, such as tokenizing) in many.

Ordered parallel map. map_ordered(fn, tasks, workers, ...) runs fn over the tasks in worker
processes and yields the results in task order, with a bounded number of tasks in flight: the
output is the same for any number of workers, and memory stays bounded however many tasks come.
"""
import contextlib
import csv
import glob
import gzip
import json
import os
import random
import re
import threading
import time
import zlib
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from tqdm import tqdm

from refusal import Refusal

TEXT_FIELDS = ("text", "content", "completion")  # tried in order when no field is named


class DataError(Refusal):
    """Bad input or a refused run; the message names the file and line."""


# -----------------------------------------------------------------------------
# files and their formats

NOT_UTF8 = "inputs are read as UTF-8; a GBK file converts with iconv -f GBK -t UTF-8 IN > OUT"
CSV_FIELD_LIMIT = 1 << 30  # characters per CSV field; the csv module's own limit (128 KiB) refuses long documents
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv",
           ".parquet": "parquet", ".txt": "text", ".text": "text", ".md": "text"}


def format_suffix(path):
    """The suffix that names a file's format, under any .gz: a.JSONL.gz -> .jsonl"""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return Path(name).suffix.lower()


def known_format(path):
    """Whether the file's name says a format (directories are searched for such files)."""
    return format_suffix(path) in FORMATS


@contextlib.contextmanager
def gzip_errors(path):
    """A truncated .gz, or a plain file named .gz, fails the whole file: DataError naming it
    (--skip-bad skips bad records, not a file whose rest cannot be read)."""
    try:
        yield
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: damaged gzip file ({e}); re-download it, or decompress it to find the damage") from None


def input_format(path):
    """An input file's format: by its name, and for .json by its first character."""
    fmt = FORMATS.get(format_suffix(path))
    if fmt == "json":  # a .json file may hold one array or one object per line
        with gzip_errors(path), open_text(path) as f:
            head = f.read(4096).lstrip()
        fmt = "json" if head.startswith("[") else "jsonl"
    if fmt == "parquet" and path.name.endswith(".gz"):
        raise DataError(f"{path}: gzip-compressed Parquet is not supported (Parquet compresses itself)")
    return fmt


def expand_inputs(specs):
    """Files, directories (searched recursively for known formats) and globs -> sorted file list."""
    files = []
    for spec in specs:
        if Path(spec).is_dir():
            found = [p for p in Path(spec).rglob("*") if p.is_file() and known_format(p)]
        else:
            found = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
        if not found:
            raise DataError(f"--input {spec}: no such file, or no input files in it")
        files += sorted(found)
    return files


def open_binary(path):
    """The file's bytes, decompressed if its name ends in .gz."""
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def open_text(path):
    """The file as UTF-8 text, decompressed if its name ends in .gz; a byte-order mark at the
    start (Excel's "CSV UTF-8") is dropped. Bytes that are not UTF-8 survive decoding as
    surrogates (surrogateescape), to be reported per record by utf8()."""
    return (gzip.open(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="")
            if path.name.endswith(".gz") else open(path, encoding="utf-8-sig", errors="surrogateescape", newline=""))


# -----------------------------------------------------------------------------
# records: a file cut into raw items as it streams in, then parsed

def iter_raw(path, fmt):
    """(line_no, item) per record: raw bytes for line formats (parsed later, possibly in a
    worker process), a dict for JSON arrays, CSV and Parquet."""
    with gzip_errors(path):
        yield from iter_raw_items(path, fmt)


def iter_raw_items(path, fmt):
    if fmt in ("jsonl", "text"):
        with open_binary(path) as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield line_no, line
    elif fmt == "json":
        with open_text(path) as f:
            yield from iter_json_array(f, path)
    elif fmt == "csv":
        csv.field_size_limit(CSV_FIELD_LIMIT)
        with open_text(path) as f:
            delimiter = "\t" if ".tsv" in path.name else ","
            reader = csv.DictReader(f, delimiter=delimiter)
            line_no = 2  # first data line (after the header)
            for row in reader:
                yield line_no, row
                line_no = reader.line_num + 1
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        row = 0
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
                for record in batch.to_pylist():
                    row += 1
                    yield row, record
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file after row {row} (truncated or damaged?): "
                            f"{str(e).splitlines()[0]}") from None
    else:
        raise DataError(f"{path}: unknown input format (known: {', '.join(sorted(FORMATS))}, optionally .gz)")


WHITESPACE = re.compile(r"\s*")


def iter_json_array(f, path, block=1 << 20):
    """(line_no, element) for the elements of the top-level JSON array in the text stream f,
    read `block` characters at a time: memory holds a block and an element, never the file."""
    text = BlockCursor(f, block)
    if text.peek() != "[":
        raise DataError(f"{path}:{text.line}: expected a JSON array")
    text.pos += 1
    while True:
        c = text.peek()
        if c == "]":
            return
        if c == "":
            raise DataError(f"{path}:{text.line}: the JSON array is not closed")
        line = text.line
        yield line, text.json_value(path)
        c = text.peek()
        if c == ",":
            text.pos += 1
        elif c not in ("]", ""):  # at the end of the input the loop reports the unclosed array
            raise DataError(f"{path}:{text.line}: expected ',' or ']' between array elements")


class BlockCursor:
    """A position in a text stream that is read a block at a time: the current block (buf),
    the position in it and the line number there."""
    decoder = json.JSONDecoder()

    def __init__(self, f, block):
        self.f, self.block = f, block
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False

    def peek(self):
        """Skip whitespace, reading blocks as needed; the next character, or "" at the end."""
        while True:
            end = WHITESPACE.match(self.buf, self.pos).end()
            self.line += self.buf.count("\n", self.pos, end)
            self.pos = end
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos:self.pos + 1]
            self.buf, self.pos = self.f.read(self.block), 0
            self.eof = not self.buf

    def json_value(self, path):
        """Decode the JSON value at the position and move past it. A value that runs past the
        block keeps its start and gets the next block appended, until it decodes or the input ends."""
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
                break
            except RecursionError:
                raise DataError(f"{path}:{self.line}: JSON nested too deeply to read") from None
            except json.JSONDecodeError as e:
                if self.eof:
                    line = self.line + self.buf.count("\n", self.pos, e.pos)
                    raise DataError(f"{path}:{line}: malformed JSON: {e.msg}") from None
                more = self.f.read(self.block)
                self.buf, self.pos, self.eof = self.buf[self.pos:] + more, 0, not more
        self.line += self.buf.count("\n", self.pos, end)
        self.pos = end
        return value


def parse_items(fmt, items, on_bad):
    """Raw items -> (line_no, record dict); bad ones go to on_bad(line_no, message)."""
    for line_no, item in items:
        try:
            record = parse_item(fmt, item)
        except json.JSONDecodeError as e:
            on_bad(line_no, f"malformed JSON: {e.msg} (column {e.colno})")
            continue
        except RecursionError:
            on_bad(line_no, "JSON nested too deeply to read")
            continue
        except DataError as e:
            on_bad(line_no, str(e))
            continue
        yield line_no, record


def parse_item(fmt, item):
    """One raw item -> its record dict, or DataError / JSONDecodeError saying what is wrong."""
    if fmt == "text":
        return {"text": decode_line(item).rstrip("\r\n")}
    record = json.loads(decode_line(item)) if fmt == "jsonl" else item
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    return record


def decode_line(raw):
    """A line's bytes as text (without a byte-order mark); DataError says where the first byte
    that is not UTF-8 is."""
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise DataError(f"non-UTF-8 bytes at byte {e.start} ({NOT_UTF8})") from None


def iter_records(path, bad):
    """(line_no, record dict) for every record of one input file; bad ones go to bad(path, ...)."""
    fmt = input_format(path)
    yield from parse_items(fmt, iter_raw(path, fmt), lambda line_no, message: bad(path, line_no, message))


def stop_at_bad(path, line_no, message):
    """The bad-record handler for files our own scripts wrote: the first bad record stops the run."""
    raise DataError(f"{path}:{line_no}: {message}")


class BadCounter:
    """Stops at the first bad record, or with --skip-bad counts them and keeps a few messages."""

    def __init__(self, skip):
        self.skip, self.count, self.examples = skip, 0, []

    def __call__(self, path, line_no, message):
        message = f"{path}:{line_no}: {message}"
        if not self.skip:
            raise DataError(message + "  (--skip-bad skips and counts such records)")
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(message)


# -----------------------------------------------------------------------------
# documents: a record's text

def string_field(record, field, required=True):
    """record[field], which must be a string; "" when it is missing and not required."""
    value = record.get(field)
    if value is None and not required:
        return ""
    if value is None:
        raise DataError(f"missing field '{field}' (fields: {', '.join(map(str, record)) or 'none'})")
    if not isinstance(value, str):
        raise DataError(f"field '{field}' is a {type(value).__name__}, expected a string")
    return value


def render(value):
    """A template value: lists (e.g. Baidu Baike sections) become their parts, one per line."""
    if isinstance(value, list):
        return "\n".join(render(v) for v in value)
    if isinstance(value, dict):
        return "\n".join(render(v) for v in value.values())
    return "" if value is None else str(value)


def document_text(record, text_field=None, template=None):
    """The document's text (str) and its UTF-8 bytes."""
    if template:
        try:
            text = template.format_map({k: render(v) for k, v in record.items()})
        except KeyError as e:
            raise DataError(f"missing field {e} used by --template") from None
    elif text_field:
        text = string_field(record, text_field)
    else:
        for field in TEXT_FIELDS:
            if field in record:
                break
        else:
            field = TEXT_FIELDS[0]  # named in the error
        text = string_field(record, field)
    return text, utf8(text)


def unescape_template(template):
    """A --template as typed on the command line: its escapes \\n and \\t become a newline and a tab."""
    return template.replace("\\n", "\n").replace("\\t", "\t") if template else None


def iter_document_texts(files, text_field, template, bad):
    """The text of every document of the files, in order; bad records go to bad(path, ...)."""
    for path in files:
        for line_no, record in iter_records(path, bad):
            try:
                text = document_text(record, text_field, template)[0]
            except DataError as e:
                bad(path, line_no, str(e))
                continue
            yield text


def sample_documents(files, n, text_field, template, bad, seed):
    """A uniform sample of up to n document texts of the files, whatever their size (reservoir
    sampling, seeded), and the number of documents read."""
    rng = random.Random(seed)
    sample, seen = [], 0
    with tqdm(files, unit="file", desc="sampling documents") as progress:  # closed on errors too
        for text in iter_document_texts(progress, text_field, template, bad):
            seen += 1
            if len(sample) < n:
                sample.append(text)
            elif (j := rng.randrange(seen)) < n:
                sample[j] = text
    return sample, seen


def utf8(text):
    """The text's UTF-8 bytes; DataError if it holds bytes that were not UTF-8 (see open_text)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # surrogates: undecodable input bytes, or a lone \ud800 escape
        raise DataError(f"non-UTF-8 bytes in the text ({NOT_UTF8})") from None


# -----------------------------------------------------------------------------
# an ordered parallel map

def start_pool_worker(parent_pid, initializer, initargs):
    """A worker exits when the main process is gone (killed), instead of waiting for work forever."""
    def watch_parent():
        while os.getppid() == parent_pid:
            time.sleep(1)
        os._exit(1)
    threading.Thread(target=watch_parent, daemon=True).start()
    initializer(*initargs)


def map_ordered(fn, tasks, workers, initializer, initargs):
    """fn over tasks on `workers` processes, results in task order. Up to 8 tasks per worker are
    in flight: enough that a worker rarely idles behind a slow task at the head of the queue,
    few enough that memory stays bounded however long `tasks` is."""
    if workers <= 1:
        initializer(*initargs)
        yield from map(fn, tasks)
        return
    # (concurrent.futures rather than multiprocessing.Pool, whose manager thread spins on results)
    with ProcessPoolExecutor(workers, initializer=start_pool_worker, initargs=(os.getpid(), initializer, initargs)) as pool:
        pending = deque()
        for task in tasks:
            pending.append((task, pool.submit(fn, task)))
            if len(pending) >= 8 * workers:
                yield result_of(*pending.popleft())
        while pending:
            yield result_of(*pending.popleft())


def result_of(task, future):
    """A task's result; a worker that died (the kernel kills the largest process when memory
    runs out) is a one-line error naming the task's file, never a traceback."""
    try:
        return future.result()
    except BrokenProcessPool:
        where = getattr(task, "path", "the input")
        raise DataError(f"{where}: a worker process died while reading it (killed, most likely for lack of memory): "
                        f"run again with fewer --workers or a smaller --chunk-bytes") from None
