"""The training machinery shared by pretrain.py and sft.py.

A training script plugs in like this (pretrain.py is the worked example):

    def main(argv=None):
        parser = argparse.ArgumentParser()
        trainer.add_train_args(parser, DEFAULTS)    # shared flags; DEFAULTS: the script's own defaults
        ...                                         # the script's own flags (data, model)
        return trainer.run_script("NAME.py", run, parser.parse_args(argv))

    def run(cfg, env):                              # env: device, precision, DDP from torchrun's env
        resume = trainer.load_resume(cfg, env, kind, tokenizer)  # newest good checkpoint of cfg.out_dir, or None
        model = Transformer(...)                    # built from resume["model_args"] when resuming
        train_batches = trainer.Batches(dataset, cfg.batch_size, cfg.seed, env, collate_fn=...)
        val_batches = lambda: trainer.eval_batches(val_dataset, cfg.batch_size, cfg.eval_batches, env)
        return trainer.train(cfg, env, model, kind, tokenizer, train_batches, val_batches, train_data, resume)

run_script sets up the environment (seeding every RNG), closes it at the end, and turns a
refusal (REFUSALS: bad flags, data or checkpoints, a full disk) into a one-line message and a
non-zero exit code instead of a traceback.

What the script provides: the model; the training batches as a `Batches` (an endless,
resumable stream of (x, y) micro-batches for this rank; its state_dict() is the data
position); a function returning this rank's validation batches (or None: no validation);
the tokenizer whose identity goes into every checkpoint; train_data, [file name, tokens] per
training file, which --resume compares. Any `extra` dict given to train() is stored in each
checkpoint too.

What train() does: the optimizer (AdamW, or Muon for hidden matrices), warmup + cosine
schedule over the run's real number of optimizer steps, gradient accumulation (DDP syncs
on the last micro-step only), bf16/fp16 autocast, clipping, optional torch.compile,
validation, checkpoints (best.pt + the last K step_*.pt, and one on SIGINT/SIGTERM),
exact resume (from the newest checkpoint that verifies, with the same settings), metrics.jsonl,
the loss-curve PNG and progress logs.

train() is the loop, at the end of this file; read it first. Its parts, in the order it calls
them: check_resume (a resumed run's settings against its checkpoint's), set_up (the model on
its device, optimizers, resumed state), wrap_model (compile, DDP),
plan (the number of steps), then per step train_step (forward, backward, update),
metrics_row, evaluate and log, and checkpoint_dict and write_checkpoints.
"""
import argparse
import contextlib
import json
import math
import os
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import kernels
from atomic import WriteError, naming_errors
from chatglm_tokenizer import TokenizerNotFound
from checkpoint import (
    CheckpointError,
    load_latest_good,
    save_checkpoint,
    step_checkpoints,
)
from corpus import DataError
from logbook import append_metrics, plot_loss_curves, read_metrics, write_metrics
from model import IGNORE_INDEX
from muon import Muon, newton_schulz_dtype
from refusal import Refusal

# What a user can get wrong (bad flags, data or checkpoints, a full disk): the error types whose
# message says what to do. The scripts' main() shows them as one line and exits non-zero.
REFUSALS = (Refusal, ValueError, FileNotFoundError)

# Shared defaults; a script passes its own overrides to add_train_args.
TRAIN_DEFAULTS = dict(
    batch_size=8, grad_accum=1, lr=3e-4, min_lr=3e-5, warmup_steps=1000, weight_decay=0.1,
    beta1=0.9, beta2=0.95, grad_clip=1.0, max_steps=0, max_tokens=0, epochs=0.0,
    eval_every=1000, eval_batches=50, save_every=1000, keep_last=3, log_every=10,
    optimizer="adamw", muon_lr=0.02, muon_momentum=0.95, muon_dtype="auto", dtype="auto", device="auto",
    compile=False, seed=1337, out_dir="out/train", stop_after_steps=0, peak_flops=0.0,
)

# Dense bf16 tensor-core peaks (FLOP/s) for the MFU estimate; --peak-flops overrides.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12,
              "3090": 71e12, "A10G": 70e12, "V100": 125e12}


def add_train_args(parser, defaults=None):
    d = {**TRAIN_DEFAULTS, **(defaults or {})}
    g = parser.add_argument_group("training")
    g.add_argument("--out-dir", default=d["out_dir"], help="checkpoints, metrics.jsonl and the loss plot go here")
    g.add_argument("--resume", action="store_true", help="continue from the latest step_*.pt in --out-dir (fresh start if none)")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="micro-batch size per process")
    g.add_argument("--grad-accum", type=int, default=d["grad_accum"], help="micro-batches per optimizer step (per process)")
    g.add_argument("--max-steps", type=int, default=d["max_steps"], help="budget in optimizer steps (0: unset)")
    g.add_argument("--max-tokens", type=float, default=d["max_tokens"], help="budget in training tokens (0: unset)")
    g.add_argument("--epochs", type=float, default=d["epochs"], help="budget in passes over the training data (0: unset)")
    g.add_argument("--stop-after-steps", type=int, default=d["stop_after_steps"],
                   help="stop with a checkpoint after this many steps in this invocation, keeping the planned schedule (0: never)")
    g.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate (AdamW)")
    g.add_argument("--min-lr", type=float, default=d["min_lr"], help="learning rate at the end of the cosine decay")
    g.add_argument("--warmup-steps", type=int, default=d["warmup_steps"], help="linear warmup steps (capped at a tenth of the run)")
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="decoupled weight decay on >=2-D weights")
    g.add_argument("--beta1", type=float, default=d["beta1"], help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=d["beta2"], help="AdamW beta2")
    g.add_argument("--grad-clip", type=float, default=d["grad_clip"], help="clip the gradient norm to this (0: off)")
    g.add_argument("--optimizer", choices=["adamw", "muon"], default=d["optimizer"],
                   help="adamw for everything, or muon for the hidden 2-D matrices and AdamW for the rest")
    g.add_argument("--muon-lr", type=float, default=d["muon_lr"], help="peak learning rate of Muon's matrices")
    g.add_argument("--muon-momentum", type=float, default=d["muon_momentum"], help="Muon momentum")
    g.add_argument("--muon-dtype", choices=["auto", "bfloat16", "float32"], default=d["muon_dtype"],
                   help="dtype of Muon's Newton-Schulz iterations; auto: bf16 where the hardware computes it "
                        "natively (CUDA, CPUs with AVX512-BF16 or AMX), else fp32")
    g.add_argument("--eval-every", type=int, default=d["eval_every"], help="validate every N optimizer steps (0: only at the end)")
    g.add_argument("--eval-batches", type=int, default=d["eval_batches"], help="validation micro-batches per process")
    g.add_argument("--save-every", type=int, default=d["save_every"], help="write step_*.pt every N optimizer steps (0: only at the end)")
    g.add_argument("--keep-last", type=int, default=d["keep_last"], help="how many step_*.pt to keep")
    g.add_argument("--log-every", type=int, default=d["log_every"], help="log to stdout and metrics.jsonl every N steps (0: only at the end)")
    g.add_argument("--device", default=d["device"], help="auto, cpu, cuda or cuda:N (under torchrun: the local rank's GPU)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=d["dtype"],
                   help="autocast dtype; auto: bf16 on CUDA where supported, else fp16 (with loss scaling); fp32 on CPU")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d["compile"], help="torch.compile the model")
    g.add_argument("--seed", type=int, default=d["seed"], help="seed for the init, dropout and data order")
    g.add_argument("--peak-flops", type=float, default=d["peak_flops"], help="device peak FLOP/s for MFU (0: guess from the GPU name)")
    return parser


# ----------------------------------------------------------------------------- environment

@dataclass
class Env:
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


def setup(cfg):
    """Device, precision and (under torchrun) the process group; seeds every RNG."""
    rank, local_rank, world_size = (int(os.environ.get(k, d)) for k, d in
                                    (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
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
        raise ValueError("--dtype float16 needs a CUDA device (use bfloat16 or float32 on CPU)")
    torch.manual_seed(cfg.seed + rank)
    return Env(device, rank, local_rank, world_size, getattr(torch, dtype))


def run_script(script, run, cfg):
    """A training script's main: run(cfg, env) in the environment of setup(cfg). A refusal
    (REFUSALS) or a second Ctrl-C ends it with a one-line message and a non-zero exit code,
    never a traceback."""
    try:
        env = setup(cfg)
        try:
            return run(cfg, env)
        finally:
            env.close()
    except REFUSALS as e:  # bad flags, data or checkpoints, a full disk: what to do, no traceback
        raise SystemExit(f"{script}: error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit(f"{script}: interrupted; --resume continues from the last checkpoint") from None


# ----------------------------------------------------------------------------- data

def epoch_batches(n_items, batch_size, seed, epoch, rank, world_size):
    """This rank's micro-batches for one epoch: an array (n_batches, batch_size) of item
    indices. The seeded order is cut into global batches of batch_size * world_size and each
    rank takes its slice, so N processes see exactly what one process with an N times
    larger batch sees. The last incomplete global batch is dropped."""
    global_batch = batch_size * world_size
    n_global = n_items // global_batch
    if n_global == 0:
        raise ValueError(f"{n_items} training items are fewer than one global batch of {global_batch}")
    order = np.random.default_rng([seed, epoch]).permutation(n_items)
    return order[:n_global * global_batch].reshape(n_global, world_size, batch_size)[:, rank]


class Batches:
    """An endless, resumable stream of this rank's training micro-batches over a map-style
    dataset. The position (epoch, batches taken) is the whole state: resuming replays the
    same order from that point. make_epoch(epoch) may replace the default shuffled order
    (e.g. length-grouped batches): it returns this rank's batches of item indices (a list of
    lists or a 2-D array) and must be deterministic in epoch."""

    def __init__(self, dataset, batch_size, seed, env, collate_fn=None, num_workers=0, make_epoch=None):
        self.dataset, self.collate_fn, self.num_workers = dataset, collate_fn, num_workers
        self.pin_memory = env.device.type == "cuda"  # lets the host-to-GPU copies run asynchronously
        self.make_epoch = make_epoch or (lambda epoch: epoch_batches(
            len(dataset), batch_size, seed, epoch, env.rank, env.world_size))
        self.batches_per_epoch = len(self.make_epoch(0))
        self.epoch, self.taken = 0, 0
        self._it = None

    def state_dict(self):
        return {"epoch": self.epoch, "taken": self.taken}

    def load_state_dict(self, state):
        self.epoch, self.taken = int(state["epoch"]), int(state["taken"])
        self._it = None

    def _start_epoch(self):
        remaining = self.make_epoch(self.epoch)[self.taken:]
        # Its own generator: a DataLoader otherwise draws worker seeds from the global RNG,
        # which would shift dropout noise after a resume.
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=remaining, collate_fn=self.collate_fn,
                                             num_workers=self.num_workers, pin_memory=self.pin_memory,
                                             generator=torch.Generator().manual_seed(self.epoch))
        self._it = iter(loader)

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._start_epoch()
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.taken = self.epoch + 1, 0
            self._start_epoch()
            batch = next(self._it)
        self.taken += 1
        return batch


def eval_batches(dataset, batch_size, max_batches, env, collate_fn=None):
    """This rank's share of a fixed validation subset (the first max_batches * batch_size *
    world_size items), the same at every evaluation; evaluate() weights by tokens, so the
    result does not depend on how the subset is split over ranks."""
    n = min(len(dataset), max_batches * batch_size * env.world_size)
    mine = list(range(env.rank, n, env.world_size))
    collate = collate_fn or torch.utils.data.default_collate
    for start in range(0, len(mine), batch_size):
        yield collate([dataset[i] for i in mine[start:start + batch_size]])


# ----------------------------------------------------------------------------- optimization

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


# ----------------------------------------------------------------------------- checkpoints

def load_resume(cfg, env, kind, tokenizer):
    """The checkpoint to continue from when --resume is given: the newest step_*.pt of
    cfg.out_dir that loads and passes its checksums (else best.pt), or None when there is none
    yet. The ones tried before that failed (damaged, truncated) are said so and set aside as
    NAME.pt.damaged, so that pruning never counts them among the checkpoints it keeps.
    Refuses a checkpoint of another kind or another tokenizer."""
    if not cfg.resume:
        return None
    ckpt, damaged = load_latest_good(cfg.out_dir)
    if ckpt is None:
        env.print(f"--resume: no checkpoint in {cfg.out_dir} yet, starting fresh")
        return None
    for path, reason in damaged:
        env.print(f"--resume: {reason}; set aside as {path.name}.damaged")
        if env.master:
            for p in (path, path.with_suffix(".json")):
                with naming_errors(p):
                    if p.exists():
                        os.replace(p, p.with_name(p.name + ".damaged"))
    if damaged:
        env.print(f"--resume: falling back to {ckpt['path']} (step {ckpt['step']}), the newest checkpoint that verifies")
    if ckpt.get("kind") != kind or "optimizers" not in ckpt:
        raise CheckpointError(f"checkpoint {ckpt['path']} is not a resumable {kind} checkpoint (kind={ckpt.get('kind')})")
    tokenizer.check_identity(ckpt["tokenizer"], f"checkpoint {ckpt['path']}")
    return ckpt


# Flags a resumed run cannot change, refused on --resume: those the saved data position depends
# on (the training data itself is compared through the header's "train_data"), and those the
# optimizer's saved state restores, so that a new value would be silently ignored.
RESUME_MUST_MATCH = ("batch_size", "grad_accum", "seed", "group_by_length",
                     "optimizer", "lr", "weight_decay", "beta1", "beta2", "muon_lr", "muon_momentum")
# Flags that apply from the resumed step on: a change is reported, the run goes on.
RESUME_MAY_CHANGE = ("min_lr", "warmup_steps", "max_steps", "max_tokens", "epochs", "grad_clip", "dtype")


def check_resume(header, resume, env):
    """Compare this run's settings with the resumed checkpoint's: refuse the changes that break
    the resumed data position (data, batch, accumulation, seed, processes) or that the
    optimizer state would override, report the others. Entries the checkpoint lacks (older
    checkpoints) are not compared."""
    old, new = dict(resume.get("config", {})), dict(header["config"])
    old["processes"], new["processes"] = resume.get("world_size", len(resume["rng"])), header["world_size"]
    refused = changes(old, new, RESUME_MUST_MATCH + ("processes",))
    if resume.get("train_data", header["train_data"]) != header["train_data"]:
        refused.append(f"--data {describe_data(resume['train_data'])} -> {describe_data(header['train_data'])}")
    if refused:
        raise ValueError(f"--resume: {'; '.join(refused)} since checkpoint {resume['path']}; a resumed run keeps "
                         f"its data, batches and optimizer settings: resume with the checkpoint's, or start a new --out-dir")
    notes = changes(old, new, RESUME_MAY_CHANGE)
    if notes:
        env.print(f"--resume: changed since the checkpoint: {', '.join(notes)} (they apply from here on; the run "
                  f"will differ from an uninterrupted one)")


def changes(old, new, keys):
    """["--flag OLD -> NEW"] for the keys that old has and new differs in."""
    return [f"{k if k == 'processes' else '--' + k.replace('_', '-')} {old[k]} -> {new.get(k)}"
            for k in keys if k in old and old[k] != new.get(k)]


def describe_data(train_data):
    """A run's "train_data" ([file name, tokens] per training file) in words."""
    return ", ".join(f"{name} ({size:,} tokens)" for name, size in train_data)


def rng_state(env):
    """Every rank's torch RNG states, gathered to all ranks as uint8 tensors (weights_only-safe)."""
    state = {"cpu": torch.get_rng_state()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    if not env.ddp:
        return [state]
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def set_rng_state(states, env):
    torch.set_rng_state(states[env.rank]["cpu"])
    if env.device.type == "cuda" and "cuda" in states[env.rank]:
        torch.cuda.set_rng_state(states[env.rank]["cuda"], env.device)


def prune_step_checkpoints(out_dir, keep_last):
    for old in step_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)


# ----------------------------------------------------------------------------- metrics

def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def guess_peak_flops(device):
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_FLOPS.items() if key in name), 0.0)


def format_seconds(s):
    h, rem = divmod(int(s), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


# ----------------------------------------------------------------------------- the loop

@dataclass
class Progress:
    """How far the run has come: saved in every checkpoint, restored on resume."""
    step: int = 0  # optimizer steps taken
    tokens: int = 0  # training positions of all ranks so far, padding included
    best_val: float = math.inf  # the lowest validation loss so far
    elapsed: float = 0.0  # training seconds of the invocations before this one
    rows: list = field(default_factory=list)  # the metrics rows logged so far


class Clock:
    """This invocation's time: seconds since it started, and tokens per second between logs."""

    def __init__(self, tokens):
        self.start = self.last_log = time.time()
        self.tokens_at_last_log = tokens
        self.steps = 0  # optimizer steps taken in this invocation

    def seconds(self):
        return time.time() - self.start

    def tokens_per_s(self, tokens):
        now = time.time()
        rate = (tokens - self.tokens_at_last_log) / max(now - self.last_log, 1e-9)
        self.last_log, self.tokens_at_last_log = now, tokens
        return rate


class StopFlag:
    """Set by SIGINT/SIGTERM while training; the loop finishes the step in progress, saves
    and exits (any_rank() reads it after the step, so a signal during a step stops after it)."""

    def __enter__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        if self.requested:  # a second signal: the user wants out now
            raise KeyboardInterrupt
        self.requested = True
        print(f"signal {signal.Signals(signum).name}: saving a checkpoint after this step", flush=True)


def any_rank(flag, env):
    """Whether flag is set on any rank: one tiny all-reduce under DDP, so all ranks agree."""
    if not env.ddp:
        return flag
    t = torch.tensor([float(flag)], device=env.device)
    dist.all_reduce(t)
    return t.item() > 0


def is_multiple(step, every):
    """Whether an --x-every interval falls on this step (every=0: never)."""
    return every != 0 and step % every == 0


def set_up(cfg, env, model, train_batches, resume):
    """The model on its device, its optimizers and loss scaler, and where the run stands: on
    resume, the checkpoint's weights, optimizer and scaler states, data position, RNG and
    metrics rows. Returns (optimizers, scaler, progress)."""
    model.to(env.device)
    # Device-specific speed code goes in here, while the model is on its device and neither
    # the optimizers nor torch.compile have seen it; parameter names stay, so resume works.
    env.print(f"speed: {kernels.speed_up(model, env.device, env.ptdtype)}")
    optimizers = build_optimizers(cfg, model, env.device)
    env.print(f"optimizer: {describe_optimizers(optimizers)}")
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.ptdtype == torch.float16)
    metrics_path = Path(cfg.out_dir) / "metrics.jsonl"
    progress = Progress()
    if resume is not None:
        model.load_state_dict(resume["model"])
        for opt, state in zip(optimizers, resume["optimizers"], strict=True):
            opt.load_state_dict(state)
        scaler.load_state_dict(resume["scaler"])
        train_batches.load_state_dict(resume["data"])
        set_rng_state(resume["rng"], env)
        # Rows logged after the checkpoint belong to a timeline that is now replayed: dropped.
        progress = Progress(resume["step"], resume["tokens"], resume["best_val_loss"], resume.get("elapsed_s", 0.0),
                            rows=read_metrics(metrics_path, up_to_step=resume["step"]))
        env.print(f"resumed from {resume['path']} at step {progress.step} ({progress.tokens:,} tokens)")
    if env.master:  # also finds out early whether --out-dir is writable
        write_metrics(metrics_path, progress.rows)
    return optimizers, scaler, progress


def wrap_model(cfg, env, model):
    """(the model the training step calls, the one validation calls): compiled with --compile,
    and for training wrapped in DDP, which all-reduces the gradients in backward."""
    if cfg.compile:
        model = torch.compile(model)
    eval_model = model
    if env.ddp:
        # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets, saving one
        # model-sized copy of them; the buckets are all-reduced while backward still runs.
        model = DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                    gradient_as_bucket_view=True)
    return model, eval_model


def plan(cfg, env, model, train_batches):
    """(total optimizer steps, warmup steps) of the run, printed with what a step holds. The run
    takes the smallest of the budgets that are set; warmup is at most a tenth of it."""
    seq_len = model.args.max_seq_len
    tokens_per_step = cfg.batch_size * seq_len * cfg.grad_accum * env.world_size  # at most: SFT pads shorter
    candidates = []
    if cfg.max_steps:
        candidates.append(cfg.max_steps)
    if cfg.max_tokens:
        candidates.append(math.ceil(cfg.max_tokens / tokens_per_step))
    if cfg.epochs:
        candidates.append(math.ceil(cfg.epochs * train_batches.batches_per_epoch / cfg.grad_accum))
    if not candidates:
        raise ValueError("set a budget: --max-steps, --max-tokens or --epochs")
    total_steps = max(1, min(candidates))
    env.print(f"model: {model.num_params() / 1e6:.2f}M parameters "
              f"({model.num_params(exclude_embeddings=True) / 1e6:.2f}M without embeddings), "
              f"{env.world_size} process(es) on {env.device}, {str(env.ptdtype).removeprefix('torch.')}")
    env.print(f"tokens per optimizer step: {tokens_per_step:,} = {cfg.batch_size} batch x {seq_len} seq "
              f"x {cfg.grad_accum} accum x {env.world_size} procs; planned {total_steps:,} steps = "
              f"{total_steps * tokens_per_step:,} tokens ({train_batches.batches_per_epoch:,} "
              f"micro-batches per epoch per process)")
    return total_steps, min(cfg.warmup_steps, max(1, total_steps // 10))


def train_step(model, micro_batches, optimizers, scaler, grad_clip, env):
    """One optimizer step over this rank's micro-batches. The loss is the mean over every target
    token of the step, on all ranks, so it does not depend on how the tokens are split into
    micro-batches and ranks. Returns (the step's loss as a tensor on the device, the step's
    positions on all ranks)."""
    # One small all-reduce per step: the step's real target count (for the token-weighted
    # mean). Without DDP it stays on the CPU, so the GPU never waits for it.
    counts = torch.tensor([sum(int((y != IGNORE_INDEX).sum()) for _, y in micro_batches),
                           sum(x.numel() for x, _ in micro_batches)],
                          dtype=torch.float64, device=env.device if env.ddp else "cpu")
    if env.ddp:
        dist.all_reduce(counts)
    n_targets = max(counts[0].item(), 1.0)
    step_loss = torch.zeros((), device=env.device)
    for i, (x, y) in enumerate(micro_batches):
        x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
        weight = (y != IGNORE_INDEX).sum() * env.world_size / n_targets  # DDP averages over ranks
        # DDP all-reduces the gradients in the last micro-batch's backward only
        sync = not env.ddp or i == len(micro_batches) - 1
        with (contextlib.nullcontext() if sync else model.no_sync()), env.autocast():
            loss = model(x, y) * weight
        scaler.scale(loss).backward()
        step_loss += loss.detach() / env.world_size
    if grad_clip > 0:
        for opt in optimizers:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)  # a wrapper yields the model's own
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return step_loss, int(counts[1].item())


@torch.no_grad()
def evaluate(model, batches, env):
    """Token-weighted mean loss over this rank's validation batches, reduced over ranks."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=env.device)
    for x, y in batches:
        x, y = x.to(env.device), y.to(env.device)
        n = (y != IGNORE_INDEX).sum()
        with env.autocast():
            loss = model(x, y)
        sums += torch.stack([loss.double() * n, n.double()])
    if env.ddp:
        dist.all_reduce(sums)
    model.train()
    return (sums[0] / sums[1].clamp(min=1)).item()


def metrics_row(step_loss, progress, optimizers, clock, env, flops_per_token, peak_flops):
    """A logged step's row: train loss (summed over ranks: each holds its share), learning
    rate, tokens/s since the last log, peak memory and, when the device's peak is known, MFU."""
    if env.ddp:
        dist.all_reduce(step_loss)
    tok_per_s = clock.tokens_per_s(progress.tokens)
    row = {"step": progress.step, "tokens": progress.tokens, "train_loss": round(step_loss.item(), 6),
           "lr": optimizers[0].param_groups[0]["lr"], "tokens_per_s": round(tok_per_s, 1),
           "peak_mem_mb": round(peak_memory_mb(env.device), 1)}
    if peak_flops:
        row["mfu"] = round(flops_per_token * tok_per_s / env.world_size / peak_flops, 4)
    return row


def log(row, progress, clock, total_steps, env, out_dir):
    """Append row to metrics.jsonl and print it with the time left at this invocation's pace."""
    progress.rows.append(row)
    if env.master:
        append_metrics(Path(out_dir) / "metrics.jsonl", row)
    eta = clock.seconds() / clock.steps * (total_steps - progress.step)
    env.print(f"step {progress.step}/{total_steps} | loss {row['train_loss']:.4f}"
              + (f" | val {row['val_loss']:.4f}" if "val_loss" in row else "")
              + f" | lr {row['lr']:.2e} | {row['tokens_per_s']:,.0f} tok/s"
              + (f" | mfu {100 * row['mfu']:.1f}%" if "mfu" in row else "")
              + f" | mem {row['peak_mem_mb']:,.0f} MB | eta {format_seconds(eta)}")


def checkpoint_header(cfg, env, kind, model, tokenizer, train_data, extra):
    """What every checkpoint of the run says it is: kind, model shape, tokenizer, the plain
    values of cfg, the number of processes, the training data, and the script's extra entries."""
    config = {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool, type(None)))}
    return {"kind": kind, "model_args": model.args.to_dict(), "tokenizer": tokenizer.identity(), "config": config,
            "world_size": env.world_size, "train_data": [list(x) for x in train_data], **(extra or {})}


def checkpoint_dict(header, model, optimizers, scaler, train_batches, progress, clock, env):
    """Everything a checkpoint holds: the run's header and the state to resume from exactly.
    Collective under DDP (the RNG states are gathered), so every rank calls it."""
    return {**header, "model": model.state_dict(), "step": progress.step, "tokens": progress.tokens,
            "optimizers": [opt.state_dict() for opt in optimizers], "scaler": scaler.state_dict(),
            "data": train_batches.state_dict(), "rng": rng_state(env), "best_val_loss": progress.best_val,
            "elapsed_s": progress.elapsed + clock.seconds()}


def write_checkpoints(ckpt, rows, cfg, env, periodic, best):
    """On rank 0: step_*.pt (keeping the last --keep-last) if periodic, best.pt if best, then
    metrics.jsonl and the loss plot rewritten whole."""
    if not env.master:
        return
    out_dir = Path(cfg.out_dir)
    if periodic:
        save_checkpoint(out_dir / f"step_{ckpt['step']:08d}.pt", ckpt)
        prune_step_checkpoints(out_dir, cfg.keep_last)
    if best:
        save_checkpoint(out_dir / "best.pt", ckpt)
    write_metrics(out_dir / "metrics.jsonl", rows)
    plot_loss_curves({f"{ckpt['kind']}: {out_dir.name}": (rows, None)}, out_dir / "loss.png")


def train(cfg, env, model, kind, tokenizer, train_batches, val_batches, train_data, resume=None, extra=None):
    """Train model to the planned step; returns the last metrics row. See the module docstring."""
    header = checkpoint_header(cfg, env, kind, model, tokenizer, train_data, extra)
    if resume is not None:
        check_resume(header, resume, env)
    optimizers, scaler, progress = set_up(cfg, env, model, train_batches, resume)
    step_model, eval_model = wrap_model(cfg, env, model)
    total_steps, warmup = plan(cfg, env, model, train_batches)
    flops_per_token = model.flops_per_token(model.args.max_seq_len)
    peak_flops = cfg.peak_flops or (guess_peak_flops(env.device) if env.device.type == "cuda" else 0.0)

    with StopFlag() as stop:
        step_model.train()
        clock, row = Clock(progress.tokens), {}
        while progress.step < total_steps:
            # determine and set the learning rate for this iteration
            lr_mult = lr_multiplier(progress.step, warmup, total_steps, cfg.min_lr / cfg.lr)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["peak_lr"] * lr_mult

            # forward backward update, with optional gradient accumulation
            micro_batches = [next(train_batches) for _ in range(cfg.grad_accum)]
            step_loss, n_tokens = train_step(step_model, micro_batches, optimizers, scaler, cfg.grad_clip, env)
            progress.step += 1
            progress.tokens += n_tokens
            clock.steps += 1

            # timing and logging, and evaluate the loss on val when it is due
            is_last = progress.step == total_steps
            do_eval = val_batches is not None and (is_last or is_multiple(progress.step, cfg.eval_every))
            best = False
            if do_eval or is_last or is_multiple(progress.step, cfg.log_every):
                row = metrics_row(step_loss, progress, optimizers, clock, env, flops_per_token, peak_flops)
                if do_eval:
                    row["val_loss"] = round(evaluate(eval_model, val_batches(), env), 6)
                    best = row["val_loss"] < progress.best_val
                    progress.best_val = min(progress.best_val, row["val_loss"])
                log(row, progress, clock, total_steps, env, cfg.out_dir)

            # write checkpoints: every --save-every steps, at the end, on a stop, and on a new best val loss
            stopping = any_rank(stop.requested, env)  # read now: a signal during this step stops after it
            pause = cfg.stop_after_steps and clock.steps >= cfg.stop_after_steps
            periodic = is_last or stopping or pause or is_multiple(progress.step, cfg.save_every)
            if periodic or best:
                ckpt = checkpoint_dict(header, model, optimizers, scaler, train_batches, progress, clock, env)
                write_checkpoints(ckpt, progress.rows, cfg, env, periodic, best)
            if stopping or pause:
                env.print(f"stopped at step {progress.step}; continue with --resume")
                break
        return row
