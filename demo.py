"""The whole pipeline at one of three budgets, the rungs of a quality ladder:

    own tokenizer -> data_process (pretrain, sft, eval) -> pretrain -> sft -> choose_decoding -> eval

    python demo.py                       # the demo rung: under 10 minutes on a 2-core CPU
    python demo.py --preset small        # a larger model on more tokens: under 30 minutes there
    python demo.py --preset gpu --data-dir DIR   # context 512, dim 512, 8 layers, ChatGLM2 vocabulary: one GPU
    DATA_DIR=path/to/data python demo.py # a local data dir (offline); without one, small public
                                         # subsets are downloaded from the Hub

A local data dir holds pretrain/*.jsonl ({"text"}), sft/*.jsonl (Alpaca) and
medical_qa/*.jsonl ({"question","answer"}); the gpu rung also needs
tokenizer/chatglm2/tokenizer.model. Each stage is an ordinary command of this repository,
printed before it runs, so the demo doubles as a worked example.

At the end it prints the pretraining validation loss beside the unigram entropy of the
validation tokens (both in nats per token: a model that only knew token frequencies would
score the entropy) and in bits per character, the sacreBLEU and ROUGE-L of the fine-tuned
model on held-out medical questions with their 95% confidence intervals and beside two
baselines, and three sample answers; all of it also goes to OUT_DIR/summary.json (with the
run's training FLOPs), and report.py writes the run's report to OUT_DIR/report.md.
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
# defaults (flags override)
DATA_DIR = os.environ.get("DATA_DIR", "")  # empty: download subsets from the Hub
WORK_DIR = "data/demo"
OUT_DIR = "out/demo"
PRESET = "demo"
EVAL_QUESTIONS = 200
# Modern medical and encyclopedic text, the closest to a consultation answer: doctor-patient
# dialogues, disease entries, Wikipedia, scientific abstracts. The TCM classics (classical
# Chinese, 37% of the shared corpus), statutes and news transcripts teach other languages of
# text; a few million tokens are better spent on this (README: what moves quality).
PRETRAIN_FILES = ["medical_dialogues.jsonl", "medical_texts.jsonl", "wiki_zh.jsonl", "csl_abstracts.jsonl",
                  "cmrc2018_wiki.jsonl"]
# The medical SFT files whose answers are as long as the eval references (median 99 characters):
# medical_huatuo26m (median 100) and medical_chatmed (135). medical_huatuo_kg's knowledge-graph
# answers (median 54) teach answers half that long, which BLEU's brevity penalty punishes.
SFT_FILES = ["medical_huatuo26m.jsonl", "medical_chatmed.jsonl"]
# One micro-batch per optimizer step: at these budgets four times the steps beat four times the
# batch (the demo's pretraining: 6.20 -> 5.27 val bits per character for the same tokens).
COMMON_PRETRAIN = ["--grad-accum", "1", "--optimizer", "muon", "--muon-lr", "0.02", "--lr", "3e-3", "--min-lr", "3e-4",
                   "--warmup-steps", "30", "--eval-batches", "80", "--log-every", "25"]
COMMON_SFT = ["--lr", "1e-3", "--min-lr", "1e-4", "--warmup-steps", "20", "--eval-batches", "10", "--log-every", "25",
              "--num-workers", "1"]
# The ladder. Each rung is the whole recipe at one budget; Muon for the hidden matrices reaches
# a given loss with fewer tokens (bench/bench_recipe.py), which is what a fixed budget needs.
# vocab_size None: the ChatGLM2 tokenizer of the data dir instead of an own one.
LADDER = {
    "demo": dict(  # 1.3M parameters, 2.4M pretraining tokens, 10 minutes on 2 CPU cores
        vocab_size=4096, pretrain_files=PRETRAIN_FILES, sft_files=SFT_FILES,
        model=["--dim", "128", "--n-layers", "4", "--n-heads", "4", "--max-seq-len", "256"],
        pretrain=["--batch-size", "32", "--epochs", "1", *COMMON_PRETRAIN, "--eval-every", "150", "--save-every", "150"],
        sft=["--batch-size", "32", "--max-steps", "300", "--epochs", "0", *COMMON_SFT, "--eval-every", "100",
             "--save-every", "150"]),
    # small: near 3 tokens per parameter; dim 192 x 6 layers (3.4M) on 3.6M tokens, more FLOPs,
    # reached val_bpc 4.644 against this size's 4.352 (README: the quality ladder)
    "small": dict(  # 2.2M parameters (dim 160, 5 layers), 6.0M pretraining tokens: 30 minutes on 2 CPU cores
        vocab_size=4096, pretrain_files=PRETRAIN_FILES, sft_files=SFT_FILES,
        model=["--dim", "160", "--n-layers", "5", "--n-heads", "5", "--max-seq-len", "256"],
        pretrain=["--batch-size", "32", "--epochs", "2.5", *COMMON_PRETRAIN, "--eval-every", "200", "--save-every", "200"],
        sft=["--batch-size", "32", "--max-steps", "400", "--epochs", "0", *COMMON_SFT, "--eval-every", "100",
             "--save-every", "200"]),
    "gpu": dict(  # the model the project is built around (dim 512, 8 layers), on all of the data: one GPU
        vocab_size=None, pretrain_files=["*.jsonl"], sft_files=["*.jsonl"],
        model=["--dim", "512", "--n-layers", "8", "--n-heads", "8", "--max-seq-len", "512"],
        pretrain=["--batch-size", "32", "--grad-accum", "4", "--epochs", "2", "--eval-every", "100", "--save-every", "100"],
        sft=["--batch-size", "32", "--epochs", "2", "--eval-every", "200", "--save-every", "200"]),
}
CHARACTER_COVERAGE = 0.99  # below SentencePiece's default so 4096 pieces suffice; rare characters use bytes
CHATGLM2 = Path("tokenizer") / "chatglm2" / "tokenizer.model"  # in the data dir
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
    parser.add_argument("--preset", choices=sorted(LADDER), default=PRESET,
                        help="the rung of the ladder: demo (10 min, 2 CPU cores), small (30 min there), gpu (one GPU)")
    return parser.parse_args(argv)


def main(argv=None):
    cfg = parse_args(argv)
    with one_line_refusals("demo.py"):
        run_demo(cfg)


def pick_files(folder, patterns):
    """The files of `folder` that the rung names, else all of its .json/.jsonl (a data dir of other names)."""
    chosen = sorted({f for pattern in patterns for f in glob.glob(str(folder / pattern))})
    return chosen or sorted(glob.glob(str(folder / "*.json*")))


def stages(rung, data, work, out):
    """The rung's stages as (name, command line) in the order they run: what a user would type."""
    pretrain_inputs = pick_files(data / "pretrain", rung["pretrain_files"])
    sft_inputs = pick_files(data / "sft", rung["sft_files"])
    qa_inputs = sorted(glob.glob(str(data / "medical_qa" / "*.json*")))
    if not (pretrain_inputs and sft_inputs and qa_inputs):
        raise Refusal(f"{data} needs pretrain/, sft/ and medical_qa/ with .jsonl/.json files")
    eval_set, sft_set = work / "eval" / "medical_qa.jsonl", work / "sft" / "demo.jsonl"
    commands = []
    if rung["vocab_size"] is None:
        tokenizer = data / CHATGLM2
        if not tokenizer.is_file():
            raise Refusal(f"{tokenizer} not found: this rung uses the ChatGLM2 tokenizer; put its tokenizer.model "
                          f"there (Hub: THUDM/chatglm2-6b)")
    else:
        tokenizer = work / "tokenizer.model"
        commands.append(("tokenizer", ["data_process.py", "tokenizer", "--input", *pretrain_inputs, "--vocab-size",
                                       rung["vocab_size"], "--character-coverage", CHARACTER_COVERAGE, "--out", tokenizer]))
    max_tokens = dict(zip(rung["model"][::2], rung["model"][1::2]))["--max-seq-len"]
    commands += [
        ("data: pretrain", ["data_process.py", "pretrain", "--input", *pretrain_inputs, "--out", work / "pretrain" / "demo",
                            "--tokenizer", tokenizer, "--val-fraction", "0.01"]),
        ("data: eval", ["data_process.py", "eval", "--input", *qa_inputs, "--out", eval_set]),
        ("data: sft", ["data_process.py", "sft", "--input", *sft_inputs, "--out", sft_set, "--exclude-questions", eval_set,
                       "--tokenizer", tokenizer, "--max-tokens", max_tokens, "--val-fraction", "0.05"]),
        ("pretrain", ["pretrain.py", "--data", work / "pretrain" / "demo.bin", "--tokenizer", tokenizer,
                      "--out-dir", out / "pretrain", *rung["model"], *rung["pretrain"]]),
        ("sft", ["sft.py", "--init", out / "pretrain", "--data", sft_set, "--tokenizer", tokenizer, "--out-dir", out / "sft",
                 *rung["sft"]]),
        # decoding defaults from the SFT validation split only; eval.py then runs with its defaults
        ("decoding", ["choose_decoding.py", "--ckpt", out / "sft", "--data", work / "sft" / "demo_val.jsonl"]),
        ("eval", ["eval.py", "--ckpt", out / "sft", "--data", eval_set, "--tokenizer", tokenizer, "--out-dir", out / "eval",
                  "--limit", EVAL_QUESTIONS, "--train-data", sft_set, "--batch-size", "50"]),
    ]
    return commands


def run_demo(cfg):
    started = time.time()
    work, out = Path(cfg.work_dir), Path(cfg.out_dir)
    for d in (work, out):  # every run starts clean so its numbers belong to it alone
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    print(cli.config_line(cfg), flush=True)
    cli.write_config(out, cfg)
    data = Path(cfg.data_dir) if cfg.data_dir else download_subsets(work / "raw")
    seconds = {}  # wall-clock per stage, for the report
    for name, command in stages(LADDER[cfg.preset], data, work, out):
        seconds[name] = run(*command)
    summarize(work, out, seconds, started, cfg.preset)


def training_flops(out):
    """FLOPs spent training (pretraining and SFT): each stage's tokens times its FLOPs per token."""
    total = 0.0
    for stage in ("pretrain", "sft"):
        config = json.loads((out / stage / "config.json").read_text(encoding="utf-8"))
        total += read_jsonl(out / stage / "metrics.jsonl")[-1]["tokens"] * config["flops_per_token"]
    return total


def summarize(work, out, seconds, started, preset):
    """Write summary.json and the run's report, then print the headline numbers."""
    pretrain_rows = read_jsonl(out / "pretrain" / "metrics.jsonl")
    val_loss, val_bpc = last_val_loss(pretrain_rows), last_val_loss(pretrain_rows, "val_bpc")
    entropy = unigram_entropy(bin_token_counts([work / "pretrain" / "demo_val.bin"]))
    metrics = json.loads((out / "eval" / "metrics.json").read_text(encoding="utf-8"))
    samples = read_jsonl(out / "eval" / "predictions.jsonl")[:3]
    summary = {"preset": preset, "training_flops": training_flops(out), "pretrain_val_loss": val_loss, "pretrain_val_bpc": val_bpc, "val_unigram_entropy": entropy,
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
