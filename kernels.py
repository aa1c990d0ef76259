"""Hardware-specific speed code for model.py's plain Llama2, switched on by `speed_up(model,
device, dtype)`, which the training, evaluation and chat scripts call and whose one-line
description they print.

1. A memory-lean loss (LinearCrossEntropy). The plain loss builds the full logits, (B*T, V)
   in fp32: with ChatGLM2's 64793 ids and a batch of 8x512 that is 1 GB, plus as much again
   for their gradient. Here the rows go through in chunks; each chunk's logits are turned
   straight into the loss and into the gradient softmax - onehot, and only the gradients
   with respect to the hidden states and the head are kept. Backward then only scales them,
   so nothing is recomputed and the full logits never exist. Per device:
   - CUDA: the vocabulary is padded with zero rows to a multiple of 64 (cuBLAS picks its
     fast kernels only for aligned matrices; the padding is kept out of the softmax), and
     the softmax-gradient step is compiled into one fused kernel by torch.compile (Triton)
     instead of about eight passes over the chunk.
   - CPU: one fp32 logits buffer is reused for every chunk (a fresh chunk-sized tensor pays
     its page faults each time) and filled in vocabulary blocks that stay in cache, and the
     softmax-gradient runs in place on it.
2. oneDNN matmuls on CPU (OneDNNLinear). In fp32 on CPU, torch's F.linear calls the MKL
   sgemm, which on some CPUs (AMD's) takes a slow path; oneDNN, the library inductor uses
   for CPU linear layers, computes the same fp32 products faster. OneDNNLinear swaps in for
   the model's nn.Linear layers (same weights, same state_dict names) and carries its own
   backward: oneDNN for the products over the model width, torch's gemm for the weight
   gradients, which sum over all rows of the batch and read their operands transposed
   (oneDNN would copy them first). Anything else (GPU, autocast, torch.compile) falls back
   to F.linear.
"""
import functools
import importlib.util

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import IGNORE_INDEX


# ----------------------------------------------------------------------------- oneDNN matmuls

@functools.cache
def onednn_linear_op():
    """torch's oneDNN linear op, or None where this torch build lacks it."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None
    return op if torch.backends.mkldnn.is_available() else None


def onednn_applies(x, w):
    """oneDNN takes CPU fp32 products, eagerly: inductor cannot lower its op, and compiles the
    plain matmul into its own oneDNN call anyway."""
    return (not torch.compiler.is_compiling() and onednn_linear_op() is not None
            and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32)


def matmul_t(x, w, onednn=True):
    """x @ w.T, through oneDNN when asked and it applies (CPU fp32)."""
    if onednn and onednn_applies(x, w):
        return onednn_linear_op()(x, w, None, "none", [], "")
    return x @ w.t()


class _OneDNNMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return matmul_t(x, w)

    @staticmethod
    def backward(ctx, grad_y):
        x, w = ctx.saved_tensors
        grad_y2, x2 = grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = matmul_t(grad_y2, w.t()).view(x.shape)  # (.., out) @ (out, in)
        # (out, rows) @ (rows, in) sums over all rows: torch's gemm reads both transposed
        # operands in place, where oneDNN would copy them first
        grad_w = grad_y2.t() @ x2
        return grad_x, grad_w


class OneDNNLinear(nn.Linear):
    """A bias-free nn.Linear whose CPU fp32 products over the width, forward and backward, go
    through oneDNN."""

    def forward(self, x):
        if onednn_applies(x, self.weight) and not torch.is_autocast_enabled("cpu"):
            return _OneDNNMatmul.apply(x, self.weight) if torch.is_grad_enabled() else matmul_t(x, self.weight)
        return F.linear(x, self.weight)


def use_onednn_linears(model):
    """Swap every bias-free nn.Linear of model for a OneDNNLinear holding the same weight
    Parameter (so tied weights stay tied). Returns how many were swapped."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear and child.bias is None]
    for parent, name, child in swaps:
        fast = OneDNNLinear(child.in_features, child.out_features, bias=False, device="meta")
        fast.weight = child.weight
        setattr(parent, name, fast)
    return len(swaps)


# ----------------------------------------------------------------------------- the lean loss

def softmax_grad(logits, targets, vocab, with_grads):
    """A chunk's summed cross entropy from its logits (rows, padded V: columns from `vocab`
    on are padding) and, with_grads, d(sum)/d(logits) = softmax - onehot (0 on ignored
    rows) in the logits' dtype. Out of place, for torch.compile to fuse."""
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


def softmax_grad_in_place(logits, targets, vocab, with_grads):
    """softmax_grad computed in place on fp32 logits: a few passes and no second
    chunk-sized buffer."""
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
def compiled_softmax_grad():
    """softmax_grad compiled into one kernel, or None where torch has no Triton."""
    return torch.compile(softmax_grad) if importlib.util.find_spec("triton") else None


WHOLE_VOCABULARY = 1 << 31  # a vocab_block that spans any vocabulary: one matmul per chunk


class LinearCrossEntropy:
    """loss_fn(h, weight, targets) for Transformer: the mean cross entropy of h @ weight.T
    against targets (IGNORE_INDEX left out), never holding more than one chunk's logits.

    chunk_rows     rows of h per chunk
    vocab_multiple pad the vocabulary with zero rows to a multiple of this (1: no padding)
    fused          a softmax_grad(logits, targets, vocab, with_grads) that returns fresh
                   tensors (e.g. compiled); None: softmax_grad_in_place on a reused buffer
    vocab_block    without `fused`, the buffer is filled this many vocabulary rows at a time
    onednn         CPU fp32 matmuls through oneDNN
    traced         under torch.compile, trace the loss into the compiled graph (fused with
                   the step); False keeps it eager there, at the cost of one graph break
    """

    def __init__(self, chunk_rows=512, vocab_multiple=1, fused=None, vocab_block=4096, onednn=False, traced=False):
        self.chunk_rows, self.vocab_multiple, self.fused = chunk_rows, vocab_multiple, fused
        self.vocab_block, self.onednn, self.traced = vocab_block, onednn, traced

    @classmethod
    def for_device(cls, device, onednn):
        """Big chunks keep a GPU busy; small ones suit a CPU's caches."""
        if torch.device(device).type == "cuda":
            # without Triton, one matmul over the whole vocabulary per chunk keeps the GPU busy
            return cls(chunk_rows=8192, vocab_multiple=64, fused=compiled_softmax_grad(), vocab_block=WHOLE_VOCABULARY)
        return cls(chunk_rows=512, onednn=onednn)

    def describe(self):
        return (f"lean loss ({self.chunk_rows}-row chunks"
                + (f", vocabulary padded to x{self.vocab_multiple}" if self.vocab_multiple > 1 else "")
                + (", fused softmax kernel" if self.fused else
                   f", {self.vocab_block}-row vocabulary blocks" if self.vocab_block < WHOLE_VOCABULARY else "")
                + (", oneDNN" if self.onednn else "") + (", traced by torch.compile" if self.traced else "") + ")")

    def __call__(self, h, weight, targets):
        return (self.loss if self.traced else self.eager_loss)(h, weight, targets)

    # traced is off by default: traced, the loss equals eager in CPU fp32 and bf16
    # (tests/test_kernels.py), but its CUDA bf16 case, which that test runs where a GPU is
    # present, has not been seen to pass.
    @torch.compiler.disable
    def eager_loss(self, h, weight, targets):
        return self.loss(h, weight, targets)

    def loss(self, h, weight, targets):
        h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        n_valid = (targets != IGNORE_INDEX).sum().clamp(min=1)
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = _LinearCrossEntropyFn.apply(h, weight, targets, self)
        else:
            total = self.summed(h, weight, targets, with_grads=False)[0]
        return total / n_valid

    def summed(self, h, weight, targets, with_grads):
        """Summed cross entropy and, with_grads, its gradients w.r.t. h and weight. The
        matmuls run in the autocast dtype when autocast is on (else in h's dtype); the
        softmax in fp32."""
        device_type = h.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
        h, w = h.to(dtype), weight.to(dtype)
        vocab = w.shape[0]
        if vocab % self.vocab_multiple:
            w = torch.cat([w, w.new_zeros(-vocab % self.vocab_multiple, w.shape[1])])
        buffer = None if self.fused else torch.empty(min(self.chunk_rows, len(h)), w.shape[0],
                                                     dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if with_grads else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=h.device) if with_grads else None
        with torch.autocast(device_type, enabled=False):
            for start in range(0, len(h), self.chunk_rows):
                hc, tc = h[start:start + self.chunk_rows], targets[start:start + self.chunk_rows]
                chunk_loss, dlogits = self._chunk(hc, w, tc, vocab, buffer, with_grads)
                total += chunk_loss
                if with_grads:
                    grad_h[start:start + len(hc)] = matmul_t(dlogits, w.t(), self.onednn)
                    self._add_grad_w(grad_w, dlogits, hc)
        return total, grad_h, grad_w[:vocab] if with_grads else None

    def _chunk(self, hc, w, tc, vocab, buffer, with_grads):
        """One chunk's summed loss and its dlogits (rows, padded V) in hc's dtype."""
        if self.fused:
            return self.fused(matmul_t(hc, w, self.onednn), tc, vocab, with_grads)
        logits = buffer[:len(hc)]
        for j in range(0, w.shape[0], self.vocab_block):
            logits[:, j:j + self.vocab_block] = matmul_t(hc, w[j:j + self.vocab_block], self.onednn)
        loss, dlogits = softmax_grad_in_place(logits, tc, vocab, with_grads)
        return loss, dlogits.to(hc.dtype) if with_grads else None

    def _add_grad_w(self, grad_w, dlogits, hc):
        """grad_w += dlogits.T @ hc, accumulated in fp32 (torch's gemm, as OneDNNLinear's
        weight gradient)."""
        if dlogits.dtype == torch.float32:
            grad_w.addmm_(dlogits.t(), hc)
        else:
            grad_w += (dlogits.t() @ hc).float()


class _LinearCrossEntropyFn(torch.autograd.Function):
    """Forward computes the loss and both gradients; backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, h, weight, targets, loss):
        total, grad_h, grad_w = loss.summed(h, weight, targets, with_grads=True)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (grad_h * grad_output).to(h_dtype), (grad_w * grad_output).to(w_dtype), None, None


# ----------------------------------------------------------------------------- switching on

def speed_up(model, device, dtype=torch.float32, onednn=True):
    """Switch on what suits the device: the lean loss always; oneDNN linear layers on CPU in
    fp32 where this torch has the op (onednn=False keeps MKL). Returns what was switched on,
    in one line for the run's header."""
    device = torch.device(device)
    use_onednn = onednn and device.type == "cpu" and dtype == torch.float32 and onednn_linear_op() is not None
    model.loss_fn = LinearCrossEntropy.for_device(device, use_onednn)
    parts = [model.loss_fn.describe()]
    if use_onednn:
        parts.append(f"{use_onednn_linears(model)} linear layers through oneDNN")
    return "; ".join(parts)
