"""Multiple-choice exams: CMMLU's subjects scored the way lm-evaluation-harness (0.4.x) scores
its cmmlu_* tasks, so that an accuracy here means what a published CMMLU table means.

    python eval.py --task cmmlu --ckpt out/sft --data DIR --out-dir out/cmmlu [--shots 0|5]

DIR holds CMMLU's own CSV files: test/SUBJECT.csv (the questions scored) and dev/SUBJECT.csv
(the few-shot examples), each with the header `,Question,A,B,C,D,Answer`.

How one question is scored (lm-eval's multiple_choice output type):
  prompt     = DESCRIPTION of the subject + one shot per dev row + the question block, where
               block(row) = f"{Question.strip()}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案："
               shot(row)  = block(row) + " " + Answer + "\\n\\n" (the first --shots dev rows, in file order)
  choice     = " A", " B", " C", " D": lm-eval's target delimiter " " before the letter
  tokens     = the prompt encoded alone (no bos, as the exported tokenizer does); the choice's
               tokens are what encoding prompt + choice adds after the prompt's own tokens
  model sees = (prompt + choice tokens)[-(max_seq_len + 1):][:-1]: cut from the left to fit
  score      = the summed log-probability of the choice's tokens; the answer is the best score.
acc_norm divides each score by the letter's length in characters first; every letter is one
character, so it equals acc (both are reported, as lm-eval reports both).

Speed: the four choices share the prompt, so a question is one row through the model: the
input of the choice with the most tokens, inside which every other choice's input is a prefix,
its scores read at its own positions. Rows go --batch-size at a time, shortest first.
"""
import csv
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import cli
import metrics
from atomic import naming_errors, write_json_atomic, write_text_atomic
from generate import load_for_inference
from refusal import Refusal

LETTERS = ["A", "B", "C", "D"]
COLUMNS = ["Question", *LETTERS, "Answer"]
TARGET_DELIMITER = " "  # between "答案：" and the letter, as lm-eval's default target_delimiter
FEWSHOT_DELIMITER = "\n\n"  # after each shot
CHANCE = 0.25
# Each subject's name in the task description; lm-eval's cmmlu_SUBJECT.yaml files use the same
# text. CMMLU's nine medical subjects; others need their name added.
SUBJECT_NAMES = {
    "anatomy": "解剖学", "clinical_knowledge": "临床知识", "college_medicine": "大学医学",
    "college_medical_statistics": "大学医学统计", "professional_medicine": "专业医学",
    "traditional_chinese_medicine": "中医中药", "virology": "病毒学", "nutrition": "营养学", "genetics": "遗传学",
}


def description(subject):
    return f"以下是关于{SUBJECT_NAMES[subject]}的单项选择题，请直接给出正确答案的选项。\n\n"


def question_block(row):
    return f"{row['Question'].strip()}\nA. {row['A']}\nB. {row['B']}\nC. {row['C']}\nD. {row['D']}\n答案："


def build_prompt(subject, row, shots):
    """The text the model continues with one of the choices; `shots` are dev rows."""
    examples = "".join(question_block(s) + TARGET_DELIMITER + s["Answer"] + FEWSHOT_DELIMITER for s in shots)
    return description(subject) + examples + question_block(row)


# -----------------------------------------------------------------------------
# reading CMMLU's CSV files

def read_csv(path):
    """-> rows ({Question, A, B, C, D, Answer, line}) of one CMMLU CSV; a bad file or row is
    refused naming it."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: a spreadsheet's BOM is not a column name
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise Refusal(f"{path}: no column {', '.join(missing)}; CMMLU's header is ,Question,A,B,C,D,Answer")
            rows = []
            for record in reader:
                row = {c: record[c] or "" for c in COLUMNS}
                if row["Answer"].strip() not in LETTERS:
                    raise Refusal(f"{path}:{reader.line_num}: Answer {row['Answer']!r} is not one of A, B, C, D")
                rows.append({**row, "Answer": row["Answer"].strip(), "line": reader.line_num})
    except UnicodeDecodeError as e:
        raise Refusal(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except csv.Error as e:
        raise Refusal(f"{path}: not a readable CSV ({e})") from None
    if not rows:
        raise Refusal(f"{path}: no questions")
    return rows


def read_subjects(data_dir, shots):
    """-> {subject: (test rows, the first `shots` dev rows)} for every DIR/test/*.csv, sorted by name."""
    data_dir = Path(data_dir)
    tests = sorted((data_dir / "test").glob("*.csv"))
    if not tests:
        raise Refusal(f"--data {data_dir}: no test/*.csv (CMMLU's layout: test/SUBJECT.csv and dev/SUBJECT.csv)")
    subjects = {}
    for test in tests:
        subject = test.stem
        if subject not in SUBJECT_NAMES:
            raise Refusal(f"{test}: subject '{subject}' has no description; add its Chinese name to "
                          f"cmmlu.SUBJECT_NAMES (known: {', '.join(sorted(SUBJECT_NAMES))})")
        dev_rows = []
        if shots:
            dev = data_dir / "dev" / test.name
            if not dev.is_file():
                raise Refusal(f"{dev}: no such file; --shots {shots} takes its examples from the subject's dev rows")
            dev_rows = read_csv(dev)
            if len(dev_rows) < shots:
                raise Refusal(f"{dev}: {len(dev_rows)} rows, fewer than --shots {shots}")
        subjects[subject] = (read_csv(test), dev_rows[:shots])
    return subjects


# -----------------------------------------------------------------------------
# scoring

def choice_requests(tokenizer, prompt, max_seq_len):
    """The model's input and the scored tokens of each choice -> ([(input ids, choice ids)],
    whether the prompt was cut to fit)."""
    context_ids = tokenizer.encode(prompt)
    requests = []
    for letter in LETTERS:
        choice_ids = tokenizer.encode(prompt + TARGET_DELIMITER + letter)[len(context_ids):]
        if not choice_ids:
            raise Refusal(f"the tokenizer encodes choice {letter!r} into the prompt's last token; it cannot be scored")
        requests.append(((context_ids + choice_ids)[-(max_seq_len + 1):][:-1], choice_ids))
    cut = any(len(context_ids) + len(choice) > max_seq_len + 1 for _, choice in requests)
    return requests, cut


def shared_rows(requests):
    """Group requests so that each runs inside a longer one's input: a request whose input is a
    prefix of another's (a choice after the same prompt) reads its scores from that row's
    positions. -> (rows of input ids, for each request (row index, its input's length))."""
    rows, placed = [], [None] * len(requests)
    by_first = {}  # first token -> indices of rows that start with it
    for r in sorted(range(len(requests)), key=lambda r: -len(requests[r][0])):
        inp = requests[r][0]
        for i in by_first.get(inp[0], ()):
            if rows[i][:len(inp)] == inp:
                placed[r] = (i, len(inp))
                break
        else:
            by_first.setdefault(inp[0], []).append(len(rows))
            placed[r] = (len(rows), len(inp))
            rows.append(inp)
    return rows, placed


@torch.no_grad()
def choice_logprobs(model, requests, pad_id, batch_size):
    """Summed log-probabilities of every request's choice ids -> list aligned with requests.
    The choice's tokens are predicted by the last len(choice ids) positions of its input."""
    rows, placed = shared_rows(requests)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths together: little padding
    slot = {row: (start // batch_size, (start % batch_size)) for start, row in enumerate(order)}
    wanted = {}  # batch -> [(request, row in batch, input length)]
    for r, (row, n) in enumerate(placed):
        batch, b = slot[row]
        wanted.setdefault(batch, []).append((r, b, n))
    device = model.tok_embeddings.weight.device
    scores = [0.0] * len(requests)
    for batch in tqdm(range(len(wanted)), desc="cmmlu", unit="batch"):
        members = [rows[i] for i in order[batch * batch_size:(batch + 1) * batch_size]]
        width = len(members[-1])
        x = torch.tensor([list(m) + [pad_id] * (width - len(m)) for m in members], device=device)
        h = model.hidden_states(x)  # (B, T, D); causal, so right padding never reaches a real position
        picks, targets, owners = [], [], []
        for r, b, n in wanted[batch]:
            choice = requests[r][1]
            picks += [(b, p) for p in range(n - len(choice), n)]
            targets += choice
            owners += [r] * len(choice)
        b_idx, p_idx = (torch.tensor(v, device=device) for v in zip(*picks))
        logp = torch.log_softmax(model.output(h[b_idx, p_idx]).float(), dim=-1)
        token_logp = logp[torch.arange(len(targets), device=device), torch.tensor(targets, device=device)]
        for r, value in zip(owners, token_logp.tolist()):
            scores[r] += value
    return scores


def accuracy_with_ci(correct, samples, seed):
    correct = np.asarray(correct, dtype=float)
    ci = metrics.interval(correct[metrics.resample_indices(len(correct), samples, seed)].mean(axis=1)) if samples else None
    return float(correct.mean()), ci


def score_questions(questions, logprobs):
    """Per-question prediction records from the four choices' scores."""
    records = []
    for q, lls in zip(questions, logprobs):
        lls = np.asarray(lls)
        pred = LETTERS[int(np.argmax(lls))]
        pred_norm = LETTERS[int(np.argmax(lls / np.array([len(c) for c in LETTERS], dtype=float)))]
        records.append({"subject": q["subject"], "line": q["line"], "answer": q["Answer"], "prediction": pred,
                        "prediction_norm": pred_norm, "logprobs": [round(v, 6) for v in lls.tolist()]})
    return records


def summarize(records, shots, samples, seed):
    correct = [r["prediction"] == r["answer"] for r in records]
    accuracy, ci = accuracy_with_ci(correct, samples, seed)
    subjects = {}
    for name in sorted({r["subject"] for r in records}):
        hits = [c for c, r in zip(correct, records) if r["subject"] == name]
        subjects[name] = {"accuracy": sum(hits) / len(hits), "n": len(hits)}
    letter, count = Counter(r["answer"] for r in records).most_common(1)[0]
    return {"task": "cmmlu", "accuracy": accuracy, "accuracy_ci95": ci,
            "acc_norm": float(np.mean([r["prediction_norm"] == r["answer"] for r in records])),
            "n": len(records), "shots": shots, "subjects": subjects,
            "baselines": {"chance": CHANCE, "most_common_answer": {"letter": letter, "accuracy": count / len(records)}},
            "accuracy_is": "the share of all questions answered right (micro-average over subjects)",
            "bootstrap": {"samples": samples, "seed": seed}}


def evaluate(cfg):
    started = time.time()
    subjects = read_subjects(cfg.data, cfg.shots)
    ckpt, model, tokenizer = load_for_inference(cfg.ckpt, cfg.tokenizer, cfg.device)
    out_dir = Path(cfg.out_dir)
    with naming_errors(out_dir):  # refused before the work, not after it
        out_dir.mkdir(parents=True, exist_ok=True)
    resolved = dict(checkpoint=ckpt["path"], kind=ckpt.get("kind"), step=ckpt.get("step"), tokenizer_name=tokenizer.name)
    print(cli.config_line(cfg, **resolved), flush=True)
    cli.write_config(out_dir, cfg, **resolved)
    (out_dir / "metrics.json").unlink(missing_ok=True)
    questions, requests, n_cut = [], [], 0
    for subject, (tests, shots) in subjects.items():
        for row in tests[:cfg.limit] if cfg.limit else tests:
            questions.append({**row, "subject": subject})
            these, cut = choice_requests(tokenizer, build_prompt(subject, row, shots), model.args.max_seq_len)
            requests += these
            n_cut += cut
    t0 = time.time()
    scores = choice_logprobs(model, requests, tokenizer.pad_id, cfg.batch_size)
    seconds = time.time() - t0
    records = score_questions(questions, [scores[i:i + len(LETTERS)] for i in range(0, len(scores), len(LETTERS))])
    write_text_atomic(out_dir / "predictions.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    result = summarize(records, cfg.shots, cfg.bootstrap, cfg.seed)
    result.update(score_seconds=seconds, questions_per_s=len(records) / seconds, seconds=time.time() - started,
                  n_prompts_cut=n_cut,
                  checkpoint=ckpt["path"], kind=ckpt.get("kind"), step=ckpt.get("step"), tokenizer=tokenizer.name,
                  data=str(cfg.data))
    write_json_atomic(out_dir / "metrics.json", result)
    print_table(result, out_dir)
    return result


def print_table(m, out_dir):
    ci = f" [{m['accuracy_ci95'][0]:.3f}, {m['accuracy_ci95'][1]:.3f}]" if m["accuracy_ci95"] else ""
    common = m["baselines"]["most_common_answer"]
    lines = [f"cmmlu: {m['n']} questions, {m['shots']}-shot -> {out_dir} ({m['score_seconds']:.1f} s)",
             f"  {'subject':<30} {'n':>5} {'accuracy':>9}"]
    lines += [f"  {name:<30} {s['n']:>5} {s['accuracy']:>9.3f}" for name, s in m["subjects"].items()]
    lines += [f"  {'all (acc = acc_norm here)':<30} {m['n']:>5} {m['accuracy']:>9.3f}{ci}",
              f"  baselines: chance {m['baselines']['chance']:.3f}, always '{common['letter']}' {common['accuracy']:.3f}"]
    if m["n_prompts_cut"]:
        lines.append(f"  {m['n_prompts_cut']} prompts were cut from the left to the model's context (as lm-eval cuts them)")
    print("\n".join(lines), flush=True)
