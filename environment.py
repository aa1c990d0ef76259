"""Where a training run runs: its device, its autocast precision and, under torchrun, its
processes (DDP), read from the environment torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE).

    run_script("pretrain.py", run, cfg)    # a training script's main: run(cfg, env) in setup(cfg)

One process is rank 0 of a world of 1; N processes (torchrun --nproc_per_node=N) each hold a
rank and train on their slice of every batch (batches.py). Only rank 0 (env.master) prints
and writes files.
"""
import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from refusal import Refusal, one_line_refusals


@dataclass
class Env:
    """This process's place in the run: its device and precision, its rank among world_size."""
    device: torch.device
    rank: int
    local_rank: int
    world_size: int
    ptdtype: torch.dtype  # autocast dtype (float32: autocast off)

    @property
    def ddp(self):
        return self.world_size > 1

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        if self.ptdtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.ptdtype)

    def print(self, *args):
        if self.master:
            print(*args, flush=True)

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()


def parse_device(name):
    """--device NAME -> torch.device, refused in one line when it is not one or this machine
    cannot run it (a CUDA device without a usable GPU, or past the last one)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise Refusal(f"--device {name}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise Refusal(f"--device {name}: {why}; use --device cpu (or leave --device out)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise Refusal(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def setup(cfg):
    """Device, precision and (under torchrun) the process group; seeds every RNG."""
    rank, local_rank, world_size = (int(os.environ.get(k, d)) for k, d in
                                    (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = parse_device(cfg.device)
        if device.type == "cuda" and world_size > 1:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dtype = cfg.dtype
    if dtype == "auto":
        if device.type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    if dtype == "float16" and device.type != "cuda":
        raise Refusal("--dtype float16 needs a CUDA device (use bfloat16 or float32 on CPU)")
    torch.manual_seed(cfg.seed + rank)
    return Env(device, rank, local_rank, world_size, getattr(torch, dtype))


def run_script(script, run, cfg):
    """A training script's main: run(cfg, env) in the environment of setup(cfg). A refusal or
    a second Ctrl-C ends it with a one-line message and a non-zero exit code, never a traceback."""
    with one_line_refusals(script, interrupted="interrupted; --resume continues from the last checkpoint"):
        env = setup(cfg)
        try:
            return run(cfg, env)
        finally:
            env.close()
