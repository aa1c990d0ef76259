"""Choose a fine-tuned model's decoding defaults on the SFT validation split, and store them
beside the checkpoint as generation_config.json, which eval.py, chat.py, serve.py and
export.py then use unless a flag overrides them.

    python choose_decoding.py --ckpt out/sft --data data/sft/NAME_val.jsonl

Greedy decoding is tried with each of the two ways of keeping a small model from looping
(sampling.py): every --repetition-penalties value alone, and every --no-repeat-ngram-sizes
value alone. Each answer is also cut at every --max-new-tokens limit (greedy answers are
causal: the first n tokens of a longer answer are the answer a limit of n gives, so one
generation scores every limit).
The rule: the highest sacreBLEU among the settings whose answers loop at most
--max-repeat-rate of the time (metrics.repeat_rate), else the least looping one. Only
validation questions are looked at, never the eval set's; the length still comes from the
model (no forced minimum, no suppressed eos), the limit only cuts it.
"""
import argparse
import time
from pathlib import Path

from tqdm import tqdm

import cli
import metrics
from atomic import write_json_atomic
from engine import BatchEngine, answer_all
from eval import read_qa
from checkpoint import ANSWERING_KINDS
from generate import generation_config_path, load_for_inference
from prompt import fit_prompt
from refusal import Refusal, one_line_refusals
from sampling import Sampling

# -----------------------------------------------------------------------------
# defaults (flags override)
CKPT = "out/sft"
LIMIT = 200  # validation questions scored
# Each tried alone. Penalty 1.1 loops in over a third of the demo's validation answers, and a
# penalty on top of n-gram blocking shortens answers for nothing (measured on validation).
REPETITION_PENALTIES = [1.2, 1.3]
NGRAM_SIZES = [3, 4]
MAX_NEW_TOKENS = [48, 64, 96, 128, 192, 256]  # those above half the model's context are left out
MAX_REPEAT_RATE = 0.10  # the share of looping answers tolerated (the references: 0)
BATCH_SIZE = 50
# -----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--ckpt", default=CKPT, help="the fine-tuned checkpoint file or out dir; the choice is written beside it")
    p.add_argument("--data", required=True, help="validation QA JSONL ({prompt, answer}: data_process.py sft's NAME_val.jsonl)")
    p.add_argument("--question-field", default="prompt", help="field holding the question")
    p.add_argument("--answer-field", default="answer", help="field holding the reference answer")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model to use instead of the one the checkpoint names")
    p.add_argument("--device", default=None, help="cpu or cuda (None: cuda when available)")
    p.add_argument("--limit", type=int, default=LIMIT, help="score only the first N validation rows (>= 1)")
    p.add_argument("--repetition-penalties", type=float, nargs="+", default=REPETITION_PENALTIES,
                   help="repetition penalties tried, without n-gram blocking (each > 0; 1 = off)")
    p.add_argument("--no-repeat-ngram-sizes", type=int, nargs="*", default=NGRAM_SIZES,
                   help="n-gram blocking sizes tried, without a repetition penalty (each >= 1)")
    p.add_argument("--max-new-tokens", type=int, nargs="+", default=MAX_NEW_TOKENS,
                   help="answer length limits tried (each >= 1; those above half the model's context are left out)")
    p.add_argument("--max-repeat-rate", type=float, default=MAX_REPEAT_RATE,
                   help="most looping answers (0-1) a chosen setting may have")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="questions generated together (>= 1)")
    cfg = p.parse_args(argv)
    if cfg.limit < 1 or cfg.batch_size < 1 or min(cfg.max_new_tokens) < 1:
        p.error("--limit, --batch-size and every --max-new-tokens must be >= 1")
    if min(cfg.repetition_penalties) <= 0 or not 0 <= cfg.max_repeat_rate <= 1:
        p.error("every --repetition-penalties value must be > 0, and --max-repeat-rate in 0..1")
    if any(n < 1 for n in cfg.no_repeat_ngram_sizes):
        p.error("every --no-repeat-ngram-sizes value must be >= 1")
    return cfg


def score_setting(tokenizer, generated, references, limit):
    """Scores of the answers cut at `limit` tokens (no bootstrap: the choice needs the point value)."""
    answers = [tokenizer.decode(ids[:limit]) for ids in generated]
    scores, _ = metrics.score(answers, references, 0, 0)
    return {"sacrebleu": scores["bleu4"], "rougeL": scores["rougeL"], "repeat_rate": scores["repeat_rate"],
            "length_ratio": scores["length_ratio"]}


def pick(candidates, max_repeat_rate):
    """The rule of the module docstring: best sacreBLEU among the settings that loop little enough."""
    allowed = [c for c in candidates if c["repeat_rate"] <= max_repeat_rate]
    if allowed:
        return max(allowed, key=lambda c: c["sacrebleu"])
    return min(candidates, key=lambda c: (c["repeat_rate"], -c["sacrebleu"]))


def try_settings(cfg, model, tokenizer, rows):
    """Generate greedily once per repetition penalty and score every length limit -> candidates."""
    limits = sorted(n for n in set(cfg.max_new_tokens) if n <= model.args.max_seq_len // 2)
    if not limits:
        raise Refusal(f"every --max-new-tokens is above half the model's context of {model.args.max_seq_len} tokens, "
                      f"which leaves a question too little room; pass smaller limits")
    longest = max(limits)
    prompt_budget = model.args.max_seq_len - longest
    prompts = [fit_prompt(tokenizer, [], r["question"], prompt_budget)[0] for r in rows]
    references = [r["answer"] for r in rows]
    engine = BatchEngine(model, tokenizer.eos_id, tokenizer.pad_id, max_batch=cfg.batch_size)
    settings = [(penalty, 0) for penalty in cfg.repetition_penalties] + [(1.0, n) for n in cfg.no_repeat_ngram_sizes]
    candidates = []
    with tqdm(total=len(prompts) * len(settings), unit="q", desc="choose decoding") as bar:
        for penalty, ngram in settings:
            sampling = Sampling(repetition_penalty=penalty, no_repeat_ngram_size=ngram)
            generated = answer_all(engine, prompts, longest, sampling, on_answer=lambda: bar.update(1))
            for limit in limits:
                candidates.append({"repetition_penalty": penalty, "no_repeat_ngram_size": ngram, "max_new_tokens": limit,
                                   **score_setting(tokenizer, generated, references, limit)})
    return candidates


def show(candidates, chosen):
    print(f"{'rep. penalty':>12} {'n-gram block':>12} {'max tokens':>10} {'sacreBLEU':>9} {'ROUGE-L':>8} "
          f"{'repeat':>6} {'length':>6}")
    for c in candidates:
        mark = "  <- chosen" if c is chosen else ""
        print(f"{c['repetition_penalty']:>12g} {c['no_repeat_ngram_size'] or 'off':>12} {c['max_new_tokens']:>10d} "
              f"{c['sacrebleu']:>9.2f} {c['rougeL']:>8.2f} {c['repeat_rate']:>6.2f} {c['length_ratio']:>6.2f}{mark}")


def choose(cfg):
    started = time.time()
    if not Path(cfg.data).is_file():
        raise Refusal(f"--data {cfg.data}: no such file")
    target = generation_config_path(cfg.ckpt)
    rows = read_qa(cfg.data, cfg.question_field, cfg.answer_field, cfg.limit)
    ckpt, model, tokenizer = load_for_inference(cfg.ckpt, cfg.tokenizer, cfg.device)
    if ckpt.get("kind") not in ANSWERING_KINDS:
        raise Refusal(f"{ckpt['path']} is a '{ckpt.get('kind')}' checkpoint; decoding defaults are chosen for "
                      f"fine-tuned models (sft.py, dpo.py)")
    print(cli.config_line(cfg, checkpoint=ckpt["path"], step=ckpt.get("step")), flush=True)
    candidates = try_settings(cfg, model, tokenizer, rows)
    chosen = pick(candidates, cfg.max_repeat_rate)
    show(candidates, chosen)
    decoding = {"max_new_tokens": chosen["max_new_tokens"], "temperature": 0.0, "top_k": None, "top_p": None,
                "repetition_penalty": chosen["repetition_penalty"], "no_repeat_ngram_size": chosen["no_repeat_ngram_size"]}
    write_json_atomic(target, {**decoding, "chosen_on": {
        "data": str(cfg.data), "n": len(rows), "checkpoint": str(ckpt["path"]), "step": ckpt.get("step"),
        "rule": f"highest sacreBLEU with repeat_rate <= {cfg.max_repeat_rate}", "candidates": candidates}})
    print(f"choose_decoding: repetition penalty {chosen['repetition_penalty']:g}, n-gram blocking "
          f"{chosen['no_repeat_ngram_size'] or 'off'}, at most {chosen['max_new_tokens']} "
          f"new tokens, greedy -> {target} ({time.time() - started:.0f} s); eval.py, chat.py, serve.py and "
          f"export.py use it unless a flag overrides it", flush=True)


def main(argv=None):
    cfg = parse_args(argv)
    with one_line_refusals("choose_decoding.py"):
        choose(cfg)


if __name__ == "__main__":
    main()
