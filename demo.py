"""The whole pipeline on a small demo preset, in under 10 minutes on a 2-core CPU:

    own tokenizer -> data_process (pretrain, sft, eval) -> pretrain -> sft -> eval

    python demo.py                       # downloads small public subsets from the Hub
    DATA_DIR=path/to/data python demo.py # or: python demo.py --data-dir path/to/data (offline)

A local data dir holds pretrain/*.jsonl ({"text"}), sft/*.jsonl (Alpaca) and
medical_qa/*.jsonl ({"question","answer"}). Each stage is an ordinary command of this
repository, printed before it runs, so the demo doubles as a worked example.

At the end it prints the pretraining validation loss beside the unigram entropy of the
validation tokens (both in nats per token: a model that only knew token frequencies would
score the entropy), the sacreBLEU and ROUGE-L of the fine-tuned model on held-out medical
questions with their 95% confidence intervals and beside two baselines, and three sample
answers; all of it also goes to out/demo/summary.json, and report.py writes the run's
report to out/demo/report.md.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cli
from atomic import write_json_atomic
from eval import headline
from refusal import Refusal, one_line_refusals
from report import bin_token_counts, last_val_loss, read_jsonl, unigram_entropy

# -----------------------------------------------------------------------------
# defaults (flags override). Sized so that the whole run fits within 10 minutes on 2 CPU cores:
# a small own vocabulary (the 64793-id ChatGLM2 head alone would eat the budget) and a
# model of 1.3M parameters, pretrained on 3.1M tokens.
DATA_DIR = os.environ.get("DATA_DIR", "")  # empty: download subsets from the Hub
WORK_DIR = "data/demo"
OUT_DIR = "out/demo"
VOCAB_SIZE = 4096
CHARACTER_COVERAGE = 0.99  # below SentencePiece's default so 4096 pieces suffice; rare characters use bytes
MODEL = ["--dim", "128", "--n-layers", "4", "--n-heads", "4", "--max-seq-len", "256"]
# Muon for the hidden matrices: the recipe that reaches a given loss with fewer tokens
# (bench/bench_recipe.py), which is what a fixed time budget needs.
PRETRAIN = ["--batch-size", "32", "--grad-accum", "1", "--max-steps", "380", "--optimizer", "muon",
            "--muon-lr", "0.02", "--lr", "3e-3", "--min-lr", "3e-4", "--warmup-steps", "30",
            "--eval-every", "150", "--eval-batches", "80", "--log-every", "25", "--save-every", "150"]
SFT = ["--batch-size", "32", "--max-steps", "300", "--epochs", "0", "--lr", "1e-3", "--min-lr", "1e-4",
       "--warmup-steps", "20", "--eval-every", "100", "--eval-batches", "10", "--log-every", "25",
       "--save-every", "200", "--num-workers", "1"]
# The medical SFT files whose answers are as long as the eval references (median 99 characters):
# medical_huatuo26m (median 100) and medical_chatmed (135). medical_huatuo_kg's knowledge-graph
# answers (median 54) teach answers half that long, which BLEU's brevity penalty punishes; with
# them the demo model scored sacreBLEU 1.37 at length ratio 0.50, without them 2.20 at 0.71.
SFT_FILES = ["medical_huatuo26m.jsonl", "medical_chatmed.jsonl"]
EVAL_QUESTIONS = 200
EVAL_ARGS = ["--batch-size", "50", "--max-new-tokens", "128", "--repetition-penalty", "1.2"]
# Small public files from the Hub for the online path (shibing624/medical, Apache-2.0).
HUB_REPO = "shibing624/medical"
HUB_FILES = {"pretrain": ["pretrain/medical_book_zh.json", "pretrain/valid_encyclopedia.json"],
             "sft": ["finetune/valid_zh_0.json"],
             "medical_qa": ["finetune/test_zh_0.json"]}
# -----------------------------------------------------------------------------


def run(*cmd):
    """Run one stage as the command a user would type; stop the demo if it fails. -> its seconds"""
    cmd = [sys.executable, *map(str, cmd)]
    print("\n$ " + " ".join(cmd[1:]), flush=True)
    started = time.time()
    subprocess.run(cmd, check=True)
    seconds = time.time() - started
    print(f"  ({seconds:.0f} s)", flush=True)
    return seconds


def download_subsets(raw_dir):
    """Fetch a few small files of the public medical set; returns a data dir laid out like a local one.
    Without network (or access) the demo stops with one message on how to run it offline."""
    n_files = sum(map(len, HUB_FILES.values()))
    print(f"demo: downloading {n_files} files of the Hub dataset {HUB_REPO} (offline: set DATA_DIR, see --help)",
          flush=True)
    try:
        from huggingface_hub import hf_hub_download
        for part, files in HUB_FILES.items():
            (raw_dir / part).mkdir(parents=True, exist_ok=True)
            for name in files:
                local = hf_hub_download(HUB_REPO, name, repo_type="dataset")
                shutil.copy(local, raw_dir / part / Path(name).name)
    except Exception as e:  # offline, no access, missing package: all end the same way
        reason = (str(e).strip().splitlines() or [""])[0]
        raise Refusal(f"downloading the demo data from the Hub dataset {HUB_REPO} failed "
                 f"({type(e).__name__}: {reason})\nWithout network, run it on a local data dir: "
                 f"DATA_DIR=path/to/data bash scripts/demo.sh (pretrain/*.jsonl, sft/*.jsonl, medical_qa/*.jsonl)")
    return raw_dir


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--data-dir", default=DATA_DIR, help="local data dir ($DATA_DIR; empty: download from the Hub)")
    parser.add_argument("--work-dir", default=WORK_DIR, help="tokenizer and processed data go here")
    parser.add_argument("--out-dir", default=OUT_DIR, help="checkpoints, metrics and the summary go here")
    return parser.parse_args(argv)


def main(argv=None):
    cfg = parse_args(argv)
    with one_line_refusals("demo.py"):
        run_demo(cfg)


def run_demo(cfg):
    started = time.time()
    work, out = Path(cfg.work_dir), Path(cfg.out_dir)
    for d in (work, out):  # every run starts clean so its numbers belong to it alone
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    print(cli.config_line(cfg), flush=True)
    cli.write_config(out, cfg)
    data = Path(cfg.data_dir) if cfg.data_dir else download_subsets(work / "raw")
    pretrain_inputs = sorted(glob.glob(str(data / "pretrain" / "*.json*")))
    sft_inputs = sorted(f for pattern in SFT_FILES for f in glob.glob(str(data / "sft" / pattern)))
    sft_inputs = sft_inputs or sorted(glob.glob(str(data / "sft" / "*.json*")))
    qa_inputs = sorted(glob.glob(str(data / "medical_qa" / "*.json*")))
    if not (pretrain_inputs and sft_inputs and qa_inputs):
        raise Refusal(f"{data} needs pretrain/, sft/ and medical_qa/ with .jsonl/.json files")
    tokenizer = work / "tokenizer.model"

    seconds = {}  # wall-clock per stage, for the report
    seconds["tokenizer"] = run("data_process.py", "tokenizer", "--input", *pretrain_inputs, "--vocab-size", VOCAB_SIZE,
                               "--character-coverage", CHARACTER_COVERAGE, "--out", tokenizer)
    seconds["data: pretrain"] = run("data_process.py", "pretrain", "--input", *pretrain_inputs, "--out",
                                    work / "pretrain" / "demo", "--tokenizer", tokenizer, "--val-fraction", "0.01")
    seconds["data: eval"] = run("data_process.py", "eval", "--input", *qa_inputs, "--out", work / "eval" / "medical_qa.jsonl")
    seconds["data: sft"] = run("data_process.py", "sft", "--input", *sft_inputs, "--out", work / "sft" / "demo.jsonl",
                               "--exclude-questions", work / "eval" / "medical_qa.jsonl", "--tokenizer", tokenizer,
                               "--max-tokens", "256", "--val-fraction", "0.05")
    seconds["pretrain"] = run("pretrain.py", "--data", work / "pretrain" / "demo.bin", "--tokenizer", tokenizer,
                              "--out-dir", out / "pretrain", *MODEL, *PRETRAIN)
    seconds["sft"] = run("sft.py", "--init", out / "pretrain", "--data", work / "sft" / "demo.jsonl", "--tokenizer", tokenizer,
                         "--out-dir", out / "sft", *SFT)
    seconds["eval"] = run("eval.py", "--ckpt", out / "sft", "--data", work / "eval" / "medical_qa.jsonl", "--tokenizer", tokenizer,
                          "--out-dir", out / "eval", "--limit", EVAL_QUESTIONS, "--train-data", work / "sft" / "demo.jsonl",
                          *EVAL_ARGS)
    summarize(work, out, seconds, started)


def summarize(work, out, seconds, started):
    """Write summary.json and the run's report, then print the headline numbers."""
    pretrain_rows = read_jsonl(out / "pretrain" / "metrics.jsonl")
    val_loss, val_bpc = last_val_loss(pretrain_rows), last_val_loss(pretrain_rows, "val_bpc")
    entropy = unigram_entropy(bin_token_counts([work / "pretrain" / "demo_val.bin"]))
    metrics = json.loads((out / "eval" / "metrics.json").read_text(encoding="utf-8"))
    samples = read_jsonl(out / "eval" / "predictions.jsonl")[:3]
    summary = {"pretrain_val_loss": val_loss, "pretrain_val_bpc": val_bpc, "val_unigram_entropy": entropy,
               "below_unigram": 1 - val_loss / entropy, "eval": metrics,
               "stage_seconds": {k: round(v, 1) for k, v in seconds.items()}, "seconds": round(time.time() - started)}
    write_json_atomic(out / "summary.json", summary)
    run("report.py", out, "--pretrain-data", work / "pretrain" / "demo.bin")

    baselines = metrics["baselines"]
    print("\n" + "=" * 72)
    print(f"pretraining val loss   {val_loss:.3f} nats/token, {val_bpc:.3f} bits/character")
    print(f"unigram entropy of val {entropy:.3f} nats/token  (val loss is {summary['below_unigram']:.1%} below it)")
    print(f"eval on {metrics['n']} held-out medical questions, [95% bootstrap intervals]:")
    print(f"  model                          {headline(metrics)}")
    print(f"  copy the question              {headline(baselines['copy_question'])}")
    print(f"  most common training answer    {headline(baselines['most_common_train_answer'])}")
    ppl = f"{metrics['answer_ppl']:.1f}" if metrics["answer_ppl"] is not None else "inf"
    print(f"  sentence BLEU avg {metrics['bleu_sentence_avg']:.2f}, answer perplexity {ppl}; "
          f"sacreBLEU signature {metrics['sacrebleu_signature']}")
    print(f"  answers that loop (repeat_rate) {metrics['repeat_rate']:.2f}, length ratio {metrics['length_ratio']:.2f}, "
          f"reference answers at {metrics['answer_bpc']:.3f} bits/character")
    for i, s in enumerate(samples, 1):
        print(f"\n[{i}] Q: {s['question'][:120]}\n    A: {s['prediction'][:200]}\n    reference: {s['reference'][:120]}")
    print(f"\ndemo finished in {summary['seconds'] / 60:.1f} min; summary in {out / 'summary.json'}; "
          f"report in {out / 'report.md'}")


if __name__ == "__main__":
    main()
