"""Generation with a trained model: a KV cache, sampling, and batched, streaming decoding.
eval.py, chat.py and the benchmarks use it.

Decoding a token needs every earlier position's keys and values in every layer. Recomputing
them for each new token costs the whole sequence per step; the KV cache keeps them, so the
prompt runs through the model once ("prefill") and each later step feeds one token per row.
Rows of a batch with prompts of different lengths are left-padded to the longest prompt;
each row's positions start at 0 at its own first token and a mask hides the padded keys, so
a row decodes exactly as it would alone.
"""
import sys

import torch
from tqdm import tqdm

import kernels
from checkpoint import load_checkpoint, model_from_checkpoint, tokenizer_for_checkpoint


class KVCache:
    """Per-layer key/value buffers of shape (B, K, max_len, Dh). `length` is how many
    positions are filled; every row of the batch shares it (see the module docstring)."""

    def __init__(self, args, batch_size, max_len, device, dtype):
        head_dim = args.dim // args.n_heads
        shape = (batch_size, args.n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer, k, v):
        """Write the new positions' k, v at the cache's current length; return all filled k, v."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def apply_repetition_penalty(logits, seen, penalty):
    """CTRL-style penalty on every token already in a row's context (prompt or generated):
    positive logits are divided by it, negative ones multiplied, so a seen token always loses."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample_next_token(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """(B, V) fp32 logits -> (B,) token ids. temperature 0 is greedy (argmax); otherwise
    sample from the temperature-scaled distribution cut to the top_k tokens and to the
    smallest set whose probability reaches top_p."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
        outside[:, 0] = False  # the most likely token always stays
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def check_sampling(temperature, top_k, top_p, repetition_penalty):
    if temperature < 0 or (top_k is not None and top_k < 1) or not (top_p is None or 0 < top_p <= 1) \
            or repetition_penalty <= 0:
        raise ValueError(f"bad sampling settings: temperature={temperature} (>= 0), top_k={top_k} (>= 1), "
                         f"top_p={top_p} (in (0, 1]), repetition_penalty={repetition_penalty} (> 0)")


def left_padded_batch(prompts, pad_id, n_steps, device):
    """Prompts (lists of ids) -> tokens (B, P) left-padded, positions (B, P) counted from
    each row's first token, and the key mask (B, P + n_steps) that hides the padding
    (None when no row is padded)."""
    batch, prompt_len = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((batch, prompt_len), pad_id, dtype=torch.long)
    for row, p in enumerate(prompts):
        tokens[row, prompt_len - len(p):] = torch.tensor(p, dtype=torch.long)
    n_pad = torch.tensor([prompt_len - len(p) for p in prompts], device=device)
    positions = (torch.arange(prompt_len, device=device)[None] - n_pad[:, None]).clamp(min=0)
    key_ok = torch.arange(prompt_len + n_steps, device=device)[None] >= n_pad[:, None] if n_pad.any() else None
    return tokens.to(device), positions, key_ok


def prefill_mask(key_ok, prompt_len):
    """(B, 1, P, P) causal mask over the prompt that also hides each row's padded keys."""
    device = key_ok.device
    causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=device).tril()
    # A pad query may see itself: a row with no allowed key would give NaN, and NaN values
    # poison later rows' sums even where the mask is 0.
    eye = torch.eye(prompt_len, dtype=torch.bool, device=device)
    return ((causal & key_ok[:, None, :prompt_len]) | eye)[:, None]


@torch.inference_mode()
def generate_stream(model, prompts, max_new_tokens, eos_id=None, pad_id=0, temperature=0.0,
                    top_k=None, top_p=None, repetition_penalty=1.0, generator=None):
    """Decode a batch of prompts (lists of ids, any lengths) with the KV cache. Yields per
    step a list with each row's new token id, or None for a row that has ended; a row ends
    at eos_id (not yielded). Stops when every row has ended, after max_new_tokens, or when
    prompt + output reach the model's max_seq_len, whichever comes first."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("generate needs at least one prompt and no empty prompt")
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    args, device = model.args, model.tok_embeddings.weight.device
    batch, prompt_len = len(prompts), max(len(p) for p in prompts)
    if prompt_len >= args.max_seq_len:
        raise ValueError(f"prompt of {prompt_len} tokens leaves no room to generate within "
                         f"max_seq_len {args.max_seq_len}")
    n_steps = min(max_new_tokens, args.max_seq_len - prompt_len)
    tokens, positions, key_ok = left_padded_batch(prompts, pad_id, n_steps, device)
    cache = KVCache(args, batch, prompt_len + n_steps, device, model.tok_embeddings.weight.dtype)
    seen = torch.zeros(batch, args.vocab_size, dtype=torch.bool, device=device)  # for the repetition penalty
    for row, p in enumerate(prompts):
        seen[row, torch.tensor(p, device=device)] = True

    # prefill: the whole prompt at once fills the cache and gives the first logits
    logits = model(tokens, positions=positions, cache=cache,
                   attn_mask=prefill_mask(key_ok, prompt_len) if key_ok is not None else None)
    next_pos = positions[:, -1:] + 1
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(n_steps):
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        new = sample_next_token(logits, temperature, top_k, top_p, generator)
        ended = done | (new == eos_id) if eos_id is not None else done
        yield [None if e else t for t, e in zip(new.tolist(), ended.tolist())]
        done = ended
        if bool(done.all()) or step == n_steps - 1:
            return
        seen[torch.arange(batch, device=device), new] = True
        # decode: one new token per row, attending to everything cached
        step_mask = key_ok[:, None, None, :cache.length + 1] if key_ok is not None else None
        logits = model(new[:, None], positions=next_pos, cache=cache, attn_mask=step_mask)
        next_pos = next_pos + 1


def generate(model, prompts, max_new_tokens, **sampling):
    """Like generate_stream, but returns each row's generated ids (without the eos)."""
    outputs = [[] for _ in prompts]
    for step_ids in generate_stream(model, prompts, max_new_tokens, **sampling):
        for out, t in zip(outputs, step_ids):
            if t is not None:
                out.append(t)
    return outputs


def generate_answers(model, prompts, batch_size, max_new_tokens, progress=True, **sampling):
    """Generated ids for every prompt, in input order. Prompts are batched by length so that
    little padding is needed; batching does not change greedy results."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [None] * len(prompts)
    with tqdm(total=len(prompts), unit="q", desc="generate", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            for i, ids in zip(rows, generate(model, [prompts[i] for i in rows], max_new_tokens, **sampling)):
                answers[i] = ids
            bar.update(len(rows))
    return answers


# ----------------------------------------------------------------------------- scripts' plumbing

def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_inference(ckpt_path, tokenizer_path=None, device=None, dtype=None):
    """-> (checkpoint dict without weights, model in eval mode with kernels.speed_up applied,
    tokenizer). dtype None: bf16 on a GPU that has it, else fp32."""
    device = device or default_device()
    ckpt = load_checkpoint(ckpt_path)
    tok = tokenizer_for_checkpoint(ckpt, tokenizer_path)
    model = model_from_checkpoint(ckpt, device).eval()
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    model.to(dtype)
    # on stderr: stdout may carry nothing but the answer (chat.py --prompt)
    print(f"speed: {kernels.speed_up(model, device, dtype)}", file=sys.stderr, flush=True)
    del ckpt["model"]
    return ckpt, model, tok


class TextStream:
    """Token ids -> text, piece by piece, as a client should see it. A character whose bytes
    are not all generated yet (decode shows U+FFFD) waits, and so does text that could be the
    start of a stop string; the text ends just before the first stop string."""

    def __init__(self, tok, stops=()):
        self.tok, self.stops = tok, [s for s in stops if s]
        self.ids, self.shown, self.stopped = [], "", False

    def push(self, token):
        """Add a token; returns the text that may be shown now ('' when all of it waits)."""
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            return self._show(text[:min(found)])
        return self._show(text[:len(text) - self._held(text)])

    def flush(self):
        """At the end: whatever still waits (unless a stop string ended the text)."""
        return "" if self.stopped else self._show(self.tok.decode(self.ids))

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
    """The flags eval.py and chat.py share: which model, where, and how to sample.
    defaults: the script's ckpt and a value for every SAMPLING_FLAGS flag (max_new_tokens, ...);
    max_new_tokens None means the script picks default_max_new_tokens once the model is loaded
    (and says which)."""
    parser.add_argument("--ckpt", default=defaults["ckpt"], help="checkpoint file or out dir (its best.pt, else latest step)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model to use instead of the one the checkpoint names")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    for flag, type_, text in SAMPLING_FLAGS:
        default = defaults[flag[2:].replace("-", "_")]
        if flag == "--max-new-tokens" and default is None:
            text += " (default: at most half the model's context, 256 at most)"
        parser.add_argument(flag, type=type_, default=default, help=text)


def sampling_settings(args, tok, device):
    """generate()'s keyword arguments from the parsed sampling flags."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    return dict(eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, generator=generator)
