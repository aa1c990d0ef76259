"""The quality ladder: what each rung of demo.py --preset buys, from the runs' own summaries.

    python demo.py --out-dir out/ladder/demo --work-dir data/ladder/demo
    python demo.py --preset small --out-dir out/ladder/small --work-dir data/ladder/small
    python bench/ladder.py out/ladder/demo out/ladder/small --out docs/ladder.png

Reads each run's summary.json (written by demo.py) and prints one Markdown table: training
FLOPs, pretraining val_bpc, the eval answers' answer_bpc, sacreBLEU and ROUGE-L with their
95% intervals, the two baselines, repeat rate and minutes; then three sample answers per
rung. Rungs without a run (the gpu rung, until one is measured) get a row "not measured".
The figure has training FLOPs on a log x axis: sacreBLEU with its interval beside the
baselines on the left, val_bpc and answer_bpc on the right.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo import LADDER  # noqa: E402
from refusal import Refusal, one_line_refusals  # noqa: E402

SAMPLES = 3
SAMPLE_CHARS = 90


def read_summary(run_dir):
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Refusal(f"{path}: not a demo.py summary ({type(e).__name__}); run demo.py --out-dir {run_dir} first")
    if "training_flops" not in summary or "eval" not in summary:
        raise Refusal(f"{path}: written by an older demo.py (no training_flops); run it again")
    predictions = Path(run_dir) / "eval" / "predictions.jsonl"
    lines = predictions.read_text(encoding="utf-8").splitlines()[:SAMPLES] if predictions.is_file() else []
    summary["samples"] = [json.loads(line) for line in lines]
    return summary


def interval(scores, key):
    low, high = scores[f"{key}_ci95"]
    return f"{scores[key]:.2f} [{low:.2f}, {high:.2f}]"


def table(runs):
    lines = ["| rung | training FLOPs | val_bpc | answer_bpc | sacreBLEU [95% CI] | ROUGE-L [95% CI] | "
             "copy question | common answer | repeat rate | minutes |", "|" + "---|" * 10]
    for name in LADDER:
        s = runs.get(name)
        if s is None:
            lines.append(f"| {name} | not measured | not measured | not measured | not measured | not measured | "
                         f"not measured | not measured | not measured | not measured |")
            continue
        e, b = s["eval"], s["eval"]["baselines"]
        lines.append(f"| {name} | {s['training_flops']:.2e} | {s['pretrain_val_bpc']:.3f} | {e['answer_bpc']:.3f} | "
                     f"{interval(e, 'bleu4')} | {interval(e, 'rougeL')} | {b['copy_question']['bleu4']:.2f} / "
                     f"{b['copy_question']['rougeL']:.2f} | {b['most_common_train_answer']['bleu4']:.2f} / "
                     f"{b['most_common_train_answer']['rougeL']:.2f} | {e['repeat_rate']:.2f} | {s['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def samples(runs):
    out = []
    for name, s in runs.items():
        out.append(f"\n{name}:")
        for i, p in enumerate(s["samples"], 1):
            out.append(f"  [{i}] Q: {p['question'][:SAMPLE_CHARS]}\n      A: {p['prediction'][:SAMPLE_CHARS]}")
    return "\n".join(out)


def draw(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(runs)
    flops = [runs[n]["training_flops"] for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    bleu = [runs[n]["eval"]["bleu4"] for n in names]
    ci = [runs[n]["eval"]["bleu4_ci95"] for n in names]
    left.errorbar(flops, bleu, yerr=[[b - c[0] for b, c in zip(bleu, ci)], [c[1] - b for b, c in zip(bleu, ci)]],
                  marker="o", capsize=4, label="model (95% CI)")
    for key, style in (("copy_question", "--"), ("most_common_train_answer", ":")):
        left.plot(flops, [runs[n]["eval"]["baselines"][key]["bleu4"] for n in names], style, color="gray",
                  label=key.replace("_", " "))
    left.set_ylabel("sacreBLEU (zh), eval questions")
    right.plot(flops, [runs[n]["pretrain_val_bpc"] for n in names], marker="o", label="val_bpc (pretraining text)")
    right.plot(flops, [runs[n]["eval"]["answer_bpc"] for n in names], marker="s", label="answer_bpc (reference answers)")
    right.set_ylabel("bits per character (lower is better)")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs (pretraining + SFT)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        for n, x in zip(names, flops):
            ax.annotate(n, (x, ax.get_ylim()[0]), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="demo.py out dirs, one per rung")
    p.add_argument("--out", default="out/ladder/ladder.png", help="where the figure goes")
    cfg = p.parse_args(argv)
    with one_line_refusals("bench/ladder.py"):
        runs = {}
        for run_dir in cfg.runs:
            summary = read_summary(run_dir)
            runs[summary.get("preset", Path(run_dir).name)] = summary
        runs = {n: runs[n] for n in sorted(runs, key=lambda n: runs[n]["training_flops"])}
        print(table(runs))
        print(samples(runs))
        draw(runs, Path(cfg.out))
        print(f"\nfigure: {cfg.out}")


if __name__ == "__main__":
    main()
