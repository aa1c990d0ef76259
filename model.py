"""A plain-PyTorch Llama2, read top to bottom: config, RMSNorm, rotary positions, attention,
SwiGLU MLP, block, transformer.

Shapes: B batch, T positions, D model width (dim), H query heads, K key/value heads,
Dh = D / H per head, V vocabulary.

Weight names follow llama2.c; rotary embeddings use the rotate-half layout of Hugging Face's
Llama, so export.py copies the weights without permuting them. Hardware-specific speed-ups
(a loss that never holds the full logits, oneDNN matmuls on CPU) live in kernels.py and are
switched on by the scripts; generation (KV cache, sampling) lives in engine.py, batch.py and sampling.py.
"""
import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value that never counts in the loss (padding, masked prompts)


@dataclass
class ModelArgs:
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: Optional[int] = None  # None: as many as n_heads (plain multi-head attention)
    vocab_size: int = 64793  # ChatGLM2's tokenizer
    multiple_of: int = 32  # SwiGLU hidden size is rounded up to a multiple of this
    hidden_dim: Optional[int] = None  # None: Llama's rule, 2/3 of 4*dim, rounded up
    norm_eps: float = 1e-5
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    dropout: float = 0.0
    tie_embeddings: bool = True  # the output head shares the embedding matrix
    qk_norm: bool = False  # RMS-normalize queries and keys per head

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "max_seq_len", "multiple_of", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be at least 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout {self.dropout} must be in [0, 1)")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim} must divide by n_heads {self.n_heads}, "
                             f"and n_heads by n_kv_heads {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:  # rotary embeddings turn pairs of dimensions
            raise ValueError(f"the head size dim / n_heads = {self.dim // self.n_heads} must be even")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**d)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (rms: root mean square over the last dim)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim, max_positions, theta):
    """cos and sin of every position's rotation angles, each (max_positions, Dh): pair i of a
    head turns by position * theta^(-2i/Dh)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_positions).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: dims i and i + Dh/2 form a pair
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, H, T, Dh) by the angles in cos/sin (B or 1, 1, T, Dh)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    """Causal grouped-query self-attention: H query heads share K key/value heads."""

    def __init__(self, args, layer_id):
        super().__init__()
        self.layer_id = layer_id  # which of the KV cache's layers is ours
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, Dh)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, Dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # generation: append to the cached keys/values, attend to all of them
            k, v = cache.update(self.layer_id, k, v)  # (B, K, S, Dh), S = cached + T
        # Without an explicit mask or a cached prefix, attention is plain causal.
        is_causal = attn_mask is None and k.shape[2] == T
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then + feed_forward(norm(x))."""

    def __init__(self, args, layer_id):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, attn_mask)
        return x + self.feed_forward(self.ffn_norm(x))


def cross_entropy(h, weight, targets):
    """Mean cross entropy of the logits h @ weight.T (B, T, V) against targets (B, T),
    leaving out IGNORE_INDEX. The plain version: it holds the full fp32 logits, which for
    a 64793-id vocabulary is most of training's memory; kernels.py has a lean one."""
    logits = F.linear(h, weight).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def per_token_cross_entropy(h, weight, targets):
    """Each target's cross entropy (B, T) under the logits h @ weight.T, 0 at IGNORE_INDEX."""
    logits = F.linear(h, weight).float()
    losses = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                             reduction="none")
    return losses.view(targets.shape)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # loss_fn(h, head_weight, targets) -> mean loss; kernels.py may swap in a leaner one.
        self.loss_fn = cross_entropy
        cos, sin = rope_tables(args.dim // args.n_heads, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # Residual projections get a smaller init so the residual stream does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, exclude_embeddings=False):
        """Unique parameters: a tied embedding/output matrix counts once."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared one once
        return n - self.tok_embeddings.weight.numel() if exclude_embeddings else n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward = 3x forward), PaLM-style: 6 per
        matmul weight, plus attention's score and value products."""
        a, T = self.args, seq_len or self.args.max_seq_len
        matmul_params = sum(p.numel() for n, p in self.named_parameters()
                            if p.dim() == 2 and not n.startswith("tok_embeddings"))
        if a.tie_embeddings:
            matmul_params += self.output.weight.numel()  # the head still multiplies
        return 6 * matmul_params + 12 * a.n_layers * a.dim * T

    def rope(self, T, positions=None, start=0):
        """cos/sin for T consecutive positions from `start` (1, 1, T, Dh), or for explicit
        integer positions (B, T) -> (B, 1, T, Dh)."""
        last = start + T - 1 if positions is None else int(positions.max())
        if last >= self.args.max_seq_len:
            raise ValueError(f"position {last} >= max_seq_len {self.args.max_seq_len}")
        if positions is None:  # a slice: no device sync, friendly to torch.compile
            return self.rope_cos[None, None, start:start + T], self.rope_sin[None, None, start:start + T]
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]

    def hidden_states(self, tokens, positions=None, cache=None, attn_mask=None):
        """Token ids (B, T) -> final normalized hidden states (B, T, D)."""
        T = tokens.shape[1]
        cos, sin = self.rope(T, positions, start=cache.length if cache is not None else 0)
        h = self.dropout(self.tok_embeddings(tokens))  # (B, T, D)
        for layer in self.layers:
            h = layer(h, cos, sin, cache, attn_mask)
        if cache is not None:
            cache.length += T
        return self.norm(h)

    def forward(self, tokens, targets=None, positions=None, cache=None, attn_mask=None, per_token=False):
        """With targets (B, T): the mean cross entropy over targets != IGNORE_INDEX, or with
        per_token each target's cross entropy (B, T), 0 at IGNORE_INDEX (DPO sums them per answer).
        Without: the last position's logits (B, V) in fp32, all that generation needs."""
        h = self.hidden_states(tokens, positions, cache, attn_mask)
        if targets is not None and per_token:
            return per_token_cross_entropy(h, self.output.weight, targets)
        if targets is not None:
            return self.loss_fn(h, self.output.weight, targets)
        return self.output(h[:, -1, :]).float()

    def logits(self, tokens):
        """Full (B, T, V) fp32 logits; for tests, perplexity and export checks."""
        return self.output(self.hidden_states(tokens)).float()
