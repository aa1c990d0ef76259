"""Pretraining data: windows of tokens from uint16 .bin files (made by data_process.py pretrain),
read through np.memmap so no file is ever loaded whole into memory.

Every id must be below the model's vocabulary size: an id past it would index outside the
embedding (on CPU an IndexError deep in the model; on GPU, where the loss pads the vocabulary,
possibly a silent wrong loss). So each file is checked when it is opened (its size, and the
largest id its meta records) and every window when it is read (one max over 513 ids), and a
bad id is reported with its file and offset before it reaches the model."""
import glob
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from corpus import DataError


def read_meta(bin_path):
    """The .json beside a .bin, checked against the file itself."""
    bin_path = Path(bin_path)
    path = bin_path.with_suffix(".json")
    if not path.is_file():
        raise DataError(f"{bin_path}: no meta file {path} (an unfinished data_process.py run leaves none)")
    again = f"re-run data_process.py pretrain to write {bin_path.name} and its meta again"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: damaged meta file ({type(e).__name__}: {e}); {again}") from None
    missing = [k for k in ("dtype", "n_tokens", "tokenizer", "vocab_size") if k not in meta] if isinstance(meta, dict) else ["all"]
    if missing:
        raise DataError(f"{path}: meta file without {', '.join(missing)}; {again}")
    if meta["dtype"] != "uint16":
        raise DataError(f"{path}: dtype {meta.get('dtype')!r}, expected 'uint16'")
    if bin_path.stat().st_size != 2 * meta["n_tokens"]:
        raise DataError(f"{bin_path}: {bin_path.stat().st_size} bytes, but its meta says {meta['n_tokens']} tokens "
                         f"({2 * meta['n_tokens']} bytes); the file is damaged or from another run")
    return meta


def max_token_id(bin_path, meta):
    """The largest id in a .bin: recorded in its meta by data_process.py; a meta written before
    it recorded one gets the file scanned (in blocks, so memory stays small)."""
    if "max_id" in meta:
        return meta["max_id"]
    print(f"{bin_path}: its meta has no max_id (made by an older data_process.py): scanning the file "
          f"once per run; re-run data_process.py pretrain to record it", flush=True)
    ids = np.memmap(bin_path, dtype="<u2", mode="r")
    return max((int(ids[i:i + (1 << 24)].max()) for i in range(0, len(ids), 1 << 24)), default=0)


def find_bin_files(patterns):
    """--data (a glob, a .bin, a directory, or a list of these) -> (train_files, val_files).
    Training files are every matching .bin except *_val.bin; val_files are the NAME_val.bin
    siblings of the training files that exist."""
    patterns = [patterns] if isinstance(patterns, (str, Path)) else list(patterns)
    found = []
    for pattern in map(str, patterns):
        matches = sorted(glob.glob(str(Path(pattern) / "*.bin")) if Path(pattern).is_dir() else glob.glob(pattern))
        if not matches:
            raise DataError(f"--data {pattern}: no .bin files match")
        found += [Path(m) for m in matches if m.endswith(".bin")]
    train = [p for p in dict.fromkeys(found) if not p.stem.endswith("_val")]
    val = [v for p in train if (v := p.with_name(p.stem + "_val.bin")).is_file()]
    if not train:
        raise DataError(f"--data {patterns}: only validation files (*_val.bin) match")
    return train, val


class PretrainDataset(Dataset):
    """PretrainDataset(files, max_seq_len, tokenizer_identity=None, vocab_size=None)

    files               one .bin path or a list of them (each with its .json meta beside it)
    max_seq_len         each item is a window of max_seq_len + 1 tokens -> (x, y), both int64
                        of length max_seq_len, y = x shifted by one. Windows start every
                        max_seq_len tokens within a file, so every token is a target once.
    tokenizer_identity  Tokenizer.identity() of the model's tokenizer (or a checkpoint's
                        "tokenizer" entry); a .bin made with another tokenizer (by sha256) is
                        refused with ValueError. None skips the check.
    vocab_size          the model's vocabulary size (default: the tokenizer's, else the
                        meta's); every id must be below it, checked per file on opening and
                        per window on reading (ValueError naming the file and offset).

    A plain map-style dataset (__len__/__getitem__) with items in file order: the sampler
    (batches.Batches) decides the order. Files are opened lazily in each DataLoader worker.
    """

    def __init__(self, files, max_seq_len, tokenizer_identity=None, vocab_size=None):
        self.files = [Path(files)] if isinstance(files, (str, Path)) else [Path(f) for f in files]
        if not self.files:
            raise DataError("PretrainDataset: no .bin files")
        self.max_seq_len = max_seq_len
        self.metas = [read_meta(f) for f in self.files]
        self.vocab_size = vocab_size or (tokenizer_identity or self.metas[0])["vocab_size"]
        for f, meta in zip(self.files, self.metas):
            if tokenizer_identity is not None and meta.get("tokenizer", {}).get("sha256") != tokenizer_identity.get("sha256"):
                raise DataError(
                    f"{f} was made with tokenizer {meta.get('tokenizer', {}).get('name')} "
                    f"(sha256 {meta.get('tokenizer', {}).get('sha256')}), but the model uses "
                    f"{tokenizer_identity.get('name')} (sha256 {tokenizer_identity.get('sha256')}); "
                    f"re-run data_process.py pretrain with the model's tokenizer")
            if (max_id := max_token_id(f, meta)) >= self.vocab_size:
                raise DataError(f"{f}: holds token id {max_id}, outside the model's vocabulary of {self.vocab_size}; "
                                 f"the file is damaged or was made with another tokenizer: re-run data_process.py pretrain")
        self.n_tokens = sum(m["n_tokens"] for m in self.metas)
        windows = [max(0, (m["n_tokens"] - 1) // max_seq_len) for m in self.metas]
        self.ends = np.cumsum(windows)  # window i lives in the first file with ends[file] > i
        if self.ends[-1] == 0:
            raise DataError(f"{[str(f) for f in self.files]}: fewer than max_seq_len + 1 = {max_seq_len + 1} tokens")
        self._memmaps = None

    def __len__(self):
        return int(self.ends[-1])

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.ends, i, side="right"))
        start = (i - (int(self.ends[k - 1]) if k else 0)) * self.max_seq_len
        if self._memmaps is None:
            self._memmaps = [np.memmap(f, dtype="<u2", mode="r") for f in self.files]
        ids = self._memmaps[k][start:start + self.max_seq_len + 1]
        if ids.max() >= self.vocab_size:  # the file changed on disk since its meta was written
            first = int(np.argmax(ids >= self.vocab_size))
            offset = start + first
            raise DataError(f"{self.files[k]}: token id {ids[first]} at token offset {offset:,} (byte {2 * offset:,}) is "
                             f"outside the model's vocabulary of {self.vocab_size}; the file is damaged: re-create it "
                             f"with data_process.py pretrain, then --resume from the last checkpoint")
        chunk = torch.from_numpy(ids.astype(np.int64))
        return chunk[:-1], chunk[1:]

    def __getstate__(self):  # DataLoader workers open their own memmaps (pickling one copies it)
        return {**self.__dict__, "_memmaps": None}
