"""How a request picks its next token from the model's logits: greedy, or sampled with a
temperature, top-k and top-p, after a repetition penalty and n-gram blocking. The engine
(engine.py) calls these for every row of its batch, each row with its own settings and its
own seeded generator.

Two ways to keep a small model from looping, both over the answer's own tokens:
  - the repetition penalty lowers every token the answer already holds, however often it
    is the right one, so a strong one ends answers early (eos is never penalized);
  - n-gram blocking (no_repeat_ngram_size n) forbids only the tokens that would repeat an
    n-token run the answer already holds, which is what a loop is, and leaves every word
    free to appear again.
OpenAI's presence and frequency penalties (what its API clients send) are there too: they
subtract from a token's logit once if the answer holds it, and once per time it does.
"""
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Sampling:
    """One request's settings. temperature 0 is greedy; seed None: a fresh random seed."""
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    no_repeat_ngram_size: int = 0  # 0: off
    presence_penalty: float = 0.0  # OpenAI's, in [-2, 2]
    frequency_penalty: float = 0.0

    def check(self):
        """ValueError unless every setting is in its range (a script refuses bad flags first)."""
        t, k, p, penalty, n = self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.no_repeat_ngram_size
        if t < 0 or (k is not None and k < 1) or not (p is None or 0 < p <= 1) or penalty <= 0 \
                or not isinstance(n, int) or isinstance(n, bool) or n < 0 \
                or not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise ValueError(f"bad sampling settings: temperature={t} (>= 0), top_k={k} (>= 1), "
                             f"top_p={p} (in (0, 1]), repetition_penalty={penalty} (> 0), "
                             f"no_repeat_ngram_size={n!r} (an integer >= 0), presence_penalty="
                             f"{self.presence_penalty} and frequency_penalty={self.frequency_penalty} (in [-2, 2])")

    def is_plain_greedy(self):
        """True when the row's token is just the argmax of its logits."""
        return self.temperature <= 0 and self.repetition_penalty == 1.0 and not self.no_repeat_ngram_size \
            and not self.counts_tokens()

    def counts_tokens(self):
        """True when the presence or frequency penalty needs the answer's token counts."""
        return bool(self.presence_penalty or self.frequency_penalty)


def apply_repetition_penalty(logits, seen, penalty):
    """CTRL-style penalty on every token the row's answer already holds (the prompt's tokens
    are not counted, unlike transformers' repetition_penalty: an answer that names the
    question's symptom is not a loop): positive logits are divided by it, negative ones
    multiplied, so a seen token always loses."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency(logits, counts, presence, frequency):
    """OpenAI's penalties over the answer's tokens: logit[j] -= count[j] * frequency
    + (count[j] > 0) * presence, where count[j] is how often token j is in the answer so far
    (negative values encourage repeats). counts: (1, V) floats."""
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


class NgramBlocker:
    """The n-token runs an answer holds, kept as {its first n-1 tokens: the tokens that came
    next}, so that the tokens to forbid at each step are one lookup away."""

    def __init__(self, n):
        self.n, self.tokens, self.next_of = n, [], {}

    def push(self, token):
        self.tokens.append(token)
        if len(self.tokens) >= self.n:
            self.next_of.setdefault(tuple(self.tokens[len(self.tokens) - self.n:-1]), set()).add(token)

    def banned(self):
        """Tokens that would make the answer repeat an n-token run it already holds."""
        if len(self.tokens) < self.n - 1:
            return []
        return sorted(self.next_of.get(tuple(self.tokens[len(self.tokens) - self.n + 1:]), ()))


def block_ngrams(logits, banned):
    """(1, V) logits with the banned tokens made impossible."""
    if not banned:
        return logits
    logits = logits.clone()
    logits[0, banned] = float("-inf")
    return logits


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
