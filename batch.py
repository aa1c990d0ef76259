"""The rows a BatchEngine (engine.py) is decoding: their KV cache slots, their next-token
logits, and the four things a step does to them (pick tokens, hand them out, let ended rows
leave, run the model once for the rest). engine.py explains why rows are batched this way.

Decoding a token needs every earlier position's keys and values in every layer. The KV cache
keeps them, so a prompt runs through the model once ("prefill") and each later step feeds
one token per row. Here the cache has a fixed number of slots, each holding one request's
keys and values from position 0 with its own length; the requests being decoded occupy
slots 0..B-1 with no holes, so a step works on a plain slice of the buffers.
"""
import random

import torch

from sampling import NgramBlocker, apply_presence_frequency, apply_repetition_penalty, block_ngrams, sample_next_token


class KVCache:
    """Keys and values of up to n_slots requests: per layer a (n_slots, K, max_seq_len, Dh)
    buffer, slot i holding one request's positions from 0. Before each forward the caller says
    what it feeds, and the model's attention calls update() in every layer:
      prefill(slots, n_pad): a left-padded group (G, P); row i's real positions (after its
        n_pad[i] pads) are written into slot slots[i] from position 0, and attention uses the
        group's own keys and values (the prefill mask hides the pads);
      decode(positions): one token for each of slots 0..B-1, written at positions (B,);
        attention reads those slots up to the longest (a mask hides each row's excess)."""

    def __init__(self, model_args, n_slots, device, dtype):
        shape = (n_slots, model_args.n_kv_heads, model_args.max_seq_len, model_args.dim // model_args.n_heads)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(model_args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(model_args.n_layers)]
        self.prefill_rows, self.positions, self.span = None, None, 0
        # model.py adds the positions it feeds to `length` and reads it only when no positions
        # are given; every forward here gives each row's own, so nothing reads it.
        self.length = 0

    def prefill(self, slots, n_pad):
        self.prefill_rows, self.positions = list(zip(slots, n_pad)), None

    def decode(self, positions):
        self.prefill_rows, self.positions = None, positions
        self.span = int(positions.max()) + 1

    def update(self, layer, k, v):
        """Store the new positions' k, v (B, K, T, Dh); return the k, v attention reads."""
        if self.prefill_rows is not None:
            for row, (slot, pad) in enumerate(self.prefill_rows):
                self.k[layer][slot, :, :k.shape[2] - pad] = k[row, :, pad:]
                self.v[layer][slot, :, :k.shape[2] - pad] = v[row, :, pad:]
            return k, v
        rows = torch.arange(len(self.positions), device=k.device)
        self.k[layer][rows, :, self.positions] = k[:, :, 0]
        self.v[layer][rows, :, self.positions] = v[:, :, 0]
        return self.k[layer][:len(rows), :, :self.span], self.v[layer][:len(rows), :, :self.span]

    def move(self, src, dst):
        """Copy slots src[i] into slots dst[i] (the rows that fill the holes)."""
        src, dst = torch.tensor(src), torch.tensor(dst)
        for buf in self.k + self.v:
            buf[dst] = buf[src]


class Request:
    """One prompt's generation. deliver(token_id, None) is called for each new token and
    deliver(None, finish_reason) once at the end; finish_reason is "stop" (eos), "length"
    (max_new_tokens or the context's end), "cancelled" or "error". deliver runs on the engine's
    thread and must return quickly. cancel() may be called from any thread: the row leaves
    the batch at the next step, ending as "cancelled", or as "stop" when its receiver found a
    stop string (cancel("stop"): an answer that ended as asked, not an abandoned one)."""

    def __init__(self, prompt_ids, max_new_tokens, sampling, deliver):
        self.prompt_ids, self.max_new_tokens = list(prompt_ids), max_new_tokens
        self.sampling, self.deliver = sampling, deliver
        self.n_generated = 0
        self.cancelled, self.cancel_reason = False, None
        self.finish_reason = None
        self.generator = None  # a seeded torch.Generator for a sampling row, made on admission
        self.seen = None  # (V,) bool: tokens the answer holds so far, for a repetition penalty != 1
        self.ngrams = None  # the answer's n-token runs, for no_repeat_ngram_size > 0
        self.counts = None  # (V,) how often each token is in the answer, for presence/frequency penalties

    def cancel(self, reason="cancelled"):
        if not self.cancelled:  # the first reason stays
            self.cancelled, self.cancel_reason = True, reason

    def send(self, token, finish_reason):
        try:
            self.deliver(token, finish_reason)
        except Exception:  # a receiver that cannot take more (its client gone) stops its row
            self.cancel()

    def finish(self, reason, stats):
        self.finish_reason = reason
        stats["finished"] += 1
        stats["cancelled"] += reason == "cancelled"
        self.send(None, reason)


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


def left_padded(prompts, pad_id, device):
    """Prompts (lists of ids) -> tokens (G, P) left-padded to the longest, positions (G, P)
    counted from each row's first token, each row's number of pads, and the (G, 1, P, P)
    causal mask that also hides the pads (None when no row is padded)."""
    width = max(len(p) for p in prompts)
    n_pad = [width - len(p) for p in prompts]
    tokens = torch.tensor([[pad_id] * n + p for n, p in zip(n_pad, prompts)], dtype=torch.long, device=device)
    pads = torch.tensor(n_pad, device=device)
    positions = (torch.arange(width, device=device)[None] - pads[:, None]).clamp(min=0)
    if not any(n_pad):
        return tokens, positions, n_pad, None
    key_ok = torch.arange(width, device=device)[None] >= pads[:, None]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    # A pad query may see itself: a row with no allowed key would give NaN, and NaN values
    # poison later rows' sums even where the mask is 0.
    eye = torch.eye(width, dtype=torch.bool, device=device)
    return tokens, positions, n_pad, ((causal & key_ok[:, None, :]) | eye)[:, None]


class DecodeBatch:
    """The requests in slots 0..B-1 of the KV cache, in slot order, and their (B, V)
    next-token logits. stats is the engine's dict of counters, which hand_out updates."""

    def __init__(self, model, eos_id, pad_id, n_slots, stats):
        self.model, self.eos_id, self.pad_id, self.stats = model, eos_id, pad_id, stats
        self.device = model.tok_embeddings.weight.device
        self.cache = KVCache(model.args, n_slots, self.device, model.tok_embeddings.weight.dtype)
        self.requests, self.logits = [], None

    def __len__(self):
        return len(self.requests)

    def prefill(self, group):
        """Run the group's prompts through the model at once, left-padded: each row's keys and
        values go straight into a free slot, and the rows join the batch."""
        tokens, positions, n_pad, mask = left_padded([r.prompt_ids for r in group], self.pad_id, self.device)
        self.cache.prefill(range(len(self.requests), len(self.requests) + len(group)), n_pad)
        logits = self.model(tokens, positions=positions, cache=self.cache, attn_mask=mask)
        for request in group:
            self._prepare_sampling(request)
            self.requests.append(request)
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])

    def _prepare_sampling(self, request):
        s = request.sampling
        if s.temperature > 0:
            seed = s.seed if s.seed is not None else random.SystemRandom().randrange(2 ** 63)
            request.generator = torch.Generator(device=self.device).manual_seed(seed)
        if s.repetition_penalty != 1.0:
            # the answer's own tokens only: the question's words are ones an answer should be free to use
            request.seen = torch.zeros(self.model.args.vocab_size, dtype=torch.bool, device=self.device)
        if s.no_repeat_ngram_size:
            request.ngrams = NgramBlocker(s.no_repeat_ngram_size)
        if s.counts_tokens():
            request.counts = torch.zeros(self.model.args.vocab_size, device=self.device)

    def step(self):
        """Pick every row's next token, hand the tokens out, let ended rows leave, and run the
        model once for the rows that go on."""
        tokens = self.next_tokens()
        tokens = self.compact(self.hand_out(tokens), tokens)
        if self.requests:
            self.logits = self.decode(tokens)

    def next_tokens(self):
        """(B,) next token of every row: one argmax for all, then the rows that sample, penalize
        repeats or block n-grams redo theirs with their own settings and generator, so what a row
        draws does not depend on who else is in the batch."""
        tokens = self.logits.argmax(dim=-1)
        for row, request in enumerate(self.requests):
            s = request.sampling
            if not s.is_plain_greedy():
                logits = self.logits[row:row + 1]
                if request.seen is not None:
                    logits = apply_repetition_penalty(logits, request.seen[None], s.repetition_penalty)
                if request.counts is not None:
                    logits = apply_presence_frequency(logits, request.counts[None].to(logits.dtype),
                                                      s.presence_penalty, s.frequency_penalty)
                if request.ngrams is not None:
                    logits = block_ngrams(logits, request.ngrams.banned())
                tokens[row] = sample_next_token(logits, s.temperature, s.top_k, s.top_p, request.generator)[0]
        return tokens

    def hand_out(self, tokens):
        """Deliver each row's token; returns per row whether it goes on."""
        going_on = []
        for request, token in zip(self.requests, tokens.tolist()):
            if request.cancelled:
                request.finish(request.cancel_reason, self.stats)
            elif token == self.eos_id:
                request.finish("stop", self.stats)
            else:
                request.n_generated += 1
                self.stats["tokens_generated"] += 1
                if request.seen is not None:
                    request.seen[token] = True
                if request.ngrams is not None:
                    request.ngrams.push(token)
                if request.counts is not None:
                    request.counts[token] += 1
                request.send(token, None)
                if request.n_generated >= request.max_new_tokens:
                    request.finish("length", self.stats)
            going_on.append(request.finish_reason is None)
        return going_on

    def compact(self, going_on, tokens):
        """Ended rows leave: rows from the end move into their slots, so the rows stay slots
        0..B-1. Returns the remaining rows' tokens in the new slot order."""
        n = sum(going_on)
        holes = [i for i in range(n) if not going_on[i]]
        movers = [i for i in range(n, len(going_on)) if going_on[i]]
        if holes:
            self.cache.move(movers, holes)
        order = list(range(n))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        self.requests = [self.requests[i] for i in order]
        if not self.requests:
            self.logits = None
        return tokens[order]

    def decode(self, tokens):
        """One forward for every row: its newest token at its own position."""
        positions = torch.tensor([len(r.prompt_ids) + r.n_generated - 1 for r in self.requests], device=self.device)
        self.cache.decode(positions)
        key_ok = torch.arange(self.cache.span, device=self.device)[None] <= positions[:, None]
        return self.model(tokens[:, None], positions=positions[:, None], cache=self.cache,
                          attn_mask=key_ok[:, None, None, :])

    def drop(self, reason):
        """End every row with `reason` (after an error, or a step interrupted half-way)."""
        for request in self.requests:
            if request.finish_reason is None:
                request.finish(reason, self.stats)
        self.requests, self.logits = [], None
