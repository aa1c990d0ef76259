"""The optimizers of a training run and their learning-rate schedule.

    optimizers = build_optimizers(cfg, model, device)    # [AdamW] or [AdamW, Muon]
    lr = group["peak_lr"] * lr_multiplier(step, warmup, total_steps, cfg.min_lr / cfg.lr)

--optimizer adamw: AdamW on every parameter, with weight decay on the >= 2-D weights only.
--optimizer muon: Muon (muon.py) on the hidden matrices (attention and MLP weights), AdamW on
the embeddings, the head and the norms. Every parameter group records its peak rate as
"peak_lr"; the schedule (linear warmup, then cosine decay to --min-lr) scales it each step.
"""
import math

import torch

from muon import Muon, newton_schulz_dtype


def lr_multiplier(step, warmup_steps, total_steps, min_ratio):
    """Linear warmup to 1, then cosine decay to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * progress))


def is_hidden_matrix(name, p):
    """The attention and MLP weight matrices (Muon's domain): not embeddings, head or norms."""
    return p.dim() == 2 and name.startswith("layers.")


def build_optimizers(cfg, model, device):
    """AdamW (decay on >= 2-D weights only), or Muon (muon.py) on hidden matrices plus AdamW on
    the rest."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = [p for n, p in params if cfg.optimizer == "muon" and is_hidden_matrix(n, p)]
    muon_ids = {id(p) for p in muon}
    rest = [(n, p) for n, p in params if id(p) not in muon_ids]
    groups = [{"params": [p for _, p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    optimizers = [adamw]
    if muon:
        ns_dtype = newton_schulz_dtype(device) if cfg.muon_dtype == "auto" else getattr(torch, cfg.muon_dtype)
        optimizers.append(Muon(muon, lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay,
                               ns_dtype=ns_dtype))
    for opt in optimizers:
        for group in opt.param_groups:
            group["peak_lr"] = group["lr"]
    return optimizers


def describe_optimizers(optimizers):
    """One line for the run's header: which optimizer has how many tensors, Muon's dtype."""
    parts = []
    for opt in optimizers:
        n = sum(len(g["params"]) for g in opt.param_groups)
        extra = f", Newton-Schulz in {str(opt.ns_dtype).removeprefix('torch.')}" if isinstance(opt, Muon) else ""
        parts.append(f"{type(opt).__name__} on {n} tensors{extra}")
    return "; ".join(parts)

