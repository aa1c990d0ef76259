"""Continuous batching: many requests decoded together, each joining and leaving a running
batch at any step. serve.py runs one BatchEngine for all of its clients.

Why batch at all: a decode step feeds one token per row, and on a CPU or GPU the step costs
nearly the same for 16 rows as for one (every weight is read once per step either way, and
reading the weights is most of the work). Rows that share a step share that cost, so tokens
per second in all grow almost with the number of rows.

Why *continuous*: generate.generate_stream decodes a fixed batch. Its rows start together
and the batch runs until its last row ends, so a request that arrives a moment later waits
for the whole batch, and rows that ended early ride along doing nothing. Continuous batching
(Orca's "iteration-level scheduling") decides who is in the batch at every step instead:
  - a request that arrives is prefilled (its prompt runs through the model once and fills
    its keys and values) and joins the running batch at the next step;
  - a row that ends (eos, its token limit, the context's end, or its client gone) leaves at
    once, and its place goes to a waiting request.

The KV cache this needs: generate.KVCache gives all rows one shared length, which only fits
rows that started together. SlotCache has a fixed number of slots instead, each holding one
request's keys and values from position 0 with its own length. Active requests occupy slots
0..B-1 with no holes (a leaving row's place is filled by a row from the end), so a step works
on a plain slice of the buffers. A step feeds each row's newest token at that row's own
position, and a mask hides every row's keys beyond its length.

Sampling: each request has its own settings (temperature, top_k, top_p, repetition
penalty) and its own seeded generator, so what it draws does not depend on who else is in
the batch; greedy rows (temperature 0, no penalty) take one argmax together.
"""
import random
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch

from generate import (KVCache, apply_repetition_penalty, check_sampling, left_padded_batch, prefill_mask,
                      sample_next_token)


@dataclass
class Sampling:
    """How one request picks its tokens (see generate.sample_next_token). seed None: a fresh
    random seed."""
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: float = 1.0
    seed: Optional[int] = None


class Request:
    """One prompt's generation inside the engine. The engine calls deliver(token_id, None) for
    each new token and deliver(None, finish_reason) once at the end; finish_reason is "stop"
    (eos), "length" (max_new_tokens or the context's end), "cancelled" or "error". deliver is
    called on the engine's thread and must return quickly. cancel() may be called from any
    thread: the row leaves the batch at the next step."""

    def __init__(self, prompt_ids, max_new_tokens, sampling, deliver):
        self.prompt_ids, self.max_new_tokens = list(prompt_ids), max_new_tokens
        self.sampling, self.deliver = sampling, deliver
        self.n_generated = 0
        self.cancelled = False
        self.finish_reason = None
        self.generator = None  # a seeded torch.Generator for a sampling row, made on admission
        self.seen = None  # (V,) bool: tokens in the context, for a repetition penalty != 1

    def cancel(self):
        self.cancelled = True

    def needs_own_sampling(self):
        s = self.sampling
        return s.temperature > 0 or s.repetition_penalty != 1.0


class SlotCache:
    """Keys and values of up to n_slots requests: per layer a (n_slots, K, max_seq_len, Dh)
    buffer, slot i holding one request's positions from 0. The model calls update() during
    a decode step set up by begin_step()."""

    def __init__(self, args, n_slots, device, dtype):
        shape = (n_slots, args.n_kv_heads, args.max_seq_len, args.dim // args.n_heads)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.rows = self.span = 0
        self.positions = None
        # Transformer.hidden_states adds the positions it fed to `length` and uses it only when
        # no positions are given; the engine always gives each row's own, so this counts nothing.
        self.length = 0

    def store_prefill(self, slot, prefill, row, start, end):
        """Copy positions start..end-1 of `row` of a prefill KVCache into `slot` from position 0."""
        for layer in range(len(self.k)):
            self.k[layer][slot, :, :end - start] = prefill.k[layer][row, :, start:end]
            self.v[layer][slot, :, :end - start] = prefill.v[layer][row, :, start:end]

    def move(self, src, dst):
        """Copy slots src[i] into slots dst[i] (the rows that fill the holes)."""
        src, dst = torch.tensor(src), torch.tensor(dst)
        for buf in self.k + self.v:
            buf[dst] = buf[src]

    def begin_step(self, positions):
        """The next forward writes one token per row 0..B-1 at positions (B,) and attends to
        positions 0..max(positions)."""
        self.rows, self.positions = len(positions), positions
        self.span = int(positions.max()) + 1

    def update(self, layer, k, v):
        rows = torch.arange(self.rows, device=k.device)
        self.k[layer][rows, :, self.positions] = k[:, :, 0]
        self.v[layer][rows, :, self.positions] = v[:, :, 0]
        return self.k[layer][:self.rows, :, :self.span], self.v[layer][:self.rows, :, :self.span]


def prefill_groups(requests, slack=1.25):
    """Requests cut into groups of similar prompt lengths, shortest first, so that a group's
    left padding costs at most `slack` times its real tokens (padding is wasted compute)."""
    groups, group = [], []
    for request in sorted(requests, key=lambda r: len(r.prompt_ids)):
        candidate = group + [request]  # the newest is the longest: it sets the padded width
        if group and len(request.prompt_ids) * len(candidate) > slack * sum(len(r.prompt_ids) for r in candidate):
            groups.append(group)
            candidate = [request]
        group = candidate
    return groups + [group] if group else groups


class BatchEngine:
    """Decodes every submitted request with continuous batching (see the module docstring).
    Drive it with step() (tests do) or run it on its own thread with start() (serve.py)."""

    def __init__(self, model, eos_id, pad_id, max_batch=16):
        self.model, self.eos_id, self.pad_id = model, eos_id, pad_id
        self.args, self.device = model.args, model.tok_embeddings.weight.device
        self.max_batch = max_batch
        self.cache = SlotCache(self.args, max_batch, self.device, model.tok_embeddings.weight.dtype)
        self.active = []  # the requests in slots 0..B-1, in slot order
        self.logits = None  # (B, V) next-token logits of the active rows
        self.waiting = deque()
        self.wakeup = threading.Condition()
        self.thread, self.closing = None, False
        self.stats = {"tokens_generated": 0, "peak_batch": 0, "finished": 0, "cancelled": 0, "errors": 0}

    # --------------------------------------------------------------- the public side
    def submit(self, prompt_ids, max_new_tokens, sampling, deliver):
        """Queue a request; returns it (call .cancel() to stop it). Its answer is cut to fit
        the context: at most max_seq_len - len(prompt_ids) tokens."""
        s = sampling
        check_sampling(s.temperature, s.top_k, s.top_p, s.repetition_penalty)
        room = self.args.max_seq_len - len(prompt_ids)
        if not prompt_ids or room < 1:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens: need 1 to {self.args.max_seq_len - 1} "
                             f"(max_seq_len {self.args.max_seq_len} must hold the prompt and one new token)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {max_new_tokens} must be >= 1")
        request = Request(prompt_ids, min(max_new_tokens, room), sampling, deliver)
        with self.wakeup:
            self.waiting.append(request)
            self.wakeup.notify()
        return request

    def load(self):
        """(rows decoding, requests waiting)."""
        return len(self.active), len(self.waiting)

    def cancel_all(self):
        """Cancel every request, running or waiting (a server shutting down)."""
        with self.wakeup:
            for request in self.active + list(self.waiting):
                request.cancel()

    def start(self):
        self.thread = threading.Thread(target=self._run, name="batch-engine", daemon=True)
        self.thread.start()

    def close(self):
        """Stop the thread; requests still running or waiting end as "cancelled"."""
        with self.wakeup:
            self.closing = True
            self.wakeup.notify()
        if self.thread is not None:
            self.thread.join()
        for request in self.active + list(self.waiting):
            self._finish(request, "cancelled")
        self.active, self.waiting, self.logits = [], deque(), None

    # --------------------------------------------------------------- one iteration
    @torch.inference_mode()
    def step(self):
        """Admit waiting requests, pick every row's next token, hand the tokens out, let ended
        rows leave, and run the model once for the rows that go on. False when idle."""
        self._admit()
        if not self.active:
            return False
        tokens = self._next_tokens()
        going_on = self._hand_out(tokens)
        tokens = self._compact(going_on, tokens)
        if self.active:
            self.logits = self._decode(tokens)
        return True

    def _admit(self):
        """Prefill waiting requests into the free slots, a few batches of similar lengths."""
        with self.wakeup:
            joining = []
            while self.waiting and len(self.active) + len(joining) < self.max_batch:
                request = self.waiting.popleft()
                if request.cancelled:
                    self._finish(request, "cancelled")
                else:
                    joining.append(request)
        try:
            for group in prefill_groups(joining):
                self._prefill(group)
        except Exception:
            for request in joining:
                if request.finish_reason is None and not any(request is r for r in self.active):
                    self._finish(request, "error")
            raise
        self.stats["peak_batch"] = max(self.stats["peak_batch"], len(self.active))

    def _prefill(self, group):
        """Run the group's prompts through the model at once (left-padded, as generate does),
        copy each row's keys and values into a free slot, and add the rows to the batch."""
        tokens, positions, key_ok = left_padded_batch([r.prompt_ids for r in group], self.pad_id, 0, self.device)
        prompt_len = tokens.shape[1]
        prefill = KVCache(self.args, len(group), prompt_len, self.device, self.cache.k[0].dtype)
        logits = self.model(tokens, positions=positions, cache=prefill,
                            attn_mask=prefill_mask(key_ok, prompt_len) if key_ok is not None else None)
        for row, request in enumerate(group):
            self.cache.store_prefill(len(self.active), prefill, row, prompt_len - len(request.prompt_ids), prompt_len)
            self._prepare_sampling(request)
            self.active.append(request)
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])

    def _prepare_sampling(self, request):
        s = request.sampling
        if s.temperature > 0:
            seed = s.seed if s.seed is not None else random.SystemRandom().randrange(2 ** 63)
            request.generator = torch.Generator(device=self.device).manual_seed(seed)
        if s.repetition_penalty != 1.0:
            request.seen = torch.zeros(self.args.vocab_size, dtype=torch.bool, device=self.device)
            request.seen[torch.tensor(request.prompt_ids, device=self.device)] = True

    def _next_tokens(self):
        """(B,) next token of every active row: one argmax for all, then the rows that
        sample or penalize repeats redo theirs with their own settings and generator."""
        tokens = self.logits.argmax(dim=-1)
        for row, request in enumerate(self.active):
            if request.needs_own_sampling():
                s, logits = request.sampling, self.logits[row:row + 1]
                if request.seen is not None:
                    logits = apply_repetition_penalty(logits, request.seen[None], s.repetition_penalty)
                tokens[row] = sample_next_token(logits, s.temperature, s.top_k, s.top_p, request.generator)[0]
        return tokens

    def _hand_out(self, tokens):
        """Deliver each row's token; returns per row whether it goes on."""
        going_on = []
        for request, token in zip(self.active, tokens.tolist()):
            if request.cancelled:
                self._finish(request, "cancelled")
            elif token == self.eos_id:
                self._finish(request, "stop")
            else:
                request.n_generated += 1
                self.stats["tokens_generated"] += 1
                if request.seen is not None:
                    request.seen[token] = True
                self._deliver(request, token, None)
                if request.n_generated >= request.max_new_tokens:
                    self._finish(request, "length")
            going_on.append(request.finish_reason is None)
        return going_on

    def _compact(self, going_on, tokens):
        """Ended rows leave: rows from the end move into their slots, so the active rows stay
        slots 0..B-1. Returns the remaining rows' tokens in the new slot order."""
        n = sum(going_on)
        holes = [i for i in range(n) if not going_on[i]]
        movers = [i for i in range(n, len(going_on)) if going_on[i]]
        if holes:
            self.cache.move(movers, holes)
        order = list(range(n))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        self.active = [self.active[i] for i in order]
        if not self.active:
            self.logits = None
        return tokens[order]

    def _decode(self, tokens):
        """One forward for every active row: its newest token at its own position."""
        positions = torch.tensor([len(r.prompt_ids) + r.n_generated - 1 for r in self.active], device=self.device)
        self.cache.begin_step(positions)
        key_ok = torch.arange(self.cache.span, device=self.device)[None] <= positions[:, None]
        return self.model(tokens[:, None], positions=positions[:, None], cache=self.cache,
                          attn_mask=key_ok[:, None, None, :])

    # --------------------------------------------------------------- endings and the thread
    def _deliver(self, request, token, finish_reason):
        try:
            request.deliver(token, finish_reason)
        except Exception:  # a receiver that cannot take more (its client gone) stops its row
            request.cancel()

    def _finish(self, request, reason):
        request.finish_reason = reason
        self.stats["finished"] += 1
        self.stats["cancelled"] += reason == "cancelled"
        self._deliver(request, None, reason)

    def _fail_all(self):
        """After an error inside a step: end every active row with "error" and go on serving."""
        traceback.print_exc(file=sys.stderr)
        self.stats["errors"] += 1
        for request in self.active:
            if request.finish_reason is None:
                self._finish(request, "error")
        self.active, self.logits = [], None

    def _run(self):
        while True:
            with self.wakeup:
                while not self.closing and not self.waiting and not self.active:
                    self.wakeup.wait()
                if self.closing:
                    return
            try:
                self.step()
            except Exception:
                self._fail_all()
