import csv
import json
import math

import pytest
import torch

import chat
import eval as qa_eval
import metrics
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from conftest import make_chinese_texts
from model import ModelArgs, Transformer
from prompt import fit_prompt
from refusal import Refusal

pytestmark = pytest.mark.usefixtures("one_thread")

# Sentence BLEU worked by hand (character tokens; "ok" is one token, the space is none):
#   hyp 感冒感冒了 (5) vs ref 感冒了要休息 (6): clipped matches 1-4 grams 3/5, 2/4, 1/3, 0/2
#   hyp 多喝水 ok  (4) vs ref 多喝水ok吧   (5): 4/4, 3/3, 2/2, 1/1
# nltk method1 (a zero count becomes 0.1 / total):
#   pair 1: exp(1 - 6/5) * (3/5 * 2/4 * 1/3 * 0.1/2)^(1/4); pair 2: exp(1 - 5/4)
HYPS = ["感冒感冒了", "多喝水 ok"]
REFS = ["感冒了要休息", "多喝水ok吧"]
SENTENCE_AVG = 100 * (math.exp(-0.2) * (0.6 * 0.5 / 3 * 0.05) ** 0.25 + math.exp(-0.25)) / 2


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


def run_eval(ckpt, data, out_dir, *flags, max_new_tokens="12"):
    lengths = ["--max-new-tokens", max_new_tokens] if max_new_tokens else []
    return qa_eval.evaluate(qa_eval.parse_args(
        ["--ckpt", str(ckpt), "--data", str(data), "--out-dir", str(out_dir), *lengths, *flags]))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


SCORES = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL", "distinct1", "distinct2", "length_ratio")


def test_eval_end_to_end_writes_predictions_and_metrics(tmp_path, sft_ckpt):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(5))
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "头痛", "answer": a} for a in ("多休息", "多喝水", "多休息")])
    result = run_eval(sft_ckpt, data, tmp_path / "out", "--batch-size", "3", "--train-data", str(train))
    written = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    for key in ("bleu4_char_corpus", "bleu_sentence_avg", "answer_ppl", "n", *SCORES):
        assert written[key] == pytest.approx(result[key]), key
    assert written["n"] == 5 and math.isfinite(written["answer_ppl"]) and written["answer_ppl"] > 1
    assert written["answer_ppl"] == pytest.approx(math.exp(written["answer_nll"]))
    assert 0 < written["answer_bpc"] and 0 <= written["repeat_rate"] <= 1
    assert written["bleu4_char_corpus"] == written["bleu4"]
    assert written["sacrebleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:zh|smooth:exp|version:")
    for key in ("bleu4_char_corpus_ci95", "rougeL_ci95"):
        low, high = written[key]
        assert low <= high
    common = written["baselines"]["most_common_train_answer"]
    assert (common["answer"], common["count"], common["n_train"]) == ("多休息", 2, 3)
    copy = written["baselines"]["copy_question"]
    references = [r["answer"] for r in qa_rows(5)]
    assert copy["rougeL"] == pytest.approx(
        float(metrics.rouge_scores([r["question"] for r in qa_rows(5)], references)[:, 2].mean()))
    assert set(SCORES) <= set(copy) and set(SCORES) <= set(common)
    predictions = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert [p["question"] for p in predictions] == [r["question"] for r in qa_rows(5)]
    assert all(isinstance(p["prediction"], str) and p["n_new_tokens"] <= 12 for p in predictions)
    assert not list((tmp_path / "out").glob("*.tmp"))
    # batching changes nothing under greedy decoding
    run_eval(sft_ckpt, data, tmp_path / "one", "--batch-size", "1")
    one = read_jsonl(tmp_path / "one" / "predictions.jsonl")
    assert [p["prediction"] for p in one] == [p["prediction"] for p in predictions]
    assert "skipped" in json.loads((tmp_path / "one" / "metrics.json").read_text())["baselines"]["most_common_train_answer"]


def test_compare_runs_a_paired_bootstrap_on_the_same_questions(tmp_path, sft_ckpt, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(6))
    run_eval(sft_ckpt, data, tmp_path / "a")
    # another "run": the same questions answered with their references, which must win
    other = [{**p, "prediction": p["reference"]} for p in read_jsonl(tmp_path / "a" / "predictions.jsonl")]
    write_jsonl(tmp_path / "b.jsonl", other)
    result = run_eval(sft_ckpt, data, tmp_path / "c", "--compare", str(tmp_path / "b.jsonl"), "--bootstrap", "200")
    compare = result["compare"]
    assert compare["bleu4"]["b"] == pytest.approx(100) and compare["bleu4"]["delta"] < 0
    assert compare["rougeL"]["ci95"][1] < 0 and 0 < compare["rougeL"]["p"] <= 1
    assert "this run trails" in capsys.readouterr().out
    same = run_eval(sft_ckpt, data, tmp_path / "d", "--compare", str(tmp_path / "a" / "predictions.jsonl"))["compare"]
    assert same["bleu4"]["delta"] == 0 and same["bleu4"]["p"] == 1.0
    with pytest.raises(SystemExit, match="--compare .*missing.jsonl: no such file"):
        qa_eval.main(["--ckpt", str(sft_ckpt), "--data", str(data), "--compare", str(tmp_path / "missing.jsonl")])
    write_jsonl(tmp_path / "short.jsonl", other[:4])
    with pytest.raises(Refusal, match="short.jsonl: 4 predictions but this run scored 6"):
        run_eval(sft_ckpt, data, tmp_path / "e", "--compare", str(tmp_path / "short.jsonl"))
    write_jsonl(tmp_path / "moved.jsonl", other[1:] + other[:1])
    with pytest.raises(Refusal, match="moved.jsonl:1: its reference differs"):
        run_eval(sft_ckpt, data, tmp_path / "f", "--compare", str(tmp_path / "moved.jsonl"))


def test_default_answer_length_fits_a_small_context(tmp_path, sft_ckpt, capsys):
    # the tiny model's context is 64: the old fixed default of 256 new tokens left no room
    result = run_eval(sft_ckpt, write_jsonl(tmp_path / "qa.jsonl", qa_rows(2)), tmp_path / "out", max_new_tokens=None)
    assert result["generation"]["max_new_tokens"] == 32
    assert "max_new_tokens 32: at most half the model's context of 64" in capsys.readouterr().out
    with pytest.raises(Refusal, match="--max-new-tokens 63 leaves no room"):
        run_eval(sft_ckpt, tmp_path / "qa.jsonl", tmp_path / "out", max_new_tokens="63")


def test_overflowing_perplexity_keeps_the_answers(tmp_path, tiny_tokenizer):
    # logits scaled by 1e4: the answers' loss is far above the ~709 nats where exp() overflows
    ckpt = load_checkpoint(save_tiny_checkpoint(tmp_path / "ckpt" / "best.pt", tiny_tokenizer, "sft"))
    ckpt["model"]["norm.weight"] *= 1e4
    save_checkpoint(tmp_path / "huge" / "best.pt", {k: v for k, v in ckpt.items() if k not in ("path", "format")})
    result = run_eval(tmp_path / "huge", write_jsonl(tmp_path / "qa.jsonl", qa_rows(3)), tmp_path / "out")
    written = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert result["answer_nll"] > 709 and written["answer_ppl"] is None and written["answer_nll"] > 709
    assert len(read_jsonl(tmp_path / "out" / "predictions.jsonl")) == 3


def test_answers_are_written_before_scoring_can_fail(tmp_path, sft_ckpt, monkeypatch):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(3))
    run_eval(sft_ckpt, data, tmp_path / "out")

    def broken(*args, **kwargs):
        raise RuntimeError("scoring failed")
    monkeypatch.setattr(metrics, "score", broken)
    with pytest.raises(RuntimeError, match="scoring failed"):
        run_eval(sft_ckpt, data, tmp_path / "out")
    assert len(read_jsonl(tmp_path / "out" / "predictions.jsonl")) == 3
    assert not (tmp_path / "out" / "metrics.json").exists()  # the old one described other answers


def test_config_json_and_the_header_name_what_ran(tmp_path, sft_ckpt, capsys):
    run_eval(sft_ckpt, write_jsonl(tmp_path / "qa.jsonl", qa_rows(2)), tmp_path / "out", max_new_tokens=None)
    config = json.loads((tmp_path / "out" / "config.json").read_text(encoding="utf-8"))
    assert config["max_new_tokens"] == 32 and config["batch_size"] == 16 and config["temperature"] == 0.0
    assert config["checkpoint"].endswith("best.pt") and config["kind"] == "sft" and config["step"] == 7
    assert "config: task=qa data=" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        qa_eval.parse_args(["--help"])
    shown = capsys.readouterr().out
    assert "(default: 16)" in shown and "(default: out/eval)" in shown


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
    ('{"question": "头痛怎么办"', "qa.jsonl:3: malformed JSON"),
    ('["头痛", "休息"]', "qa.jsonl:3: expected a JSON object"),
])
def test_empty_or_malformed_row_stops_with_its_line(tmp_path, bad_line, where):
    good = [json.dumps(r, ensure_ascii=False) for r in qa_rows(3)]
    (tmp_path / "qa.jsonl").write_text("\n".join(good[:2] + [bad_line] + good[2:]) + "\n", encoding="utf-8")
    with pytest.raises(Refusal, match=where):
        qa_eval.read_qa(tmp_path / "qa.jsonl")


@pytest.mark.parametrize("name, where", [("qa.jsonl", "qa.jsonl:2"), ("qa.csv", "qa.csv:3"), ("qa.json", "qa.json:3")])
def test_non_utf8_bytes_stop_with_file_and_line(tmp_path, name, where):
    gbk = "发热".encode("gbk")  # a GBK-encoded word (not valid UTF-8) in an otherwise UTF-8 file
    rows = [{"question": r["question"].encode(), "answer": r["answer"].encode()} for r in qa_rows(3)]
    rows[1]["answer"] += gbk
    if name == "qa.csv":
        lines = [b"question,answer"] + [r["question"] + b"," + r["answer"] for r in rows]
    else:
        lines = [b'{"question": "' + r["question"] + b'", "answer": "' + r["answer"] + b'"}' for r in rows]
        if name == "qa.json":
            lines = [b"["] + [line + b"," for line in lines[:-1]] + [lines[-1], b"]"]
    (tmp_path / name).write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(Refusal, match=f"{where}: .*UTF-8"):
        qa_eval.read_qa(tmp_path / name)
    with pytest.raises(SystemExit, match=f"{where}: .*UTF-8"):
        qa_eval.main(["--data", str(tmp_path / name)])


def test_csv_row_without_answer_names_its_line(tmp_path):
    (tmp_path / "qa.csv").write_text("question,answer\n头痛怎么办,多休息\n发热怎么办,\n", encoding="utf-8")
    with pytest.raises(Refusal, match="qa.csv:3: field 'answer'"):
        qa_eval.read_qa(tmp_path / "qa.csv")
    with pytest.raises(SystemExit, match="qa.csv:3"):
        qa_eval.main(["--data", str(tmp_path / "qa.csv")])


def test_chat_one_shot_for_sft_and_pretrain_checkpoints(tmp_path, sft_ckpt, tiny_tokenizer, capsys):
    chat.main(["--ckpt", str(sft_ckpt), "--prompt", "头痛怎么办", "--max-new-tokens", "6"])
    assert capsys.readouterr().out.endswith("\n")
    pretrain = save_tiny_checkpoint(tmp_path / "pre" / "best.pt", tiny_tokenizer, "pretrain")
    chat.main(["--ckpt", str(pretrain), "--prompt", "医生建议", "--max-new-tokens", "6", "--temperature", "0"])
    assert capsys.readouterr().out.startswith("医生建议")  # a continuation prints the text it continues


def test_answer_bpc_is_the_answers_loss_in_bits_per_character(sft_ckpt, tiny_tokenizer):
    tok = tiny_tokenizer
    model = model_from_checkpoint(load_checkpoint(sft_ckpt)).eval()
    questions, answers = ["头痛发热", "感冒咳嗽"], ["建议休息", "可以用药治疗"]
    prompts = [fit_prompt(tok, [], q, 32)[0] for q in questions]
    for encoding, dummy_prefix in (("continuation", False), (None, True)):  # a checkpoint from now on, an older one
        nll, n_tokens, n_chars = qa_eval.answer_nll(model, tok, prompts, answers, batch_size=2, encoding=encoding)
        # by hand: -log p of every answer token and the eos, one sequence at a time
        total = 0.0
        for prompt, answer in zip(prompts, answers):
            seq = prompt + tok.encode(answer, dummy_prefix=dummy_prefix) + [tok.eos_id]
            with torch.no_grad():
                logp = torch.log_softmax(model.logits(torch.tensor([seq[:-1]]))[0], dim=-1)
            total -= sum(float(logp[i - 1, seq[i]]) for i in range(len(prompt), len(seq)))
        assert n_tokens == sum(len(tok.encode(a, dummy_prefix=dummy_prefix)) + 1 for a in answers) and n_chars == 4 + 6
        assert nll == pytest.approx(total / n_tokens, rel=1e-4)
        assert metrics.bits_per_char(nll, n_tokens, n_chars) == pytest.approx(total / math.log(2) / 10, rel=1e-4)


def test_an_out_dir_that_is_a_file_is_refused_before_any_answer_is_made(tmp_path, sft_ckpt, tiny_tokenizer_path,
                                                                        capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(3))
    (tmp_path / "out").write_text("a file, not a directory")
    with pytest.raises(SystemExit, match=r"cannot write .*out: "):
        qa_eval.main(["--ckpt", str(sft_ckpt), "--data", str(data), "--out-dir", str(tmp_path / "out"),
                      "--tokenizer", str(tiny_tokenizer_path), "--max-new-tokens", "4"])
    assert "generate" not in capsys.readouterr().err  # refused before the answers
    assert (tmp_path / "out").read_text() == "a file, not a directory"
