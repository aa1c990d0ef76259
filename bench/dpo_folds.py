"""Does DPO learn a preference that carries over to pairs it never saw? k-fold held-out reward accuracy.

    python data_process.py prefs --input dpo_zh_500.jsonl --out data/prefs/prefs.jsonl --tokenizer ...
    python bench/dpo_folds.py --init out/sft --pairs data/prefs/prefs.jsonl --work-dir out/dpo_folds \
        -- --epochs 2 --lr 1e-4 --min-lr 1e-5

One validation split of a few hundred pairs gives a reward accuracy of about +-0.11, too wide to
tell a weak preference from none. Here every pair is held out once: NAME.jsonl and NAME_val.jsonl
are pooled, dealt into --folds folds (every k-th pair), and dpo.py (the flags after --) trains
once per fold on the other folds, validating on that fold. The folds' final reward accuracies,
weighted by their pairs, give one held-out accuracy over all the pairs, with a 95% binomial
interval; 0.5 is where every run starts (the model is its own reference), so an interval above
0.5 is a preference learned from the training pairs that holds on others. Beside it, how often
the chosen answer is simply the longer one: a run that learned only to like length scores that.
"""
import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from refusal import Refusal, one_line_refusals  # noqa: E402
from report import read_jsonl  # noqa: E402

FOLDS = 5
Z95 = 1.96


def read_pairs(pairs):
    """The pairs of NAME.jsonl and NAME_val.jsonl (if there), as JSON lines in file order."""
    paths = [pairs, pairs.with_name(pairs.stem + "_val.jsonl")]
    lines = [line for p in paths if p.is_file() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not pairs.is_file() or not lines:
        raise Refusal(f"{pairs}: no preference pairs; make them with data_process.py prefs first")
    return lines


def write_fold(lines, k, folds, fold_dir):
    """Fold k's files: every pair whose index is k mod folds held out as NAME_val.jsonl."""
    fold_dir.mkdir(parents=True, exist_ok=True)
    held = [line for i, line in enumerate(lines) if i % folds == k]
    train = [line for i, line in enumerate(lines) if i % folds != k]
    (fold_dir / "pairs.jsonl").write_text("\n".join(train) + "\n", encoding="utf-8")
    (fold_dir / "pairs_val.jsonl").write_text("\n".join(held) + "\n", encoding="utf-8")
    return len(held)


def before_and_after(out_dir):
    """A dpo.py run's validation scores for its --init model (config.json) and at its last step (metrics.jsonl)."""
    before = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))["before_dpo"]
    return before, [r for r in read_jsonl(out_dir / "metrics.jsonl") if "val_reward_acc" in r][-1]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ours, dpo_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="the fine-tuned checkpoint dpo.py starts from")
    p.add_argument("--pairs", required=True, type=Path, help="NAME.jsonl from data_process.py prefs (NAME_val.jsonl pooled in)")
    p.add_argument("--work-dir", required=True, type=Path, help="where each fold's pairs and run go")
    p.add_argument("--folds", type=int, default=FOLDS, help="number of folds (>= 2)")
    cfg = p.parse_args(ours)
    if cfg.folds < 2:
        p.error("--folds must be >= 2")
    with one_line_refusals("dpo_folds.py"):
        lines = read_pairs(cfg.pairs)
        wins, n, started = 0.0, 0, time.time()
        for k in range(cfg.folds):
            fold_dir = cfg.work_dir / f"fold{k}"
            held = write_fold(lines, k, cfg.folds, fold_dir)
            # --eval-batches high enough that validation scores the whole fold (a flag after -- overrides it)
            cmd = [sys.executable, str(ROOT / "dpo.py"), "--init", cfg.init, "--data", str(fold_dir / "pairs.jsonl"),
                   "--out-dir", str(fold_dir / "run"), "--eval-batches", "1000", *dpo_flags]
            shutil.rmtree(fold_dir / "run", ignore_errors=True)  # each fold's run starts fresh
            print("$ " + " ".join(cmd[1:]), flush=True)
            if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode:
                raise Refusal(f"dpo.py failed on fold {k} (its message is above); its run is in {fold_dir / 'run'}")
            before, after = before_and_after(fold_dir / "run")
            print(f"fold {k}: {held} held-out pairs, reward accuracy {before['val_reward_acc']:.3f} -> "
                  f"{after['val_reward_acc']:.3f}, validation loss {before['val_loss']:.3f} -> {after['val_loss']:.3f}", flush=True)
            wins, n = wins + after["val_reward_acc"] * held, n + held
        acc = wins / n
        half = Z95 * math.sqrt(acc * (1 - acc) / n)
        print(f"held-out reward accuracy over {n} pairs ({cfg.folds} folds): {acc:.3f} [{acc - half:.3f}, {acc + half:.3f}] "
              f"(before DPO: 0.5; 'the longer answer wins': {longer_wins(lines):.3f}); {time.time() - started:.0f} s")


def longer_wins(lines):
    """How often the chosen answer is the longer one (a tie counts half): what a preference for
    length alone would score. Summed log-probabilities favour it once DPO raises the answers'
    per-token probabilities in general, so a reward accuracy near it may have learned no more."""
    pairs = [json.loads(line) for line in lines]
    wins = [1.0 if len(p["chosen"]) > len(p["rejected"]) else 0.5 if len(p["chosen"]) == len(p["rejected"]) else 0.0
            for p in pairs]
    return sum(wins) / len(wins)


if __name__ == "__main__":
    main()
