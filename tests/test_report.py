"""The tiny end-to-end run: data_process -> pretrain -> sft -> eval -> report, every stage as
the command a user runs, then the report's presence and its sections."""
import json
import math

import numpy as np
import pytest

import data_process
import eval as qa_eval
import pretrain
import report
import sft
from conftest import make_chinese_texts

pytestmark = pytest.mark.usefixtures("one_thread")

SECTIONS = ["## Data", "## Model and training", "## Loss curves", "## Final validation loss vs unigram entropy",
            "## Evaluation", "## Sample answers", "## Wall-clock per stage", "## Hardware"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_tokenizer_path):
    """A whole tiny run: data, work/ and out/{pretrain,sft,eval}."""
    root = tmp_path_factory.mktemp("run")
    tok = str(tiny_tokenizer_path)
    texts = make_chinese_texts(300, seed=11)
    write_jsonl(root / "corpus.jsonl", [{"text": t} for t in texts])
    write_jsonl(root / "qa.jsonl", [{"question": texts[i][:20], "answer": texts[i + 1][:20]} for i in range(0, 16, 2)])
    write_jsonl(root / "sft_raw.jsonl", [{"instruction": texts[i][:20], "input": "", "output": texts[i + 1][:20]}
                                         for i in range(100, 220, 2)])
    data_process.main(["pretrain", "--input", str(root / "corpus.jsonl"), "--out", str(root / "work" / "corpus"),
                       "--tokenizer", tok, "--val-fraction", "0.1", "--workers", "1"])
    data_process.main(["sft", "--input", str(root / "sft_raw.jsonl"), "--out", str(root / "work" / "sft.jsonl"),
                       "--tokenizer", tok, "--val-fraction", "0.1"])
    out = root / "out"
    common = ["--tokenizer", tok, "--device", "cpu", "--batch-size", "4", "--log-every", "1", "--eval-batches", "2",
              "--warmup-steps", "2", "--eval-every", "2", "--grad-accum", "1"]
    pretrain.main(["--data", str(root / "work" / "corpus.bin"), "--out-dir", str(out / "pretrain"), "--dim", "32",
                   "--n-layers", "2", "--n-heads", "4", "--max-seq-len", "32", "--max-steps", "4", *common])
    sft.main(["--init", str(out / "pretrain"), "--data", str(root / "work" / "sft.jsonl"), "--out-dir", str(out / "sft"),
              "--max-steps", "4", "--epochs", "0", "--num-workers", "0", *common])
    qa_eval.main(["--ckpt", str(out / "sft"), "--data", str(root / "qa.jsonl"), "--out-dir", str(out / "eval"),
                  "--train-data", str(root / "work" / "sft.jsonl"), "--bootstrap", "100"])
    return root


def test_report_has_every_section_after_a_tiny_run(run_dir, capsys, tiny_tokenizer):
    out = run_dir / "out"
    report.main([str(out), "--pretrain-data", str(run_dir / "work" / "corpus.bin")])
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    text = (out / "report.md").read_text(encoding="utf-8")
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((out / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert f"{metrics['bleu4_char_corpus']:.2f} [" in text  # the headline with its interval
    assert metrics["sacrebleu_signature"] in text
    assert "copy the question" in text and "most common training answer" in text
    corpus_meta = json.loads((run_dir / "work" / "corpus.json").read_text())
    assert f"{corpus_meta['n_tokens']:,}" in text
    # both stages have a final validation loss and an entropy to compare it with
    rows = [line for line in text.splitlines() if line.startswith("| pretrain (") or line.startswith("| SFT (")]
    assert len(rows) == 2 and all("n/a" not in row and "%" in row for row in rows)
    pretrain_rows = [json.loads(line) for line in (run_dir / "out" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    val_bpc = [r["val_bpc"] for r in pretrain_rows if "val_bpc" in r][-1]  # pretraining logs bits per character
    assert 0 < val_bpc and f"| {val_bpc:.3f} |" in rows[0]
    # by hand: the last val_loss in bits, times the validation text's tokens per character
    ids = np.fromfile(run_dir / "work" / "corpus_val.bin", dtype="<u2").tolist()
    val_loss = [r["val_loss"] for r in pretrain_rows if "val_loss" in r][-1]
    chars = len(tiny_tokenizer.decode(ids))
    assert val_bpc == pytest.approx(val_loss / math.log(2) * len(ids) / chars, rel=1e-4)
    assert text.count("- model: ") == 5


def test_report_without_pretraining_data_or_eval_says_so(run_dir, tmp_path):
    out = tmp_path / "partial"
    out.mkdir()
    path = report.write_report(out, pretrain_dir=run_dir / "out" / "pretrain", sft_dir=run_dir / "out" / "sft")
    text = path.read_text(encoding="utf-8")
    assert "pass --pretrain-data" in text and "No eval/metrics.json." in text
    with pytest.raises(SystemExit, match="no checkpoints"):
        report.main([str(tmp_path / "partial" / "..")])


def test_unigram_entropy_of_known_counts():
    assert report.unigram_entropy([5, 5]) == pytest.approx(0.6931471805599453)  # ln 2: two equally likely tokens
    assert report.unigram_entropy([0, 7, 0]) == 0.0


def test_report_shows_cmmlu_accuracy_beside_chance_when_it_ran(run_dir, tmp_path):
    from test_cmmlu import ROW, write_csv
    write_csv(tmp_path / "mcq" / "test" / "anatomy.csv", [{**ROW, "Answer": a} for a in "ABCDD"])
    out = tmp_path / "run"
    qa_eval.main(["--task", "cmmlu", "--ckpt", str(run_dir / "out" / "sft"), "--data", str(tmp_path / "mcq"),
                  "--out-dir", str(out / "cmmlu"), "--bootstrap", "100"])
    m = json.loads((out / "cmmlu" / "metrics.json").read_text(encoding="utf-8"))
    text = report.write_report(out, sft_dir=run_dir / "out" / "sft").read_text(encoding="utf-8")
    assert "## CMMLU (multiple choice)" in text and f"**{m['accuracy']:.3f} [" in text
    assert "Chance 0.250; always answering 'D' 0.400." in text and "| anatomy | 5 |" in text
