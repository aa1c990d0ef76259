"""What the scripts that generate (eval.py, chat.py, serve.py) share: loading a checkpoint
for inference, the sampling flags and their Sampling, the decoding defaults stored with a
checkpoint, and streamed text. The generating itself is engine.py's; how a token is picked
is sampling.py's.

Decoding defaults. A fine-tuned checkpoint's out dir may hold generation_config.json (as a
Hugging Face model does), written by choose_decoding.py from scores on the SFT validation
split: the answer length limit, repetition penalty and sampling settings that suit this
model. A sampling flag left unset takes its value from there, else from the script's own
default; a flag given always wins.
"""
import json
import sys
from pathlib import Path

import torch

import kernels
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, resolve_checkpoint, tokenizer_for_checkpoint
from environment import parse_device
from refusal import Refusal
from sampling import Sampling


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_inference(ckpt_path, tokenizer_path=None, device=None, dtype=None):
    """-> (checkpoint dict without weights, model in eval mode with kernels.speed_up applied,
    tokenizer). dtype None: bf16 on a GPU that has it, else fp32."""
    device = str(parse_device(device or default_device()))
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
        text = self.tokenizer.decode_raw(self.ids)
        unfinished = len(text) - len(text.rstrip("\ufffd"))
        # bytes before those that formed no character are dropped, as decode drops them
        settled = text[:len(text) - unfinished].replace("\ufffd", "")
        found = [i for i in (settled.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            return self._show(settled[:min(found)])
        return self._show(settled[:len(settled) - self._stop_start(settled)])

    def flush(self):
        """At the end: whatever still waits (unless a stop string ended the text)."""
        return "" if self.stopped else self._show(self.tokenizer.decode(self.ids))

    def _stop_start(self, text):
        """How many characters at the end wait: the longest start of a stop string."""
        start = 0
        for s in self.stops:
            start = max([start] + [k for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])])
        return start

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
    ("--repetition-penalty", float, "> 1 discourages tokens the answer already holds (1 = off)"),
    ("--no-repeat-ngram-size", int, "n >= 1 forbids the answer to repeat any run of n tokens (0 = off)"),
    ("--seed", int, "seed of the sampling generator"),
)


# The settings generation_config.json holds (the seed stays the script's: it is not a property of the model).
GENERATION_CONFIG = "generation_config.json"
DECODING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size")


def add_generation_args(parser, defaults):
    """The flags eval.py, chat.py and serve.py share: which model, where, and how to sample.
    defaults: the script's ckpt and a value for every SAMPLING_FLAGS flag (max_new_tokens, ...).
    The DECODING_KEYS flags parse as None when not given; resolve_decoding(cfg, defaults) fills
    them from the checkpoint's generation_config.json, else from these defaults. max_new_tokens None there
    means the script picks default_max_new_tokens once the model is loaded (and says which)."""
    parser.add_argument("--ckpt", default=defaults["ckpt"], help="checkpoint file or out dir (its best.pt, else latest step)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model to use instead of the one the checkpoint names")
    parser.add_argument("--device", default=None, help="cpu or cuda (None: cuda when available)")
    for flag, type_, text in SAMPLING_FLAGS:
        key = flag[2:].replace("-", "_")
        default = defaults[key]
        if key in DECODING_KEYS:
            shown = "at most half the model's context, 256 at most" if default is None else default
            text += f" (default: the checkpoint's {GENERATION_CONFIG}, else {shown})"
            default = None
        parser.add_argument(flag, type=type_, default=default, help=text)


def generation_config_path(ckpt_path):
    """Where a checkpoint's decoding defaults live: generation_config.json beside it."""
    return resolve_checkpoint(ckpt_path).parent / GENERATION_CONFIG


def check_decoding(settings, where):
    """Refuse decoding settings out of range, naming where they came from."""
    n = settings.get("max_new_tokens")
    sampling = Sampling(**{k: settings[k] for k in DECODING_KEYS if k in settings and k != "max_new_tokens"})
    try:
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"max_new_tokens={n!r} (an integer >= 1)")
        sampling.check()
    except (ValueError, TypeError) as e:
        raise Refusal(f"{where}: {e}") from None


def read_generation_config(path):
    """The decoding settings of a generation_config.json ({} when there is none); a damaged
    file is refused in one line, never half used."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Refusal(f"{path}: unreadable ({type(e).__name__}: {e}); write it again with choose_decoding.py "
                      f"or delete it to use the scripts' defaults") from None
    if not isinstance(data, dict):
        raise Refusal(f"{path}: not a JSON object; write it again with choose_decoding.py or delete it")
    settings = {k: data[k] for k in DECODING_KEYS if k in data}
    check_decoding(settings, path)
    return settings


def resolve_decoding(cfg, defaults):
    """Fill every decoding flag left unset (None) from the checkpoint's generation_config.json,
    else from the script's `defaults` (as given to add_generation_args); -> the file used, or None. A checkpoint that does not
    exist has none: loading it reports that afterwards."""
    try:
        path = generation_config_path(cfg.ckpt)
    except CheckpointError:
        path = None
    stored = read_generation_config(path) if path else {}
    for key in DECODING_KEYS:
        if getattr(cfg, key) is None:
            setattr(cfg, key, stored.get(key, defaults[key]))
    return path if stored else None


def sampling_from(cfg):
    """The Sampling of the parsed sampling flags, refused as a Refusal when out of range."""
    sampling = Sampling(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                        repetition_penalty=cfg.repetition_penalty, seed=cfg.seed,
                        no_repeat_ngram_size=cfg.no_repeat_ngram_size)
    try:
        sampling.check()
    except ValueError as e:
        raise Refusal(str(e)) from None
    return sampling
