import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import sft
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from model import ModelArgs, Transformer

# Written in the tiny test tokenizer's characters (tests/conftest.py), so the ids stay few.
QA = [("头痛发热", "建议休息"), ("感冒咳嗽", "可以用药治疗"),
      ("问：血压高\n答：检查心脏\n糖尿病", "饮食和运动"), ("胃肠病", "生活要有时")]


def write_jsonl(path, pairs):
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}, ensure_ascii=False) + "\n" for p, a in pairs),
                    encoding="utf-8")
    return path


def save_init(path, tokenizer, /, **ckpt_overrides):  # /: ckpt_overrides may hold a "tokenizer"
    """A pretraining checkpoint of a tiny random model (the same one every call)."""
    torch.manual_seed(0)
    model_args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=tokenizer.vocab_size, max_seq_len=64)
    ckpt = {"kind": "pretrain", "model_args": model_args.to_dict(), "tokenizer": tokenizer.identity(),
            "model": Transformer(model_args).state_dict(), "step": 0, **ckpt_overrides}
    save_checkpoint(path, ckpt)
    return path


def sft_flags(tmp_path, tokenizer_path, out_dir, *flags):
    return ["--init", str(tmp_path / "pre"), "--data", str(tmp_path / "sft.jsonl"), "--out-dir", str(out_dir),
            "--tokenizer", str(tokenizer_path), "--device", "cpu", "--num-workers", "0", "--batch-size", "4",
            "--epochs", "0", "--warmup-steps", "5", "--eval-every", "0", "--eval-batches", "2", "--log-every", "2", *flags]


def run_sft(tmp_path, tokenizer_path, out_dir, *flags):
    return sft.main(sft_flags(tmp_path, tokenizer_path, out_dir, *flags))


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def greedy_answer(model, prompt_ids, bos_id, eos_id):
    """Greedy decoding after prompt_ids + [bos] until eos, re-running the whole sequence each step."""
    ids, answer = list(prompt_ids) + [bos_id], []
    with torch.no_grad():
        while len(ids) + len(answer) < model.args.max_seq_len:
            next_id = int(model(torch.tensor([ids + answer])).argmax(-1))
            if next_id == eos_id:
                break
            answer.append(next_id)
    return answer


def test_fine_tuned_model_reproduces_answers(tmp_path, tiny_tokenizer, tiny_tokenizer_path):
    tokenizer = tiny_tokenizer
    save_init(tmp_path / "pre" / "best.pt", tokenizer)
    write_jsonl(tmp_path / "sft.jsonl", QA)
    write_jsonl(tmp_path / "sft_val.jsonl", QA[:2])
    out = tmp_path / "sft"
    run_sft(tmp_path, tiny_tokenizer_path, out, "--max-steps", "40", "--lr", "1e-2", "--min-lr", "1e-3")

    rows = metrics(out)
    assert {"step", "tokens", "train_loss", "lr"} <= set(rows[-1]) and "val_loss" in rows[-1]
    assert rows[-1]["train_loss"] < 0.1 < rows[0]["train_loss"]
    assert (out / "loss.png").is_file()
    ckpt = load_checkpoint(out, prefer="latest")
    assert ckpt["kind"] == "sft" and ckpt["step"] == 40 and ckpt["init"].endswith("best.pt")
    model = model_from_checkpoint(ckpt).eval()
    for prompt, answer in QA:
        assert tokenizer.decode(greedy_answer(model, tokenizer.encode(prompt), tokenizer.bos_id, tokenizer.eos_id)) == answer


def test_resume_continues_exactly(tmp_path, tiny_tokenizer, tiny_tokenizer_path):
    save_init(tmp_path / "pre" / "best.pt", tiny_tokenizer)
    write_jsonl(tmp_path / "sft.jsonl", QA * 3)  # 12 examples: three batches of 4 per epoch
    flags = ("--max-steps", "8", "--lr", "1e-3", "--dropout", "0.1")
    run_sft(tmp_path, tiny_tokenizer_path, tmp_path / "whole", *flags)
    run_sft(tmp_path, tiny_tokenizer_path, tmp_path / "halves", *flags, "--stop-after-steps", "4")
    assert load_checkpoint(tmp_path / "halves", prefer="latest")["step"] == 4
    run_sft(tmp_path, tiny_tokenizer_path, tmp_path / "halves", *flags, "--resume")
    whole = load_checkpoint(tmp_path / "whole", prefer="latest")["model"]
    halves = load_checkpoint(tmp_path / "halves", prefer="latest")["model"]
    for name in whole:
        torch.testing.assert_close(halves[name], whole[name], rtol=0, atol=0)


def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_tokenizer,
                                                                          tiny_tokenizer_path):
    """Each rank pads and weights only its own shard; the step's loss must not notice."""
    save_init(tmp_path / "pre" / "best.pt", tiny_tokenizer)
    write_jsonl(tmp_path / "sft.jsonl", [(p * (i + 1), a) for i in range(4) for p, a in QA])  # lengths vary
    write_jsonl(tmp_path / "sft_val.jsonl", QA)
    flags = ("--max-steps", "3", "--log-every", "1", "--eval-every", "3")
    run_sft(tmp_path, tiny_tokenizer_path, tmp_path / "one", *flags, "--batch-size", "8")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "sft.py"), *sft_flags(tmp_path, tiny_tokenizer_path, tmp_path / "two", *flags)],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [row["step"] for row in two] == [1, 2, 3] and "val_loss" in two[-1]
    for a, b in zip(one, two):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4
    assert abs(one[-1]["val_loss"] - two[-1]["val_loss"]) < 1e-4


def test_refuses_init_with_another_tokenizer(tmp_path, tiny_tokenizer, tiny_tokenizer_path):
    other = dict(tiny_tokenizer.identity(), name="other", sha256="0" * 64)
    save_init(tmp_path / "pre" / "best.pt", tiny_tokenizer, tokenizer=other)
    write_jsonl(tmp_path / "sft.jsonl", QA)
    with pytest.raises(SystemExit, match="made with tokenizer other"):
        run_sft(tmp_path, tiny_tokenizer_path, tmp_path / "sft", "--max-steps", "1")


def test_refuses_init_whose_shapes_do_not_match(tmp_path, tiny_tokenizer, tiny_tokenizer_path):
    write_jsonl(tmp_path / "sft.jsonl", QA)
    wrong_weights = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=tiny_tokenizer.vocab_size)).state_dict()
    save_init(tmp_path / "pre" / "best.pt", tiny_tokenizer, model=wrong_weights)
    with pytest.raises(SystemExit, match="weights do not match"):
        run_sft(tmp_path, tiny_tokenizer_path, tmp_path / "sft", "--max-steps", "1")
    small_vocab = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=100).to_dict()
    save_init(tmp_path / "pre" / "best.pt", tiny_tokenizer, model_args=small_vocab)
    with pytest.raises(SystemExit, match="100 token rows"):
        run_sft(tmp_path, tiny_tokenizer_path, tmp_path / "sft", "--max-steps", "1")


def test_max_seq_len_reaches_the_plan_and_the_recorded_config(tmp_path, tiny_tokenizer, tiny_tokenizer_path, capsys):
    save_init(tmp_path / "pre" / "best.pt", tiny_tokenizer)  # context 64
    write_jsonl(tmp_path / "sft.jsonl", QA)
    out = tmp_path / "sft"
    run_sft(tmp_path, tiny_tokenizer_path, out, "--max-steps", "2", "--max-seq-len", "16")
    assert "= 4 rows x 16 seq x 1 accum" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["max_seq_len"] == 16
