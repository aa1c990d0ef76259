"""What the scripts that generate (eval.py, chat.py, serve.py) share: loading a checkpoint
for inference, the sampling flags and their Sampling, and streamed text. The generating
itself is engine.py's; how a token is picked is sampling.py's.
"""
import sys

import torch

import kernels
from checkpoint import load_checkpoint, model_from_checkpoint, tokenizer_for_checkpoint
from refusal import Refusal
from sampling import Sampling


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_inference(ckpt_path, tokenizer_path=None, device=None, dtype=None):
    """-> (checkpoint dict without weights, model in eval mode with kernels.speed_up applied,
    tokenizer). dtype None: bf16 on a GPU that has it, else fp32."""
    device = device or default_device()
    ckpt = load_checkpoint(ckpt_path)
    tokenizer = tokenizer_for_checkpoint(ckpt, tokenizer_path)
    model = model_from_checkpoint(ckpt, device).eval()
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    model.to(dtype)
    # on stderr: stdout may carry nothing but the answer (chat.py --prompt)
    print(f"speed: {kernels.speed_up(model, device, dtype)}", file=sys.stderr, flush=True)
    del ckpt["model"]
    return ckpt, model, tokenizer


class TextStream:
    """Token ids -> text, piece by piece, as a client should see it. A character whose bytes
    are not all generated yet (decode shows U+FFFD) waits, and so does text that could be the
    start of a stop string; the text ends just before the first stop string."""

    def __init__(self, tokenizer, stops=()):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.ids, self.shown, self.stopped = [], "", False

    def push(self, token):
        """Add a token; returns the text that may be shown now ('' when all of it waits)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            return self._show(text[:min(found)])
        return self._show(text[:len(text) - self._held(text)])

    def flush(self):
        """At the end: whatever still waits (unless a stop string ended the text)."""
        return "" if self.stopped else self._show(self.tokenizer.decode(self.ids))

    def _held(self, text):
        """How many characters at the end wait: the unfinished ones, and before them the
        longest start of a stop string."""
        unfinished = len(text) - len(text.rstrip("\ufffd"))
        settled = text[:len(text) - unfinished]
        start = 0
        for s in self.stops:
            start = max([start] + [k for k in range(1, min(len(s), len(settled) + 1)) if settled.endswith(s[:k])])
        return unfinished + start

    def _show(self, text):
        piece = text[len(self.shown):]
        self.shown = max(self.shown, text, key=len)
        return piece


def default_max_new_tokens(max_seq_len, cap=256):
    """How many tokens to allow an answer when none is asked for: `cap`, but at most half the
    model's context, so that every model leaves a prompt room (the demo's context is 256)."""
    return min(cap, max_seq_len // 2)


# The sampling flags eval.py and chat.py share: (flag, type, help); each script gives the defaults.
SAMPLING_FLAGS = (
    ("--max-new-tokens", int, "most tokens generated per answer"),
    ("--temperature", float, "0 = greedy; > 0 samples"),
    ("--top-k", int, "sample only from the k most likely tokens"),
    ("--top-p", float, "sample only from the smallest set with this probability mass"),
    ("--repetition-penalty", float, "> 1 discourages tokens already in the prompt or answer (1 = off)"),
    ("--seed", int, "seed of the sampling generator"),
)


def add_generation_args(parser, defaults):
    """The flags eval.py, chat.py and serve.py share: which model, where, and how to sample.
    defaults: the script's ckpt and a value for every SAMPLING_FLAGS flag (max_new_tokens, ...);
    max_new_tokens None means the script picks default_max_new_tokens once the model is loaded
    (and says which)."""
    parser.add_argument("--ckpt", default=defaults["ckpt"], help="checkpoint file or out dir (its best.pt, else latest step)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model to use instead of the one the checkpoint names")
    parser.add_argument("--device", default=None, help="cpu or cuda (None: cuda when available)")
    for flag, type_, text in SAMPLING_FLAGS:
        default = defaults[flag[2:].replace("-", "_")]
        if flag == "--max-new-tokens" and default is None:
            text += " (None: at most half the model's context, 256 at most)"
        parser.add_argument(flag, type=type_, default=default, help=text)


def sampling_from(cfg):
    """The Sampling of the parsed sampling flags, refused as a Refusal when out of range."""
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty, cfg.seed)
    try:
        sampling.check()
    except ValueError as e:
        raise Refusal(str(e)) from None
    return sampling
