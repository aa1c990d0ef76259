"""SFT examples: normalized JSONL ({"prompt", "answer"} per line) -> (x, y) token tensors.

One example is encoded as  prompt_ids + [bos] + answer_ids + [eos]  and trained with the usual
one-position shift (x = seq[:-1], y = seq[1:]). Labels are IGNORE_INDEX everywhere except the
answer ids and the eos, so the prediction made at the bos position targets the first answer id
and the one made at the last answer id targets eos.

Text is tokenized on the fly in the DataLoader workers. Batches are padded only to their longest
example (pad label IGNORE_INDEX, which model.py's loss leaves out of both its sum and its
denominator), and length_grouped_batches puts examples of similar length together so little
is padded.
"""
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from corpus import DataError, iter_records, stop_at_bad
from model import IGNORE_INDEX
from prompt import answer_ids, answers_ids


def read_sft_examples(path):
    """Return [(prompt, answer, line_number)] of a normalized SFT file; a malformed row is
    refused naming path:line. An empty prompt is allowed (the answer then follows bos alone);
    an empty answer is not."""
    examples = []
    for line_number, row in iter_records(Path(path), stop_at_bad):
        for field in ("prompt", "answer"):
            if not isinstance(row.get(field), str):
                raise DataError(f"{path}:{line_number}: field '{field}' is missing or not a string")
        if not row["answer"].strip():
            raise DataError(f"{path}:{line_number}: empty answer (an SFT example needs an answer to learn)")
        examples.append((row["prompt"], row["answer"], line_number))
    if not examples:
        raise DataError(f"{path}: no SFT examples")
    return examples


def build_example(prompt_ids, answer_ids, bos_id, eos_id, max_seq_len):
    """(x, y) lists for one example, each at most max_seq_len long.

    Too long a sequence keeps the answer's start: the prompt is cut from the left first (its
    end, nearest the answer, stays), then the answer from the right. A cut answer gets no eos,
    since it did not end there."""
    if not answer_ids:
        raise ValueError("empty answer: nothing to learn")
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    budget = max_seq_len + 1  # seq positions: x = seq[:-1] and y = seq[1:] get max_seq_len each
    answer_room = budget - 1  # everything after bos
    tail = list(answer_ids) + [eos_id]
    prompt_keep = min(len(prompt_ids), max(answer_room - len(tail), 0))
    prompt = list(prompt_ids[len(prompt_ids) - prompt_keep:])
    tail = tail[:answer_room - prompt_keep]
    seq = prompt + [bos_id] + tail
    labels = [IGNORE_INDEX] * (len(prompt) + 1) + tail
    return seq[:-1], labels[1:]


class SFTDataset(Dataset):
    """Examples of one normalized SFT JSONL file, tokenized when an item is fetched."""

    def __init__(self, path, tokenizer, max_seq_len):
        self.path = str(path)
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.examples = read_sft_examples(path)
        self.lengths = self._measure_lengths()

    def _measure_lengths(self, chunk=8192):
        """Positions each example fills (len(x) after truncation), for grouping by length.
        A multi-threaded encode pass that keeps only the counts; the ids themselves are made
        again in the workers, so memory stays one integer per example."""
        lengths = np.empty(len(self.examples), dtype=np.int64)
        progress = tqdm(total=len(self.examples), desc=f"measuring {self.path}", unit="ex",
                        disable=len(self.examples) <= chunk)
        for start in range(0, len(self.examples), chunk):
            part = self.examples[start:start + chunk]
            prompts = self.tokenizer.encode_batch([p for p, _, _ in part])
            answers = answers_ids(self.tokenizer, [a for _, a, _ in part])
            for i, (prompt_ids, answer_ids, (_, _, line_number)) in enumerate(zip(prompts, answers, part)):
                if not answer_ids:
                    raise DataError(f"{self.path}:{line_number}: the answer encodes to no tokens")
                lengths[start + i] = min(len(prompt_ids) + 1 + len(answer_ids), self.max_seq_len)
            progress.update(len(part))
        progress.close()
        return lengths

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        prompt, answer, _ = self.examples[i]
        tokenizer = self.tokenizer
        x, y = build_example(tokenizer.encode(prompt), answer_ids(tokenizer, answer), tokenizer.bos_id, tokenizer.eos_id,
                             self.max_seq_len)
        return torch.tensor(x, dtype=torch.long), torch.tensor(y, dtype=torch.long)


def collate_sft(batch, pad_id):
    """Right-pad (x, y) pairs to the batch's longest example: x with pad_id, y with
    IGNORE_INDEX, so padding is never a target. Causal attention means right padding cannot
    change what the real positions see."""
    length = max(len(x) for x, _ in batch)
    xs = torch.full((len(batch), length), pad_id, dtype=torch.long)
    ys = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    for row, (x, y) in enumerate(batch):
        xs[row, :len(x)] = x
        ys[row, :len(y)] = y
    return xs, ys


def length_grouped_batches(lengths, batch_size, seed, epoch, rank=0, world_size=1, megabatch=64):
    """This rank's micro-batches (lists of indices) for one epoch, grouped by length.

    The seeded order is cut into megabatches of `megabatch` global batches; each megabatch
    is sorted by length and cut into global batches of batch_size * world_size, and the
    global batches are shuffled, so a batch holds similar lengths (little padding) while
    the order stays random. Each rank takes its slice of every global batch: it reads only
    its shard, the ranks' batches have similar lengths (no rank waits long for another),
    and N processes see what one process with N times the batch sees. As in
    batches.epoch_batches, the order depends only on (seed, epoch) and the items short of a
    whole global batch are left out (different ones each epoch)."""
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch])
    global_batch = batch_size * world_size
    n_global = len(lengths) // global_batch
    if n_global == 0:
        raise DataError(f"{len(lengths)} training examples are fewer than one global batch of {global_batch}")
    order = rng.permutation(len(lengths))[:n_global * global_batch]
    chunk = global_batch * megabatch
    # a stable sort keeps equal lengths in their shuffled order
    order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in np.split(order, range(chunk, len(order), chunk))])
    return [order[g * global_batch + rank * batch_size: g * global_batch + (rank + 1) * batch_size].tolist()
            for g in rng.permutation(n_global)]
