"""A training run's log: metrics.jsonl (one JSON row per logged step) and its loss plot.

The trainer appends a row at every log step and rewrites the file whole at every checkpoint,
so that a resumed run's file holds exactly the rows up to its checkpoint; report.py and
demo.py read the same rows back. The loss plot is drawn here, for a single run (OUT/loss.png)
and for the run report's pretraining and SFT panels alike.
"""
import json
from pathlib import Path

from atomic import AtomicFile, naming_errors, write_text_atomic
from corpus import DataError, iter_records


def read_metrics(path, up_to_step=None):
    """The rows of a metrics.jsonl (those up to a step, if given); [] when there is no file.
    A last line cut short by a crash is dropped; any other damaged line is refused."""
    path = Path(path)
    if not path.is_file():
        return []
    rows, damaged = [], []

    def refuse():
        raise DataError(f"{damaged[0]}; the metrics log is damaged: repair that line, or move the file away "
                        f"(its rows are then lost)")

    for _, row in iter_records(path, lambda p, line_no, message: damaged.append(f"{p}:{line_no}: {message}")):
        if damaged:  # a good row after a bad one: not a cut tail, the file is damaged
            refuse()
        rows.append(row)
    if len(damaged) > 1:  # a crash cuts one line, the last
        refuse()
    if up_to_step is None:
        return rows
    return [r for r in rows if r.get("step", 0) <= up_to_step]


def write_metrics(path, rows):
    """Rewrite the log whole (atomically) with these rows."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_metrics(path, row):
    with naming_errors(path), open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def plot_loss_curves(panels, path):
    """Loss against tokens, one panel per run: panels is {title: (metrics rows, baseline)},
    where baseline (a loss, or None) is drawn dashed, e.g. the unigram entropy of the
    validation tokens. Written atomically as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 2 * (len(panels) == 1), 4.5), squeeze=False)
    for ax, (title, (rows, baseline)) in zip(axes[0], panels.items()):
        ax.set_title(title)
        ax.set_xlabel("tokens")
        ax.set_ylabel("cross entropy (nats/token)")
        ax.grid(alpha=0.3)
        train = [(r["tokens"], r["train_loss"]) for r in rows if "train_loss" in r]
        val = [(r["tokens"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if not train and not val:
            ax.text(0.5, 0.5, "no run", ha="center", va="center", transform=ax.transAxes)
            continue
        if train:
            ax.plot(*zip(*train), lw=1, label="train")
        if val:
            ax.plot(*zip(*val), "o-", label="validation")
        if baseline is not None:
            ax.axhline(baseline, ls="--", color="gray", label="unigram entropy of validation")
        ax.legend()
    fig.tight_layout()
    try:
        with AtomicFile(path, "wb") as out:
            fig.savefig(out.f, format="png", dpi=100)
    finally:
        plt.close(fig)
