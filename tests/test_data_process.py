import csv
import gzip
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, make_chinese_texts

import corpus
import data_process
import qa_examples
import splits
import tokenize_corpus
from chatglm_tokenizer import Tokenizer
from dataset import PretrainDataset
from prompt import context_prompt
from refusal import Refusal


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def run(*argv):
    return data_process.main([str(a) for a in argv])


def pretrain(inputs, out, tokenizer_path, *extra):
    run("pretrain", "--input", *inputs, "--out", out, "--tokenizer", tokenizer_path, *extra)


def read_docs(bin_path, tokenizer):
    """The documents of a .bin, split at eos, decoded."""
    ids = np.fromfile(bin_path, dtype="<u2")
    assert ids[-1] == tokenizer.eos_id
    ends = np.flatnonzero(ids == tokenizer.eos_id)
    return [tokenizer.decode(ids[s + 1 if i else 0:e].tolist()) for i, (s, e) in enumerate(zip(np.r_[0, ends[:-1]], ends))]


# ---------------------------------------------------------------------------- pretrain

def test_round_trip_every_document_ends_with_eos(tmp_path, tiny_tokenizer_path, tiny_tokenizer):
    texts = make_chinese_texts(60, seed=5)
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    pretrain([src], tmp_path / "out" / "c", tiny_tokenizer_path, "--val-fraction", "0", "--min-tokens", "1")
    assert read_docs(tmp_path / "out" / "c.bin", tiny_tokenizer) == texts
    meta = json.loads((tmp_path / "out" / "c.json").read_text())
    assert meta["n_documents"] == 60 and meta["dtype"] == "uint16" and meta["eos_id"] == 2
    assert meta["tokenizer"]["sha256"] == tiny_tokenizer.sha256 and meta["vocab_size"] == 400
    assert meta["n_tokens"] * 2 == os.path.getsize(tmp_path / "out" / "c.bin")
    assert meta["n_tokens"] == sum(len(tiny_tokenizer.encode(t)) + 1 for t in texts)
    assert not (tmp_path / "out" / "c_val.bin").exists()


def test_every_input_format_gives_the_same_documents(tmp_path, tiny_tokenizer_path, tiny_tokenizer):
    texts = make_chinese_texts(12, seed=6)
    records = [{"title": t[:4], "body": t[4:], "id": i} for i, t in enumerate(texts)]
    (tmp_path / "a.json").write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    pd.DataFrame(records).to_csv(tmp_path / "c.csv", index=False)
    pd.DataFrame(records).to_parquet(tmp_path / "d.parquet")
    for name in ("a.json", "b.jsonl.gz", "c.csv", "d.parquet"):
        pretrain([tmp_path / name], tmp_path / "out" / name, tiny_tokenizer_path, "--template", "{title}{body}",
                 "--val-fraction", "0", "--min-tokens", "1")
        assert read_docs(tmp_path / "out" / (name + ".bin"), tiny_tokenizer) == texts, name
    (tmp_path / "e.txt").write_text("\n".join(texts) + "\n\n", encoding="utf-8")  # one document per line
    pretrain([tmp_path / "e.txt"], tmp_path / "e", tiny_tokenizer_path, "--val-fraction", "0", "--min-tokens", "1")
    assert read_docs(tmp_path / "e.bin", tiny_tokenizer) == texts


def test_json_arrays_stream_in_small_blocks_with_line_numbers(tmp_path):
    records = [{"text": t, "n": i} for i, t in enumerate(make_chinese_texts(30, seed=13))]
    (tmp_path / "a.json").write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    with open(tmp_path / "a.json", encoding="utf-8") as f:
        streamed = list(corpus.iter_json_array(f, tmp_path / "a.json", block=16))
    assert [r for _, r in streamed] == records
    assert [line for line, _ in streamed[:2]] == [2, 6]  # where each element starts
    (tmp_path / "b.json").write_text('[\n {"q": "一", "a": "二"},\n {"q": "二" "三"}\n]', encoding="utf-8")
    with pytest.raises(SystemExit, match="b.json:3: malformed JSON"):
        run("sft", "--input", tmp_path / "b.json", "--out", tmp_path / "o.jsonl")


def test_formats_by_name_and_content(tmp_path):
    (tmp_path / "lines.json").write_text('{"text": "一"}\n{"text": "二"}\n', encoding="utf-8")
    (tmp_path / "array.json").write_text('\n [{"text": "一"}]', encoding="utf-8")
    assert corpus.format_suffix(tmp_path / "a.JSONL.gz") == ".jsonl"
    assert [corpus.input_format(tmp_path / n) for n in ("lines.json", "array.json")] == ["jsonl", "json"]
    assert corpus.known_format(tmp_path / "b.tsv.gz") and not corpus.known_format(tmp_path / "c.gz")
    assert corpus.parse_item("text", "一行\r\n".encode()) == {"text": "一行"}
    with pytest.raises(corpus.DataError, match="expected a JSON object, got list"):
        corpus.parse_item("jsonl", b"[1]")


def test_output_is_identical_for_any_worker_count(tmp_path, tiny_tokenizer_path):
    texts = make_chinese_texts(300, seed=7)
    texts += texts[:40] + ["短"] * 5  # duplicates and too-short documents
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        pretrain([src], out, tiny_tokenizer_path, "--workers", workers, "--chunk-bytes", 2000,
                 "--val-fraction", "0.1", "--dedup")
        outputs.append([(tmp_path / f"w{workers}{s}.bin").read_bytes() for s in ("", "_val")])
        meta, val_meta = (json.loads((tmp_path / f"w{workers}{s}.json").read_text()) for s in ("", "_val"))
        assert meta["summary"]["dropped_duplicate"] == 40 and meta["summary"]["dropped_short"] >= 5
        assert meta["n_documents"] + val_meta["n_documents"] == 300 - meta["summary"]["dropped_short"] + 5
        assert 10 <= val_meta["n_documents"] <= 60
    assert outputs[0] == outputs[1]


def test_ids_outside_the_vocabulary_are_refused(tmp_path, tiny_tokenizer_path, monkeypatch):
    def small_vocab_tokenizer(path=None):
        tokenizer = Tokenizer(path)
        tokenizer.vocab_size = 100  # as if the .bin were meant for a smaller vocabulary than the ids use
        return tokenizer
    monkeypatch.setattr(data_process, "load_tokenizer", small_vocab_tokenizer)
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in make_chinese_texts(20, seed=8)])
    with pytest.raises(SystemExit, match=r"docs.jsonl:1: token id \d+ is outside the vocabulary \(vocab size 100\)"):
        pretrain([src], tmp_path / "c", tiny_tokenizer_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


def test_bad_input_names_file_and_line_unless_skipped(tmp_path, tiny_tokenizer_path):
    good = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in make_chinese_texts(6, seed=9)]
    cases = {"malformed JSON": b'{"text": "x"', "missing field 'text'": b'{"body": "x"}',
             "non-UTF-8 bytes": b'{"text": "\xff\xfe"}'}
    for i, (message, bad_line) in enumerate(cases.items()):
        src = tmp_path / f"bad{i}.jsonl"
        src.write_bytes(b"\n".join(good[:3] + [bad_line] + good[3:]) + b"\n")
        with pytest.raises(SystemExit, match=f"bad{i}.jsonl:4: {message}"):
            pretrain([src], tmp_path / "c", tiny_tokenizer_path)
        assert not (tmp_path / "c.bin").exists() and not (tmp_path / "c.json").exists()
    pretrain(sorted(tmp_path.glob("bad*.jsonl")), tmp_path / "c", tiny_tokenizer_path, "--skip-bad", "--min-tokens", "1")
    meta = json.loads((tmp_path / "c.json").read_text())
    assert meta["summary"]["skipped_bad"] == 3 and meta["summary"]["documents_read"] == 21


def test_interrupted_run_leaves_nothing_complete_looking(tmp_path, tiny_tokenizer_path, monkeypatch):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in make_chinese_texts(200, seed=10)])
    out = tmp_path / "out" / "c"
    pretrain([src], out, tiny_tokenizer_path)
    finished = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    assert sorted(finished) == ["c.bin", "c.json", "c_val.bin", "c_val.json"]
    pretrain([src], out, tiny_tokenizer_path)  # finished: skipped, untouched
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == finished

    # a crash after the data is written but before the meta that marks completion
    def crash(path, obj):
        raise KeyboardInterrupt
    monkeypatch.setattr(tokenize_corpus, "write_json_atomic", crash)
    with pytest.raises(SystemExit, match="^data_process.py: interrupted$"):
        pretrain([src], out, tiny_tokenizer_path, "--force")
    assert not (tmp_path / "out" / "c.json").exists() and not (tmp_path / "out" / "c_val.json").exists()
    assert not list((tmp_path / "out").glob("*.tmp"))
    with pytest.raises(Refusal, match="no meta file"):
        PretrainDataset(tmp_path / "out" / "c.bin", 8)

    # a crash in the middle of the input (bad record after many written chunks)
    monkeypatch.undo()
    with open(src, "a") as f:
        f.write("not json\n")
    with pytest.raises(SystemExit, match="docs.jsonl:201"):
        pretrain([src], out, tiny_tokenizer_path, "--chunk-bytes", 500)
    assert not (tmp_path / "out" / "c.json").exists() and not list((tmp_path / "out").glob("*.tmp"))
    pretrain([src], out, tiny_tokenizer_path, "--skip-bad")  # nothing finished: not skipped
    assert json.loads((tmp_path / "out" / "c.json").read_text())["summary"]["skipped_bad"] == 1


def test_preset_offline_gives_a_clear_message(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, str(ROOT / "data_process.py"), "sft", "--preset", "alpaca-zh",
                           "--out", str(tmp_path / "a.jsonl"), "--raw-dir", str(tmp_path / "raw")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode != 0
    assert "downloading the Hub dataset shibing624/alpaca-zh failed" in proc.stderr
    assert "--input" in proc.stderr
    # the hinted command is one the pinned huggingface_hub installs, and its flags parse
    # (offline it fails to download, exit 1, not with a usage error, exit 2)
    hint = next(line for line in proc.stderr.splitlines() if line.strip().startswith("hf download"))
    cli = [str(Path(sys.executable).parent / "hf"), *shlex.split(hint)[1:]]
    assert subprocess.run(cli, capture_output=True, text=True, env=env, cwd=tmp_path).returncode == 1


def test_own_vocabulary_from_the_corpus(tmp_path, tiny_tokenizer_path):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"content": t} for t in make_chinese_texts(300, seed=11)])
    run("tokenizer", "--input", src, "--vocab-size", 420, "--out", tmp_path / "own.model", "--sample-docs", 200)
    own = Tokenizer(tmp_path / "own.model")
    assert own.vocab_size == 420 and own.bos_id == 1 and own.eos_id == 2
    pretrain([src], tmp_path / "c", tmp_path / "own.model", "--val-fraction", "0")
    assert json.loads((tmp_path / "c.json").read_text())["tokenizer"]["sha256"] == own.sha256


# ---------------------------------------------------------------------------- sft / eval

def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def sft(inputs, out, *extra):
    run("sft", "--input", *inputs, "--out", out, "--val-fraction", "0", *extra)
    return read_jsonl(out)


def test_sft_alpaca_csv_and_conversations_normalize_to_prompt_answer(tmp_path):
    alpaca = [{"instruction": "翻译成英文", "input": "你好", "output": "Hello"},
              {"instruction": "头痛怎么办？", "input": "", "output": "多休息。"},
              {"instruction": "还有呢", "input": "", "output": "多喝水。", "history": [["头痛怎么办？", "多休息。"]]}]
    (tmp_path / "a.json").write_text(json.dumps(alpaca, ensure_ascii=False), encoding="utf-8")
    assert sft([tmp_path / "a.json"], tmp_path / "a.jsonl") == [
        {"prompt": "翻译成英文\n你好", "answer": "Hello"}, {"prompt": "头痛怎么办？", "answer": "多休息。"},
        {"prompt": "问：头痛怎么办？\n答：多休息。\n还有呢", "answer": "多喝水。"}]

    with open(tmp_path / "b.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["prompt", "answer"], ["发热怎么办", "量体温，\n多喝水"], ["咳嗽", "止咳"]])
    assert sft([tmp_path / "b.csv"], tmp_path / "b.jsonl") == [
        {"prompt": "发热怎么办", "answer": "量体温，\n多喝水"}, {"prompt": "咳嗽", "answer": "止咳"}]
    with open(tmp_path / "c.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["ask", "reply", "prompt"], ["胃痛", "热敷", "unused"]])
    assert sft([tmp_path / "c.csv"], tmp_path / "c.jsonl", "--prompt-field", "ask", "--answer-field", "reply") == [
        {"prompt": "胃痛", "answer": "热敷"}]

    chats = [{"conversations": [{"from": "system", "value": "你是医生"}, {"from": "human", "value": "我头痛"},
                                {"from": "gpt", "value": "多久了？"}, {"from": "human", "value": "两天"},
                                {"from": "gpt", "value": "请就医。"}]},
             {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}]
    write_jsonl(tmp_path / "d.jsonl", chats)
    assert sft([tmp_path / "d.jsonl"], tmp_path / "d.jsonl.out.jsonl") == [
        {"prompt": "你是医生\n我头痛", "answer": "多久了？"},
        {"prompt": "你是医生\n问：我头痛\n答：多久了？\n两天", "answer": "请就医。"},
        {"prompt": "你好", "answer": "你好！"}]


def test_conversation_prompts_are_prompt_context_prompt():
    turns = [{"role": "system", "content": "你是医生"}, {"role": "user", "content": "我头痛"},
             {"role": "assistant", "content": "多久了？"}, {"role": "user", "content": "两天"},
             {"role": "assistant", "content": "请就医。"}]
    assert qa_examples.conversation_examples(turns) == [
        (context_prompt([], "我头痛", "你是医生"), "多久了？"),
        (context_prompt([("我头痛", "多久了？")], "两天", "你是医生"), "请就医。")]
    blank_system = [{"from": "system", "value": " "}, {"from": "human", "value": "你好"}, {"from": "gpt", "value": "好"}]
    assert qa_examples.conversation_examples(blank_system) == [("你好", "好")]  # adds no empty line


def test_sft_exclude_questions_dedup_and_val_split(tmp_path):
    write_jsonl(tmp_path / "eval.jsonl", [{"question": "糖尿病 患者能吃西瓜吗？", "answer": "少量"},
                                          {"question": "高血压要注意什么", "answer": "低盐"}])
    examples = [{"instruction": "糖尿病患者，能吃西瓜吗", "input": "", "output": "a"},  # punctuation/space differ
                {"instruction": "请问：高血压要注意什么？谢谢", "input": "", "output": "b"},  # contains it
                {"instruction": "高血压", "input": "", "output": "c"},  # only a part of it: kept
                {"instruction": "感冒了", "input": "", "output": "d"},
                {"instruction": "感冒了", "input": "", "output": "d"},  # exact duplicate
                {"instruction": "", "input": "", "output": "e"}]  # empty prompt
    write_jsonl(tmp_path / "s.jsonl", examples)
    out = sft([tmp_path / "s.jsonl"], tmp_path / "o.jsonl", "--exclude-questions", tmp_path / "eval.jsonl")
    assert [e["answer"] for e in out] == ["c", "d"]

    texts = make_chinese_texts(400, seed=12)
    write_jsonl(tmp_path / "many.jsonl", [{"question": t, "answer": t[::-1]} for t in texts])
    run("sft", "--input", tmp_path / "many.jsonl", "--out", tmp_path / "m.jsonl", "--val-fraction", "0.1")
    train, val = read_jsonl(tmp_path / "m.jsonl"), read_jsonl(tmp_path / "m_val.jsonl")
    assert len(train) + len(val) == len(set(texts)) and 15 <= len(val) <= 70
    assert {e["prompt"] for e in val} == {t for t in set(texts) if splits.is_val(t.encode(), 0.1)}


def test_sft_bad_lines_and_length_filters(tmp_path, tiny_tokenizer_path, capsys):
    lines = [json.dumps({"instruction": "头痛", "output": "休息"}, ensure_ascii=False), '{"instruction": "x",',
             json.dumps({"instruction": "发热"}, ensure_ascii=False),
             json.dumps({"conversations": [{"from": "gpt", "value": "先答"}]}, ensure_ascii=False),
             json.dumps({"instruction": "咳嗽", "output": "止咳" * 50}, ensure_ascii=False)]
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="s.jsonl:2: malformed JSON"):
        sft([tmp_path / "s.jsonl"], tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists() and not list(tmp_path.glob("*.tmp"))
    out = sft([tmp_path / "s.jsonl"], tmp_path / "o.jsonl", "--skip-bad", "--tokenizer", tiny_tokenizer_path,
              "--max-answer-tokens", 20)
    assert out == [{"prompt": "头痛", "answer": "休息"}]
    report = capsys.readouterr().out
    assert "{'answer_too_long': 1}; 3 bad records skipped" in report
    assert "s.jsonl:3: missing field 'output'" in report and "s.jsonl:4: turn 0 (gpt): turns must alternate" in report


def test_eval_writes_question_answer(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [{"instruction": "孩子发烧38度", "input": "怎么办", "output": "物理降温"},
                                          {"question": "失眠吃什么药", "answer": "遵医嘱"}])
    run("eval", "--input", tmp_path / "test.jsonl", "--out", tmp_path / "qa")
    assert read_jsonl(tmp_path / "qa.jsonl") == [{"question": "孩子发烧38度\n怎么办", "answer": "物理降温"},
                                                 {"question": "失眠吃什么药", "answer": "遵医嘱"}]


def test_small_vocabulary_needs_lower_character_coverage(tmp_path):
    # A vocabulary too small for every character seen fails clearly at full coverage and
    # trains at a lower one, where rare characters still round-trip through byte pieces.
    texts = make_chinese_texts(300, seed=12) + ["罕见的字：龘靐齉"] * 2
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    with pytest.raises(SystemExit, match="(?i)character"):
        run("tokenizer", "--input", src, "--vocab-size", 345, "--out", tmp_path / "a.model", "--character-coverage", "1.0")
    assert not (tmp_path / "a.model").exists()
    run("tokenizer", "--input", src, "--vocab-size", 345, "--out", tmp_path / "b.model", "--character-coverage", "0.98")
    own = Tokenizer(tmp_path / "b.model")
    assert own.vocab_size == 345 and own.decode(own.encode(texts[-1])) == texts[-1]
