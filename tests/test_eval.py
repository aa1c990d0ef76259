import csv
import json
import math

import pytest
import torch
from nltk.translate.bleu_score import corpus_bleu

import chat
import eval as qa_eval
from checkpoint import save_checkpoint
from conftest import make_chinese_texts
from model import ModelArgs, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

# Two pairs worked by hand (character tokens; "ok" is one token, the space is none):
#   hyp 感冒感冒了 (5) vs ref 感冒了要休息 (6): clipped matches 1-4 grams 3/5, 2/4, 1/3, 0/2
#   hyp 多喝水 ok  (4) vs ref 多喝水ok吧   (5): 4/4, 3/3, 2/2, 1/1
# corpus precisions 7/9, 5/7, 3/5, 1/3 (product 1/9), lengths c=9, r=11:
#   BLEU = exp(1 - 11/9) * (1/9)^(1/4) = exp(-2/9) / sqrt(3)
HYPS = ["感冒感冒了", "多喝水 ok"]
REFS = ["感冒了要休息", "多喝水ok吧"]
CORPUS_BLEU = 100 * math.exp(-2 / 9) / math.sqrt(3)
# sentence BLEU, nltk method1 (a zero count becomes 0.1 / total):
#   pair 1: exp(1 - 6/5) * (3/5 * 2/4 * 1/3 * 0.1/2)^(1/4); pair 2: exp(1 - 5/4)
SENTENCE_AVG = 100 * (math.exp(-0.2) * (0.6 * 0.5 / 3 * 0.05) ** 0.25 + math.exp(-0.25)) / 2


def test_char_tokens_split_chinese_and_keep_ascii_runs():
    assert qa_eval.char_tokens("多喝水 ok，3.5mg") == ["多", "喝", "水", "ok", "，", "3", ".", "5mg"]


def test_corpus_bleu_equals_hand_computed_value_and_nltk():
    assert qa_eval.bleu4_char_corpus(HYPS, REFS) == pytest.approx(CORPUS_BLEU, rel=1e-12)
    nltk_value = corpus_bleu([[qa_eval.char_tokens(r)] for r in REFS], [qa_eval.char_tokens(h) for h in HYPS])
    assert qa_eval.bleu4_char_corpus(HYPS, REFS) == pytest.approx(100 * nltk_value, rel=1e-12)
    assert qa_eval.bleu4_char_corpus(REFS, REFS) == pytest.approx(100.0)
    assert qa_eval.bleu4_char_corpus(["", "感冒"], REFS) == 0.0


def test_sentence_bleu_average_equals_hand_computed_value():
    assert qa_eval.bleu_sentence_avg(HYPS, REFS) == pytest.approx(SENTENCE_AVG, rel=1e-9)


def qa_rows(n):
    texts = make_chinese_texts(2 * n, seed=5)
    return [{"question": texts[2 * i][:30], "answer": texts[2 * i + 1][:30]} for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def save_tiny_checkpoint(path, tok, kind):
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=tok.vocab_size, max_seq_len=64)
    model = Transformer(args)
    save_checkpoint(path, {"kind": kind, "model_args": args.to_dict(), "tokenizer": tok.identity(),
                           "model": model.state_dict(), "step": 7})
    return path


@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory, tiny_tokenizer):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("sft") / "best.pt", tiny_tokenizer, "sft")


def run_eval(ckpt, data, out_dir, *flags):
    return qa_eval.evaluate(qa_eval.parse_args(
        ["--ckpt", str(ckpt), "--data", str(data), "--out-dir", str(out_dir), "--max-new-tokens", "12", *flags]))


def test_eval_end_to_end_writes_predictions_and_metrics(tmp_path, sft_ckpt):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(5))
    metrics = run_eval(sft_ckpt, data, tmp_path / "out", "--batch-size", "3")
    written = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    for key in ("bleu4_char_corpus", "bleu_sentence_avg", "answer_ppl", "n"):
        assert written[key] == pytest.approx(metrics[key])
    assert written["n"] == 5 and math.isfinite(written["answer_ppl"]) and written["answer_ppl"] > 1
    predictions = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [p["question"] for p in predictions] == [r["question"] for r in qa_rows(5)]
    assert all(isinstance(p["prediction"], str) and p["n_new_tokens"] <= 12 for p in predictions)
    assert not list((tmp_path / "out").glob("*.tmp"))
    # batching changes nothing under greedy decoding
    run_eval(sft_ckpt, data, tmp_path / "one", "--batch-size", "1")
    one = [json.loads(line)["prediction"] for line in (tmp_path / "one" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert one == [p["prediction"] for p in predictions]


def test_qa_set_reads_the_same_from_jsonl_json_and_csv_with_custom_fields(tmp_path):
    rows = [{"q": r["question"], "a": r["answer"]} for r in qa_rows(3)]
    write_jsonl(tmp_path / "qa.jsonl", rows)
    (tmp_path / "qa.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    with open(tmp_path / "qa.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["q", "a"])
        writer.writeheader()
        writer.writerows(rows)
    read = [[(r["question"], r["answer"]) for r in qa_eval.read_qa(tmp_path / name, "q", "a")]
            for name in ("qa.jsonl", "qa.json", "qa.csv")]
    assert read[0] == read[1] == read[2] == [(r["q"], r["a"]) for r in rows]
    assert len(qa_eval.read_qa(tmp_path / "qa.jsonl", "q", "a", limit=2)) == 2


@pytest.mark.parametrize("bad_line, where", [
    ('{"question": "头痛怎么办", "answer": ""}', "qa.jsonl:3: field 'answer'"),
    ('{"question": "头痛怎么办"', "qa.jsonl:3: not valid JSON"),
    ('   ', "qa.jsonl:3: empty line"),
    ('["头痛", "休息"]', "qa.jsonl:3: expected an object"),
])
def test_empty_or_malformed_row_stops_with_its_line(tmp_path, bad_line, where):
    good = [json.dumps(r, ensure_ascii=False) for r in qa_rows(3)]
    (tmp_path / "qa.jsonl").write_text("\n".join(good[:2] + [bad_line] + good[2:]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=where):
        qa_eval.read_qa(tmp_path / "qa.jsonl")


def test_csv_row_without_answer_names_its_line(tmp_path):
    (tmp_path / "qa.csv").write_text("question,answer\n头痛怎么办,多休息\n发热怎么办,\n", encoding="utf-8")
    with pytest.raises(ValueError, match="qa.csv:3: field 'answer'"):
        qa_eval.read_qa(tmp_path / "qa.csv")
    with pytest.raises(SystemExit, match="qa.csv:3"):
        qa_eval.main(["--data", str(tmp_path / "qa.csv")])


def test_chat_one_shot_for_sft_and_pretrain_checkpoints(tmp_path, sft_ckpt, tiny_tokenizer, capsys):
    chat.main(["--ckpt", str(sft_ckpt), "--prompt", "头痛怎么办", "--max-new-tokens", "6"])
    assert capsys.readouterr().out.endswith("\n")
    pretrain = save_tiny_checkpoint(tmp_path / "pre" / "best.pt", tiny_tokenizer, "pretrain")
    chat.main(["--ckpt", str(pretrain), "--prompt", "医生建议", "--max-new-tokens", "6", "--temperature", "0"])
    assert capsys.readouterr().out.startswith("医生建议")  # a continuation prints the text it continues
