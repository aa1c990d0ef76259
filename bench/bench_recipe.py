"""Training-recipe benchmark: tokens to reach the upstream recipe's validation loss.

Trains the upstream recipe (AdamW, warmup + cosine, tied head; at a few peak lrs, the best of which
sets the target) and each candidate recipe through
pretrain.py on the same tokenized data, the same small model and the same token budget, then
reports from each run's metrics.jsonl:

- the validation-loss curve (val_loss against tokens);
- the tokens at which the run first reaches the upstream recipe's final validation loss, linearly
  interpolated between the two evaluations around the crossing (None if it never does);
- wall-clock per training token: 1 / median of the logged tokens_per_s (the median skips the
  log intervals that also hold an evaluation or a checkpoint save);
- a PNG of the curves.

Target: the recommended recipe reaches upstream's final loss with <= 0.7x its tokens at
<= 1.15x its wall-clock per token.

    python bench/bench_recipe.py                      # tokenize ../shared/data/pretrain, train, report
    python bench/bench_recipe.py --bin data/pretrain/NAME.bin --tokenizer PATH.model
    python bench/bench_recipe.py --only-report        # re-read finished runs

By default the recipes train at the same time, one thread each, so that a shared machine's
load falls on all of them alike; --jobs 1 trains them one after another.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import cli  # noqa: E402

# ----------------------------------------------------------------------------- defaults
DATA = "../shared/data/pretrain"  # raw {"text"} JSONL, tokenized here with an own small vocabulary
OUT_DIR = "out/bench_recipe"
VOCAB_SIZE = 8192  # the ChatGLM2 head (64793) would make the model mostly head and too slow on a CPU
MODEL = dict(dim=128, n_layers=4, n_heads=4, max_seq_len=128)  # embeddings ~57% of parameters, as in upstream's model
BATCH_SIZE = 16
MAX_TOKENS = 2e6
EVAL_EVERY = 25  # optimizer steps
EVAL_BATCHES = 8  # x 16 x 128 = 16k held-out tokens, the same for every recipe
WARMUP_FRACTION = 0.05
# Upstream's recipe (AdamW on everything, tied head) at each of these peak lrs; its 3e-4 is for
# 58M parameters. The best of them by final validation loss sets the target, so a candidate
# only wins against a tuned baseline.
UPSTREAM_LRS = (1.5e-3, 3e-3, 6e-3)
MUON = ["--optimizer", "muon", "--muon-lr", "0.02", "--lr", "3e-3"]  # --lr: AdamW's embeddings, norms, head
RECIPES = {  # name -> pretrain.py flags on top of the shared ones
    **{f"upstream_lr{lr:g}": ["--optimizer", "adamw", "--lr", f"{lr:g}"] for lr in UPSTREAM_LRS},
    "muon": MUON,
    "muon_qknorm": [*MUON, "--qk-norm"],
    "muon_untied": [*MUON, "--untie-head"],
    "muon_qknorm_untied": [*MUON, "--qk-norm", "--untie-head"],
}
# Muon alone: upstream's model unchanged (tied head, no QK-norm, so Llama export still holds).
RECOMMENDED = "muon"
TARGET_TOKENS_RATIO, TARGET_WALL_RATIO = 0.7, 1.15


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--data", default=DATA, help="raw pretraining JSONL directory (relative to the repo root)")
    p.add_argument("--bin", default=None, help="use this tokenized NAME.bin (with NAME_val.bin) instead of tokenizing --data")
    p.add_argument("--tokenizer", default=None, help="the tokenizer --bin was made with (needed with --bin)")
    p.add_argument("--out-dir", default=OUT_DIR, help="data, runs, summary.json and curves.png go here")
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="size of the vocabulary trained on --data")
    p.add_argument("--max-tokens", type=float, default=MAX_TOKENS, help="training tokens per recipe")
    for field in ("dim", "n_layers", "n_heads"):
        p.add_argument(f"--{field.replace('_', '-')}", type=int, default=MODEL[field], help=f"model {field}")
    p.add_argument("--eval-every", type=int, default=EVAL_EVERY, help="validate every N optimizer steps")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES), help="recipes to train")
    p.add_argument("--jobs", type=int, default=0, help="recipes trained at once (0: all at once)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    p.add_argument("--seed", type=int, default=1337, help="init and data-order seed, the same for every recipe")
    p.add_argument("--only-report", action="store_true", help="do not train; report the runs already in --out-dir")
    return p.parse_args()


def run(cmd, **kw):
    print("$", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=REPO, check=True, **kw)


def prepare_data(cfg, out):
    """Tokenize --data with an own vocabulary (both steps skip outputs that already exist)."""
    if cfg.bin:
        if not cfg.tokenizer:
            raise SystemExit("--bin needs --tokenizer (the model the .bin was made with)")
        return Path(cfg.bin), Path(cfg.tokenizer)
    inputs = sorted(str(p) for p in (REPO / cfg.data).glob("*.jsonl"))
    if not inputs:
        raise SystemExit(f"--data {cfg.data}: no *.jsonl files")
    tokenizer = out / "data" / f"sp{cfg.vocab_size}.model"
    name = out / "data" / "pretrain"
    run([sys.executable, "data_process.py", "tokenizer", "--input", *inputs,
         "--vocab-size", cfg.vocab_size, "--out", tokenizer])
    run([sys.executable, "data_process.py", "pretrain", "--input", *inputs,
         "--out", name, "--tokenizer", tokenizer])
    return name.with_suffix(".bin"), tokenizer


def train_command(cfg, name, bin_path, tokenizer, out):
    steps = int(cfg.max_tokens // (BATCH_SIZE * MODEL["max_seq_len"]))
    shape = {**MODEL, "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads}
    model = [f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]
    return [sys.executable, "pretrain.py", "--data", bin_path, "--tokenizer", tokenizer,
            "--out-dir", out / "runs" / name, *model, "--batch-size", BATCH_SIZE, "--grad-accum", 1,
            "--max-tokens", int(cfg.max_tokens), "--warmup-steps", max(1, int(WARMUP_FRACTION * steps)),
            "--eval-every", cfg.eval_every, "--eval-batches", EVAL_BATCHES, "--log-every", 10,
            "--save-every", 10 ** 9, "--keep-last", 1, "--device", "cpu", "--dtype", "float32",
            "--no-compile", "--seed", cfg.seed, *RECIPES[name], "--min-lr", f"{min_lr(RECIPES[name])}"]


def min_lr(flags):
    """A tenth of the recipe's AdamW peak lr, as upstream's 3e-4 -> 3e-5."""
    return float(flags[flags.index("--lr") + 1]) / 10


def train_all(cfg, bin_path, tokenizer, out):
    """Start the runs (at most --jobs at once), each logging to runs/NAME.log."""
    (out / "runs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads), "MKL_NUM_THREADS": str(cfg.threads)}
    pending, running = list(cfg.recipes), []
    jobs = cfg.jobs or len(pending)
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            cmd = [str(c) for c in train_command(cfg, name, bin_path, tokenizer, out)]
            print("$", " ".join(cmd), flush=True)
            log = open(out / "runs" / f"{name}.log", "w")
            running.append((name, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        name, proc, log = running.pop(0)
        proc.wait()
        log.close()
        if proc.returncode:
            raise SystemExit(f"{name}: pretrain.py failed (exit {proc.returncode}); see {out / 'runs' / (name + '.log')}")
        print(f"{name}: done", flush=True)


def read_run(path):
    rows = [json.loads(line) for line in open(path)]
    curve = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not curve:
        raise SystemExit(f"{path}: no val_loss rows")
    speeds = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    return {"curve": curve, "final_val_loss": curve[-1][1], "tokens": curve[-1][0],
            "seconds_per_token": 1.0 / statistics.median(speeds)}


def tokens_to_reach(curve, target):
    """First tokens at which the curve is <= target, linear between the evaluations around it."""
    prev = (0, float("inf"))
    for tokens, loss in curve:
        if loss <= target:
            if prev[1] == float("inf"):
                return float(tokens)
            t0, l0 = prev
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
        prev = (tokens, loss)
    return None


def report(runs, out):
    reference = min((n for n in runs if n.startswith("upstream")), key=lambda n: runs[n]["final_val_loss"])
    target = runs[reference]["final_val_loss"]
    reference_tokens = tokens_to_reach(runs[reference]["curve"], target)
    reference_spt = runs[reference]["seconds_per_token"]
    print(f"\ntarget: the best upstream recipe ({reference}) final validation loss {target:.4f} at {reference_tokens:,.0f} tokens")
    print(f"{'recipe':<22}{'final val':>10}{'tokens to target':>18}{'x upstream':>12}{'us/token':>10}{'x upstream':>12}")
    for name, r in runs.items():
        t = tokens_to_reach(r["curve"], target)
        r["tokens_to_target"] = t
        r["tokens_ratio"] = t / reference_tokens if t is not None else None
        r["wall_ratio"] = r["seconds_per_token"] / reference_spt
        reached = f"{t:>18,.0f}{r['tokens_ratio']:>12.3f}" if t is not None else f"{'not reached':>18}{'-':>12}"
        print(f"{name:<22}{r['final_val_loss']:>10.4f}{reached}{1e6 * r['seconds_per_token']:>10.1f}{r['wall_ratio']:>12.3f}")
    rec = runs.get(RECOMMENDED)
    if rec is not None:
        ok = rec["tokens_ratio"] is not None and rec["tokens_ratio"] <= TARGET_TOKENS_RATIO and rec["wall_ratio"] <= TARGET_WALL_RATIO
        print(f"\n{RECOMMENDED}: tokens x{rec['tokens_ratio'] if rec['tokens_ratio'] is not None else float('nan'):.3f} "
              f"(target <= {TARGET_TOKENS_RATIO}), wall-clock per token x{rec['wall_ratio']:.3f} "
              f"(target <= {TARGET_WALL_RATIO}): {'MEETS' if ok else 'MISSES'} the target")
    summary = {"reference": reference, "target_val_loss": target, "reference_tokens_to_target": reference_tokens,
               "recommended": RECOMMENDED,
               "recipes": {n: {**r, "flags": RECIPES[n]} for n, r in runs.items()}}
    write_atomic(out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=1)))
    write_atomic(out / "curves.png", lambda p: plot(runs, target, p))
    print(f"wrote {out / 'summary.json'} and {out / 'curves.png'}")


def plot(runs, target, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in runs.items():
        tokens, losses = zip(*r["curve"])
        ax.plot([t / 1e6 for t in tokens], losses, marker=".", label=name)
    ax.axhline(target, color="gray", linestyle="--", linewidth=1, label="target: best upstream final")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss")
    ax.set_title("tokens to the upstream recipe's validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def write_atomic(path, write):
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def main():
    cfg = parse_args()
    out = (REPO / cfg.out_dir).resolve()
    if not any(n.startswith("upstream") for n in cfg.recipes):
        raise SystemExit("--recipes must include an upstream_lr* recipe: the best one sets the target")
    if not cfg.only_report:
        bin_path, tokenizer = prepare_data(cfg, out)
        train_all(cfg, bin_path, tokenizer, out)
    runs = {name: read_run(out / "runs" / name / "metrics.jsonl") for name in cfg.recipes}
    report(runs, out)


if __name__ == "__main__":
    main()
