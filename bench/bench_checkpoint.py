"""What checkpoint checksums cost: loading a resumable checkpoint of the default config
(upstream's: dim 512, 8 layers, 8 heads, vocab 64793; 58.5M parameters) with its optimizer
states, beside the plain torch.load that every load does anyway, in one run; and the same
tensors through sha256 instead of checkpoint.py's CRC-32, on as many threads.

The checkpoint is what pretrain.py writes: the weights, the states of the default optimizers
(Muon for the hidden matrices, AdamW for the rest; --optimizer adamw for upstream's) after one
step, and the plain values. Random weights: hashing does not depend on what they say.

    python bench/bench_checkpoint.py [--optimizer muon|adamw] [--repeats 3]

Target: verifying the checksums on load adds under a second on a 2-core CPU.
"""
import argparse
import hashlib
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402
import cli  # noqa: E402
import pretrain  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from optimizers import build_optimizers  # noqa: E402

REPEATS = 3


def resumable_checkpoint(optimizer):
    """A checkpoint dict as pretrain.py saves one, after one optimizer step of the default model."""
    cfg = pretrain.parse_args(["--optimizer", optimizer])
    torch.manual_seed(0)
    model = Transformer(ModelArgs())
    optimizers = build_optimizers(cfg, model, torch.device("cpu"))
    x = torch.randint(0, model.args.vocab_size, (1, 16))
    model(x, x).backward()
    for opt in optimizers:
        opt.step()
    return {"kind": "pretrain", "model_args": model.args.to_dict(), "tokenizer": {"name": "bench"},
            "config": {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool))},
            "model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers], "step": 1,
            "rng": [{"cpu": torch.get_rng_state()}]}, model.num_params()


def sha256_all(ckpt):
    """The baseline: a sha256 of every tensor of ckpt (tied ones once), on as many threads."""
    tensors = {}
    checkpoint.canonical(ckpt, "", tensors)
    unique = {checkpoint.storage_key(t): t for t in tensors.values()}
    arrays = [t.contiguous().reshape(-1).view(torch.uint8).numpy() for t in unique.values()]
    with ThreadPoolExecutor(checkpoint.CHECKSUM_THREADS) as pool:
        return list(pool.map(lambda a: hashlib.sha256(a).hexdigest(), sorted(arrays, key=len, reverse=True)))


def best_of(repeats, fn):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--optimizer", choices=["muon", "adamw"], default="muon", help="whose states the checkpoint holds")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timings per measurement; the best is reported")
    cfg = parser.parse_args()
    ckpt, n_params = resumable_checkpoint(cfg.optimizer)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "step_00000001.pt"
        save_s, _ = best_of(1, lambda: checkpoint.save_checkpoint(path, ckpt))
        hash_on_save_s, _ = best_of(cfg.repeats, lambda: checkpoint.checksums(ckpt))
        # the file was just written, so both loads read it from the page cache alike
        torch_load_s, loaded = best_of(cfg.repeats, lambda: torch.load(path, map_location="cpu", weights_only=True))
        verify_s, _ = best_of(cfg.repeats, lambda: checkpoint.verify(loaded, path))
        sha256_s, _ = best_of(cfg.repeats, lambda: sha256_all(loaded))
        load_checkpoint_s, _ = best_of(cfg.repeats, lambda: checkpoint.load_checkpoint(path))
        size = path.stat().st_size
    result = {
        "parameters_M": round(n_params / 1e6, 2), "optimizer": cfg.optimizer, "file_MB": round(size / 2**20, 1),
        "checksum_threads": checkpoint.CHECKSUM_THREADS, "torch_load_s": round(torch_load_s, 3),
        "verify_s": round(verify_s, 3), "load_checkpoint_s": round(load_checkpoint_s, 3),
        "verify_x_torch_load": round(verify_s / torch_load_s, 2), "verify_MB_per_s": round(size / 2**20 / verify_s),
        "sha256_instead_s": round(sha256_s, 3),
        "save_checkpoint_s": round(save_s, 3), "checksums_on_save_s": round(hash_on_save_s, 3),
    }
    print(json.dumps(result, indent=2))
    print(f"verifying the checksums adds {verify_s:.2f}s to a {torch_load_s:.2f}s torch.load of a "
          f"{size / 2**20:,.0f} MB checkpoint ({'under' if verify_s < 1 else 'OVER'} the 1 s target)")


if __name__ == "__main__":
    main()
