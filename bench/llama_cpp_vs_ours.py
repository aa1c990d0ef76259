"""Check that llama.cpp answers exactly as our engine does, as strings, on a real model.

    pip install llama-cpp-python==0.3.36  # a bench dependency, not one of the repository's (builds llama.cpp)
    python bench/llama_cpp_vs_ours.py --ckpt out/demo/sft --data data/demo/eval/medical_qa.jsonl \\
        --work out/llama_cpp_check [--limit 20] [--max-tokens 64] [--tokenizer PATH]

1. export.py writes the checkpoint as WORK/hf with an fp32 WORK/hf/model.gguf, as a user would
   (python export.py --ckpt CKPT --out WORK/hf --gguf --dtype float32 --force);
2. ours: the first --limit questions of --data, each one user message, prompted by prompt.py as
   eval.py prompts them (question ids + bos), answered by engine.py's BatchEngine as eval.py
   answers them (--batch-size at once), plain greedy: temperature 0, repetition penalty 1, no
   n-gram blocking, at most --max-tokens tokens, whatever the checkpoint's generation_config.json
   says; the text is Tokenizer.decode of the ids, as in eval.py's predictions.jsonl;
3. llama.cpp, through llama-cpp-python: Llama(model.gguf, n_ctx=the model's context) and
   create_chat_completion([{"role": "user", "content": q}], temperature=0, top_k=1,
   repeat_penalty=1, max_tokens=--max-tokens): the prompt is the chat template stored in the GGUF
   rendered by llama-cpp-python's Jinja2 formatter, which is checked first: that the file holds
   prompt.chat_template(), that llama-cpp-python chose it (chat_format "chat_template.default",
   not a built-in format it guessed, nor its llama-2 fallback), and that Jinja2ChatFormatter
   renders it, and llama.cpp tokenizes it, to exactly our prompt (the questions, and a few
   conversations with system messages and earlier turns). llama.cpp's token ids are those of
   Llama.generate on the same prompt ids with top_k=1 (the chat completion returns text only);
4. per question: the two strings equal, the two lists of token ids equal; where they differ,
   the first differing character (or token) and both strings' first 40 characters.

Answers cut at the limit inside a character. Both sides drop bytes that form no character
(Tokenizer.decode; llama-cpp-python decodes with errors="ignore"), but llama-cpp-python does not
cut there: when the limit splits a character it generates up to 3 tokens more, until the
character is complete (its multi-byte check skips the max_tokens check). Such an answer (more
completion tokens than --max-tokens, and our text at the limit ending in bytes that form no
character) is compared without its last character, so that both sides drop the split character.
Token ids are compared over the first --max-tokens tokens, which the two sides both generate.

Prints one line per question that differs, and:
    llama.cpp answers equal ours as strings on K of N questions (tokens: M of N)
writes WORK/comparison.json, and exits 1 if K < N or the template check fails, 2 if llama_cpp
is not installed.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine import BatchEngine, answer_all  # noqa: E402
from eval import read_qa  # noqa: E402
from generate import load_for_inference  # noqa: E402
from prompt import chat_template, fit_prompt, messages_prompt  # noqa: E402
from sampling import Sampling  # noqa: E402

SHOWN = 40  # characters of each answer shown where they differ
# Conversations beyond the bare question whose rendering is checked too (not answered).
EXTRA_CONVERSATIONS = (
    [{"role": "system", "content": "你是一名医生。"}, {"role": "user", "content": "头痛怎么办？"}],
    [{"role": "user", "content": "头痛怎么办？"}, {"role": "assistant", "content": "多休息。"},
     {"role": "user", "content": "发热呢？"}],
    [{"role": "system", "content": "旧的"}, {"role": "system", "content": "你是一名医生。"},
     {"role": "user", "content": "头痛怎么办？"}, {"role": "assistant", "content": "多休息，多喝水。"},
     {"role": "user", "content": "发热呢？"}],
)


def run(*cmd):
    print("$ " + " ".join(map(str, cmd)), flush=True)
    started = time.time()
    subprocess.run([str(c) for c in cmd], check=True)
    return time.time() - started


def import_llama_cpp():
    try:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    except ImportError:
        print("llama_cpp_vs_ours: llama_cpp is not installed; pip install llama-cpp-python==0.3.36 "
              "(a bench dependency, not one of the repository's)", file=sys.stderr)
        sys.exit(2)
    return llama_cpp, Jinja2ChatFormatter


# ----------------------------------------------------------------------------- ours

def our_answers(cfg, questions):
    """-> (tokenizer, prompt ids, answer ids, answer texts, context length, the checkpoint's
    answer_encoding), greedy through the engine as eval.py runs it."""
    ckpt, model, tokenizer = load_for_inference(cfg.ckpt, cfg.tokenizer, "cpu")
    max_seq_len = model.args.max_seq_len
    fitted = [fit_prompt(tokenizer, [], q, max_seq_len - cfg.max_tokens) for q in questions]
    if any(cut for _, _, cut in fitted):  # llama.cpp would be given the whole question: not the same prompt
        sys.exit(f"llama_cpp_vs_ours: a question does not fit the context of {max_seq_len} with "
                 f"--max-tokens {cfg.max_tokens}; pass a smaller --max-tokens")
    prompts = [ids for ids, _, _ in fitted]
    engine = BatchEngine(model, tokenizer.eos_id, tokenizer.pad_id, max_batch=cfg.batch_size)
    # Sampling(): temperature 0, repetition penalty 1, no n-gram blocking: the row's argmax
    generated = answer_all(engine, prompts, cfg.max_tokens, Sampling())
    return (tokenizer, prompts, generated, [tokenizer.decode(ids) for ids in generated], max_seq_len,
            ckpt.get("answer_encoding"))


# ----------------------------------------------------------------------------- llama.cpp's

def check_template(llm, Jinja2ChatFormatter, tokenizer, questions, prompts):
    """The template llama-cpp-python answers with, against ours -> a dict of findings."""
    stored = llm.metadata.get("tokenizer.chat_template")
    # the bos and eos texts llama-cpp-python's own handler is made with (Llama.__init__)
    bos = llm._model.token_get_text(llm.token_bos())
    eos = llm._model.token_get_text(llm.token_eos())
    formatter = Jinja2ChatFormatter(template=stored or "", eos_token=eos, bos_token=bos, stop_token_ids=[llm.token_eos()])
    conversations = [[{"role": "user", "content": q}] for q in questions] + list(EXTRA_CONVERSATIONS)
    rendered = [formatter(messages=m).prompt for m in conversations]
    ours = [messages_prompt(m) + tokenizer.id_to_piece(tokenizer.bos_id) for m in conversations]
    text_same = sum(r == o for r, o in zip(rendered, ours))
    # as the chat handler tokenizes it: no bos added in front, special pieces parsed
    ids = [llm.tokenize(r.encode("utf-8"), add_bos=False, special=True) for r in rendered[:len(questions)]]
    ids_same = sum(a == b for a, b in zip(ids, prompts))
    first_bad = next((i for i, (r, o) in enumerate(zip(rendered, ours)) if r != o), None)
    return {"stored_is_ours": stored == chat_template(), "chat_format": llm.chat_format,
            "uses_stored": llm.chat_format == "chat_template.default",
            "bos_token": bos, "eos_token": eos,
            "rendered_equal": text_same, "rendered_n": len(conversations),
            "prompt_ids_equal": ids_same, "prompt_ids_n": len(questions),
            "first_rendered_difference": None if first_bad is None else
            {"conversation": conversations[first_bad], "rendered": rendered[first_bad], "ours": ours[first_bad]},
            "llama_prompt_ids": ids}


def llama_answer(llm, question, max_tokens):
    """The chat completion, as an OpenAI client of llama.cpp gets it -> (text, finish, tokens)."""
    r = llm.create_chat_completion(messages=[{"role": "user", "content": question}], temperature=0, top_k=1,
                                   repeat_penalty=1.0, max_tokens=max_tokens)
    return (r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"],
            r["usage"]["completion_tokens"])


def llama_ids(llama_cpp, llm, prompt_ids, max_tokens):
    """llama.cpp's greedy ids for the same prompt (without the eos), at most max_tokens; it ends
    where create_completion ends, at an end-of-generation token."""
    out = []
    for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
        out.append(token)
        if len(out) >= max_tokens:
            break
    return out


# ----------------------------------------------------------------------------- comparing

def first_difference(a, b):
    """Index of the first element where the sequences differ (the shorter one's length if one
    is the other's start), None if equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(tokenizer, ours_ids, ours_text, theirs_text, theirs_completion_tokens, theirs_ids, max_tokens):
    """One question's comparison (see the module docstring for the split-character rule)."""
    split = (theirs_completion_tokens > max_tokens and len(ours_ids) == max_tokens
             and tokenizer.decode_raw(ours_ids).endswith("\ufffd"))
    compared = theirs_text[:-1] if split and theirs_text else theirs_text
    at = first_difference(ours_text, compared)
    token_at = first_difference(list(ours_ids), list(theirs_ids))
    return {"strings_equal": at is None, "tokens_equal": token_at is None, "split_character_dropped": split,
            "first_char_difference": at, "first_token_difference": token_at,
            "ours": ours_text, "llama_cpp": theirs_text, "ours_ids": list(ours_ids), "llama_cpp_ids": list(theirs_ids),
            "llama_cpp_completion_tokens": theirs_completion_tokens}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="SFT checkpoint file or out dir")
    p.add_argument("--data", required=True, help="QA set (.jsonl with question fields), as eval.py reads it")
    p.add_argument("--work", required=True, help="dir for the export and comparison.json")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model, when the checkpoint's recorded one moved")
    p.add_argument("--limit", type=int, default=20, help="the first N questions")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens an answer may have, on both sides")
    p.add_argument("--batch-size", type=int, default=16, help="questions our engine answers together (eval.py's)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of each side")
    p.add_argument("--skip-export", action="store_true", help="reuse WORK/hf/model.gguf")
    cfg = p.parse_args()
    llama_cpp, Jinja2ChatFormatter = import_llama_cpp()  # before the export: without it nothing can be compared
    work = Path(cfg.work)
    gguf = work / "hf" / "model.gguf"
    if not cfg.skip_export:
        tokenizer_flag = ["--tokenizer", cfg.tokenizer] if cfg.tokenizer else []
        run(sys.executable, ROOT / "export.py", "--ckpt", cfg.ckpt, "--out", work / "hf", "--gguf",
            "--dtype", "float32", "--force", *tokenizer_flag)
    torch.set_num_threads(cfg.threads)
    questions = [r["question"] for r in read_qa(cfg.data, limit=cfg.limit)]

    t0 = time.time()
    tokenizer, prompts, ours_ids, ours_text, n_ctx, encoding = our_answers(cfg, questions)
    ours_s = time.time() - t0
    print(f"ours: {len(questions)} answers in {ours_s:.1f} s (checkpoint's answer_encoding: {encoding})", flush=True)

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=cfg.threads, n_threads_batch=cfg.threads,
                          verbose=False)
    template = check_template(llm, Jinja2ChatFormatter, tokenizer, questions, prompts)
    print(f"template: the GGUF holds prompt.chat_template(): {template['stored_is_ours']}; llama-cpp-python's "
          f"chat_format: {template['chat_format']} (the stored template: {template['uses_stored']}); its Jinja2 "
          f"rendering equals our prompt on {template['rendered_equal']} of {template['rendered_n']} conversations; "
          f"llama.cpp's prompt ids equal ours on {template['prompt_ids_equal']} of {template['prompt_ids_n']} questions")
    if template["first_rendered_difference"]:
        d = template["first_rendered_difference"]
        print(f"  first rendering that differs: {d['rendered']!r} vs ours {d['ours']!r}")

    t0 = time.time()
    rows = []
    for i, q in enumerate(questions):
        text, finish, n_tokens = llama_answer(llm, q, cfg.max_tokens)
        ids = llama_ids(llama_cpp, llm, template["llama_prompt_ids"][i], cfg.max_tokens)
        rows.append({"index": i, "question": q, "llama_cpp_finish": finish,
                     **compare(tokenizer, ours_ids[i], ours_text[i], text, n_tokens, ids, cfg.max_tokens)})
    llama_s = time.time() - t0

    for r in rows:
        if r["strings_equal"] and r["tokens_equal"]:
            continue
        at, first_piece = r["first_char_difference"], None
        if r["ours_ids"]:
            first_piece = tokenizer.id_to_piece(r["ours_ids"][0])
        strings = "equal" if r["strings_equal"] else f"differ at character {at}"
        tokens = "equal" if r["tokens_equal"] else f"differ at token {r['first_token_difference']}"
        print(f"question {r['index']}: strings {strings}, tokens {tokens} "
              f"(our first piece {first_piece!r}; llama.cpp {r['llama_cpp_finish']}, "
              f"{r['llama_cpp_completion_tokens']} tokens)\n"
              f"  ours:      {r['ours'][:SHOWN]!r}\n  llama.cpp: {r['llama_cpp'][:SHOWN]!r}")
    n = len(rows)
    same_text = sum(r["strings_equal"] for r in rows)
    same_ids = sum(r["tokens_equal"] for r in rows)
    split = sum(r["split_character_dropped"] for r in rows)
    by_eos = sum(r["llama_cpp_finish"] == "stop" for r in rows)
    summary = {"n": n, "strings_equal": same_text, "tokens_equal": same_ids, "split_character_dropped": split,
               "llama_cpp_ended_by_eos": by_eos, "max_tokens": cfg.max_tokens, "n_ctx": n_ctx,
               "answer_encoding": encoding, "llama_cpp_python": llama_cpp.__version__,
               "seconds_ours": ours_s, "seconds_llama_cpp": llama_s, "checkpoint": str(cfg.ckpt), "data": str(cfg.data),
               "template": {k: v for k, v in template.items() if k != "llama_prompt_ids"}}
    work.mkdir(parents=True, exist_ok=True)
    (work / "comparison.json").write_text(json.dumps({**summary, "questions": rows}, ensure_ascii=False, indent=2)
                                          + "\n", encoding="utf-8")
    print(f"\n{by_eos} of {n} llama.cpp answers ended by eos, {n - by_eos} at --max-tokens {cfg.max_tokens} "
          f"({split} compared without a character the limit split); llama-cpp-python {llama_cpp.__version__}; "
          f"ours {ours_s:.1f} s, llama.cpp {llama_s:.1f} s (with its second, token-id pass)")
    print(f"llama.cpp answers equal ours as strings on {same_text} of {n} questions (tokens: {same_ids} of {n})")
    template_ok = template["uses_stored"] and template["rendered_equal"] == template["rendered_n"] \
        and template["prompt_ids_equal"] == template["prompt_ids_n"]
    sys.exit(0 if same_text == n and template_ok else 1)


if __name__ == "__main__":
    main()
