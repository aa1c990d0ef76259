"""Pretraining-step throughput with Muon beside AdamW, in one run.

A step is what pretrain.py does per optimizer step: forward and backward (with kernels.speed_up)
and the optimizers' update; only the optimizer differs between the variants:
  adamw         AdamW on everything (upstream's recipe)
  muon          muon.Muon on the hidden matrices (Newton-Schulz in the dtype the hardware
                computes natively, as pretrain.py chooses it) + AdamW on the rest
  muon_fp32     the same, Newton-Schulz forced to fp32
  muon_bf16     the same, Newton-Schulz forced to bf16
  torch_muon    torch.optim.Muon (matrix by matrix, always bf16) + AdamW on the rest

    python bench/bench_optim.py                       # the demo's model on CPU (dim 128, 4 layers, seq 256, vocab 4096)
    python bench/bench_optim.py --device cuda --dim 512 --n-layers 8 --n-heads 8 --seq-len 512 \\
        --vocab-size 64793 --compile                  # upstream's model on a GPU, bf16 autocast

The variants run in alternating rounds and each reports its fastest step, so a busy machine's
noise falls on all alike. Random token ids: the step's cost does not depend on the text.
Target: muon's tokens/s >= 0.93x adamw's on a 2-core CPU, >= 0.9x on a GPU.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import kernels  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from muon import newton_schulz_dtype  # noqa: E402
from optimizers import build_optimizers  # noqa: E402
from train_flags import TRAIN_DEFAULTS  # noqa: E402

VARIANTS = ("adamw", "muon", "muon_fp32", "muon_bf16", "torch_muon")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--dim", type=int, default=128, help="model width")
    p.add_argument("--n-layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--n-heads", type=int, default=4, help="attention heads")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary (the demo's own: 4096; ChatGLM2: 64793)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of all variants")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (the optimizers stay eager)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="variants to time")
    return p.parse_args()


def optimizers_for(variant, model, device):
    """The variant's optimizers, built by optimizers.build_optimizers as pretrain.py builds them;
    for torch_muon, its Muon is swapped for torch.optim.Muon on the same matrices."""
    muon_dtype = {"muon_fp32": "float32", "muon_bf16": "bfloat16"}.get(variant, "auto")
    cfg = argparse.Namespace(**{**TRAIN_DEFAULTS, "optimizer": "adamw" if variant == "adamw" else "muon",
                                "muon_dtype": muon_dtype})
    optimizers = build_optimizers(cfg, model, device)
    if variant == "torch_muon":
        optimizers[1] = torch.optim.Muon(optimizers[1].param_groups[0]["params"], lr=cfg.muon_lr,
                                         momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay)
    return optimizers


class Variant:
    """One variant's model, optimizers and a fixed batch; step() runs one timed training step."""

    def __init__(self, name, cfg, device):
        torch.manual_seed(0)
        model_args = ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, vocab_size=cfg.vocab_size,
                               max_seq_len=cfg.seq_len)
        self.name, self.device = name, device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = Transformer(model_args).to(device)
        self.speed = kernels.speed_up(self.model, device, self.dtype)
        self.step_model = torch.compile(self.model) if cfg.compile else self.model
        self.optimizers = optimizers_for(name, self.model, device)
        self.x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len), device=device)
        self.y = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len), device=device)
        self.times, self.opt_times = [], []

    def step(self):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss = self.step_model(self.x, self.y)
        loss.backward()
        sync()
        t1 = time.perf_counter()
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        t2 = time.perf_counter()
        self.times.append(t2 - t0)
        self.opt_times.append(t2 - t1)


def main():
    cfg = parse_args()
    device = torch.device(cfg.device)
    variants = [Variant(name, cfg, device) for name in cfg.variants]
    print(f"model: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, vocab {cfg.vocab_size}, "
          f"batch {cfg.batch_size} x seq {cfg.seq_len}, {device}, {torch.get_num_threads()} threads"
          f"{', compiled' if cfg.compile else ''}; {variants[0].speed}")
    print(f"Newton-Schulz dtype chosen for {device} (muon): {str(newton_schulz_dtype(device)).removeprefix('torch.')}")
    for v in variants:  # warm-up: allocator, compile, optimizer state
        v.step()
        v.times.clear()
        v.opt_times.clear()
    for _ in range(cfg.rounds):
        for v in variants:
            for _ in range(cfg.steps):
                v.step()
    tokens = cfg.batch_size * cfg.seq_len
    base = tokens / min(variants[0].times) if cfg.variants[0] == "adamw" else None
    print(f"\n{'variant':<12}{'tokens/s':>10}{'s/step':>9}{'optimizer s':>13}{'x adamw':>9}")
    for v in variants:
        tok_s = tokens / min(v.times)
        ratio = f"{tok_s / base:.3f}" if base else "-"
        print(f"{v.name:<12}{tok_s:>10,.0f}{min(v.times):>9.3f}{min(v.opt_times):>13.4f}{ratio:>9}")
    if base and "muon" in cfg.variants:
        target = 0.9 if device.type == "cuda" else 0.93
        muon = next(v for v in variants if v.name == "muon")
        ratio = tokens / min(muon.times) / base
        print(f"\nmuon / adamw tokens/s: {ratio:.3f}x (target >= {target}x): {'met' if ratio >= target else 'NOT met'}")


if __name__ == "__main__":
    main()
