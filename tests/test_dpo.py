import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SYLLABLES

import data_process
import dpo
from checkpoint import load_checkpoint, save_checkpoint
from dataset_prefs import PreferenceDataset, answer_row, collate_pairs
from model import IGNORE_INDEX, ModelArgs, Transformer

SHARED_PAIRS = ROOT.parent / "shared" / "data" / "preference" / "dpo_zh_500.jsonl"


def write_pairs(path, pairs):
    path.write_text("".join(json.dumps(dict(zip(("prompt", "chosen", "rejected"), p)), ensure_ascii=False) + "\n"
                            for p in pairs), encoding="utf-8")
    return path


def synthetic_pairs(n, seed):
    """Pairs over random prompts that always prefer one kind of answer: a preference that holds
    on prompts never trained on, so held-out reward accuracy can only rise by learning it."""
    rng = random.Random(seed)
    prompts = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(3, 8))) for _ in range(n)]
    return [(p, "建议休息" + rng.choice("多少"), "可以用药治疗" + rng.choice("多少")) for p in prompts]


def save_sft(path, tokenizer, max_seq_len=64):
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=tokenizer.vocab_size, max_seq_len=max_seq_len)
    save_checkpoint(path, {"kind": "sft", "model_args": args.to_dict(), "tokenizer": tokenizer.identity(),
                           "model": Transformer(args).state_dict(), "step": 0})
    return path


def dpo_flags(tmp_path, tokenizer_path, out_dir, *flags):
    return ["--init", str(tmp_path / "sft"), "--data", str(tmp_path / "prefs.jsonl"), "--out-dir", str(out_dir),
            "--tokenizer", str(tokenizer_path), "--device", "cpu", "--batch-size", "4", "--lr", "1e-3",
            "--min-lr", "1e-4", "--warmup-steps", "2", "--eval-every", "10", "--eval-batches", "4",
            "--log-every", "5", "--save-every", "10", "--epochs", "0", *flags]


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_and_rewards_against_hand_computed_values():
    t = torch.tensor
    # h = [(-1) - (-2)] - [(-3) - (-2)] = 2
    losses, chosen, rejected = dpo.preference_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1.0)))  # -log sigmoid(0.5 * 2)
    assert (chosen.item(), rejected.item()) == pytest.approx((0.5, -0.5))
    losses, _, _ = dpo.preference_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.25, loss="ipo")
    assert losses.item() == pytest.approx((2 - 1 / (2 * 0.25)) ** 2)


def test_answer_logprobs_sum_the_answer_tokens_only():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=50, max_seq_len=16)).eval()
    x, y = answer_row([5, 6, 7], [8, 9], bos_id=1, eos_id=2, max_seq_len=16)
    assert y == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 8, 9, 2]
    x, y = torch.tensor([x]), torch.tensor([y])
    logp = torch.log_softmax(model.logits(x)[0], -1)
    expected = sum(logp[i, y[0, i]] for i in (3, 4, 5))
    with torch.no_grad():
        assert dpo.answer_logprobs(model, x, y, mean=False).item() == pytest.approx(expected.item(), abs=1e-5)
        assert dpo.answer_logprobs(model, x, y, mean=True).item() == pytest.approx(expected.item() / 3, abs=1e-5)


def test_reference_model_gets_no_gradient_and_never_changes(tiny_tokenizer):
    torch.manual_seed(0)
    policy = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tiny_tokenizer.vocab_size, max_seq_len=32))
    reference = Transformer(policy.args)
    reference.load_state_dict(policy.state_dict())
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    objective = dpo.PreferenceObjective(reference, beta=0.1, loss="dpo")
    t = tiny_tokenizer
    rows = [tuple(answer_row(t.encode(p), t.encode(a), t.bos_id, t.eos_id, 32) for a in (c, r))
            for p, c, r in synthetic_pairs(4, seed=0)]
    x, y = collate_pairs([tuple((torch.tensor(a), torch.tensor(b)) for a, b in row) for row in rows], t.pad_id)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    for _ in range(3):
        objective.loss(policy, x, y).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad is None and not p.requires_grad for p in reference.parameters())
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    assert not torch.equal(policy.tok_embeddings.weight, reference.tok_embeddings.weight)


def test_dpo_learns_a_preference_that_holds_on_held_out_prompts(tmp_path, tiny_tokenizer, tiny_tokenizer_path, one_thread):
    save_sft(tmp_path / "sft" / "best.pt", tiny_tokenizer)
    write_pairs(tmp_path / "prefs.jsonl", synthetic_pairs(48, seed=1))
    write_pairs(tmp_path / "prefs_val.jsonl", synthetic_pairs(16, seed=2))
    out = tmp_path / "dpo"
    dpo.main(dpo_flags(tmp_path, tiny_tokenizer_path, out, "--max-steps", "30"))
    before = json.loads((out / "config.json").read_text())["before_dpo"]
    assert before["val_reward_acc"] == 0.5 and before["val_margin"] == 0  # the model is its reference
    last = metrics(out)[-1]
    assert last["val_reward_acc"] > 0.9 and last["val_margin"] > 0 and last["val_loss"] < math.log(2)
    ckpt = load_checkpoint(out, prefer="latest")
    assert ckpt["kind"] == "dpo" and ckpt["step"] == 30 and "reference" not in str(list(ckpt["model"]))


def test_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_tokenizer, tiny_tokenizer_path, one_thread):
    save_sft(tmp_path / "sft" / "best.pt", tiny_tokenizer)
    write_pairs(tmp_path / "prefs.jsonl", synthetic_pairs(24, seed=1))
    write_pairs(tmp_path / "prefs_val.jsonl", synthetic_pairs(8, seed=2))
    dpo.main(dpo_flags(tmp_path, tiny_tokenizer_path, tmp_path / "whole", "--max-steps", "20"))
    dpo.main(dpo_flags(tmp_path, tiny_tokenizer_path, tmp_path / "parts", "--max-steps", "20", "--stop-after-steps", "10"))
    dpo.main(dpo_flags(tmp_path, tiny_tokenizer_path, tmp_path / "parts", "--max-steps", "20", "--resume"))
    whole, parts = metrics(tmp_path / "whole"), metrics(tmp_path / "parts")
    keys = ("step", "train_loss", "val_loss", "val_reward_acc", "val_margin")
    assert [[r.get(k) for k in keys] for r in whole] == [[r.get(k) for k in keys] for r in parts]


@pytest.mark.parametrize("pair, message", [
    (("头痛", "", "休息"), "empty answer"),
    (("头痛", "休息", "休息"), "the same answer"),
    (("头痛" * 40, "休息", "用药"), "leaving no room for an answer"),
])
def test_bad_pairs_are_refused_naming_the_line(tmp_path, tiny_tokenizer, pair, message):
    path = write_pairs(tmp_path / "prefs.jsonl", [("发热", "休息", "用药"), pair])
    with pytest.raises(Exception, match=rf"prefs.jsonl:2: .*{message}"):
        PreferenceDataset(path, tiny_tokenizer, max_seq_len=32)


def test_bad_flag_and_bad_data_end_in_one_line(tmp_path, tiny_tokenizer, tiny_tokenizer_path):
    save_sft(tmp_path / "sft" / "best.pt", tiny_tokenizer)
    write_pairs(tmp_path / "prefs.jsonl", [("发热", "休息", "休息")])
    result = subprocess.run([sys.executable, str(ROOT / "dpo.py"), *dpo_flags(tmp_path, tiny_tokenizer_path, tmp_path / "o")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "prefs.jsonl:1: chosen and rejected are the same answer" in result.stdout + result.stderr
    with pytest.raises(SystemExit):
        dpo.parse_args(["--beta", "0"])


def test_data_process_prefs_reads_conversations_and_plain_pairs(tmp_path):
    raw = tmp_path / "raw.jsonl"
    raw.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"conversations": [{"from": "system", "value": "你是医生。"}, {"from": "human", "value": "头痛怎么办？"},
                           {"from": "gpt", "value": "多休息。"}, {"from": "human", "value": "发热呢？"}],
         "chosen": "多喝水。", "rejected": "不知道。"},
        {"question": "咳嗽怎么办？", "response_chosen": "看医生。", "response_rejected": "随便。"},
        {"prompt": "胃痛", "chosen": "同一个", "rejected": "同一个"},
    ]) + "\n", encoding="utf-8")
    out = tmp_path / "prefs.jsonl"
    data_process.main(["prefs", "--input", str(raw), "--out", str(out), "--val-fraction", "0"])
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"prompt": "你是医生。\n问：头痛怎么办？\n答：多休息。\n发热呢？", "chosen": "多喝水。", "rejected": "不知道。"},
                    {"prompt": "咳嗽怎么办？", "chosen": "看医生。", "rejected": "随便。"}]


@pytest.mark.skipif(not SHARED_PAIRS.is_file(), reason="needs the shared preference pairs")
def test_shared_pairs_normalize_with_a_validation_split(tmp_path):
    out = tmp_path / "prefs.jsonl"
    data_process.main(["prefs", "--input", str(SHARED_PAIRS), "--out", str(out)])
    train = out.read_text(encoding="utf-8").splitlines()
    val = Path(tmp_path / "prefs_val.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(train) + len(val) == 500 and 20 < len(val) < 90
    assert all(set(json.loads(line)) == {"prompt", "chosen", "rejected"} for line in train + val)


def test_fold_bench_holds_every_pair_out_exactly_once(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import dpo_folds
    pairs = write_pairs(tmp_path / "prefs.jsonl", [(f"问{i}", "长一点的回答" if i % 3 else "短", "短答") for i in range(7)])
    write_pairs(tmp_path / "prefs_val.jsonl", [("问7", "好", "坏")])
    lines = dpo_folds.read_pairs(pairs)
    held_out = []
    for k in range(3):
        held = dpo_folds.write_fold(lines, k, 3, tmp_path / f"fold{k}")
        train = (tmp_path / f"fold{k}" / "pairs.jsonl").read_text(encoding="utf-8").splitlines()
        val = (tmp_path / f"fold{k}" / "pairs_val.jsonl").read_text(encoding="utf-8").splitlines()
        assert held == len(val) and not set(train) & set(val) and len(train) + len(val) == 8
        held_out += val
    assert sorted(held_out) == sorted(lines)
    # chosen longer in 4 of 8 pairs (i = 1, 2, 4, 5), shorter in 3 (i = 0, 3, 6), a tie in 1 (问7)
    assert dpo_folds.longer_wins(lines) == pytest.approx(4.5 / 8)
