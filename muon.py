"""Muon (MomentUm Orthogonalized by Newton-Schulz) for the hidden weight matrices, computed
batched, in the dtype the hardware is fast at, and split across DDP ranks.

The update is torch.optim.Muon's, for a matrix W with gradient G and momentum buffer B:

    B <- mu * B + (1 - mu) * G                 momentum (an exponential average)
    U <- (1 - mu) * G + mu * B                 Nesterov: look one step further along B
    O <- NewtonSchulz(U)                       ~ U's nearest orthogonal matrix (all singular values ~1)
    W <- W * (1 - lr * weight_decay)           decoupled weight decay
    W <- W - lr * sqrt(max(1, rows / cols)) * O

Orthogonalizing makes every direction of the update move by about the same amount, so the
rare directions of the gradient are not drowned by the dominant ones. The Newton-Schulz
iteration gets there with matmuls only: five steps of the quintic X <- aX + (bA + cA^2)X,
A = X X^T, after scaling X to norm 1.

How this module computes it (the result is the same update as torch.optim.Muon's):
- Batched by shape. The matrices of one shape (all layers' wq, all layers' w1, ...) are
  stacked into one (N, rows, cols) tensor and orthogonalized by one chain of batched matmuls,
  instead of N chains of small matmuls that each pay a kernel launch (GPU) or a thread
  hand-off (CPU).
- Dtype by hardware. The iteration tolerates bf16, which halves its cost where bf16 matmuls
  run natively (CUDA, CPUs with AVX512-BF16 or AMX); elsewhere a CPU emulates bf16 several
  times slower than fp32, so there it runs in fp32. `newton_schulz_dtype(device)` decides.
- Split across DDP ranks. Every rank holds the same gradients after DDP's all-reduce, so
  each orthogonalizes only its share of each stack and an all-gather hands every rank the
  whole result: the work per GPU falls as GPUs are added.

The optimizer state (a "momentum_buffer" per matrix) and the param-group settings are named
as in torch.optim.Muon, so checkpoints keep their layout.
"""
import math
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's quintic
NS_STEPS = 5
EPS = 1e-7


def cpu_has_native_bf16():
    """Whether the CPU kernels torch will run compute bf16 matmuls in hardware: the CPU has
    AVX512-BF16 or AMX (Linux CPU flags), and torch dispatches to its AVX-512 kernels.
    torch.backends.cpu.get_cpu_capability() honours ATEN_CPU_CAPABILITY, so a machine told
    `ATEN_CPU_CAPABILITY=avx2` is treated as the AVX2-only CPU it stands in for."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def newton_schulz_dtype(device):
    """bf16 where the hardware computes it natively, else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32


def newton_schulz(G, steps=NS_STEPS, coefficients=NS_COEFFICIENTS, eps=EPS, dtype=torch.bfloat16):
    """Orthogonalize each matrix of G (N, rows, cols) in `dtype`; returns that dtype."""
    a, b, c = coefficients
    X = G.to(dtype)
    wide = X.shape[-2] <= X.shape[-1]
    if not wide:  # iterate on the smaller Gram matrix X X^T
        X = X.transpose(-2, -1)
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        A = X @ X.transpose(-2, -1)  # (N, r, r), r = min(rows, cols)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    return X if wide else X.transpose(-2, -1)


class Muon(torch.optim.Optimizer):
    """Muon(params, lr, weight_decay, momentum, nesterov, ns_dtype=None, ...): 2-D
    parameters only. ns_dtype: the Newton-Schulz dtype (None: newton_schulz_dtype of the
    parameters' device). Under torch.distributed each rank orthogonalizes its share."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=NS_COEFFICIENTS, eps=EPS, ns_steps=NS_STEPS, ns_dtype=None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=None)
        super().__init__(params, defaults)
        shapes = [p.shape for group in self.param_groups for p in group["params"]]
        if any(len(s) != 2 for s in shapes):
            raise ValueError(f"Muon takes 2-D parameters only, got shapes {sorted(set(map(tuple, shapes)))}")
        first = self.param_groups[0]["params"][0]
        self.ns_dtype = ns_dtype or newton_schulz_dtype(first.device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_shape = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[p.shape].append(p)
            for params in by_shape.values():
                self._update(group, params)
        return loss

    def _update(self, group, params):
        """One step for matrices of one shape: momentum, orthogonalization, decay, update."""
        mu = group["momentum"]
        updates = []
        for p in params:
            buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            buf.lerp_(p.grad, 1 - mu)
            updates.append(p.grad.lerp(buf, mu) if group["nesterov"] else buf)
        ortho = self._orthogonalize(torch.stack(updates), group)
        rows, cols = params[0].shape
        scale = group["lr"] * math.sqrt(max(1.0, rows / cols))
        for p, o in zip(params, ortho):
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(o.to(p.dtype), alpha=-scale)

    def _orthogonalize(self, U, group):
        """newton_schulz over the stack U (N, rows, cols); under DDP each rank takes every
        world_size-th matrix and the results are gathered."""
        settings = dict(steps=group["ns_steps"], coefficients=group["ns_coefficients"], eps=group["eps"],
                        dtype=self.ns_dtype)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world == 1 or len(U) == 1:
            return newton_schulz(U, **settings)
        n = len(U)
        padded = torch.cat([U, U.new_zeros(-n % world, *U.shape[1:])])  # every rank gets as many
        mine = newton_schulz(padded[dist.get_rank()::world], **settings).contiguous()
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        # gathered[r][i] is matrix i * world + r of the padded stack
        return torch.stack(gathered, dim=1).flatten(0, 1)[:n]
