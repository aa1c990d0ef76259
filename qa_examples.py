"""SFT, evaluation and preference sets -> normalized JSONL: one example per line.

Every input record becomes examples (record_examples): an Alpaca record (instruction, input,
output, history), a conversation (ShareGPT {from, value} or chat {role, content} turns: one
example per assistant turn, its prompt made by prompt.context_prompt from the turns before
it), or a record with a prompt and an answer field. The examples then pass the filters
(write_examples): empty, a question of the evaluation set (QuestionIndex: equal or contained
after normalizing), an exact repeat, the token-length limits. sft writes {"prompt", "answer"}
lines and holds out a share of them by hash of the prompt (NAME_val.jsonl); eval writes
{"question", "answer"} lines. prefs makes one (prompt, chosen, rejected) pair per record
(record_pair: the prompt from a conversation that ends with the user's turn, or a prompt field),
filtered as sft's examples are (each answer under the length limits; a pair whose answers are the
same is dropped), and writes {"prompt", "chosen", "rejected"} lines with a validation split.
"""
import json
import re
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

from tqdm import tqdm

from chatglm_tokenizer import load_tokenizer
from corpus import BadCounter, DataError, expand_inputs, iter_records, string_field, utf8
from prompt import answer_ids, context_prompt
from splits import SplitWriter, check_kept, clear_outputs, doc_hash, is_val, remove_outputs

# fields tried in order when none is named on the command line
PROMPT_FIELDS = ("prompt", "question", "query", "q")
ANSWER_FIELDS = ("answer", "response", "output", "target", "a")
CHOSEN_FIELDS, REJECTED_FIELDS = ("chosen", "response_chosen"), ("rejected", "response_rejected")
OUTPUT_KEYS = {"sft": ("prompt", "answer"), "eval": ("question", "answer"), "prefs": ("prompt", "chosen", "rejected")}
SUBSTRING_MIN_CHARS = 8  # eval questions this long are also caught inside longer prompts


def alpaca_question(instruction, input_text):
    return instruction if not input_text.strip() else instruction + "\n" + input_text


USER_ROLES, ASSISTANT_ROLES = {"human", "user"}, {"gpt", "assistant", "bot", "chatgpt"}


def conversation_examples(messages):
    """ShareGPT {from,value} or chat {role,content} turns -> one example per assistant turn, its
    prompt made by prompt.context_prompt from the turns before it and the last system text."""
    return walk_conversation(messages)[0]


def conversation_prompt(messages):
    """The prompt of a conversation that ends with the user's turn (a preference pair's two
    answers follow it), made as conversation_examples makes an example's prompt."""
    _, system, turns, question = walk_conversation(messages)
    if question is None:
        raise DataError("the conversation must end with the user's turn (the answers follow it)")
    return context_prompt(turns, question, system)


def walk_conversation(messages):
    """(one (prompt, answer) per assistant turn, the last system text, the (question, answer)
    turns, the trailing user question or None)."""
    if not isinstance(messages, list):
        raise DataError("'conversations' must be a list of turns")
    system, turns, question = "", [], None
    examples = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"turn {i} is not an object")
        role = str(m.get("from", m.get("role", ""))).lower()
        text = string_field(m, "value" if "value" in m else "content").strip()
        if role == "system":
            system = text
        elif role in USER_ROLES and question is None:
            question = text
        elif role in ASSISTANT_ROLES and question is not None:
            examples.append((context_prompt(turns, question, system), text))
            turns.append((question, text))
            question = None
        else:
            raise DataError(f"turn {i} ({role or 'no role'}): turns must alternate user and assistant")
    return examples, system, turns, question


def record_examples(record, prompt_field=None, answer_field=None):
    """One input record -> [(prompt, answer)]."""
    if not (prompt_field or answer_field):
        if "conversations" in record or "messages" in record:
            return conversation_examples(record.get("conversations", record.get("messages")))
        if "instruction" in record:
            history = record.get("history") or []
            if not all(isinstance(t, (list, tuple)) and len(t) == 2 for t in history):
                raise DataError("'history' must be a list of [question, answer] pairs")
            question = alpaca_question(string_field(record, "instruction").strip(),
                                       string_field(record, "input", required=False).strip())
            return [(context_prompt(history, question), string_field(record, "output").strip())]
    prompt_field = prompt_field or next((f for f in PROMPT_FIELDS if f in record), PROMPT_FIELDS[0])
    answer_field = answer_field or next((f for f in ANSWER_FIELDS if f in record), ANSWER_FIELDS[0])
    return [(string_field(record, prompt_field).strip(), string_field(record, answer_field).strip())]


def record_pair(record, prompt_field=None):
    """One input preference record -> (prompt, chosen, rejected)."""
    if not prompt_field and ("conversations" in record or "messages" in record):
        prompt = conversation_prompt(record.get("conversations", record.get("messages")))
    else:
        prompt_field = prompt_field or next((f for f in PROMPT_FIELDS if f in record), PROMPT_FIELDS[0])
        prompt = string_field(record, prompt_field).strip()
    chosen = string_field(record, next((f for f in CHOSEN_FIELDS if f in record), CHOSEN_FIELDS[0])).strip()
    rejected = string_field(record, next((f for f in REJECTED_FIELDS if f in record), REJECTED_FIELDS[0])).strip()
    return prompt, chosen, rejected


def normalize_question(text):
    """Comparison key: NFKC, lower case, no whitespace, punctuation or symbols."""
    return re.sub(r"[\W_]+", "", unicodedata.normalize("NFKC", text).lower())


class QuestionIndex:
    """Normalized evaluation questions; a prompt matches one if it equals it or contains it."""

    def __init__(self, questions):
        self.exact = set()
        self.by_start = defaultdict(list)  # first SUBSTRING_MIN_CHARS chars -> questions
        for q in map(normalize_question, questions):
            self.exact.add(q)
            if len(q) >= SUBSTRING_MIN_CHARS:
                self.by_start[q[:SUBSTRING_MIN_CHARS]].append(q)

    def __len__(self):
        return len(self.exact)

    def matches(self, prompt):
        key = normalize_question(prompt)
        if key in self.exact:
            return True
        for i in range(len(key) - SUBSTRING_MIN_CHARS + 1):
            for q in self.by_start.get(key[i:i + SUBSTRING_MIN_CHARS], ()):
                if key.startswith(q, i):
                    return True
        return False


def iter_examples(files, cfg, bad, kind="sft"):
    """The examples of the files: (prompt, answer) tuples, or for prefs (prompt, chosen, rejected)."""
    for path in files:
        for line_no, record in iter_records(path, bad):
            try:
                examples = ([record_pair(record, cfg.prompt_field)] if kind == "prefs" else
                            record_examples(record, cfg.prompt_field, cfg.answer_field))
                for example in examples:
                    utf8("".join(example))
            except DataError as e:
                bad(path, line_no, str(e))
                continue
            yield from examples


def length_reason(prompt, answers, tokenizer, cfg):
    """Why an example fails the token-length filters (every one of its answers must pass), or None."""
    n_prompt = len(tokenizer.encode(prompt))
    return next(filter(None, (answer_length_reason(n_prompt, len(answer_ids(tokenizer, a)), cfg) for a in answers)), None)


def answer_length_reason(n_prompt, n_answer, cfg):
    if cfg.max_prompt_tokens and n_prompt > cfg.max_prompt_tokens:
        return "prompt_too_long"
    if cfg.max_answer_tokens and n_answer > cfg.max_answer_tokens:
        return "answer_too_long"
    if cfg.min_answer_tokens and n_answer < cfg.min_answer_tokens:
        return "answer_too_short"
    if cfg.max_tokens and n_prompt + n_answer + 2 > cfg.max_tokens:  # + bos + eos
        return "too_long"
    return None


def write_examples(examples, outputs, kind, excluded, tokenizer, cfg):
    """Filter the examples ((prompt, answer...) tuples) and append each kept one to its split
    as a JSON line; returns the counts: read, and dropped per reason."""
    keys = OUTPUT_KEYS[kind]
    stats, seen = Counter(), set()
    with tqdm(examples, unit="ex", desc=f"{kind} {outputs['train'].path.name}") as progress:  # closed on errors too
        for prompt, *answers in progress:
            stats["read"] += 1
            reason = drop_reason(prompt, answers, excluded, tokenizer, seen, cfg)
            if reason:
                stats[reason] += 1
                continue
            split = "val" if "val" in outputs and is_val(prompt.encode("utf-8"), cfg.val_fraction) else "train"
            line = (json.dumps(dict(zip(keys, (prompt, *answers))), ensure_ascii=False) + "\n").encode("utf-8")
            outputs[split].append(line, 1, line)
    return stats


def drop_reason(prompt, answers, excluded, tokenizer, seen, cfg):
    """Why an example (a prompt and its answers: one, or a preference pair's two) is dropped, or
    None. With --dedup, `seen` collects the hashes of the examples that passed the other
    filters, and a repeat of one is a duplicate."""
    reason = ("empty" if not prompt or not all(answers) else
              "same_answers" if len(answers) == 2 and answers[0] == answers[1] else
              "in_eval_set" if excluded and excluded.matches(prompt) else
              length_reason(prompt, answers, tokenizer, cfg) if tokenizer else None)
    if reason is None and cfg.dedup:
        h = doc_hash("\0".join((prompt, *answers)).encode("utf-8"))
        reason = "duplicate" if h in seen else None
        seen.add(h)
    return reason


def example_paths(out):
    """{split: path} for --out NAME.jsonl (or NAME): NAME.jsonl and NAME_val.jsonl."""
    out = Path(out if out.endswith(".jsonl") else out + ".jsonl")
    return {"train": out, "val": out.with_name(out.stem + "_val.jsonl")}


def write_example_data(files, paths, kind, cfg):
    """sft, eval and prefs (kind): the examples of the files, filtered, to paths["train"] and,
    with a --val-fraction (sft, prefs), a held-out share to paths["val"] (cfg: the command's
    flags; eval's val_fraction is 0). The train file marks a finished run: it is committed last."""
    eval_files = expand_inputs([cfg.exclude_questions]) if cfg.exclude_questions else []
    clear_outputs(list(paths.values()), files + eval_files)  # an output may not be any input
    length_filters = any((cfg.max_prompt_tokens, cfg.max_answer_tokens, cfg.min_answer_tokens, cfg.max_tokens))
    tokenizer = load_tokenizer(cfg.tokenizer) if length_filters else None
    excluded = QuestionIndex(q for q, _ in iter_examples(eval_files, cfg, BadCounter(False))) if eval_files else None
    bad, outputs = BadCounter(cfg.skip_bad), {}
    try:
        outputs["train"] = SplitWriter(paths["train"])
        if cfg.val_fraction > 0:
            outputs["val"] = SplitWriter(paths["val"])
        stats = write_examples(iter_examples(files, cfg, bad, kind), outputs, kind, excluded, tokenizer, cfg)
        check_kept(outputs, "example", cfg.val_fraction, f"read {stats['read']:,} examples"
                   + "".join(f", {n:,} {reason}" for reason, n in stats.items() if reason != "read")
                   + (f", {bad.count:,} bad records" if bad.count else ""))
        for split in sorted(outputs, key=lambda s: s == "train"):  # the main file last: it marks completion
            outputs[split].out.commit()
    except BaseException:
        remove_outputs(outputs.values(), paths.values())
        raise
    print_examples_summary(kind, files, outputs, stats, excluded, bad, cfg)


def print_examples_summary(kind, files, outputs, stats, excluded, bad, cfg):
    print(f"{kind}: read {stats['read']:,} examples from {len(files)} files; "
          f"wrote {outputs['train'].records:,} to {outputs['train'].path}"
          + (f" and {outputs['val'].records:,} to {outputs['val'].path}" if "val" in outputs else ""))
    dropped = {r: stats[r] for r in ("empty", "same_answers", "in_eval_set", "duplicate", "prompt_too_long", "answer_too_long",
                                     "answer_too_short", "too_long") if stats[r]}
    if excluded:
        print(f"  excluded {stats['in_eval_set']:,} examples whose question is in {cfg.exclude_questions} "
              f"({len(excluded):,} questions)")
    print(f"  dropped: {dropped or 'none'}" + (f"; {bad.count:,} bad records skipped" if cfg.skip_bad else ""))
    for message in bad.examples:
        print(f"    e.g. {message}")
