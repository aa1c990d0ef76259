"""Chat with a checkpoint in the terminal; the reply is printed as it is generated.

    python chat.py --ckpt out/sft                    # interactive; /reset forgets, /quit or Ctrl-D ends
    python chat.py --ckpt out/sft --prompt "..."     # one reply, then exit

An SFT checkpoint ("sft") answers: the prompt is the earlier turns as SFT formats multi-turn
context ("问：{q}\\n答：{a}\\n" each), then the question, then bos; the answer runs until eos.
A pretrained checkpoint ("pretrain") continues the text typed, as a new document (after an
eos, as documents follow each other in the pretraining stream) until it ends the document.
"""
import argparse
import sys

from prompt import context_prompt
from eval import add_generation_args, load_for_inference, sampling_settings, sft_prompt_ids

# -----------------------------------------------------------------------------
# defaults (flags override)
CKPT = "out/sft"
MAX_NEW_TOKENS = 256
TEMPERATURE = 0.7
TOP_K = None
TOP_P = 0.9
REPETITION_PENALTY = 1.1  # small models fall into loops; a mild penalty breaks most of them
SEED = 1337
# -----------------------------------------------------------------------------


def sft_prompt(tok, history, question, budget):
    """Prompt ids for the question after as many of the latest turns as fit in budget tokens."""
    for first in range(len(history) + 1):
        ids = sft_prompt_ids(tok, context_prompt(history[first:], question))
        if len(ids) <= budget:
            return ids
    return ids[-budget:]  # even the bare question is too long: keep its end and the bos


def stream_reply(model, tok, prompt_ids, max_new_tokens, sampling):
    """Generate one reply, printing its text as it grows; returns the whole reply."""
    out, ids, shown = sys.stdout, [], ""
    for step in model.generate_stream([prompt_ids], max_new_tokens, **sampling):
        if step[0] is None:  # eos
            break
        ids.append(step[0])
        text = tok.decode(ids)
        if not text.endswith("\ufffd"):  # a character whose bytes are not all generated yet waits
            out.write(text[len(shown):])
            out.flush()
            shown = text
    text = tok.decode(ids)
    out.write(text[len(shown):] + "\n")
    out.flush()
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description="Chat with a pretrained or SFT checkpoint in the terminal.")
    p.add_argument("--prompt", default=None, help="answer this one prompt and exit")
    add_generation_args(p, CKPT, TEMPERATURE, TOP_K, TOP_P, REPETITION_PENALTY, MAX_NEW_TOKENS, SEED)
    args = p.parse_args(argv)

    ckpt, model, tok = load_for_inference(args.ckpt, args.tokenizer, args.device)
    sampling = sampling_settings(args, tok, str(model.tok_embeddings.weight.device))
    is_sft = ckpt.get("kind") == "sft"
    budget = model.args.max_seq_len - args.max_new_tokens
    if budget < 2:
        sys.exit(f"chat.py: error: --max-new-tokens {args.max_new_tokens} leaves no room for a prompt "
                 f"within max_seq_len {model.args.max_seq_len}")

    def reply(text, history):
        if is_sft:
            prompt_ids = sft_prompt(tok, history, text, budget)
        else:
            prompt_ids = ([tok.eos_id] + tok.encode(text))[-budget:]
            sys.stdout.write(text)
        answer = stream_reply(model, tok, prompt_ids, args.max_new_tokens, sampling)
        if is_sft:
            history.append((text, answer))

    if args.prompt is not None:
        reply(args.prompt, [])
        return
    print(f"{ckpt['path']} ({ckpt.get('kind')}, step {ckpt.get('step')}): "
          f"{'ask a question' if is_sft else 'type the start of a text'}; /reset forgets the conversation, /quit ends")
    history = []
    while True:
        try:
            text = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text == "/quit":
            return
        if text == "/reset":
            history.clear()
            continue
        if text:
            reply(text, history)


if __name__ == "__main__":
    main()
