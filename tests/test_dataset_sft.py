import json
from functools import partial

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataset_sft import SFTDataset, build_example, collate_sft, length_grouped_batches, read_sft_examples
from model import IGNORE_INDEX, ModelArgs, Transformer
from refusal import Refusal

BOS, EOS = 1, 2
PROMPT, ANSWER = [10, 11, 12], [20, 21]
I = IGNORE_INDEX


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_mask_covers_exactly_answer_and_eos():
    x, y = build_example(PROMPT, ANSWER, BOS, EOS, max_seq_len=16)
    assert x == [10, 11, 12, BOS, 20, 21]
    assert y == [I, I, I, 20, 21, EOS]  # bos predicts the first answer id, the last answer id predicts eos


def test_empty_prompt_answer_follows_bos():
    x, y = build_example([], ANSWER, BOS, EOS, max_seq_len=16)
    assert x == [BOS, 20, 21]
    assert y == [20, 21, EOS]


# PROMPT + [bos] + ANSWER + [eos] is 7 ids, so x and y hold 6 positions when nothing is cut.
@pytest.mark.parametrize("max_seq_len, x_expected, y_expected", [
    (7, [10, 11, 12, BOS, 20, 21], [I, I, I, 20, 21, EOS]),  # room to spare
    (6, [10, 11, 12, BOS, 20, 21], [I, I, I, 20, 21, EOS]),  # exact fit
    (5, [11, 12, BOS, 20, 21], [I, I, 20, 21, EOS]),  # prompt loses its first id
    (4, [12, BOS, 20, 21], [I, 20, 21, EOS]),  # prompt keeps only its last id
    (3, [BOS, 20, 21], [20, 21, EOS]),  # prompt gone, answer and eos whole
    (2, [BOS, 20], [20, 21]),  # answer whole but cut before eos: no eos
    (1, [BOS], [20]),  # answer cut to its first id
])
def test_truncation_cuts_prompt_left_then_answer_right(max_seq_len, x_expected, y_expected):
    x, y = build_example(PROMPT, ANSWER, BOS, EOS, max_seq_len)
    assert (x, y) == (x_expected, y_expected)


def test_cut_answer_gets_no_eos():
    x, y = build_example([], list(range(20, 30)), BOS, EOS, max_seq_len=5)
    assert x == [BOS, 20, 21, 22, 23]
    assert y == [20, 21, 22, 23, 24]
    assert EOS not in y


def test_empty_answer_rejected(tmp_path):
    with pytest.raises(ValueError, match="empty answer"):
        build_example(PROMPT, [], BOS, EOS, 16)
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "问", "answer": "答"}, {"prompt": "问", "answer": " "}])
    with pytest.raises(Refusal, match=rf"{path}:2: empty answer"):
        read_sft_examples(path)


@pytest.mark.parametrize("line, complaint", [
    ("{not json", "malformed JSON"),
    ('["prompt", "answer"]', "expected a JSON object"),
    ('{"prompt": "问"}', "'answer' is missing"),
    ('{"prompt": 3, "answer": "答"}', "'prompt' is missing or not a string"),
])
def test_malformed_row_names_file_and_line(tmp_path, line, complaint):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "", "answer": "好"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(Refusal, match=rf"{path}:3: .*{complaint}"):
        read_sft_examples(path)


def test_dataset_multi_turn_prompt_masks_context_answers(tmp_path, tiny_tokenizer):
    tokenizer = tiny_tokenizer
    prompt = "问：头痛发热怎么办\n答：建议休息\n问：咳嗽呢\n答：多喝水\n感冒了吃什么药"
    answer = "建议检查后用药"
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": prompt, "answer": answer}, {"prompt": "", "answer": "休息"}])
    ds = SFTDataset(path, tokenizer, max_seq_len=256)
    x, y = ds[0]
    # the answer continues the prompt: no dummy-prefix '▁' before its first word
    prompt_ids, answer_ids = tokenizer.encode(prompt), tokenizer.encode(answer, dummy_prefix=False)
    assert tokenizer.encode(answer)[0] == tokenizer.sp.piece_to_id("▁") and answer_ids[0] != tokenizer.encode(answer)[0]
    assert x.tolist() == prompt_ids + [tokenizer.bos_id] + answer_ids
    # only the current answer and eos are targets; earlier turns' answers stay context
    assert y.tolist() == [I] * len(prompt_ids) + answer_ids + [tokenizer.eos_id]
    x, y = ds[1]
    assert x.tolist() == [tokenizer.bos_id] + tokenizer.encode("休息", dummy_prefix=False)
    assert ds.lengths.tolist() == [len(ds[i][0]) for i in range(len(ds))]


def test_collate_pads_to_longest_with_ignored_labels():
    a = (torch.tensor([5, BOS, 7]), torch.tensor([I, 7, EOS]))
    b = (torch.tensor([BOS, 8, 9, 10, 11]), torch.tensor([8, 9, 10, 11, EOS]))
    x, y = collate_sft([a, b], pad_id=0)
    assert x.tolist() == [[5, BOS, 7, 0, 0], [BOS, 8, 9, 10, 11]]
    assert y.tolist() == [[I, 7, EOS, I, I], [8, 9, 10, 11, EOS]]


def pad_right(batch, length):
    """A collated (x, y) padded further, to length positions."""
    x, y = batch
    return (torch.nn.functional.pad(x, (0, length - x.shape[1]), value=0),
            torch.nn.functional.pad(y, (0, length - y.shape[1]), value=I))


def test_padding_never_changes_the_loss():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=50, max_seq_len=32)).eval()
    short = tuple(torch.tensor(t) for t in build_example([30, 31], [40, 41, 42], BOS, EOS, 32))
    long = tuple(torch.tensor(t) for t in build_example(list(range(10, 25)), list(range(30, 40)), BOS, EOS, 32))
    with torch.no_grad():
        alone = model(*collate_sft([short], pad_id=0))
        alone_padded = model(*pad_right(collate_sft([short], pad_id=0), 32))
        loss_long = model(*collate_sft([long], pad_id=0))
        together = model(*collate_sft([short, long], pad_id=0))
        together_padded = model(*pad_right(collate_sft([short, long], pad_id=0), 32))
    torch.testing.assert_close(alone_padded, alone)
    torch.testing.assert_close(together_padded, together)
    # the denominator counts real targets only: a target-weighted mean of the two examples
    n_short, n_long = (short[1] != I).sum(), (long[1] != I).sum()
    torch.testing.assert_close(together, (n_short * alone + n_long * loss_long) / (n_short + n_long))


def test_grouped_epoch_covers_examples_once_in_seeded_order():
    lengths = np.random.default_rng(0).integers(1, 200, size=103)
    batches = length_grouped_batches(lengths, 8, seed=3, epoch=0)
    assert len(batches) == 12 and all(len(b) == 8 for b in batches)
    seen = [i for b in batches for i in b]
    assert len(set(seen)) == 96  # 103 // 8 whole batches; the 7 left over differ by epoch
    assert batches == length_grouped_batches(lengths, 8, seed=3, epoch=0)
    assert batches != length_grouped_batches(lengths, 8, seed=3, epoch=1)


def test_grouping_cuts_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, size=4096)
    grouped = length_grouped_batches(lengths, 32, seed=0, epoch=0)
    random = [rng.permutation(4096)[i:i + 32] for i in range(0, 4096, 32)]
    real = lengths.sum()
    assert real / sum(32 * lengths[b].max() for b in grouped) > 0.9
    assert real / sum(32 * lengths[b].max() for b in random) < 0.6


def test_ranks_take_disjoint_slices_of_global_batches():
    lengths = np.random.default_rng(0).integers(1, 200, size=101)
    shards = [length_grouped_batches(lengths, 4, seed=5, epoch=0, rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in shards] == [8, 8, 8]  # 101 // 12 global batches
    seen = [i for s in shards for b in s for i in b]
    assert len(seen) == len(set(seen)) == 96
    # one process with 3x the batch sees the same global batches
    single = length_grouped_batches(lengths, 12, seed=5, epoch=0)
    assert [sorted(sum((s[g] for s in shards), [])) for g in range(8)] == [sorted(b) for b in single]


def test_loader_tokenizes_in_workers(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"问题{i}", "answer": "答" * (i + 1)} for i in range(12)]
    ds = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", rows), tiny_tokenizer, max_seq_len=64)
    loader = DataLoader(ds, batch_sampler=length_grouped_batches(ds.lengths, 4, seed=0, epoch=0), num_workers=1,
                        collate_fn=partial(collate_sft, pad_id=tiny_tokenizer.pad_id))
    batches = list(loader)
    # every example ends in a target (eos), so a row's real length runs to its last target
    real = [int((y != I).nonzero().max()) + 1 for _, ys in batches for y in ys]
    assert sorted(real) == sorted(ds.lengths.tolist())
    for x, y in batches:
        assert x.shape == y.shape and x.shape[1] == max(int((r != I).nonzero().max()) + 1 for r in y)
        assert ((x == tiny_tokenizer.bos_id).sum(1) == 1).all()
