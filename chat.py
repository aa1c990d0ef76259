"""Chat with a checkpoint in the terminal; the reply is printed as it is generated.

    python chat.py --ckpt out/sft                    # interactive; /help lists the commands
    python chat.py --ckpt out/sft --prompt "..."     # one reply, then exit
    python chat.py --ckpt out/sft --system "你是一名儿科医生。"   # a system text before every prompt

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
import contextlib
import random
import sys
import termios
from dataclasses import replace

import cli
from engine import BatchEngine
from checkpoint import ANSWERING_KINDS
from generate import (TextStream, add_generation_args, default_max_new_tokens, load_for_inference, resolve_decoding,
                      sampling_from)
from prompt import fit_prompt
from refusal import Refusal, one_line_refusals

# -----------------------------------------------------------------------------
# defaults (flags override, and so does the checkpoint's generation_config.json where it has
# a value); a mild repetition penalty breaks most of a small model's loops
GENERATION = dict(ckpt="out/sft", max_new_tokens=None, temperature=0.7, top_k=None, top_p=0.9,
                  repetition_penalty=1.1, no_repeat_ngram_size=0, seed=1337)
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
        raise Refusal(f"--max-new-tokens {n} must be in 1..{max_seq_len - 2} "
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


@contextlib.contextmanager
def keys_held_back(stream):
    """While an answer streams, keys typed on the terminal `stream` reads are neither echoed into it nor
    kept as the next input: echo and line editing are off (Ctrl-C still stops the answer),
    and whatever was typed is discarded at the end. No-op when it is not a terminal."""
    try:
        fd = stream.fileno()
        saved = termios.tcgetattr(fd)
    except (termios.error, OSError, ValueError):  # a pipe or a file
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | termios.ICANON)
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcflush(fd, termios.TCIFLUSH)
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def stream_reply(engine, tokenizer, prompt_ids, max_new_tokens, sampling):
    """Generate one reply through the engine, printing its text as it grows. Ctrl-C cancels
    it (its row leaves the engine). Returns (the text shown, whether Ctrl-C stopped it)."""
    out, text, stopped = sys.stdout, TextStream(tokenizer), False
    arrived = []  # the tokens of the last step (None: the answer ended)
    engine.submit(prompt_ids, max_new_tokens, sampling, lambda token, finish_reason: arrived.append(token))
    try:
        while engine.step():
            for token in arrived:
                if token is not None:
                    out.write(text.push(token))
            arrived.clear()
            out.flush()
    except KeyboardInterrupt:
        stopped = True
        engine.end_all()
    out.write(text.flush() + ("  [stopped]" if stopped else "") + "\n")
    out.flush()
    return tokenizer.decode(text.ids), stopped


class Session:
    """One conversation with a loaded model: the prompt for each input, the reply, the history.
    Each reply samples with a seed drawn from the session's own generator, so a session
    started with the same --seed says the same things."""

    def __init__(self, engine, tokenizer, is_sft, max_new_tokens, sampling, system=""):
        self.engine, self.tokenizer, self.is_sft, self.sampling = engine, tokenizer, is_sft, sampling
        self.system = system
        self.seeds = random.Random(sampling.seed)
        self.max_new_tokens = max_new_tokens
        self.context = engine.args.max_seq_len
        self.budget = self.context - max_new_tokens  # prompt tokens
        self.history = []  # (question, answer) turns of an SFT conversation

    def prompt_ids(self, text):
        """The prompt for `text`, cut to the budget; says what was cut."""
        if not self.is_sft:
            ids = self.tokenizer.encode(text)
            if len(ids) > self.budget - 1:
                note(f"the text was cut to its last {self.budget - 1} tokens to fit the {self.context}-token context")
            return [self.tokenizer.eos_id] + ids[-(self.budget - 1):]  # eos first: a new document
        ids, dropped, cut = fit_prompt(self.tokenizer, self.history, text, self.budget, self.system)
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
        sampling = replace(self.sampling, seed=self.seeds.randrange(2 ** 63))
        with keys_held_back(sys.stdin):
            answer, stopped = stream_reply(self.engine, self.tokenizer, ids, self.max_new_tokens, sampling)
        if self.is_sft and answer:  # stopped before its first word, there is no turn to remember
            self.history.append((text, answer))
        return stopped


def read_line():
    """One input line, or None at Ctrl-D or Ctrl-C (the end of the session)."""
    try:
        return input("> ").strip()
    except (EOFError, KeyboardInterrupt):
        print()
        return None


COMMANDS = {"/help": "this list", "/reset": "forget the conversation (the system text stays)",
            "/quit": "end the session (also Ctrl-D, or Ctrl-C at the prompt)"}


def command(session, text):
    """Run a /command; returns False for /quit."""
    if text == "/quit":
        return False
    if text == "/reset":
        session.history.clear()
        note("the conversation is forgotten")
    elif text == "/help":
        print("\n".join(f"  {name:<7} {what}" for name, what in COMMANDS.items())
              + "\n  Ctrl-C stops an answer; what was shown stays in the conversation")
    else:
        note(f"unknown command {text.split()[0]}; /help lists the commands")
    return True


def interact(session, header):
    print(header)
    while (text := read_line()) is not None:
        if text.startswith("/"):
            if not command(session, text):
                return
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--prompt", default=None, help="answer this one prompt and exit (None: a conversation)")
    p.add_argument("--system", default="", help="system text put before every prompt, as SFT formats one (SFT models)")
    add_generation_args(p, GENERATION)
    return p.parse_args(argv)


def chat(cfg):
    for flag, text in (("--prompt", cfg.prompt), ("--system", cfg.system)):
        if text is not None and not_encodable(text):
            raise Refusal(f"{flag} is not valid UTF-8 text")
    stored = resolve_decoding(cfg, GENERATION)
    if stored:
        note(f"decoding defaults from {stored} (a flag overrides each)")
    sampling = sampling_from(cfg)
    setup_terminal()
    ckpt, model, tokenizer = load_for_inference(cfg.ckpt, cfg.tokenizer, cfg.device)
    is_sft = ckpt.get("kind") in ANSWERING_KINDS
    engine = BatchEngine(model, tokenizer.eos_id, tokenizer.pad_id, max_batch=1)
    session = Session(engine, tokenizer, is_sft, answer_length(cfg.max_new_tokens, model.args.max_seq_len), sampling,
                      cfg.system)
    if cfg.prompt is not None:
        if session.reply(cfg.prompt):
            sys.exit(130)  # a one-shot answer stopped by Ctrl-C is not a whole answer
        return
    interact(session, f"{ckpt['path']} ({ckpt.get('kind')}, step {ckpt.get('step')}): "
                      f"{'ask a question' if is_sft else 'type the start of a text'}; Ctrl-C stops an answer, "
                      f"/help lists the commands, /quit or Ctrl-D ends")


def main(argv=None):
    cfg = parse_args(argv)
    with one_line_refusals("chat.py"):
        chat(cfg)


if __name__ == "__main__":
    main()
