"""Check eval.py --task cmmlu against lm-evaluation-harness itself, question by question.

    pip install "lm-eval[hf]==0.4.13"  # a bench dependency, not one of the repository's
    python bench/cmmlu_vs_lm_eval.py --ckpt out/sft --data DIR --work out/cmmlu_check [--shots 0]

1. export.py writes the checkpoint as a Hugging Face directory (WORK/hf);
2. eval.py --task cmmlu scores it (WORK/ours);
3. lm_eval scores WORK/hf with its own cmmlu_SUBJECT task configs, each included unchanged
   from the installed package, only pointed at DIR's CSV files (WORK/tasks), offline:
       lm_eval --model hf --model_args pretrained=WORK/hf,dtype=float32 --device cpu \\
           --include_path WORK/tasks --tasks local_cmmlu_anatomy,... --num_fewshot 0 \\
           --batch_size 32 --log_samples --output_path WORK/lm_eval
4. the option each picked is compared per question: the share of questions on which both pick
   the same option, and the two accuracies (the target: at least 99% and within 0.5 points);
   also the largest difference between the two log-likelihoods of any choice.
Prints one table and writes WORK/agreement.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LETTERS = "ABCD"


def run(*cmd, env=None):
    print("$ " + " ".join(map(str, cmd)), flush=True)
    started = time.time()
    subprocess.run([str(c) for c in cmd], check=True, env=env)
    return time.time() - started


def write_tasks(data_dir, tasks_dir):
    """One local task per test/SUBJECT.csv: lm-eval's own cmmlu_SUBJECT.yaml, with the data
    read from the CSV files instead of the Hub. -> task names."""
    import lm_eval
    package_tasks = Path(lm_eval.__file__).parent / "tasks" / "cmmlu"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for test in sorted((Path(data_dir) / "test").glob("*.csv")):
        subject = test.stem
        dev = Path(data_dir) / "dev" / test.name
        name = f"local_cmmlu_{subject}"
        (tasks_dir / f"{name}.yaml").write_text(
            f"include: {package_tasks / f'cmmlu_{subject}.yaml'}\n"
            f"task: {name}\n"
            "dataset_path: csv\n"
            "dataset_name: null\n"
            "dataset_kwargs:\n"
            f"  data_files:\n    test: {test.resolve()}\n    dev: {dev.resolve()}\n", encoding="utf-8")
        names.append(name)
    return names


def lm_eval_picks(output_dir, names):
    """{(subject, question index): (picked letter, the four log-likelihoods)} from lm_eval's
    --log_samples files."""
    picks = {}
    for name in names:
        files = sorted(Path(output_dir).rglob(f"samples_{name}_*.jsonl"))
        if not files:
            sys.exit(f"cmmlu_vs_lm_eval: no samples file for {name} under {output_dir}")
        for line in files[-1].read_text(encoding="utf-8").splitlines():
            sample = json.loads(line)
            lls = [float(r[0]) for r in sample["filtered_resps"]]
            picks[(name.removeprefix("local_cmmlu_"), sample["doc_id"])] = (LETTERS[lls.index(max(lls))], lls)
    return picks


def our_picks(predictions):
    picks, index = {}, {}
    for line in Path(predictions).read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        i = index[r["subject"]] = index.get(r["subject"], -1) + 1
        picks[(r["subject"], i)] = (r["prediction"], r["answer"], r["logprobs"])
    return picks


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint file or out dir")
    p.add_argument("--data", required=True, help="CMMLU dir with test/*.csv and dev/*.csv")
    p.add_argument("--work", required=True, help="dir for the export, both runs and agreement.json")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples (0..5)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="only the first N questions of each subject")
    cfg = p.parse_args()
    work = Path(cfg.work)
    py = sys.executable
    limit = ["--limit", cfg.limit] if cfg.limit else []
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run(py, ROOT / "export.py", "--ckpt", cfg.ckpt, "--out", work / "hf", "--force")
    ours_s = run(py, ROOT / "eval.py", "--task", "cmmlu", "--ckpt", cfg.ckpt, "--data", cfg.data, "--out-dir",
                 work / "ours", "--shots", cfg.shots, "--device", "cpu", "--batch-size", cfg.batch_size, *limit, env=env)
    names = write_tasks(cfg.data, work / "tasks")
    theirs_s = run(py, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={work / 'hf'},dtype=float32",
                   "--device", "cpu", "--include_path", work / "tasks", "--tasks", ",".join(names),
                   "--num_fewshot", cfg.shots, "--batch_size", cfg.batch_size, "--log_samples",
                   "--output_path", work / "lm_eval", *limit, env=env)
    ours, theirs = our_picks(work / "ours" / "predictions.jsonl"), lm_eval_picks(work / "lm_eval", names)
    if set(ours) != set(theirs):
        sys.exit(f"cmmlu_vs_lm_eval: the runs scored different questions ({len(ours)} ours, {len(theirs)} lm_eval)")
    same = sum(ours[k][0] == theirs[k][0] for k in ours)
    acc_ours = sum(pred == gold for pred, gold, _ in ours.values()) / len(ours)
    acc_theirs = sum(theirs[k][0] == gold for k, (_, gold, _) in ours.items()) / len(ours)
    gap = max(abs(a - b) for k in ours for a, b in zip(ours[k][2], theirs[k][1]))
    result = {"n": len(ours), "shots": cfg.shots, "same_pick": same / len(ours), "accuracy_ours": acc_ours,
              "accuracy_lm_eval": acc_theirs, "difference_points": 100 * (acc_ours - acc_theirs),
              "max_loglik_difference": gap,
              "seconds_ours": ours_s, "seconds_lm_eval": theirs_s, "checkpoint": str(cfg.ckpt), "data": str(cfg.data),
              "holds": same / len(ours) >= 0.99 and abs(acc_ours - acc_theirs) <= 0.005}
    (work / "agreement.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\n{result['n']} questions, {cfg.shots}-shot: the same option on {100 * result['same_pick']:.2f}%; "
          f"accuracy ours {acc_ours:.4f}, lm_eval {acc_theirs:.4f} ({result['difference_points']:+.2f} points); "
          f"log-likelihoods differ by at most {gap:.2g}; "
          f"eval.py {ours_s:.0f} s, lm_eval {theirs_s:.0f} s (each with start-up); "
          f"{'holds' if result['holds'] else 'DOES NOT HOLD'} (>= 99% and within 0.5 points)")
    sys.exit(0 if result["holds"] else 1)


if __name__ == "__main__":
    main()
