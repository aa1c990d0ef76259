"""A plain-PyTorch Llama2: RMSNorm, rotary positions, grouped-query attention through
F.scaled_dot_product_attention, SwiGLU, tied embeddings, and a KV cache for generation.

Weight names follow llama2.c; rotary embeddings use the rotate-half layout of Hugging Face's
Llama so that export.py copies weights without permuting them.
"""
import functools
import importlib.util
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
    vocab_size: int = 64793
    multiple_of: int = 32  # SwiGLU hidden size is rounded up to a multiple of this
    hidden_dim: Optional[int] = None  # None: Llama's rule, 2/3 of 4*dim, rounded up
    norm_eps: float = 1e-5
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    dropout: float = 0.0
    tie_embeddings: bool = True
    qk_norm: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim} must divide by n_heads {self.n_heads}, "
                             f"and n_heads by n_kv_heads {self.n_kv_heads}")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = cls.__dataclass_fields__
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**d)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim, max_positions, theta):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_positions).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: (pos, head_dim)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """x: (B, H, T, D); cos/sin: (B or 1, 1, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class KVCache:
    """Per-layer key/value buffers of shape (B, n_kv_heads, max_len, head_dim).
    `length` is how many positions are filled; every row of the batch shares it (rows of
    different prompt lengths are left-padded and masked, see Transformer.generate)."""

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
    """(B, vocab) fp32 logits -> (B,) token ids. temperature 0 is greedy (argmax);
    otherwise sample from the temperature-scaled distribution cut to the top_k tokens and to
    the smallest set whose probability reaches top_p."""
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


# oneDNN's fp32 matmul (what torch.compile's inductor calls for CPU linear layers) runs 1.6-2.8x
# faster than the MKL sgemm behind F.linear on some CPUs (AMD's, where MKL takes a slower
# path), in full fp32 precision. On CPU in fp32 every matmul of the model goes through it when
# this torch has it: the linear layers (training and generation) and the loss.
def _find_onednn_linear():
    try:
        op = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None
    return op if torch.backends.mkldnn.is_available() else None


_ONEDNN_LINEAR = _find_onednn_linear()
CPU_VOCAB_BLOCK = 4096  # the loss's CPU matmul outputs of (rows, 4096) stay in cache


def _onednn_applies(x, w):
    return _ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32


def _matmul_t(x, w):
    """x @ w.T, through oneDNN for CPU fp32 where available."""
    if _onednn_applies(x, w):
        return _ONEDNN_LINEAR(x, w, None, "none", [], "")
    return x @ w.t()


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return _matmul_t(x, w)

    @staticmethod
    def backward(ctx, grad_y):
        x, w = ctx.saved_tensors
        grad_y2, x2 = grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = _matmul_t(grad_y2, w.t()).view(x.shape)
        grad_w = _matmul_t(grad_y2.t().contiguous(), x2.t().contiguous())
        return grad_x, grad_w


class Linear(nn.Linear):
    """A bias-free nn.Linear whose CPU fp32 matmuls go through oneDNN (see above); anything
    else (GPU, autocast, torch.compile) takes F.linear."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        if _onednn_applies(x, self.weight) and not torch.is_autocast_enabled("cpu") \
                and not torch.compiler.is_compiling():
            return _OneDNNLinear.apply(x, self.weight) if torch.is_grad_enabled() else _matmul_t(x, self.weight)
        return F.linear(x, self.weight)


class Attention(nn.Module):
    def __init__(self, args, layer_id):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = Linear(args.dim, args.n_heads * self.head_dim)
        self.wk = Linear(args.dim, args.n_kv_heads * self.head_dim)
        self.wv = Linear(args.dim, args.n_kv_heads * self.head_dim)
        self.wo = Linear(args.n_heads * self.head_dim, args.dim)
        self.q_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)
        # With no explicit mask and no cache prefix, plain causal attention.
        is_causal = attn_mask is None and k.shape[2] == T
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.w1 = Linear(args.dim, args.hidden_dim)
        self.w2 = Linear(args.hidden_dim, args.dim)
        self.w3 = Linear(args.dim, args.hidden_dim)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args, layer_id):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, attn_mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
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
        n = sum(p.numel() for p in self.parameters())  # parameters() already yields shared ones once
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

    def rope(self, positions):
        """cos/sin for integer positions of shape (T,) or (B, T), broadcast over heads."""
        if int(positions.max()) >= self.args.max_seq_len:
            raise ValueError(f"position {int(positions.max())} >= max_seq_len {self.args.max_seq_len}")
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        if positions.dim() == 1:
            return cos[None, None], sin[None, None]
        return cos[:, None], sin[:, None]

    def hidden_states(self, tokens, positions=None, cache=None, attn_mask=None):
        B, T = tokens.shape
        if positions is None:  # consecutive positions: slice the tables (no device sync, compile-friendly)
            start = cache.length if cache is not None else 0
            if start + T > self.args.max_seq_len:
                raise ValueError(f"position {start + T - 1} >= max_seq_len {self.args.max_seq_len}")
            cos, sin = self.rope_cos[None, None, start:start + T], self.rope_sin[None, None, start:start + T]
        else:
            cos, sin = self.rope(positions)
        h = self.dropout(self.tok_embeddings(tokens))
        for layer in self.layers:
            h = layer(h, cos, sin, cache, attn_mask)
        if cache is not None:
            cache.length += T
        return self.norm(h)

    def forward(self, tokens, targets=None, positions=None, cache=None, attn_mask=None):
        """With targets: returns the mean cross entropy over targets != IGNORE_INDEX, computed
        without materializing the full logits. Without: returns the last position's logits
        (B, vocab) in fp32, which is all generation needs."""
        h = self.hidden_states(tokens, positions, cache, attn_mask)
        if targets is not None:
            return chunked_cross_entropy(h, self.output.weight, targets)
        return self.output(h[:, -1, :]).float()

    def logits(self, tokens):
        """Full (B, T, vocab) fp32 logits; for tests, perplexity and export checks."""
        return self.output(self.hidden_states(tokens)).float()

    @torch.inference_mode()
    def generate_stream(self, prompts, max_new_tokens, eos_id=None, pad_id=0, temperature=0.0,
                        top_k=None, top_p=None, repetition_penalty=1.0, generator=None):
        """Decode a batch of prompts (lists of ids, any lengths) with the KV cache: the prompts
        run once, then one token per step. Yields per step a list with each row's new token id,
        or None for a row that has ended; a row ends at eos_id (not yielded). Generation stops
        when every row has ended, after max_new_tokens, or when prompt + output reach
        max_seq_len, whichever comes first.

        Rows are left-padded to the longest prompt; each row's positions start at 0 at its own
        first token and a mask hides the padded keys, so a row's tokens match decoding it alone."""
        if not prompts or min(len(p) for p in prompts) == 0:
            raise ValueError("generate needs at least one prompt and no empty prompt")
        if temperature < 0 or (top_k is not None and top_k < 1) or not (top_p is None or 0 < top_p <= 1) \
                or repetition_penalty <= 0:
            raise ValueError(f"bad sampling settings: temperature={temperature} (>= 0), top_k={top_k} (>= 1), "
                             f"top_p={top_p} (in (0, 1]), repetition_penalty={repetition_penalty} (> 0)")
        batch, prompt_len = len(prompts), max(len(p) for p in prompts)
        if prompt_len >= self.args.max_seq_len:
            raise ValueError(f"prompt of {prompt_len} tokens leaves no room to generate within "
                             f"max_seq_len {self.args.max_seq_len}")
        n_steps = min(max_new_tokens, self.args.max_seq_len - prompt_len)
        weight = self.tok_embeddings.weight
        device = weight.device

        tokens = torch.full((batch, prompt_len), pad_id, dtype=torch.long)
        for row, p in enumerate(prompts):
            tokens[row, prompt_len - len(p):] = torch.tensor(p, dtype=torch.long)
        tokens = tokens.to(device)
        n_pad = torch.tensor([prompt_len - len(p) for p in prompts], device=device)
        positions = (torch.arange(prompt_len, device=device)[None] - n_pad[:, None]).clamp(min=0)
        cache = KVCache(self.args, batch, prompt_len + n_steps, device, weight.dtype)

        key_ok, prefill_mask = None, None
        if n_pad.any():
            key_ok = torch.arange(prompt_len + n_steps, device=device)[None] >= n_pad[:, None]  # (B, S)
            causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=device).tril()
            # A pad query may see itself: a row with no allowed key would give NaN, and NaN
            # values poison later rows' sums even where the mask is 0.
            eye = torch.eye(prompt_len, dtype=torch.bool, device=device)
            prefill_mask = ((causal & key_ok[:, None, :prompt_len]) | eye)[:, None]  # (B, 1, T, S)

        seen = torch.zeros(batch, self.args.vocab_size, dtype=torch.bool, device=device)
        for row, p in enumerate(prompts):
            seen[row, torch.tensor(p, device=device)] = True

        logits = self(tokens, positions=positions, cache=cache, attn_mask=prefill_mask)
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
            step_mask = key_ok[:, None, None, :cache.length + 1] if key_ok is not None else None
            logits = self(new[:, None], positions=next_pos, cache=cache, attn_mask=step_mask)
            next_pos = next_pos + 1

    def generate(self, prompts, max_new_tokens, **sampling):
        """Like generate_stream, but returns each row's generated ids (without the eos)."""
        outputs = [[] for _ in prompts]
        for step_ids in self.generate_stream(prompts, max_new_tokens, **sampling):
            for out, t in zip(outputs, step_ids):
                if t is not None:
                    out.append(t)
        return outputs


# Kept out of torch.compile: traced, this hand-written forward+backward gave a wrong loss in
# CUDA bf16 training (fine eagerly, and compiled on CPU); eager, it costs one graph break.
@torch.compiler.disable
def chunked_cross_entropy(h, weight, targets, chunk_rows=None):
    """Mean cross entropy of (h @ weight.T) against targets, ignoring IGNORE_INDEX, without
    ever holding more than one chunk's (rows, vocab) logits. When gradients are wanted, the
    forward pass also computes them (softmax - onehot, chunk by chunk) and keeps only those,
    so backward is a multiply by the incoming gradient: no full logits and no recompute."""
    if chunk_rows is None:
        # Small chunks suit a CPU's caches; a GPU needs big ones to keep its kernels busy
        # (8192 rows of a 64793-id vocab are 2 GB of fp32 logits: still far from the full ones).
        chunk_rows = 8192 if h.is_cuda else 512
    h = h.reshape(-1, h.shape[-1])
    targets = targets.reshape(-1)
    n_valid = (targets != IGNORE_INDEX).sum().clamp(min=1)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        total = _LinearCrossEntropy.apply(h, weight, targets, chunk_rows)
    else:
        total = _linear_cross_entropy_sum(h, weight, targets, chunk_rows, with_grads=False)[0]
    return total / n_valid


def _vocab_multiple(h):
    """cuBLAS picks its fast kernels only for aligned rows: on GPU the loss pads the vocabulary
    (ChatGLM2's 64793) to a multiple of 64 with zero rows, kept out of the softmax."""
    return 64 if h.is_cuda else 1


def _softmax_grad(logits, targets, vocab, with_grads):
    """A chunk's summed cross entropy from its logits (rows, padded vocab: columns from `vocab`
    on are padding) and, with_grads, d(sum)/d(logits) = softmax - onehot (0 on ignored rows) in
    the logits' dtype. On GPU it runs compiled: one fused kernel instead of ~8 passes."""
    x = logits.float()
    col = torch.arange(x.shape[1], device=x.device)
    x = torch.where(col < vocab, x, float("-inf"))
    valid = targets != IGNORE_INDEX
    safe_t = targets.clamp(min=0)
    row_max = x.amax(dim=-1, keepdim=True)
    exps = (x - row_max).exp()
    sum_exp = exps.sum(dim=-1)
    loss = ((sum_exp.log() + row_max.squeeze(1) - x.gather(1, safe_t[:, None]).squeeze(1)) * valid).sum()
    if not with_grads:
        return loss, None
    dlogits = exps * (valid / sum_exp)[:, None]
    dlogits = torch.where(col == safe_t[:, None], dlogits - valid[:, None].float(), dlogits)
    return loss, dlogits.to(logits.dtype)


def _softmax_grad_in_place(logits, targets, vocab, with_grads):
    """_softmax_grad in place on fp32 logits: a few passes and no second chunk-sized buffer
    (eager, on CPU, where fresh large tensors cost page faults)."""
    logits[:, vocab:] = float("-inf")
    valid = targets != IGNORE_INDEX
    safe_t = targets.clamp(min=0)
    target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
    row_max = logits.amax(dim=-1, keepdim=True)
    exps = logits.sub_(row_max).exp_()
    sum_exp = exps.sum(dim=-1)
    loss = ((sum_exp.log() + row_max.squeeze(1) - target_logit) * valid).sum()
    if not with_grads:
        return loss, None
    dlogits = exps.mul_((valid / sum_exp)[:, None])
    dlogits[torch.arange(len(targets), device=logits.device), safe_t] -= valid.float()
    return loss, dlogits


@functools.cache
def _compiled_softmax_grad():
    return torch.compile(_softmax_grad) if importlib.util.find_spec("triton") else None


def _fused_softmax_grad(h):
    """_softmax_grad compiled, on GPU; None on CPU or where torch has no Triton to compile with."""
    return _compiled_softmax_grad() if h.is_cuda else None


def _linear_cross_entropy_sum(h, weight, targets, chunk_rows, with_grads):
    """Summed cross entropy and, optionally, its gradients w.r.t. h and weight. The matmuls
    run in the autocast dtype when autocast is on (else in h's dtype); softmax is in fp32."""
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    hc_all, w = h.to(dtype), weight.to(dtype)
    n_rows, vocab = hc_all.shape[0], w.shape[0]
    if vocab % _vocab_multiple(h):
        w = torch.cat([w, w.new_zeros(-vocab % _vocab_multiple(h), w.shape[1])])
    fused = _fused_softmax_grad(h)
    # Without the fused kernel, one fp32 logits buffer serves every chunk (on CPU a fresh 100+ MB
    # tensor per chunk would cost its page faults each time), filled by vocabulary blocks on CPU.
    block = w.shape[0] if h.is_cuda else CPU_VOCAB_BLOCK
    logits_buf = None if fused else torch.empty(min(chunk_rows, n_rows), w.shape[0], dtype=torch.float32,
                                                 device=h.device)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(hc_all) if with_grads else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=h.device) if with_grads else None
    with torch.autocast(device_type, enabled=False):
        for start in range(0, n_rows, chunk_rows):
            hc, tc = hc_all[start:start + chunk_rows], targets[start:start + chunk_rows]
            if fused:
                chunk_loss, dlogits = fused(_matmul_t(hc, w), tc, vocab, with_grads)
            else:
                logits = logits_buf[:len(hc)]
                for j in range(0, w.shape[0], block):
                    logits[:, j:j + block] = _matmul_t(hc, w[j:j + block])
                chunk_loss, dlogits = _softmax_grad_in_place(logits, tc, vocab, with_grads)
                dlogits = dlogits.to(dtype) if with_grads else None
            total += chunk_loss
            if not with_grads:
                continue
            grad_h[start:start + chunk_rows] = _matmul_t(dlogits, w.t())
            if _onednn_applies(dlogits, hc):  # grad_w rows block by block: (block, rows) @ (rows, dim)
                hc_t = hc.t().contiguous()
                for j in range(0, vocab, block):
                    grad_w[j:j + block] += _matmul_t(dlogits[:, j:j + block].t().contiguous(), hc_t)
            elif dtype == torch.float32:
                grad_w.addmm_(dlogits.t(), hc)
            else:
                grad_w += (dlogits.t() @ hc).float()
    return total, grad_h, grad_w[:vocab] if with_grads else None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows):
        total, grad_h, grad_w = _linear_cross_entropy_sum(h, weight, targets, chunk_rows, with_grads=True)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (grad_h * grad_output).to(h_dtype), (grad_w * grad_output).to(w_dtype), None, None
