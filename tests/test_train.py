"""pretrain.py + trainer.py on tiny models and tiny .bin files: exact resume, DDP over gloo
matching one process, signals, refusals, the optional recipe flags, config.json and --help."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pretrain
from checkpoint import load_checkpoint, save_checkpoint
from conftest import ROOT, make_chinese_texts
from test_dataset import write_bin

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--dim", "32", "--n-layers", "2", "--n-heads", "4", "--max-seq-len", "16", "--batch-size", "4",
        "--grad-accum", "2", "--lr", "3e-3", "--warmup-steps", "2", "--log-every", "1", "--eval-batches", "2"]


@pytest.fixture(scope="module")
def bins(tmp_path_factory, tiny_tokenizer, tiny_tokenizer_path):
    out = tmp_path_factory.mktemp("bins")
    for name, n, seed in (("corpus.bin", 120, 2), ("corpus_val.bin", 20, 3)):
        ids = [i for t in make_chinese_texts(n, seed) for i in tiny_tokenizer.encode(t, eos=True)]
        write_bin(out / name, ids, tiny_tokenizer.identity())
    return ["--data", str(out / "corpus.bin"), "--tokenizer", str(tiny_tokenizer_path)]


def run(bins, out_dir, *flags):
    return pretrain.main([*bins, *TINY, "--out-dir", str(out_dir), *flags])


def losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in rows]


def weights(out_dir, step):
    return load_checkpoint(Path(out_dir) / f"step_{step:08d}.pt")["model"]


def test_stop_and_resume_reproduces_the_uninterrupted_run(bins, tmp_path):
    flags = ["--max-steps", "8", "--eval-every", "3", "--save-every", "100", "--dropout", "0.1"]
    run(bins, tmp_path / "whole", *flags)
    run(bins, tmp_path / "parts", *flags, "--stop-after-steps", "5")
    assert losses(tmp_path / "parts")[-1][0] == 5
    run(bins, tmp_path / "parts", *flags, "--resume")
    whole = losses(tmp_path / "whole")
    assert len(whole) == 8 and whole[-1][2] is not None
    assert losses(tmp_path / "parts") == whole  # same float losses, bit for bit
    a, b = weights(tmp_path / "whole", 8), weights(tmp_path / "parts", 8)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (tmp_path / "whole" / "loss.png").stat().st_size > 0
    assert (tmp_path / "whole" / "best.pt").is_file()


class SignalAfter(torch.utils.data.Dataset):
    """Wraps a dataset and sends this process SIGTERM when item number `after` is read."""

    def __init__(self, dataset, after):
        self.dataset, self.after, self.reads = dataset, after, 0

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):  # n_tokens etc. come from the wrapped dataset
        return getattr(self.dataset, name)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.after:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.dataset[i]


def test_sigterm_saves_a_checkpoint_and_stops(bins, tmp_path, monkeypatch):
    real = pretrain.PretrainDataset
    made = []

    def signalling_dataset(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return SignalAfter(made[-1], after=3 * 8 + 1) if len(made) == 1 else made[-1]  # during step 4

    monkeypatch.setattr(pretrain, "PretrainDataset", signalling_dataset)
    run(bins, tmp_path, "--max-steps", "20", "--save-every", "100", "--eval-every", "100")
    assert [p.name for p in tmp_path.glob("step_*.pt")] == ["step_00000004.pt"]
    assert losses(tmp_path)[-1][0] == 4
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the trainer's handler is gone


def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(bins, tmp_path):
    flags = ["--max-steps", "4", "--eval-every", "2", "--save-every", "100"]
    run(bins, tmp_path / "one", *flags, "--batch-size", "8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(ROOT / "pretrain.py"), *bins, *TINY, "--out-dir", str(tmp_path / "two"), *flags],
                   env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [r[0] for r in two] == [1, 2, 3, 4]
    for (_, l1, v1), (_, l2, v2) in zip(one, two):
        assert abs(l1 - l2) < 1e-4
        assert (v1 is None) == (v2 is None) and (v1 is None or abs(v1 - v2) < 1e-4)


def test_recipe_flags_muon_qk_norm_untied_head_train(bins, tmp_path):
    run(bins, tmp_path, "--max-steps", "6", "--eval-every", "6", "--optimizer", "muon", "--qk-norm", "--untie-head")
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["model_args"]["qk_norm"] and not ckpt["model_args"]["tie_embeddings"]
    assert len(ckpt["optimizers"]) == 2  # AdamW + Muon
    (first, *_), last = losses(tmp_path), losses(tmp_path)[-1]
    assert last[1] < first[1]


def test_zero_intervals_mean_only_at_the_end(bins, tmp_path):
    run(bins, tmp_path, "--max-steps", "4", "--eval-every", "0", "--save-every", "0", "--log-every", "0")
    assert [(step, val is not None) for step, _, val in losses(tmp_path)] == [(4, True)]
    assert [p.name for p in sorted(tmp_path.glob("step_*.pt"))] == ["step_00000004.pt"]


def test_corrupt_checkpoint_is_refused_on_resume(bins, tmp_path):
    run(bins, tmp_path, "--max-steps", "2", "--eval-every", "100", "--save-every", "100")
    for ckpt in (tmp_path / "step_00000002.pt", tmp_path / "best.pt"):  # (tests/test_faults.py: the fallbacks)
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(SystemExit, match="step_00000002.pt is corrupt"):
        run(bins, tmp_path, "--max-steps", "4", "--resume")


def test_bin_of_another_tokenizer_is_refused(bins, tmp_path, tiny_tokenizer):
    other = dict(tiny_tokenizer.identity(), sha256="0" * 64, name="other")
    write_bin(tmp_path / "x.bin", list(range(100)), other)
    write_bin(tmp_path / "x_val.bin", list(range(100)), other)
    with pytest.raises(SystemExit, match="x.bin was made with tokenizer other"):
        pretrain.main(["--data", str(tmp_path / "x.bin"), *bins[2:], *TINY, "--out-dir", str(tmp_path / "o"),
                       "--max-steps", "1"])


def test_checkpoint_of_another_tokenizer_is_refused_on_resume(bins, tmp_path):
    run(bins, tmp_path, "--max-steps", "1", "--eval-every", "100")
    path = tmp_path / "step_00000001.pt"
    ckpt = load_checkpoint(path)
    ckpt["tokenizer"] = dict(ckpt["tokenizer"], sha256="f" * 64)
    save_checkpoint(path, ckpt)
    with pytest.raises(SystemExit, match="was made with tokenizer"):
        run(bins, tmp_path, "--max-steps", "2", "--resume")


def test_config_json_beside_the_checkpoints_holds_the_flags_and_what_was_resolved(bins, tmp_path, capsys):
    run(bins, tmp_path, "--max-steps", "3", "--eval-every", "100")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["max_steps"] == 3 and config["batch_size"] == 4 and config["lr"] == 3e-3  # flags given
    assert config["optimizer"] == "muon" and config["seed"] == 1337  # pretrain.py's and the shared defaults
    assert config["out_dir"] == str(tmp_path) and config["dim"] == 32
    assert config["device"] == "cpu" and config["dtype"] == "float32"  # resolved from "auto"
    assert config["world_size"] == 1 and config["total_steps"] == 3 and config["warmup_steps"] == 1
    assert config["resumed_from"] is None
    header = capsys.readouterr().out
    assert "config: " in header and "max_steps=3" in header and "total_steps=3" in header
    run(bins, tmp_path, "--max-steps", "4", "--eval-every", "100", "--resume")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["max_steps"] == 4 and config["resumed_from"].endswith("step_00000003.pt")


@pytest.mark.parametrize("script, shown", [("pretrain.py", ["--optimizer", "(default: muon)"]),
                                           ("sft.py", ["--batch-size", "(default: 32)"])])
def test_help_shows_the_defaults(script, shown):
    r = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    flag, default = shown
    text = " ".join(r.stdout.split())  # argparse wraps lines
    entry = text[text.index(f" {flag} ") + 1:].split(" --")[0]  # the flag's help (usage writes [--flag)
    assert entry.endswith(default), entry
