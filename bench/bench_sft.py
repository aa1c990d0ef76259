"""SFT batching benchmark: padding share and real (non-padding) tokens/s of SFT training steps,
our batching (pad to the batch's longest, length-grouped) beside upstream's fixed 512-position
padding, measured in the same run with the steps of the two interleaved so that a busy machine
slows both alike.

    python bench/bench_sft.py                                   # upstream's model config (GPU-sized)
    python bench/bench_sft.py --dim 64 --n-layers 2 --n-heads 4 # a model small enough for a CPU

Targets: padding <= 25% of positions at batch 32; real tokens/s >= 2x fixed-512.
"""
import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import data_process  # noqa: E402
import kernels  # noqa: E402
from batches import epoch_batches  # noqa: E402
from chatglm_tokenizer import load_tokenizer  # noqa: E402
from dataset_sft import SFTDataset, collate_sft, length_grouped_batches  # noqa: E402
from model import IGNORE_INDEX, ModelArgs, Transformer  # noqa: E402

# ----------------------------------------------------------------------------- defaults
data_dir = ROOT / "../shared/data/sft"
tokenizer_path = ROOT / "../shared/data/tokenizer/chatglm2/tokenizer.model"
batch_size = 32
max_seq_len = 512
steps = 6  # timed steps per method
dim, n_layers, n_heads = 512, 8, 8  # upstream's model
learning_rate = 1e-4
seed = 0
# -----------------------------------------------------------------------------


def padding_share(lengths, batches, pad_to=None):
    positions = sum(len(b) * (pad_to or lengths[b].max()) for b in batches)
    return 1 - lengths.sum() / positions


def collate_fixed(batch, pad_id, length):
    """Upstream's batching: every example right-padded to the same length."""
    x, y = collate_sft(batch, pad_id)
    return (F.pad(x, (0, length - x.shape[1]), value=pad_id),
            F.pad(y, (0, length - y.shape[1]), value=IGNORE_INDEX))


def train_step(model, optimizer, x, y, device, autocast):
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    with autocast:
        loss = model(x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--data-dir", default=str(data_dir), help="folder of Alpaca-style SFT *.jsonl files")
    p.add_argument("--tokenizer", default=str(tokenizer_path), help="tokenizer.model to encode with")
    p.add_argument("--batch-size", type=int, default=batch_size, help="examples per step")
    p.add_argument("--max-seq-len", type=int, default=max_seq_len, help="positions per example (the fixed padding length)")
    p.add_argument("--steps", type=int, default=steps, help="timed training steps per method")
    p.add_argument("--dim", type=int, default=dim, help="model width")
    p.add_argument("--n-layers", type=int, default=n_layers, help="transformer blocks")
    p.add_argument("--n-heads", type=int, default=n_heads, help="attention heads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=seed, help="shuffling and init seed")
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    return p.parse_args()


def real_tokens_per_s(model, optimizer, loaders, steps, device):
    """{method: (real tokens, seconds)} over `steps` training steps of each method, interleaved
    step by step; the first step of each is warm-up, untimed."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    batches = {name: iter(loader) for name, loader in loaders.items()}
    seconds, real_tokens = dict.fromkeys(loaders, 0.0), dict.fromkeys(loaders, 0)
    for step in range(steps + 1):
        for name, it in batches.items():
            sync()
            t0 = time.perf_counter()
            x, y = next(it)  # loading (tokenizing) counts too: it is part of every step
            train_step(model, optimizer, x, y, device, autocast)
            sync()
            if step > 0:
                seconds[name] += time.perf_counter() - t0
                # real positions: every example's positions run up to its last target
                real_tokens[name] += int(((y != IGNORE_INDEX).flip(1).cumsum(1) > 0).sum())
    return {name: (real_tokens[name], seconds[name]) for name in loaders}


def main():
    cfg = parse_args()
    torch.manual_seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        # the raw Alpaca files -> normalized {prompt, answer} JSONL, as data_process.py sft does it
        normalized = Path(tmp) / "sft.jsonl"
        data_process.main(["sft", "--input", cfg.data_dir, "--out", str(normalized), "--val-fraction", "0"])
        dataset = SFTDataset(normalized, tokenizer, cfg.max_seq_len)
    lengths = dataset.lengths
    print(f"{len(dataset)} examples; positions per example: mean {lengths.mean():.1f}, "
          f"median {np.median(lengths):.0f}, max {lengths.max()} (max_seq_len {cfg.max_seq_len})")

    grouped = length_grouped_batches(lengths, cfg.batch_size, cfg.seed, epoch=0)
    shuffled = epoch_batches(len(dataset), cfg.batch_size, cfg.seed, epoch=0, rank=0, world_size=1)
    padding = {"ours": padding_share(lengths, grouped),
               "ours_ungrouped": padding_share(lengths, shuffled),
               "fixed": padding_share(lengths, shuffled, pad_to=cfg.max_seq_len)}
    print(f"padding share of positions over one epoch at batch {cfg.batch_size}: "
          f"ours (grouped) {padding['ours']:.1%}, pad-to-longest without grouping {padding['ours_ungrouped']:.1%}, "
          f"fixed {cfg.max_seq_len} {padding['fixed']:.1%}")
    fixed = partial(collate_fixed, pad_id=tokenizer.pad_id, length=cfg.max_seq_len)
    loaders = {"ours": DataLoader(dataset, batch_sampler=grouped, collate_fn=partial(collate_sft, pad_id=tokenizer.pad_id)),
               "fixed": DataLoader(dataset, batch_sampler=shuffled, collate_fn=fixed)}

    device = cfg.device
    model_args = ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                           vocab_size=tokenizer.vocab_size, max_seq_len=cfg.max_seq_len)
    model = Transformer(model_args).to(device)
    speed_up = kernels.speed_up(model, device, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    print(f"model: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
          f"{model.num_params() / 1e6:.1f}M params, on {device}; {speed_up}")

    timed = real_tokens_per_s(model, optimizer, loaders, cfg.steps, device)
    speed = {name: tokens / seconds for name, (tokens, seconds) in timed.items()}
    for name, (tokens, seconds) in timed.items():
        print(f"{name:>5}: {tokens} real tokens in {seconds:.2f}s -> {speed[name]:.0f} real tokens/s")
    ratio = speed["ours"] / speed["fixed"]
    print(f"padding {padding['ours']:.1%} (target <= 25%): {'met' if padding['ours'] <= 0.25 else 'MISSED'}; "
          f"real tokens/s {ratio:.2f}x fixed-{cfg.max_seq_len} (target >= 2x): {'met' if ratio >= 2 else 'MISSED'}")
    if cfg.out:
        result = {"n_examples": len(dataset), "batch_size": cfg.batch_size, "max_seq_len": cfg.max_seq_len,
                  "model_args": model_args.to_dict(), "device": device, "steps": cfg.steps,
                  "padding_share": padding, "real_tokens_per_s": speed, "speedup": ratio}
        Path(cfg.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
