"""Training-step throughput and peak memory of our model beside a plain reference, in one run.

    python bench/bench_train.py                      # default config, batch 8, seq 512, CPU fp32
    python bench/bench_train.py --device cuda         # bf16 autocast on a GPU, reports MFU
    python bench/bench_train.py --compile             # torch.compile ours (the reference stays eager)
    python bench/bench_train.py --compile --compile-loss  # ... with the loss traced into the graph too

On a shared or busy machine, step times swing widely; the variants run in alternating
rounds and each reports its fastest step (the least disturbed one).

The reference is the model as upstream wrote it: attention as an explicit softmax over
the full (T, T) score matrix and the loss as F.cross_entropy over the full fp32 (B, T, vocab)
logits. Ours is model.py with kernels.speed_up: the loss chunk by chunk without the full
logits. Both share the linear layers (on CPU in fp32 their matmuls go through oneDNN, see
kernels.OneDNNLinear, the reference's head and logits too), so the two differ in attention
and loss only. Each variant runs in a fresh subprocess, so its peak memory (ru_maxrss on CPU,
max_memory_allocated on CUDA) is its own. Random token ids: throughput does not depend on
the text.
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import kernels  # noqa: E402
import model as model_module  # noqa: E402
from model import IGNORE_INDEX, ModelArgs, Transformer  # noqa: E402
from trainer import guess_peak_flops  # noqa: E402

VARIANTS = ("reference", "ours")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--dim", type=int, default=512, help="model width")
    p.add_argument("--n-layers", type=int, default=8, help="transformer blocks")
    p.add_argument("--n-heads", type=int, default=8, help="attention heads")
    p.add_argument("--vocab-size", type=int, default=64793, help="vocabulary (ChatGLM2: 64793)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per variant and round")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of reference and ours")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, compile)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="autocast dtype; auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile our model; the reference stays eager, as upstream ran")
    p.add_argument("--compile-loss", action="store_true", help="with --compile, trace our loss into the compiled graph too")
    p.add_argument("--no-onednn", action="store_true", help="CPU matmuls of both variants through MKL, not oneDNN")
    p.add_argument("--peak-flops", type=float, default=0.0, help="device peak FLOP/s for MFU (0: guess from the GPU name)")
    p.add_argument("--variant", choices=VARIANTS, default=None, help="(internal) run one variant and print JSON")
    cfg = p.parse_args()
    if cfg.compile_loss and not cfg.compile:
        p.error("--compile-loss needs --compile")
    return cfg


def manual_attention_forward(self, x, cos, sin, cache=None, attn_mask=None):
    """Upstream's attention: materialized scores, mask, softmax, dropout, then values."""
    B, T, _ = x.shape
    q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
    k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
    v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
    q, k = model_module.apply_rope(q, cos, sin), model_module.apply_rope(k, cos, sin)
    rep = self.n_heads // self.n_kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
    scores = scores + torch.full((T, T), float("-inf"), device=x.device).triu(1)
    probs = F.dropout(scores.float().softmax(-1).type_as(q), self.dropout, self.training)
    y = (probs @ v).transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
    return self.resid_dropout(self.wo(y))


class ReferenceTransformer(Transformer):
    def forward(self, tokens, targets):
        logits = self.output(self.hidden_states(tokens)).float()  # the full (B, T, vocab) fp32 logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=IGNORE_INDEX)


def run_variant(cfg):
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model_args = ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, vocab_size=cfg.vocab_size,
                           max_seq_len=cfg.seq_len)
    torch.manual_seed(0)
    if cfg.variant == "reference":
        model_module.Attention.forward = manual_attention_forward
        model = ReferenceTransformer(model_args).to(device)
        if device.type == "cpu" and dtype == "float32" and not cfg.no_onednn:
            kernels.use_onednn_linears(model)
    else:
        model = Transformer(model_args).to(device)
        kernels.speed_up(model, device, getattr(torch, dtype), onednn=not cfg.no_onednn)
        model.loss_fn.traced = cfg.compile_loss
        print(f"ours: {model.loss_fn.describe()}", file=sys.stderr)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if cfg.compile and cfg.variant == "ours" else model
    x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len), device=device)
    y = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len), device=device)

    def step():
        with torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=dtype != "float32"):
            loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(cfg.warmup):
        step().item()
    step_seconds = []
    for _ in range(cfg.steps):
        t0 = time.perf_counter()
        loss = step().item()  # waits for the step to finish (GPU too)
        step_seconds.append(time.perf_counter() - t0)
    seconds = min(step_seconds)
    tok_per_s = cfg.batch_size * cfg.seq_len / seconds
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"variant": cfg.variant, "device": str(device), "dtype": dtype, "step_s": seconds,
              "tokens_per_s": tok_per_s, "peak_mem_mb": peak_mb, "loss": loss,
              "params_m": model.num_params() / 1e6}
    peak = cfg.peak_flops or (guess_peak_flops(device) if device.type == "cuda" else 0.0)
    if peak:
        result["mfu"] = model.flops_per_token(cfg.seq_len) * tok_per_s / peak
    print(json.dumps(result))


def main():
    cfg = parse_args()
    if cfg.variant:
        return run_variant(cfg)
    runs = {v: [] for v in VARIANTS}
    for r in range(cfg.rounds):
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
            runs[variant].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1} {variant}: {runs[variant][-1]['step_s']:.2f} s/step, "
                  f"{runs[variant][-1]['peak_mem_mb']:,.0f} MB peak", flush=True)
    # Fastest step for speed; the largest peak for memory.
    ref, ours = ({**min(runs[v], key=lambda r: r["step_s"]), "peak_mem_mb": max(r["peak_mem_mb"] for r in runs[v])}
                 for v in VARIANTS)
    print(f"\nconfig: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, vocab {cfg.vocab_size}, "
          f"batch {cfg.batch_size} x seq {cfg.seq_len}, {ours['device']} {ours['dtype']}"
          f"{', ours compiled' if cfg.compile else ''}{' with its loss' if cfg.compile_loss else ''}{', no oneDNN' if cfg.no_onednn else ''}, {torch.get_num_threads()} threads, best of {cfg.rounds} rounds "
          f"x {cfg.steps} timed steps")
    print(f"{'variant':<10} {'tokens/s':>10} {'s/step':>8} {'peak MB':>9} {'MFU':>6}  loss")
    for r in (ref, ours):
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        print(f"{r['variant']:<10} {r['tokens_per_s']:>10,.0f} {r['step_s']:>8.2f} {r['peak_mem_mb']:>9,.0f} {mfu:>6}  {r['loss']:.4f}")
    speed, memory = ours["tokens_per_s"] / ref["tokens_per_s"], ours["peak_mem_mb"] / ref["peak_mem_mb"]
    print(f"ours / reference: tokens/s {speed:.2f}x (target >= 1.2x), peak memory {memory:.2f}x (target <= 0.6x)")
    if "mfu" not in ours and ours["device"] != "cpu":
        print("MFU: pass --peak-flops for this GPU")


if __name__ == "__main__":
    main()
