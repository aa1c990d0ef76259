import csv
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, make_chinese_texts

import data_process
from chatglm_tokenizer import Tokenizer
from dataset import PretrainDataset


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
        tok = Tokenizer(path)
        tok.vocab_size = 100  # as if the .bin were meant for a smaller vocabulary than the ids use
        return tok
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
    monkeypatch.setattr(data_process, "write_json_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain([src], out, tiny_tokenizer_path, "--force")
    assert not (tmp_path / "out" / "c.json").exists() and not (tmp_path / "out" / "c_val.json").exists()
    assert not list((tmp_path / "out").glob("*.tmp"))
    with pytest.raises(ValueError, match="no meta file"):
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
    assert "--input" in proc.stderr and "huggingface-cli download shibing624/alpaca-zh" in proc.stderr


def test_own_vocabulary_from_the_corpus(tmp_path, tiny_tokenizer_path):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"content": t} for t in make_chinese_texts(300, seed=11)])
    run("tokenizer", "--input", src, "--vocab-size", 420, "--out", tmp_path / "own.model", "--sample-docs", 200)
    own = Tokenizer(tmp_path / "own.model")
    assert own.vocab_size == 420 and own.bos_id == 1 and own.eos_id == 2
    pretrain([src], tmp_path / "c", tmp_path / "own.model", "--val-fraction", "0")
    assert json.loads((tmp_path / "c.json").read_text())["tokenizer"]["sha256"] == own.sha256
