"""Evaluate an SFT checkpoint on a QA set: generate an answer to every question (greedy by
default, through engine.py, the engine that serves, --batch-size questions at once), score
the answers against the references, and put the scores beside two baselines and their 95%
bootstrap confidence intervals.

    python eval.py --ckpt out/sft --data data/eval/medical_qa.jsonl --out-dir out/eval \
        [--limit N] [--train-data data/sft/NAME.jsonl] [--compare out/old_eval/predictions.jsonl]

Writes OUT_DIR/config.json (every setting, the resolved max_new_tokens and checkpoint
included) before generating, OUT_DIR/predictions.jsonl (one object per question, in input
order) as soon as the answers exist, then OUT_DIR/metrics.json with (scores on 0-100; metrics.py explains each):
  bleu4_char_corpus  the headline: sacreBLEU corpus BLEU-4 with tokenize="zh" (each Chinese
                     character one token), its signature in sacrebleu_signature and its 95%
                     bootstrap interval in bleu4_char_corpus_ci95,
  bleu_sentence_avg  nltk sentence BLEU-4 with smoothing method1 over the same tokens,
                     averaged over questions (the upstream project's score),
  answer_ppl         perplexity of the reference answers under the model with teacher forcing
                     (the SFT loss over answer ids + eos, prompt masked); null if it overflows,
  answer_nll         the same loss in nats per token, which never overflows,
  answer_bpc         the same loss in bits per character of the reference answers, which
                     compares across vocabularies,
  repeat_rate        the share of answers (0-1) that repeat a 10-character run: loops,
  n                  number of questions scored,
  bleu1..bleu4, rouge1, rouge2, rougeL (+ rougeL_ci95), distinct1, distinct2, length_ratio,
  baselines          the same scores for "copy the question" and, given --train-data, "the
                     most common training answer", on the same questions,
  compare            with --compare: the paired bootstrap of this run against another run's
                     predictions.jsonl on the same questions,
and the settings and timings of the run.

With --task cmmlu it scores CMMLU's multiple-choice questions instead, as lm-evaluation-harness
does (cmmlu.py explains how):
    python eval.py --task cmmlu --ckpt out/sft --data DIR --out-dir out/cmmlu [--shots 0|5]
"""
import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from tqdm import tqdm

import cli
import cmmlu
import metrics
from atomic import naming_errors, write_json_atomic, write_text_atomic
from corpus import DataError, iter_records, stop_at_bad, utf8
from engine import BatchEngine, answer_all
from checkpoint import ANSWERING_KINDS
from generate import add_generation_args, default_max_new_tokens, load_for_inference, resolve_decoding, sampling_from
from model import IGNORE_INDEX
from prompt import ANSWER_ENCODING, answer_ids, fit_prompt
from refusal import Refusal, one_line_refusals

# -----------------------------------------------------------------------------
# defaults (flags override)
DATA = {"qa": "data/eval/medical_qa.jsonl", "cmmlu": "data/cmmlu"}  # per --task
SHOTS = 0  # CMMLU examples before each question (lm-eval's default for cmmlu)
OUT_DIR = "out/eval"
QUESTION_FIELD = "question"
ANSWER_FIELD = "answer"
BATCH_SIZE = 16
# Decoding flags left unset come from the checkpoint's generation_config.json when it has one.
GENERATION = dict(ckpt="out/sft", max_new_tokens=None, seed=1337, top_k=None, top_p=None, repetition_penalty=1.0,
                  no_repeat_ngram_size=0, temperature=0.0)  # greedy, so the score is reproducible; max_new_tokens None: fit the model
# -----------------------------------------------------------------------------


def bleu_sentence_avg(hypotheses, references):
    """Mean of nltk's sentence BLEU-4 (smoothing method1) over character tokens, 0-100."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"need as many hypotheses ({len(hypotheses)}) as references ({len(references)}), at least one")
    smooth = SmoothingFunction().method1
    values = [sentence_bleu([metrics.char_tokens(r)], metrics.char_tokens(h), smoothing_function=smooth)
              for h, r in zip(hypotheses, references)]
    return 100 * sum(values) / len(values)


# -----------------------------------------------------------------------------
# reading the QA set, the training answers and another run's predictions

def records(path):
    """(where, record) for every record of a .jsonl, .json or .csv file, read by corpus.py;
    a malformed or non-UTF-8 record stops with its file:line."""
    for line_no, record in iter_records(Path(path), stop_at_bad):
        yield f"{path}:{line_no}", record


def text_field(where, record, field):
    """record[field], which must be non-empty UTF-8 text."""
    value = record.get(field)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field '{field}' is missing, empty or not text")
    try:
        utf8(value)
    except DataError:
        raise DataError(f"{where}: field '{field}' holds bytes that are not UTF-8; re-save the file as UTF-8") from None
    return value


def read_qa(path, question_field=QUESTION_FIELD, answer_field=ANSWER_FIELD, limit=None):
    """-> list of dicts {where, question, answer}; stops at the first empty or malformed row."""
    rows = []
    for where, record in records(path):
        if limit is not None and len(rows) >= limit:
            break
        rows.append({"where": where, "question": text_field(where, record, question_field),
                     "answer": text_field(where, record, answer_field)})
    if not rows:
        raise DataError(f"{path}: no QA rows")
    return rows


def most_common_answer(path):
    """The answer that occurs most often in an SFT training file ({"prompt", "answer"} per
    line, as data_process.py sft writes it) -> (answer, times it occurs, examples read)."""
    counts = Counter(text_field(where, record, "answer") for where, record in records(path))
    if not counts:
        raise DataError(f"{path}: no training examples")
    answer, count = counts.most_common(1)[0]
    return answer, count, sum(counts.values())


def read_predictions(path, rows):
    """Another run's predictions.jsonl, checked to hold the same questions in the same order."""
    other = [(where, record) for where, record in records(path)]
    if len(other) != len(rows):
        raise DataError(f"{path}: {len(other)} predictions but this run scored {len(rows)} questions; "
                         f"--compare needs a run on the same questions (same --data and --limit)")
    for (where, record), row in zip(other, rows):
        if not isinstance(record.get("prediction"), str):
            raise DataError(f"{where}: no 'prediction' text; --compare takes a predictions.jsonl written by eval.py")
        if record.get("reference") != row["answer"]:
            raise DataError(f"{where}: its reference differs from {row['where']}; --compare needs the same questions")
    return [record["prediction"] for _, record in other]


# -----------------------------------------------------------------------------
# scoring

@torch.inference_mode()
def answer_nll(model, tokenizer, prompts, answers, batch_size, encoding=ANSWER_ENCODING):
    """The SFT loss of the reference answers under teacher forcing -> (nats per token over every
    scored answer token and its eos, tokens scored, characters of the answer text scored).
    An answer that runs past the context is scored up to it, its characters counted as far.
    encoding: the checkpoint's answer encoding (prompt.answer_ids), so it is scored as it learned."""
    max_len = model.args.max_seq_len
    device = model.tok_embeddings.weight.device
    total_nll, total_tokens, total_chars = 0.0, 0, 0
    for start in tqdm(range(0, len(prompts), batch_size), desc="answer ppl", unit="batch"):
        xs, ys = [], []
        for prompt, answer in zip(prompts[start:start + batch_size], answers[start:start + batch_size]):
            ids = answer_ids(tokenizer, answer, encoding)
            seq = prompt + ids + [tokenizer.eos_id]
            targets = [IGNORE_INDEX] * (len(prompt) - 1) + seq[len(prompt):]
            xs.append(seq[:-1][:max_len])
            ys.append(targets[:max_len])
            n_scored = max(0, min(len(seq) - 1, max_len) - (len(prompt) - 1))
            total_chars += len(answer) if n_scored >= len(ids) else len(tokenizer.decode(ids[:n_scored]))
        width = max(len(x) for x in xs)
        x = torch.tensor([x + [tokenizer.pad_id] * (width - len(x)) for x in xs], device=device)
        y = torch.tensor([y + [IGNORE_INDEX] * (width - len(y)) for y in ys], device=device)
        n_tokens = int((y != IGNORE_INDEX).sum())
        total_nll += float(model(x, y)) * n_tokens
        total_tokens += n_tokens
    return total_nll / total_tokens, total_tokens, total_chars


def perplexity(nll):
    """exp(nll), or None where that is no finite number (a loss above ~709 nats overflows a float)."""
    return math.exp(nll) if math.isfinite(nll) and nll < math.log(sys.float_info.max) else None


def score_baselines(rows, train_data, samples, seed):
    """The scores of answers that need no model, on the same questions: the question itself,
    and the most common answer of the SFT training data (skipped without --train-data)."""
    references = [r["answer"] for r in rows]
    result = {"copy_question": metrics.score([r["question"] for r in rows], references, samples, seed)[0]}
    if train_data is None:
        result["most_common_train_answer"] = {"skipped": "no --train-data given"}
        return result
    answer, count, n_train = most_common_answer(train_data)
    result["most_common_train_answer"] = {**metrics.score([answer] * len(rows), references, samples, seed)[0],
                                          "answer": answer, "count": count, "n_train": n_train,
                                          "train_data": str(train_data)}
    return result


def compare_runs(per_question, rows, other_path, samples, seed):
    """Paired bootstrap of this run against the predictions in other_path."""
    other = read_predictions(other_path, rows)
    _, other_per_question = metrics.score(other, [r["answer"] for r in rows], samples=0)
    return {"other": str(other_path), "samples": samples,
            **metrics.paired_bootstrap(per_question, other_per_question, samples, seed)}


# -----------------------------------------------------------------------------
# the run

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--task", choices=["qa", "cmmlu"], default="qa",
                   help="qa: answer open questions, scored by BLEU and ROUGE; cmmlu: CMMLU multiple choice (cmmlu.py)")
    p.add_argument("--data", default=None, help=f"qa: a QA set, .jsonl, .json (list of objects) or .csv with a header "
                   f"(default {DATA['qa']}); cmmlu: a dir of test/*.csv and dev/*.csv (default {DATA['cmmlu']})")
    p.add_argument("--shots", type=int, choices=range(0, 6), default=SHOTS, metavar="0..5",
                   help="cmmlu: examples from the subject's dev rows before each question")
    p.add_argument("--out-dir", default=OUT_DIR, help="where predictions.jsonl, metrics.json and config.json go")
    p.add_argument("--question-field", default=QUESTION_FIELD, help="field holding the question")
    p.add_argument("--answer-field", default=ANSWER_FIELD, help="field holding the reference answer")
    p.add_argument("--limit", type=int, default=None, help="score only the first N rows (None: all; cmmlu: per subject)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="questions generated together (cmmlu: inputs scored together)")
    p.add_argument("--train-data", default=None, help="the SFT training JSONL, for the 'most common training answer' baseline")
    p.add_argument("--compare", default=None, metavar="OTHER_PREDICTIONS.jsonl",
                   help="another run's predictions on the same questions: paired bootstrap of this run against it")
    p.add_argument("--bootstrap", type=int, default=metrics.BOOTSTRAP_SAMPLES,
                   help="bootstrap resamples for the confidence intervals (0: none); seeded by --seed")
    add_generation_args(p, GENERATION)
    cfg = p.parse_args(argv)
    if cfg.bootstrap < 0 or cfg.bootstrap == 1 or (cfg.compare and not cfg.bootstrap):
        p.error("--bootstrap must be 0 (off) or at least 2, and at least 2 with --compare")
    if cfg.batch_size < 1 or (cfg.limit is not None and cfg.limit < 1):
        p.error("--batch-size and --limit must be >= 1")
    if cfg.task == "cmmlu" and (cfg.train_data or cfg.compare):
        p.error("--train-data and --compare are for --task qa")
    cfg.data = cfg.data or DATA[cfg.task]
    return cfg


def fit_answer_length(cfg, max_seq_len):
    """The answer's token limit (--max-new-tokens, None: what fits this model) and the prompt's
    token budget beside it."""
    max_new_tokens = cfg.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(max_seq_len)
        print(f"max_new_tokens {max_new_tokens}: at most half the model's context of {max_seq_len} "
              f"(--max-new-tokens sets it)", flush=True)
    prompt_budget = max_seq_len - max_new_tokens
    if max_new_tokens < 1 or prompt_budget < 2:
        raise Refusal(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt "
                      f"within max_seq_len {max_seq_len}; pass a smaller one or leave it out")
    return max_new_tokens, prompt_budget


def write_predictions(out_dir, rows, predictions, generated):
    """predictions.jsonl, written before any scoring so that answers survive a failure there;
    an older metrics.json goes first, so that it never sits beside answers it does not describe."""
    (out_dir / "metrics.json").unlink(missing_ok=True)
    write_text_atomic(out_dir / "predictions.jsonl", "".join(
        json.dumps({"index": i, "question": r["question"], "reference": r["answer"],
                    "prediction": pred, "n_new_tokens": len(ids)}, ensure_ascii=False) + "\n"
        for i, (r, pred, ids) in enumerate(zip(rows, predictions, generated))))


def generate_predictions(cfg, rows):
    """Load the model and answer every question through the engine (at most --batch-size at
    once), writing config.json first -> (checkpoint, model, tokenizer, prompts, generated ids, info)."""
    stored = resolve_decoding(cfg, GENERATION)
    sampling = sampling_from(cfg)
    ckpt, model, tokenizer = load_for_inference(cfg.ckpt, cfg.tokenizer, cfg.device)
    device = str(model.tok_embeddings.weight.device)
    if ckpt.get("kind") not in ANSWERING_KINDS:
        print(f"warning: {ckpt['path']} is a '{ckpt.get('kind')}' checkpoint; eval.py prompts it like an SFT model")
    max_new_tokens, prompt_budget = fit_answer_length(cfg, model.args.max_seq_len)
    resolved = dict(max_new_tokens=max_new_tokens, checkpoint=ckpt["path"], kind=ckpt.get("kind"),
                    step=ckpt.get("step"), tokenizer_name=tokenizer.name, device=device,
                    decoding_from=str(stored) if stored else "flags and eval.py's defaults")
    print(cli.config_line(cfg, **resolved), flush=True)
    out_dir = Path(cfg.out_dir)
    with naming_errors(out_dir):  # an out dir that is a file or read-only is refused before any answer is made
        out_dir.mkdir(parents=True, exist_ok=True)
    cli.write_config(out_dir, cfg, **resolved)
    # A question too long for the context keeps its end (usually the actual question) and the bos.
    fitted = [fit_prompt(tokenizer, [], r["question"], prompt_budget) for r in rows]
    prompts = [ids for ids, _, _ in fitted]
    engine = BatchEngine(model, tokenizer.eos_id, tokenizer.pad_id, max_batch=cfg.batch_size)
    t0 = time.time()
    with tqdm(total=len(prompts), unit="q", desc="generate") as bar:
        generated = answer_all(engine, prompts, max_new_tokens, sampling, on_answer=lambda: bar.update(1))
    info = {"n_prompts_truncated": sum(cut for _, _, cut in fitted), "generate_seconds": time.time() - t0,
            "device": device, "mean_new_tokens": sum(map(len, generated)) / len(generated),
            "generation": {"max_new_tokens": max_new_tokens, **{k: getattr(cfg, k) for k in (
                "temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size", "seed", "batch_size")}}}
    return ckpt, model, tokenizer, prompts, generated, info


def score_run(cfg, rows, predictions, nll):
    """The model's scores beside the baselines (and, with --compare, against another run)."""
    references = [r["answer"] for r in rows]
    model_scores, per_question = metrics.score(predictions, references, cfg.bootstrap, cfg.seed)
    result = {
        "bleu4_char_corpus": model_scores["bleu4"], "bleu_sentence_avg": bleu_sentence_avg(predictions, references),
        "answer_ppl": perplexity(nll), "n": len(rows),
        "bleu4_char_corpus_ci95": model_scores.get("bleu4_ci95"), "sacrebleu_signature": metrics.sacrebleu_signature(),
        "answer_nll": nll, **model_scores,
        "baselines": score_baselines(rows, cfg.train_data, cfg.bootstrap, cfg.seed),
        "bleu_scale": "0-100", "bleu_tokens": "sacreBLEU zh: each Chinese character one token",
        "bleu_sentence_smoothing": "nltk method1", "bootstrap": {"samples": cfg.bootstrap, "seed": cfg.seed},
    }
    if cfg.compare:
        result["compare"] = compare_runs(per_question, rows, cfg.compare, cfg.bootstrap, cfg.seed)
    return result


def evaluate(cfg):
    started = time.time()
    for flag, path in (("--data", cfg.data), ("--train-data", cfg.train_data), ("--compare", cfg.compare)):
        if path is not None and not Path(path).is_file():  # found out now, not after generating
            raise Refusal(f"{flag} {path}: no such file")
    rows = read_qa(cfg.data, cfg.question_field, cfg.answer_field, cfg.limit)
    ckpt, model, tokenizer, prompts, generated, info = generate_predictions(cfg, rows)
    predictions = [tokenizer.decode(ids) for ids in generated]
    out_dir = Path(cfg.out_dir)
    write_predictions(out_dir, rows, predictions, generated)

    nll, n_tokens, n_chars = answer_nll(model, tokenizer, prompts, [r["answer"] for r in rows], cfg.batch_size,
                                        ckpt.get("answer_encoding"))
    t0 = time.time()
    result = score_run(cfg, rows, predictions, nll)
    result["answer_bpc"] = metrics.bits_per_char(nll, n_tokens, n_chars) if n_chars else None
    result.update(info, score_seconds=time.time() - t0, seconds=time.time() - started,
                  questions_per_s=len(rows) / info["generate_seconds"],
                  checkpoint=ckpt["path"], kind=ckpt.get("kind"), step=ckpt.get("step"), tokenizer=tokenizer.name,
                  data=str(cfg.data))
    write_json_atomic(out_dir / "metrics.json", result)
    print_summary(result, out_dir)
    return result


# -----------------------------------------------------------------------------
# what a person reads

def with_ci(value, ci):
    return f"{value:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def headline(s):
    """'sacreBLEU x [lo, hi]  ROUGE-L y [lo, hi]' of one system's scores."""
    return f"sacreBLEU {with_ci(s['bleu4'], s.get('bleu4_ci95'))}  ROUGE-L {with_ci(s['rougeL'], s.get('rougeL_ci95'))}"


def comparison_lines(compare):
    """'this run beats OTHER by x [lo, hi], p = ...' for BLEU and ROUGE-L."""
    lines = []
    for key, name in (("bleu4", "sacreBLEU"), ("rougeL", "ROUGE-L")):
        c = compare[key]
        verb = "beats" if c["delta"] > 0 else "trails" if c["delta"] < 0 else "ties"
        lines.append(f"  this run {verb} {compare['other']} on {name} by {c['delta']:+.2f} "
                     f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}], p = {c['p']:.3f} (paired bootstrap)")
    return lines


def print_summary(m, out_dir):
    ppl = f"{m['answer_ppl']:.2f}" if m["answer_ppl"] is not None else "inf"
    ci = f" (95% bootstrap CIs, {m['bootstrap']['samples']} resamples)" if m["bootstrap"]["samples"] else ""
    lines = [f"eval: {m['n']} questions -> {out_dir}",
             f"  model:                          {headline(m)}{ci}",
             f"  baseline, copy the question:    {headline(m['baselines']['copy_question'])}"]
    common = m["baselines"]["most_common_train_answer"]
    lines.append("  baseline, most common training answer: "
                 + (common["skipped"] if "skipped" in common else headline(common)))
    bleu_n = " / ".join(f"{m['bleu' + str(n)]:.2f}" for n in range(1, 5))
    lines.append(f"  BLEU-1..4 {bleu_n}  ROUGE-1/2 {m['rouge1']:.2f} / "
                 f"{m['rouge2']:.2f}  Distinct-1/2 {m['distinct1']:.2f} / {m['distinct2']:.2f}  "
                 f"length ratio {m['length_ratio']:.2f}")
    bpc = f"{m['answer_bpc']:.3f}" if m.get("answer_bpc") is not None else "n/a"
    lines.append(f"  repeat rate {m['repeat_rate']:.2f}  answer bits per character {bpc}")
    lines.append(f"  sentence BLEU avg {m['bleu_sentence_avg']:.2f}  answer ppl {ppl} (nll {m['answer_nll']:.3f})  "
                 f"sacreBLEU signature {m['sacrebleu_signature']}")
    if "compare" in m:
        lines += comparison_lines(m["compare"])
    print("\n".join(lines), flush=True)


def main(argv=None):
    cfg = parse_args(argv)
    with one_line_refusals("eval.py"):
        cmmlu.evaluate(cfg) if cfg.task == "cmmlu" else evaluate(cfg)


if __name__ == "__main__":
    main()
