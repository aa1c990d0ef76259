"""Bad inputs and faults: what a user who damages, truncates, fills or mistypes something sees.

Each test is one case of README's "Troubleshooting": damaged and truncated checkpoints,
token ids outside the vocabulary, damaged .gz inputs, outputs that would be empty, a full
disk and a read-only output directory, SIGTERM in the middle of a step, refusals shown as
one line instead of a traceback, and --resume with changed settings."""
import errno
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from conftest import ROOT, make_chinese_texts
from test_dataset import write_bin
from test_train import TINY, bins, losses  # noqa: F401  (bins: the tiny .bin fixture)

import atomic
import data_process
import eval as qa_eval
import export
import generate
import pretrain
import sft
import splits
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dataset import PretrainDataset
from refusal import Refusal

pytestmark = pytest.mark.usefixtures("one_thread")


def train(bins, out_dir, *flags):
    return pretrain.main([*bins, *TINY, "--out-dir", str(out_dir), "--eval-every", "100", *flags])


def flip_tensor_bytes(path, n=16):
    """Flip n bytes in the middle of the checkpoint's largest tensor (torch's zip stores tensor
    data uncompressed, and torch.load does not check the zip's CRCs)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    h = info.header_offset  # local file header: 30 bytes, then the name and the extra field
    start = h + 30 + int.from_bytes(data[h + 26:h + 28], "little") + int.from_bytes(data[h + 28:h + 30], "little")
    middle = start + info.file_size // 2
    data[middle:middle + n] = bytes(b ^ 0xFF for b in data[middle:middle + n])
    path.write_bytes(bytes(data))


class FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are in: a disk filling up."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def fail_writes(monkeypatch, name_suffix, error=errno.ENOSPC, room=0):
    """Make atomic's files whose name ends with name_suffix fail: writes after `room` bytes
    with ENOSPC, or opening with another errno (EROFS, EACCES: a read-only directory)."""
    def failing_open(path, mode="r", **kwargs):
        if not re.sub(r"\.[0-9a-f]{8}\.tmp$", ".tmp", str(path)).endswith(name_suffix):  # NAME.RANDOM.tmp
            return open(path, mode, **kwargs)
        if error != errno.ENOSPC:
            raise OSError(error, os.strerror(error), str(path))
        return FullDisk(open(path, mode, **kwargs), room)
    monkeypatch.setattr(atomic, "open", failing_open, raising=False)


# ---------------------------------------------------------------------------- checkpoints

def test_flipped_bytes_in_a_checkpoint_are_refused_by_every_loader(bins, tmp_path, tiny_tokenizer_path):
    train(bins, tmp_path, "--max-steps", "2")
    path = tmp_path / "step_00000002.pt"
    assert load_checkpoint(path)["step"] == 2
    flip_tensor_bytes(path)
    torch.load(path, weights_only=True)  # the file still loads: only the checksums can tell
    with pytest.raises(CheckpointError, match=r"step_00000002.pt is damaged: \d+ of its entries differ from their checksums \(first: model/"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="step_00000002.pt is damaged"):  # eval.py and chat.py load so
        generate.load_for_inference(path, tiny_tokenizer_path, device="cpu")
    with pytest.raises(CheckpointError, match="step_00000002.pt is damaged"):
        export.export(path, tmp_path / "hf", tiny_tokenizer_path)
    assert not (tmp_path / "hf").exists()
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "头痛", "answer": "休息"}, ensure_ascii=False) + "\n")
    with pytest.raises(SystemExit, match="step_00000002.pt is damaged"):
        sft.main(["--init", str(path), "--data", str(tmp_path / "sft.jsonl"), "--out-dir", str(tmp_path / "sft"),
                  "--tokenizer", str(tiny_tokenizer_path), "--max-steps", "1", "--num-workers", "0"])


def test_resume_falls_back_past_a_damaged_checkpoint_and_pruning_keeps_the_good_one(bins, tmp_path, capsys):
    flags = ["--max-steps", "6", "--dropout", "0.1"]
    train(bins, tmp_path / "whole", *flags)
    train(bins, tmp_path / "parts", *flags, "--save-every", "2", "--stop-after-steps", "4")
    flip_tensor_bytes(tmp_path / "parts" / "step_00000004.pt")
    capsys.readouterr()
    train(bins, tmp_path / "parts", *flags, "--save-every", "1", "--keep-last", "1", "--resume")
    out = capsys.readouterr().out
    assert "step_00000004.pt is damaged" in out and "falling back to" in out and "step_00000002.pt (step 2)" in out
    # the damaged file is set aside, so pruning (keep 1) never kept it instead of a good one
    assert sorted(p.name for p in (tmp_path / "parts").glob("step_*")) == [
        "step_00000004.json.damaged", "step_00000004.pt.damaged", "step_00000006.json", "step_00000006.pt"]
    assert load_checkpoint(tmp_path / "parts" / "step_00000006.pt")["step"] == 6
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")  # steps 3-6 retrained exactly


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(bins, tmp_path, capsys):
    train(bins, tmp_path, "--max-steps", "4", "--save-every", "2")
    latest = tmp_path / "step_00000004.pt"
    latest.write_bytes(latest.read_bytes()[:latest.stat().st_size // 2])
    capsys.readouterr()
    train(bins, tmp_path, "--max-steps", "4", "--save-every", "2", "--resume")
    out = capsys.readouterr().out
    assert "step_00000004.pt is corrupt (truncated or overwritten)" in out and "resumed from" in out
    assert "falling back to" in out and load_checkpoint(latest)["step"] == 4  # retrained and saved whole


def test_resume_falls_back_to_best_pt_when_no_step_checkpoint_verifies(bins, tmp_path, capsys):
    train(bins, tmp_path, "--max-steps", "2", "--eval-every", "1")
    best_step = load_checkpoint(tmp_path / "best.pt")["step"]
    step = tmp_path / "step_00000002.pt"
    step.write_bytes(step.read_bytes()[:100])
    capsys.readouterr()
    train(bins, tmp_path, "--max-steps", "3", "--resume")
    out = capsys.readouterr().out
    assert f"falling back to {tmp_path / 'best.pt'} (step {best_step})" in out
    (tmp_path / "best.pt").write_bytes(b"not a checkpoint")
    for p in tmp_path.glob("step_*.pt"):
        p.write_bytes(b"")
    with pytest.raises(SystemExit, match=r"no checkpoint in \S+ is usable \(.*best.pt is corrupt.*\); move them away"):
        train(bins, tmp_path, "--max-steps", "4", "--resume")


# ---------------------------------------------------------------------------- token ids

def test_data_process_records_the_largest_id(tmp_path, tiny_tokenizer_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in make_chinese_texts(80, seed=4)))
    data_process.main(["pretrain", "--input", str(src), "--out", str(tmp_path / "c"), "--tokenizer", str(tiny_tokenizer_path),
                       "--val-fraction", "0.2"])
    for name in ("c", "c_val"):
        meta = json.loads((tmp_path / f"{name}.json").read_text())
        assert meta["max_id"] == int(np.fromfile(tmp_path / f"{name}.bin", dtype="<u2").max())


@pytest.mark.parametrize("with_max_id", [True, False], ids=["meta", "older-meta-scanned"])
def test_bin_with_ids_outside_the_vocabulary_is_refused_on_loading(bins, tmp_path, tiny_tokenizer, with_max_id):
    ids = np.arange(600) % 500  # a vocabulary of 500 ids, but the model's has 400
    for name in ("x.bin", "x_val.bin"):
        write_bin(tmp_path / name, ids, tiny_tokenizer.identity())
        if not with_max_id:
            meta = json.loads((tmp_path / name).with_suffix(".json").read_text())
            del meta["max_id"]
            (tmp_path / name).with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match=r"x.bin: holds token id 499, outside the model's vocabulary of 400"):
        pretrain.main(["--data", str(tmp_path / "x.bin"), *bins[2:], *TINY, "--out-dir", str(tmp_path / "o"),
                       "--max-steps", "1"])


def test_damaged_bin_is_stopped_at_the_batch_naming_file_and_offset(bins, tmp_path, tiny_tokenizer):
    ids = np.asarray([i for t in make_chinese_texts(60, seed=2) for i in tiny_tokenizer.encode(t, eos=True)])
    for name in ("x.bin", "x_val.bin"):
        write_bin(tmp_path / name, ids, tiny_tokenizer.identity())
    # after the meta was written, one id becomes 400: the first of the rows a GPU pads the
    # vocabulary with (to 448), where it would have been a silent target instead of an error
    damaged = ids.astype("<u2")
    damaged[1000] = 400
    damaged.tofile(tmp_path / "x.bin")
    dataset = PretrainDataset(tmp_path / "x.bin", 16, tiny_tokenizer.identity())  # the meta looks fine
    with pytest.raises(Refusal, match=r"x.bin: token id 400 at token offset 1,000 \(byte 2,000\)"):
        dataset[1000 // 16]
    with pytest.raises(SystemExit, match=r"x.bin: token id 400 at token offset 1,000"):
        pretrain.main(["--data", str(tmp_path / "x.bin"), *bins[2:], *TINY, "--out-dir", str(tmp_path / "o"),
                       "--epochs", "1", "--eval-every", "0"])


# ---------------------------------------------------------------------------- data_process

def run_data_process(*argv):
    return data_process.main([str(a) for a in argv])


def both_refuse(src, tmp_path, tokenizer_path, flags, pretrain_message, sft_message):
    """data_process.py pretrain and sft both stop on input src with these messages."""
    with pytest.raises(SystemExit, match=pretrain_message):
        run_data_process("pretrain", "--input", src, "--out", tmp_path / "c", "--tokenizer", tokenizer_path, *flags)
    with pytest.raises(SystemExit, match=sft_message):
        run_data_process("sft", "--input", src, "--out", tmp_path / "s.jsonl", *flags)


@pytest.mark.parametrize("skip_bad", [[], ["--skip-bad"]], ids=["stop", "skip-bad"])
def test_truncated_gz_and_plain_file_named_gz_name_the_file(tmp_path, tiny_tokenizer_path, skip_bad):
    text = "".join(json.dumps({"text": t, "prompt": t, "answer": t}, ensure_ascii=False) + "\n"
                   for t in make_chinese_texts(300, seed=3))
    packed = gzip.compress(text.encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(packed[:len(packed) // 2])
    (tmp_path / "plain.jsonl.gz").write_text(text, encoding="utf-8")
    for name, why in (("cut.jsonl.gz", "Compressed file ended"), ("plain.jsonl.gz", "Not a gzipped file")):
        both_refuse(tmp_path / name, tmp_path, tiny_tokenizer_path, skip_bad,
                    rf"^data_process.py: error: \S*{name}: damaged gzip file \({why}",
                    rf"^data_process.py: error: \S*{name}: damaged gzip file \({why}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.jsonl.gz", "plain.jsonl.gz"]


@pytest.mark.parametrize("meta, words", [('{"dtype": "uint16", "n_tok', "damaged meta file"),
                                         ('{"dtype": "uint16"}', "meta file without n_tokens, tokenizer, vocab_size"),
                                         ('[1]', "meta file without all")])
def test_a_damaged_bin_meta_is_one_line_naming_it(bins, tmp_path, meta, words):
    corpus = tmp_path / "corpus.bin"
    for name in ("corpus.bin", "corpus_val.bin"):
        (tmp_path / name).write_bytes(b"\0\0" * 40)
        (tmp_path / name).with_suffix(".json").write_text(meta)
    with pytest.raises(SystemExit, match=rf"^pretrain.py: error: \S*corpus.json: {words}.*re-run data_process.py pretrain"):
        pretrain.main(["--data", str(corpus), *bins[2:], "--out-dir", str(tmp_path / "run"), *TINY, "--max-steps", "1"])


def test_byte_order_marks_and_long_csv_fields_are_read(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM (else the first column is "\ufeffprompt"); a CSV
    field over the csv module's 128 KiB limit is one long document, not an error."""
    from corpus import iter_records, stop_at_bad
    long_text = "头痛" * 70_000
    (tmp_path / "excel.csv").write_text("\ufeffprompt,answer\n头痛,多休息\n", encoding="utf-8")
    (tmp_path / "long.csv").write_text(f"text\n{long_text}\n", encoding="utf-8")
    (tmp_path / "bom.jsonl").write_text('\ufeff{"text": "多喝水"}\n', encoding="utf-8")
    assert [r for _, r in iter_records(tmp_path / "excel.csv", stop_at_bad)] == [{"prompt": "头痛", "answer": "多休息"}]
    assert [r for _, r in iter_records(tmp_path / "long.csv", stop_at_bad)] == [{"text": long_text}]
    assert [r for _, r in iter_records(tmp_path / "bom.jsonl", stop_at_bad)] == [{"text": "多喝水"}]


def test_empty_input_or_every_record_bad_fails_with_nothing_written(tmp_path, tiny_tokenizer_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\nnot json\n')
    for name, flags in (("empty.jsonl", []), ("bad.jsonl", ["--skip-bad"])):
        both_refuse(tmp_path / name, tmp_path, tiny_tokenizer_path, flags,
                    r"c.bin: no documents to write \(read \d+ records", r"s.jsonl: no examples to write \(read \d+ examples")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty.jsonl"]


def test_small_corpus_still_gets_one_validation_document(tmp_path, tiny_tokenizer_path, tiny_tokenizer):
    texts = make_chinese_texts(5, seed=11)
    assert not any(splits.is_val(t.encode(), data_process.PRETRAIN_VAL_FRACTION) for t in texts)  # the hash picks none
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        run_data_process("pretrain", "--input", src, "--out", out / "c", "--tokenizer", tiny_tokenizer_path,
                         "--min-tokens", "1", "--workers", workers, "--chunk-bytes", 200)
        outputs.append({p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".bin"})
    assert outputs[0] == outputs[1]  # the same bytes for any worker count
    val = np.frombuffer(outputs[0]["c_val.bin"], dtype="<u2")
    assert tiny_tokenizer.decode(val[:-1].tolist()) == texts[-1]
    meta = json.loads((tmp_path / "w1" / "c.json").read_text())
    assert meta["n_documents"] == 4 and meta["max_id"] == int(np.frombuffer(outputs[0]["c.bin"], dtype="<u2").max())
    PretrainDataset(tmp_path / "w1" / "c_val.bin", 4)  # usable by pretrain.py

    src.write_text(json.dumps({"text": texts[0]}, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"c_val.bin: cannot hold out a validation document: only 1 document"):
        run_data_process("pretrain", "--input", src, "--out", tmp_path / "one" / "c", "--tokenizer", tiny_tokenizer_path,
                         "--min-tokens", "1")
    assert not (tmp_path / "one").exists() or not list((tmp_path / "one").iterdir())

    pairs = [{"prompt": f"问题{i}", "answer": "回答"} for i in range(3)]  # sft: the same guarantee
    assert not any(splits.is_val(p["prompt"].encode(), data_process.SFT_VAL_FRACTION) for p in pairs)
    (tmp_path / "sft_in.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    run_data_process("sft", "--input", tmp_path / "sft_in.jsonl", "--out", tmp_path / "s.jsonl")
    assert [json.loads(line) for line in (tmp_path / "s_val.jsonl").read_text().splitlines()] == pairs[-1:]
    assert [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()] == pairs[:-1]


# ---------------------------------------------------------------------------- disk full, read-only

def test_disk_full_during_a_checkpoint_save_names_it_and_leaves_no_temp_file(bins, tmp_path, monkeypatch):
    train(bins, tmp_path, "--max-steps", "2")
    fail_writes(monkeypatch, "step_00000004.pt.tmp", room=1000)
    with pytest.raises(SystemExit, match=r"step_00000004.pt: the disk is full; free some space and run again"):
        train(bins, tmp_path, "--max-steps", "4", "--resume")
    assert not list(tmp_path.glob("*.tmp"))
    assert load_checkpoint(tmp_path / "step_00000002.pt")["step"] == 2  # what was there is intact


def test_disk_full_while_writing_metrics_names_the_file(bins, tmp_path, monkeypatch):
    fail_writes(monkeypatch, "metrics.jsonl.tmp")
    with pytest.raises(SystemExit, match=r"metrics.jsonl: the disk is full"):
        train(bins, tmp_path, "--max-steps", "2")
    assert not list(tmp_path.glob("*.tmp"))


def test_disk_full_while_writing_data_leaves_nothing_complete_looking(tmp_path, tiny_tokenizer_path, monkeypatch):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in make_chinese_texts(300, seed=7)))
    for failing in ("c.json.tmp", "c.bin.tmp"):  # the meta that marks completion (the val meta is in by then)
        fail_writes(monkeypatch, failing)
        with pytest.raises(SystemExit, match=rf"^data_process.py: error: cannot write \S*{failing[:-4]}: the disk is full"):
            run_data_process("pretrain", "--input", src, "--out", tmp_path / "out" / "c",
                             "--tokenizer", tiny_tokenizer_path, "--val-fraction", "0.2")
        assert list((tmp_path / "out").iterdir()) == []
    fail_writes(monkeypatch, "s.jsonl.tmp")
    with pytest.raises(SystemExit, match=r"s.jsonl: the disk is full"):
        run_data_process("sft", "--input", tmp_path / "docs.jsonl", "--out", tmp_path / "out" / "s.jsonl",
                         "--prompt-field", "text", "--answer-field", "text")
    assert list((tmp_path / "out").iterdir()) == []


def test_disk_full_while_eval_writes_its_answers_is_one_line(tmp_path, tiny_tokenizer, monkeypatch):
    from test_eval import qa_rows, save_tiny_checkpoint, write_jsonl
    ckpt = save_tiny_checkpoint(tmp_path / "sft" / "best.pt", tiny_tokenizer, "sft")
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(2))
    fail_writes(monkeypatch, "predictions.jsonl.tmp")
    with pytest.raises(SystemExit, match=r"^eval.py: error: cannot write \S*predictions.jsonl: the disk is full"):
        qa_eval.main(["--ckpt", str(ckpt), "--data", str(data), "--out-dir", str(tmp_path / "out"),
                      "--max-new-tokens", "4", "--bootstrap", "0"])
    assert not list((tmp_path / "out").glob("*.tmp"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable CUDA GPU")
def test_a_cuda_device_without_a_gpu_is_one_line_in_training_and_inference(bins, tmp_path, tiny_tokenizer):
    from test_eval import qa_rows, save_tiny_checkpoint, write_jsonl
    ckpt = save_tiny_checkpoint(tmp_path / "sft" / "best.pt", tiny_tokenizer, "sft")
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(2))
    with pytest.raises(SystemExit, match=r"^eval.py: error: --device cuda: (this torch is built without CUDA|no CUDA GPU)"):
        qa_eval.main(["--ckpt", str(ckpt), "--data", str(data), "--out-dir", str(tmp_path / "out"), "--device", "cuda"])
    with pytest.raises(SystemExit, match=r"^pretrain.py: error: --device cuda:1: (this torch|no CUDA GPU)"):
        pretrain.main([*bins, "--out-dir", str(tmp_path / "run"), *TINY, "--device", "cuda:1"])
    with pytest.raises(SystemExit, match=r"--device gpu: not a device; use cpu, cuda or cuda:N"):
        pretrain.main([*bins, "--out-dir", str(tmp_path / "run"), *TINY, "--device", "gpu"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("error, words", [(errno.EROFS, "the file system is read-only"),
                                          (errno.EACCES, "permission denied")], ids=["EROFS", "EACCES"])
def test_read_only_output_directory_is_named_as_such(bins, tmp_path, tiny_tokenizer_path, monkeypatch, error, words):
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "头痛发热"}, ensure_ascii=False) + "\n")
    fail_writes(monkeypatch, ".tmp", error=error)  # (tests run as root, where chmod does not stop writes)
    with pytest.raises(SystemExit, match=rf"^pretrain.py: error: cannot write \S*metrics.jsonl: {words}; "
                                         r"choose a writable output directory$"):
        train(bins, tmp_path / "out", "--max-steps", "1")
    with pytest.raises(SystemExit, match=rf"^data_process.py: error: cannot write \S*c.bin: {words}"):
        run_data_process("pretrain", "--input", tmp_path / "docs.jsonl", "--out", tmp_path / "data" / "c",
                         "--tokenizer", tiny_tokenizer_path)


# ---------------------------------------------------------------------------- signals, refusals, resume

def test_sigterm_during_a_step_saves_after_that_step(bins, tmp_path, monkeypatch):
    class SignalledModel(pretrain.Transformer):
        """Sends this process SIGTERM in the middle of step 4 (its 7th forward: 2 per step)."""
        calls = 0

        def forward(self, *args, **kwargs):
            SignalledModel.calls += 1
            if SignalledModel.calls == 7:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().forward(*args, **kwargs)

    monkeypatch.setattr(pretrain, "Transformer", SignalledModel)
    train(bins, tmp_path, "--max-steps", "20", "--save-every", "100")
    assert [p.name for p in tmp_path.glob("step_*.pt")] == ["step_00000004.pt"]
    assert losses(tmp_path)[-1][0] == 4


@pytest.mark.parametrize("script, flags, message", [
    ("pretrain.py", ["--data", "no/such/*.bin"], "pretrain.py: error: --data no/such/*.bin: no .bin files match"),
    ("pretrain.py", ["--dim", "30"], "pretrain.py: error: model flags: dim 30 must divide by n_heads 8, and n_heads by n_kv_heads 8"),
    ("sft.py", ["--init", "no/such/dir"], "sft.py: error: checkpoint no/such/dir does not exist; pass a checkpoint file or a training out dir"),
])
def test_refusals_are_one_line_without_a_traceback(tmp_path, tiny_tokenizer_path, script, flags, message):
    r = subprocess.run([sys.executable, str(ROOT / script), *flags, "--tokenizer", str(tiny_tokenizer_path),
                        "--out-dir", str(tmp_path / "o")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [message]


def die_on_the_third(task):
    """A worker's work that gets the worker killed (as the kernel's OOM killer would) at one task."""
    if task.byte_range[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return task.byte_range[0]


def no_setup():
    pass


def test_a_killed_tokenizer_worker_names_the_file_and_the_likely_cause(tmp_path):
    from corpus import DataError, map_ordered
    from tokenize_corpus import Task
    tasks = [Task(tmp_path / "big.jsonl", "jsonl", byte_range=(i, i + 1)) for i in range(6)]
    got = []
    with pytest.raises(DataError, match=r"big.jsonl: a worker process died while reading it \(killed, most likely "
                                        r"for lack of memory\): run again with fewer --workers"):
        got.extend(map_ordered(die_on_the_third, tasks, 2, no_setup, ()))
    assert got == list(range(len(got))) and len(got) <= 3  # results in order, none past the dead worker's task


class DyingDataset(torch.utils.data.Dataset):
    """Items read in a DataLoader worker; reading item 5 gets the worker killed."""
    path = "sft.jsonl"

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.tensor([i])


def test_a_killed_dataloader_worker_names_the_data_and_the_likely_cause():
    from types import SimpleNamespace
    from batches import Batches
    from corpus import DataError
    env = SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1)
    batches = Batches(DyingDataset(), 1, 0, env, num_workers=1, make_epoch=lambda epoch: [[i] for i in range(8)])
    with pytest.raises(DataError, match=r"^sft.jsonl: a DataLoader worker died while reading it \(most likely killed "
                                        r"for lack of memory\): run again with fewer --num-workers"):
        for _ in range(8):
            next(batches)
    time.sleep(0.5)  # torch's SIGCHLD handler would raise here if the dead worker were still watched


def test_a_deeply_nested_record_is_a_bad_record_named_by_line(tmp_path, tiny_tokenizer_path):
    good = [json.dumps({"text": t}, ensure_ascii=False) for t in make_chinese_texts(30, 4)]
    deep = '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (tmp_path / "docs.jsonl").write_text("\n".join(good[:3] + [deep] + good[3:]) + "\n")
    flags = ["pretrain", "--input", str(tmp_path / "docs.jsonl"), "--tokenizer", str(tiny_tokenizer_path), "--workers", "1"]
    with pytest.raises(SystemExit, match=r"docs.jsonl:4: JSON nested too deeply to read"):
        data_process.main([*flags, "--out", str(tmp_path / "strict")])
    data_process.main([*flags, "--out", str(tmp_path / "skipping"), "--skip-bad"])
    assert (tmp_path / "skipping.bin").stat().st_size > 0


def test_a_file_that_is_no_tokenizer_and_a_truncated_parquet_are_one_line(tmp_path, tiny_tokenizer_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": make_chinese_texts(1, 0)[0]}, ensure_ascii=False) + "\n")
    (tmp_path / "notes.txt").write_text("not a model\n")
    pq.write_table(pa.table({"text": make_chinese_texts(50, 1)}), tmp_path / "full.parquet")
    whole = (tmp_path / "full.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(whole[:len(whole) // 2])
    for inputs, tokenizer, message in [
            ("docs.jsonl", "notes.txt", r"notes.txt is not a SentencePiece tokenizer model: pass a tokenizer.model"),
            ("cut.parquet", str(tiny_tokenizer_path), r"cut.parquet: not a readable Parquet file after row 0 "
                                                      r"\(truncated or damaged\?\)")]:
        r = subprocess.run([sys.executable, str(ROOT / "data_process.py"), "pretrain", "--input", inputs,
                            "--tokenizer", tokenizer, "--out", "o/x"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120)
        errors = [line for line in r.stderr.splitlines() if "error" in line]
        assert r.returncode != 0 and "Traceback" not in r.stderr and len(errors) == 1
        assert re.search(message, errors[0]) and not (tmp_path / "o" / "x.bin").exists()


def test_resume_with_changed_batch_data_or_processes_is_refused_naming_them(bins, tmp_path, tiny_tokenizer, capsys):
    train(bins, tmp_path / "o", "--max-steps", "2")
    other = [i for t in make_chinese_texts(100, seed=9) for i in tiny_tokenizer.encode(t, eos=True)]
    write_bin(tmp_path / "other.bin", other, tiny_tokenizer.identity())
    write_bin(tmp_path / "other_val.bin", other, tiny_tokenizer.identity())
    for flags, refused in ((["--batch-size", "8"], "--batch-size 4 -> 8"), (["--grad-accum", "4"], "--grad-accum 2 -> 4"),
                           (["--data", str(tmp_path / "other.bin")], r"--data corpus.bin \([\d,]+ tokens\) -> other.bin \([\d,]+ tokens\)"),
                           (["--lr", "1e-3"], "--lr 0.003 -> 0.001")):  # (the optimizer state would override it)
        with pytest.raises(SystemExit, match=rf"--resume: {refused} since checkpoint \S*step_00000002.pt"):
            pretrain.main([*bins, *TINY, "--out-dir", str(tmp_path / "o"), "--max-steps", "4", "--resume", *flags])
    path = tmp_path / "o" / "step_00000002.pt"  # as if saved by two processes (torchrun)
    save_checkpoint(path, {**load_checkpoint(path), "world_size": 2})
    with pytest.raises(SystemExit, match=r"--resume: processes 2 -> 1 since"):
        train(bins, tmp_path / "o", "--max-steps", "4", "--resume")
    save_checkpoint(path, {**load_checkpoint(path), "world_size": 1})
    capsys.readouterr()
    train(bins, tmp_path / "o", "--max-steps", "4", "--resume", "--grad-clip", "0.5")  # these apply: reported
    assert "--resume: changed since the checkpoint: --max-steps 2 -> 4, --grad-clip 1.0 -> 0.5" in capsys.readouterr().out


# ---------------------------------------------------------------------------- hijacking, flags, shapes

def test_a_link_planted_where_a_temp_file_would_go_is_never_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for name in ("metrics.jsonl.tmp", "metrics.jsonl"):  # the old fixed temp name, and the target itself
        (tmp_path / "out").mkdir(exist_ok=True)
        link = tmp_path / "out" / name
        link.unlink(missing_ok=True)
        link.symlink_to(victim)
    atomic.write_text_atomic(tmp_path / "out" / "metrics.jsonl", "new\n")
    assert victim.read_text() == "keep me"
    assert (tmp_path / "out" / "metrics.jsonl").read_text() == "new\n"  # the link was replaced, not followed
    with pytest.raises(FileExistsError):  # the opener refuses an existing path, a link included
        open(tmp_path / "out" / "metrics.jsonl.tmp", "w", opener=atomic.exclusive)


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size: 0 is out of range: give an integer >= 1"),
    (["--grad-accum", "0"], "--grad-accum: 0 is out of range"),
    (["--eval-batches", "0"], "--eval-batches: 0 is out of range"),
    (["--max-steps", "-5"], "--max-steps: -5 is out of range: give an integer >= 0"),
    (["--lr", "0"], "--lr: 0 is out of range: give a number > 0"),
    (["--beta2", "1"], "--beta2: 1 is out of range: give a number in [0, 1)"),
    (["--keep-last", "x"], "--keep-last: 'x' is not an integer"),
])
def test_training_flags_out_of_range_stop_at_the_flag(flags, message):
    for script in (ROOT / "pretrain.py", ROOT / "sft.py", ROOT / "dpo.py"):
        result = subprocess.run([sys.executable, str(script), *flags], capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, script


@pytest.mark.parametrize("shape, message", [
    (dict(n_heads=0), "n_heads 0 must be at least 1"),
    (dict(dim=0), "dim 0 must be at least 1"),
    (dict(max_seq_len=0), "max_seq_len 0 must be at least 1"),
    (dict(dim=60, n_heads=4), "head size dim / n_heads = 15 must be even"),
])
def test_model_shapes_that_cannot_work_are_refused_in_words(shape, message):
    from model import ModelArgs
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelArgs(**{**dict(dim=64, n_layers=2, n_heads=4, vocab_size=100, max_seq_len=32), **shape})


# ---------------------------------------------------------------------------- out dirs that hold a run

def test_a_fresh_run_into_another_runs_out_dir_is_refused_and_overwrite_moves_it_aside(bins, tmp_path):
    out = tmp_path / "run"
    train(bins, out, "--max-steps", "4", "--save-every", "2")
    before = sorted(p.name for p in out.glob("*.pt"))
    with pytest.raises(SystemExit, match="holds another run's checkpoints .* --resume, move it aside with --overwrite"):
        train(bins, out, "--max-steps", "2")
    assert sorted(p.name for p in out.glob("*.pt")) == before  # untouched
    train(bins, out, "--max-steps", "2", "--overwrite")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].glob("*.pt")) == before
    assert load_checkpoint(out, prefer="latest")["step"] == 2


def test_a_second_run_into_an_out_dir_being_written_is_refused_naming_the_first(bins, tmp_path):
    """Another process holds the out dir's lock (as a run in progress does): refused with its
    pid, nothing written; once that process is gone (even killed), the dir is free."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from checkpoint import lock_out_dir
lock_out_dir(Path({str(out)!r}))
print("locked", flush=True)
sys.stdin.read()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=f"--out-dir .*run is being written by another run \\(pid {holder.pid}\\)"):
            train(bins, out, "--max-steps", "2")
        assert not list(out.glob("*.pt")) and not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    train(bins, out, "--max-steps", "2")
    assert load_checkpoint(out, prefer="latest")["step"] == 2


def test_resume_drops_a_cut_last_metrics_row_and_refuses_a_damaged_log(bins, tmp_path):
    out = tmp_path / "run"
    train(bins, out, "--max-steps", "4", "--save-every", "2")
    log = out / "metrics.jsonl"
    good = log.read_bytes()
    log.write_bytes(good + b'{"step": 5, "tok')  # a crash in the middle of an append
    train(bins, out, "--max-steps", "6", "--save-every", "2", "--resume")
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    lines = good.splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:2]) + b"\x00\xff damaged\n" + lines[2][:10] + b"\n")  # two bad lines
    with pytest.raises(SystemExit, match=r"metrics.jsonl:3: .*the metrics log is damaged: repair that line"):
        train(bins, out, "--max-steps", "8", "--save-every", "2", "--resume")
    assert load_checkpoint(out, prefer="latest")["step"] == 6  # nothing was trained or pruned


def test_sft_into_its_own_init_dir_is_refused(bins, tmp_path, tiny_tokenizer_path):
    train(bins, tmp_path / "pre", "--max-steps", "2")
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "头痛", "answer": "休息"}, ensure_ascii=False) + "\n")
    best = (tmp_path / "pre" / "best.pt").read_bytes()
    with pytest.raises(SystemExit, match="holds --init .*best.pt: the run would write over its own input"):
        sft.main(["--init", str(tmp_path / "pre"), "--data", str(tmp_path / "sft.jsonl"), "--out-dir", str(tmp_path / "pre"),
                  "--tokenizer", str(tiny_tokenizer_path), "--max-steps", "1", "--num-workers", "0"])
    assert (tmp_path / "pre" / "best.pt").read_bytes() == best


def test_export_into_a_file_or_onto_a_full_disk_is_one_line_and_leaves_nothing(bins, tmp_path, monkeypatch):
    train(bins, tmp_path / "run", "--max-steps", "2")
    (tmp_path / "afile").write_text("kept\n")
    with pytest.raises(SystemExit, match=r"--out \S*afile/hf: \S*afile is a file, not a directory; choose another --out"):
        export.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "afile" / "hf")])

    def disk_full(directory, *args):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export, "write_hf_dir", disk_full)
    with pytest.raises(SystemExit, match=r"cannot write \S*hf: the disk is full; free some space and run again"):
        export.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "run"]  # no half-written export
    assert (tmp_path / "afile").read_text() == "kept\n"


def test_sft_resume_with_another_max_seq_len_names_that_flag(bins, tmp_path, tiny_tokenizer_path):
    train(bins, tmp_path / "pre", "--max-steps", "2")
    rows = [{"prompt": "头痛" * (1 + i % 5), "answer": "多休息，多喝水。" * (1 + i % 3)} for i in range(40)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    flags = ["--init", str(tmp_path / "pre"), "--data", str(tmp_path / "sft.jsonl"), "--out-dir", str(tmp_path / "sft"),
             "--tokenizer", str(tiny_tokenizer_path), "--max-steps", "2", "--num-workers", "0", "--batch-size", "4",
             "--save-every", "1"]
    sft.main([*flags, "--max-seq-len", "16"])
    with pytest.raises(SystemExit, match=r"--resume: --max-seq-len 16 -> 12 since checkpoint [^;]*; a resumed run keeps"):
        sft.main([*flags, "--max-seq-len", "12", "--resume"])


def test_export_into_the_checkpoints_own_dir_is_refused_even_with_force(bins, tmp_path, tiny_tokenizer_path):
    train(bins, tmp_path / "run", "--max-steps", "2")
    kept = sorted(p.name for p in (tmp_path / "run").glob("*.pt"))
    with pytest.raises(export.ExportError, match="holds --ckpt .*--force would delete the checkpoint"):
        export.export(tmp_path / "run", tmp_path / "run", tiny_tokenizer_path, force=True)
    assert sorted(p.name for p in (tmp_path / "run").glob("*.pt")) == kept


def test_sft_data_written_over_its_own_exclude_questions_file_is_refused(tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "头痛怎么办", "answer": "休息"}, ensure_ascii=False) + "\n", encoding="utf-8")
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"prompt": "发热", "answer": "喝水"}, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="output .*qa.jsonl is also an input"):
        data_process.main(["sft", "--input", str(raw), "--out", str(qa), "--exclude-questions", str(qa), "--force",
                           "--val-fraction", "0"])
    assert "头痛怎么办" in qa.read_text(encoding="utf-8")
