"""Evaluate an SFT checkpoint on a QA set: generate an answer to every question (greedy by
default, batched, with the KV cache) and score the answers against the references.

    python eval.py --ckpt out/sft --data data/eval/medical_qa.jsonl --out-dir out/eval [--limit N]

Writes OUT_DIR/predictions.jsonl (one object per question, in input order) and
OUT_DIR/metrics.json with
  bleu4_char_corpus  corpus BLEU-4 over character tokens, 0-100 (the headline number),
  bleu_sentence_avg  sentence BLEU-4 with nltk's smoothing method1 over the same character
                     tokens, averaged over questions, 0-100 (the upstream project's score),
  answer_ppl         perplexity of the reference answers under the model with teacher forcing:
                     the SFT loss (answer ids + eos, prompt masked) over all answers,
  n                  number of questions scored.
Character tokens follow sacreBLEU's zh tokenizer in spirit: every non-space character is a
token, except that a run of ASCII letters and digits (an English word, a number) is one token.
"""
import argparse
import csv
import json
import math
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from tqdm import tqdm

from checkpoint import write_text_atomic
from generate import add_generation_args, generate_answers, load_for_inference, sampling_settings
from model import IGNORE_INDEX
from prompt import fit_prompt

# -----------------------------------------------------------------------------
# defaults (flags override)
DATA = "data/eval/medical_qa.jsonl"
OUT_DIR = "out/eval"
QUESTION_FIELD = "question"
ANSWER_FIELD = "answer"
BATCH_SIZE = 16
GENERATION = dict(ckpt="out/sft", max_new_tokens=256, seed=1337, top_k=None, top_p=None, repetition_penalty=1.0,
                  temperature=0.0)  # greedy, so the score is reproducible
# -----------------------------------------------------------------------------

CHAR_TOKEN = re.compile(r"[A-Za-z0-9]+|\S")


def char_tokens(text):
    """Every non-space character is a token; a run of ASCII letters/digits stays one token."""
    return CHAR_TOKEN.findall(text)


def ngram_counts(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu4_char_corpus(hypotheses, references):
    """Corpus BLEU-4 (Papineni et al.) over character tokens, one reference per hypothesis,
    on a 0-100 scale: clipped n-gram matches and n-gram totals are summed over the corpus, the
    four precisions are combined by geometric mean, and the brevity penalty uses the summed
    lengths. No smoothing: a corpus with no matching 4-gram scores 0."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    matches, totals = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        hyp, ref = char_tokens(hyp), char_tokens(ref)
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, 5):
            hyp_ngrams, ref_ngrams = ngram_counts(hyp, n), ngram_counts(ref, n)
            matches[n - 1] += sum(min(c, ref_ngrams[g]) for g, c in hyp_ngrams.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * brevity * math.exp(log_precision)


def bleu_sentence_avg(hypotheses, references):
    """Mean of nltk's sentence BLEU-4 (smoothing method1) over character tokens, 0-100."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"need as many hypotheses ({len(hypotheses)}) as references ({len(references)}), at least one")
    smooth = SmoothingFunction().method1
    scores = [sentence_bleu([char_tokens(r)], char_tokens(h), smoothing_function=smooth)
              for h, r in zip(hypotheses, references)]
    return 100 * sum(scores) / len(scores)


# -----------------------------------------------------------------------------
# reading the QA set

def qa_records(path):
    """(where, record) pairs of a JSONL, JSON (a list of objects) or CSV (with a header) file;
    `where` names the line (or the JSON list item) for error messages."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield f"{path}:{reader.line_num}", row
    elif suffix == ".json":
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(items, list):
            raise ValueError(f"{path}: a .json QA set must be a list of objects")
        for i, item in enumerate(items):
            yield f"{path}: item {i}", item
    else:  # .jsonl and anything else: one JSON object per line
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    raise ValueError(f"{path}:{line_no}: empty line")
                try:
                    yield f"{path}:{line_no}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON: {e}") from None


def read_qa(path, question_field=QUESTION_FIELD, answer_field=ANSWER_FIELD, limit=None):
    """-> list of dicts {where, question, answer}; stops at the first empty or malformed row."""
    rows = []
    for where, record in qa_records(path):
        if limit is not None and len(rows) >= limit:
            break
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object with '{question_field}' and '{answer_field}'")
        for field in (question_field, answer_field):
            value = record.get(field)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: field '{field}' is missing, empty or not text")
        rows.append({"where": where, "question": record[question_field], "answer": record[answer_field]})
    if not rows:
        raise ValueError(f"{path}: no QA rows")
    return rows


# -----------------------------------------------------------------------------
# scoring

@torch.inference_mode()
def answer_perplexity(model, tok, prompts, answers, batch_size):
    """exp of the mean SFT loss over every reference answer token and its eos (teacher forcing)."""
    max_len = model.args.max_seq_len
    device = model.tok_embeddings.weight.device
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(prompts), batch_size), desc="answer ppl", unit="batch"):
        xs, ys = [], []
        for prompt, answer in zip(prompts[start:start + batch_size], answers[start:start + batch_size]):
            seq = prompt + tok.encode(answer) + [tok.eos_id]
            targets = [IGNORE_INDEX] * (len(prompt) - 1) + seq[len(prompt):]
            xs.append(seq[:-1][:max_len])
            ys.append(targets[:max_len])
        width = max(len(x) for x in xs)
        x = torch.tensor([x + [tok.pad_id] * (width - len(x)) for x in xs], device=device)
        y = torch.tensor([y + [IGNORE_INDEX] * (width - len(y)) for y in ys], device=device)
        n_tokens = int((y != IGNORE_INDEX).sum())
        total_nll += float(model(x, y)) * n_tokens
        total_tokens += n_tokens
    return math.exp(total_nll / total_tokens)


# -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate answers for a QA set with an SFT checkpoint and score them with BLEU.")
    p.add_argument("--data", default=DATA, help="QA set: .jsonl, .json (list of objects) or .csv with a header")
    p.add_argument("--out-dir", default=OUT_DIR, help="where predictions.jsonl and metrics.json go")
    p.add_argument("--question-field", default=QUESTION_FIELD, help="field holding the question")
    p.add_argument("--answer-field", default=ANSWER_FIELD, help="field holding the reference answer")
    p.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="questions generated together")
    add_generation_args(p, GENERATION)
    return p.parse_args(argv)


def evaluate(args):
    rows = read_qa(args.data, args.question_field, args.answer_field, args.limit)
    ckpt, model, tok = load_for_inference(args.ckpt, args.tokenizer, args.device)
    device = str(model.tok_embeddings.weight.device)
    if ckpt.get("kind") != "sft":
        print(f"warning: {ckpt['path']} is a '{ckpt.get('kind')}' checkpoint; eval.py prompts it like an SFT model")
    prompt_budget = model.args.max_seq_len - args.max_new_tokens
    if prompt_budget < 2:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt "
                         f"within max_seq_len {model.args.max_seq_len}")
    # A question too long for the context keeps its end (usually the actual question) and the bos.
    fitted = [fit_prompt(tok, [], r["question"], prompt_budget) for r in rows]
    prompts, n_truncated = [ids for ids, _, _ in fitted], sum(cut for _, _, cut in fitted)

    t0 = time.time()
    generated = generate_answers(model, prompts, args.batch_size, args.max_new_tokens,
                                 **sampling_settings(args, tok, device))
    gen_seconds = time.time() - t0
    predictions = [tok.decode(ids) for ids in generated]
    references = [r["answer"] for r in rows]
    metrics = {
        "bleu4_char_corpus": bleu4_char_corpus(predictions, references),
        "bleu_sentence_avg": bleu_sentence_avg(predictions, references),
        "answer_ppl": answer_perplexity(model, tok, prompts, references, args.batch_size),
        "n": len(rows),
        "bleu_scale": "0-100",
        "bleu_tokens": "characters; a run of ASCII letters/digits is one token",
        "bleu_sentence_smoothing": "nltk method1",
        "n_prompts_truncated": n_truncated,
        "mean_new_tokens": sum(map(len, generated)) / len(generated),
        "questions_per_s": len(rows) / gen_seconds,
        "checkpoint": ckpt["path"], "kind": ckpt.get("kind"), "step": ckpt.get("step"),
        "tokenizer": tok.name, "data": str(args.data),
        "generation": {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p",
                                                      "repetition_penalty", "seed", "batch_size")},
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "predictions.jsonl", "".join(
        json.dumps({"index": i, "question": r["question"], "reference": r["answer"],
                    "prediction": pred, "n_new_tokens": len(ids)}, ensure_ascii=False) + "\n"
        for i, (r, pred, ids) in enumerate(zip(rows, predictions, generated))))
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
    print(f"n={metrics['n']}  bleu4_char_corpus={metrics['bleu4_char_corpus']:.2f}  "
          f"bleu_sentence_avg={metrics['bleu_sentence_avg']:.2f}  answer_ppl={metrics['answer_ppl']:.2f}  "
          f"-> {out_dir}")
    return metrics


def main(argv=None):
    try:
        evaluate(parse_args(argv))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"eval.py: error: {e}")


if __name__ == "__main__":
    main()
