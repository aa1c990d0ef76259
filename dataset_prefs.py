"""Preference pairs: normalized JSONL ({"prompt", "chosen", "rejected"} per line) -> batches
for dpo.py.

Each answer is encoded as an SFT example is (dataset_sft.py): prompt_ids + [bos] + answer_ids
+ [eos], labels IGNORE_INDEX everywhere but the answer ids and the eos. Unlike SFT, the prompt
is never cut: both answers of a pair must follow the very same prompt, so a prompt that leaves
no room for an answer in the context is refused (file:line); an answer too long is cut from the
right (and gets no eos, since it did not end there).

A batch of B pairs is 2B rows, right-padded to the longest: the B chosen answers first, then
the B rejected ones in the same order, so row i and row B + i are one pair and one forward
pass scores both.
"""
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from corpus import DataError, iter_records, stop_at_bad
from dataset_sft import collate_sft
from model import IGNORE_INDEX
from prompt import answer_ids

PAIR_FIELDS = ("prompt", "chosen", "rejected")


def check_pair(prompt, chosen, rejected):
    """Why a (prompt, chosen, rejected) pair cannot teach a preference, or None."""
    if not chosen.strip() or not rejected.strip():
        return "empty answer (a pair needs two answers to compare)"
    if chosen.strip() == rejected.strip():
        return "chosen and rejected are the same answer (nothing to prefer)"
    return None


def read_pairs(path):
    """[(prompt, chosen, rejected, line_number)] of a normalized preference file; a malformed
    or useless row is refused naming path:line."""
    pairs = []
    for line_number, row in iter_records(Path(path), stop_at_bad):
        for name in PAIR_FIELDS:
            if not isinstance(row.get(name), str):
                raise DataError(f"{path}:{line_number}: field '{name}' is missing or not a string")
        reason = check_pair(row["prompt"], row["chosen"], row["rejected"])
        if reason:
            raise DataError(f"{path}:{line_number}: {reason}")
        pairs.append((row["prompt"], row["chosen"], row["rejected"], line_number))
    if not pairs:
        raise DataError(f"{path}: no preference pairs")
    return pairs


def answer_row(prompt_ids, answer_ids, bos_id, eos_id, max_seq_len):
    """(x, y) lists of one answer after its whole prompt, at most max_seq_len long: the answer
    (and its eos) cut from the right when it does not fit."""
    seq = (list(prompt_ids) + [bos_id] + list(answer_ids) + [eos_id])[:max_seq_len + 1]
    labels = [IGNORE_INDEX] * (len(prompt_ids) + 1) + seq[len(prompt_ids) + 1:]
    return seq[:-1], labels[1:]


class PreferenceDataset(Dataset):
    """The pairs of one normalized preference file, all encoded up front (a few thousand pairs
    is a large preference set); an item is ((x, y) chosen, (x, y) rejected)."""

    def __init__(self, path, tokenizer, max_seq_len):
        self.path = str(path)
        self.rows = []
        bos, eos = tokenizer.bos_id, tokenizer.eos_id
        for prompt, chosen, rejected, line_number in read_pairs(path):
            prompt_ids = tokenizer.encode(prompt)
            if len(prompt_ids) + 2 > max_seq_len:  # bos and at least one answer token must fit
                raise DataError(f"{path}:{line_number}: the prompt is {len(prompt_ids)} tokens, leaving no room for "
                                f"an answer in {max_seq_len} positions; drop such pairs (data_process.py prefs "
                                f"--max-prompt-tokens) or raise --max-seq-len")
            answers = answer_ids(tokenizer, chosen), answer_ids(tokenizer, rejected)
            if not all(answers):
                raise DataError(f"{path}:{line_number}: an answer encodes to no tokens")
            self.rows.append(tuple(answer_row(prompt_ids, a, bos, eos, max_seq_len) for a in answers))
        self.lengths = np.array([max(len(c[0]), len(r[0])) for c, r in self.rows], dtype=np.int64)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return tuple((torch.tensor(x, dtype=torch.long), torch.tensor(y, dtype=torch.long)) for x, y in self.rows[i])


def collate_pairs(batch, pad_id):
    """B pairs -> (x, y) of 2B right-padded rows: the chosen answers, then the rejected ones."""
    return collate_sft([chosen for chosen, _ in batch] + [rejected for _, rejected in batch], pad_id)
