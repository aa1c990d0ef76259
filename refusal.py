"""Refusals: what a user can get wrong, told in one line.

A bad flag, bad or missing data, a damaged checkpoint, a missing tokenizer, a full disk: each
is raised as a Refusal (or one of its kinds: corpus.DataError, atomic.WriteError,
checkpoint.CheckpointError, chatglm_tokenizer.TokenizerNotFound) whose message names the
file, line or flag and says what to do. Every script runs its work under one_line_refusals,
which prints that message as `SCRIPT: error: ...` and exits non-zero, never a traceback.
Anything else that is raised is a bug, and keeps its traceback.
"""
import contextlib


class Refusal(Exception):
    """A run that cannot go on as asked; the message says why and what to do."""


@contextlib.contextmanager
def one_line_refusals(script, interrupted="interrupted"):
    """Turn a Refusal into `script: error: message` and a Ctrl-C into `script: interrupted`,
    each with exit code 1 and no traceback."""
    try:
        yield
    except Refusal as e:
        raise SystemExit(f"{script}: error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit(f"{script}: {interrupted}") from None
