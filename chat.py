"""Chat with a checkpoint in the terminal; the reply is printed as it is generated.

    python chat.py --ckpt out/sft                    # interactive; /reset forgets, /quit or Ctrl-D ends
    python chat.py --ckpt out/sft --prompt "..."     # one reply, then exit

An SFT checkpoint ("sft") answers: the prompt is the earlier turns as SFT formats multi-turn
context ("问：{q}\\n答：{a}\\n" each), then the question, then bos; the answer runs until eos.
A pretrained checkpoint ("pretrain") continues the text typed, as a new document (after an
eos, as documents follow each other in the pretraining stream) until it ends the document.

An answer gets at most --max-new-tokens tokens; by default min(256, half the model's context),
so that every model this repository trains leaves room for a prompt. The prompt gets the rest:
when the conversation no longer fits, its oldest turns are left out (and forgotten), and a
question too long on its own loses its start; each time chat.py says so. Ctrl-C stops an
answer (what was shown stays in the conversation) and returns to the prompt; Ctrl-C at the
prompt, Ctrl-D or /quit ends the session. Where the platform has `readline`, the prompt has
line editing and the arrow keys recall earlier lines.
"""
import argparse
import sys

from generate import (TextStream, add_generation_args, check_sampling, default_max_new_tokens, generate_stream,
                      load_for_inference, sampling_settings)
from prompt import fit_prompt

# -----------------------------------------------------------------------------
# defaults (flags override); a mild repetition penalty breaks most of a small model's loops
GENERATION = dict(ckpt="out/sft", max_new_tokens=None, temperature=0.7, top_k=None, top_p=0.9,
                  repetition_penalty=1.1, seed=1337)
MAX_NEW_TOKENS = 256  # the default answer length, where half the context allows it
# -----------------------------------------------------------------------------


def note(text):
    """A message about the session, on stderr: stdout carries only the model's text."""
    sys.stdout.flush()
    print(f"[{text}]", file=sys.stderr, flush=True)


def answer_length(requested, max_seq_len):
    """--max-new-tokens, or by default min(MAX_NEW_TOKENS, half the context); the prompt
    gets the rest of the context and needs at least 2 tokens (a text token and bos)."""
    n = default_max_new_tokens(max_seq_len, MAX_NEW_TOKENS) if requested is None else requested
    if not 1 <= n <= max_seq_len - 2:
        sys.exit(f"chat.py: error: --max-new-tokens {n} must be in 1..{max_seq_len - 2} "
                 f"to leave room for a prompt within the model's context of {max_seq_len} tokens")
    if requested is None:
        note(f"answers get up to {n} new tokens of the model's {max_seq_len}-token context "
             f"(--max-new-tokens changes it)")
    return n


def not_encodable(text):
    """True when a line holds bytes the terminal's encoding could not decode (kept as lone
    surrogates by stdin's surrogateescape, see main); no tokenizer can take such text."""
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def stream_reply(model, tok, prompt_ids, max_new_tokens, sampling):
    """Generate one reply, printing its text as it grows. Ctrl-C stops it early.
    Returns (the whole reply, whether Ctrl-C stopped it)."""
    out, text, stopped = sys.stdout, TextStream(tok), False
    try:
        for step in generate_stream(model, [prompt_ids], max_new_tokens, **sampling):
            if step[0] is None:  # eos
                break
            out.write(text.push(step[0]))
            out.flush()
    except KeyboardInterrupt:
        stopped = True
    out.write(text.flush() + ("  [stopped]" if stopped else "") + "\n")
    out.flush()
    return tok.decode(text.ids), stopped


class Session:
    """One conversation with a loaded model: the prompt for each input, the reply, the history."""

    def __init__(self, model, tok, is_sft, max_new_tokens, sampling):
        self.model, self.tok, self.is_sft, self.sampling = model, tok, is_sft, sampling
        self.max_new_tokens = max_new_tokens
        self.context = model.args.max_seq_len
        self.budget = self.context - max_new_tokens  # prompt tokens
        self.history = []  # (question, answer) turns of an SFT conversation

    def prompt_ids(self, text):
        """The prompt for `text`, cut to the budget; says what was cut."""
        if not self.is_sft:
            ids = self.tok.encode(text)
            if len(ids) > self.budget - 1:
                note(f"the text was cut to its last {self.budget - 1} tokens to fit the {self.context}-token context")
            return [self.tok.eos_id] + ids[-(self.budget - 1):]  # eos first: a new document
        ids, dropped, cut = fit_prompt(self.tok, self.history, text, self.budget)
        if dropped:
            turns = "the oldest turn" if dropped == 1 else f"the {dropped} oldest turns"
            note(f"left out {turns} of the conversation: it no longer fits the {self.context}-token context "
                 f"beside a {self.max_new_tokens}-token answer")
            del self.history[:dropped]  # a longer conversation never fits them again
        if cut:
            note(f"the question was cut to its last {self.budget - 1} tokens to fit the {self.context}-token context")
        return ids

    def reply(self, text):
        """Print the model's reply to `text`; returns whether Ctrl-C stopped it."""
        ids = self.prompt_ids(text)
        if not self.is_sft:
            sys.stdout.write(text)
        answer, stopped = stream_reply(self.model, self.tok, ids, self.max_new_tokens, self.sampling)
        if self.is_sft:
            self.history.append((text, answer))
        return stopped


def read_line():
    """One input line, or None at Ctrl-D or Ctrl-C (the end of the session)."""
    try:
        return input("> ").strip()
    except (EOFError, KeyboardInterrupt):
        print()
        return None


def interact(session, header):
    print(header)
    while (text := read_line()) is not None:
        if text == "/quit":
            return
        if text == "/reset":
            session.history.clear()
        elif not_encodable(text):
            note(f"that line is not valid {sys.stdin.encoding} text and was ignored; "
                 f"set the terminal to UTF-8 (or type it again)")
        elif text:
            session.reply(text)


def setup_terminal():
    """Undecodable input bytes reach not_encodable instead of raising; line editing where
    the platform has readline."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        except ImportError:  # e.g. Windows
            pass


def main(argv=None):
    p = argparse.ArgumentParser(description="Chat with a pretrained or SFT checkpoint in the terminal.")
    p.add_argument("--prompt", default=None, help="answer this one prompt and exit")
    add_generation_args(p, GENERATION)
    args = p.parse_args(argv)
    if args.prompt is not None and not_encodable(args.prompt):
        sys.exit("chat.py: error: --prompt is not valid UTF-8 text")
    try:
        check_sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    except ValueError as e:
        sys.exit(f"chat.py: error: {e}")
    setup_terminal()
    try:
        ckpt, model, tok = load_for_inference(args.ckpt, args.tokenizer, args.device)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"chat.py: error: {e}")
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    is_sft = ckpt.get("kind") == "sft"
    sampling = sampling_settings(args, tok, str(model.tok_embeddings.weight.device))
    session = Session(model, tok, is_sft, answer_length(args.max_new_tokens, model.args.max_seq_len), sampling)
    if args.prompt is not None:
        if session.reply(args.prompt):
            sys.exit(130)  # a one-shot answer stopped by Ctrl-C is not a whole answer
        return
    interact(session, f"{ckpt['path']} ({ckpt.get('kind')}, step {ckpt.get('step')}): "
                      f"{'ask a question' if is_sft else 'type the start of a text'}; Ctrl-C stops an answer, "
                      f"/reset forgets the conversation, /quit or Ctrl-D ends")


if __name__ == "__main__":
    main()
