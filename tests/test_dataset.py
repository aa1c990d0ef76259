import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from dataset import PretrainDataset, find_bin_files
from refusal import Refusal


def write_bin(path, tokens, identity):
    tokens = np.asarray(tokens, dtype="<u2")
    tokens.tofile(path)
    meta = dict(tokenizer=identity, vocab_size=identity["vocab_size"], eos_id=2, dtype="uint16",
                n_tokens=len(tokens), max_id=int(tokens.max(initial=0)), n_documents=1, sources=["test"])
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def test_windows_cover_every_token_once_and_shift_by_one(tmp_path, tiny_tokenizer):
    ident = tiny_tokenizer.identity()
    a = write_bin(tmp_path / "a.bin", np.arange(0, 35) % 400, ident)  # 4 windows of 8 (+1)
    b = write_bin(tmp_path / "b.bin", np.arange(100, 120), ident)  # 2 windows
    ds = PretrainDataset([a, b], max_seq_len=8, tokenizer_identity=ident)
    assert len(ds) == 4 + 2
    x, y = ds[0]
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (8,)
    assert x.tolist() == list(range(8)) and y.tolist() == list(range(1, 9))
    assert ds[3][1].tolist() == list(range(25, 33))  # last full window of a.bin
    assert ds[4][0].tolist() == list(range(100, 108))  # windows never cross files
    targets = [t for i in range(4) for t in ds[i][1].tolist()]
    assert targets == list(range(1, 33))  # every token of a.bin but the first is a target once


def test_distributed_sampler_splits_items_across_ranks(tmp_path, tiny_tokenizer):
    f = write_bin(tmp_path / "a.bin", np.arange(0, 161) % 400, tiny_tokenizer.identity())
    ds = PretrainDataset(f, 8)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=False)
        loader = DataLoader(ds, batch_size=5, sampler=sampler, num_workers=1 if rank else 0)
        seen.append([x[0].item() for xb, _ in loader for x in xb])
    assert len(seen[0]) == len(seen[1]) == 10
    assert sorted(seen[0] + seen[1]) == list(range(0, 160, 8))


def test_refuses_other_tokenizer_and_damaged_files(tmp_path, tiny_tokenizer):
    ident = tiny_tokenizer.identity()
    f = write_bin(tmp_path / "a.bin", np.arange(50), ident)
    other = {**ident, "name": "chatglm2", "sha256": "0" * 64}
    with pytest.raises(Refusal, match="a.bin was made with tokenizer"):
        PretrainDataset(f, 8, tokenizer_identity=other)
    with open(f, "ab") as out:
        out.write(b"\0\0")  # a token more than the meta says
    with pytest.raises(Refusal, match="damaged"):
        PretrainDataset(f, 8)
    f.with_suffix(".json").unlink()
    with pytest.raises(Refusal, match="no meta file"):
        PretrainDataset(f, 8)


def test_find_bin_files_skips_val_and_finds_siblings(tmp_path, tiny_tokenizer):
    ident = tiny_tokenizer.identity()
    for name in ("a.bin", "a_val.bin", "b.bin"):
        write_bin(tmp_path / name, np.arange(20), ident)
    train, val = find_bin_files(str(tmp_path / "*.bin"))
    assert [p.name for p in train] == ["a.bin", "b.bin"] and [p.name for p in val] == ["a_val.bin"]
    assert find_bin_files(tmp_path) == (train, val)
    with pytest.raises(Refusal, match="no .bin files"):
        find_bin_files(str(tmp_path / "missing*.bin"))
