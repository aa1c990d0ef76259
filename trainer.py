"""The training loop that pretrain.py, sft.py and dpo.py run: train(), the first function below.

A training script builds what differs between pretraining and fine-tuning, then hands it over
(pretrain.py is the worked example):

    def run(cfg, env):                              # env: device, precision, DDP (environment.py)
        resume = load_resume(cfg, env, kind, tokenizer)   # checkpoint.py; None without --resume
        model = Transformer(...)                    # the checkpoint's shape when resuming
        train_batches = Batches(dataset, cfg.batch_size, cfg.seed, env)         # batches.py
        val_batches = lambda: eval_batches(val_dataset, cfg.batch_size, cfg.eval_batches, env)
        return trainer.train(cfg, env, model, kind, tokenizer, train_batches, val_batches, train_data, resume)

train_data ([file name, tokens] per training file) and the tokenizer's identity go into every
checkpoint, and --resume compares them; so does any `extra` dict given to train(). val_text,
(tokens, characters) of the validation text, adds val_bpc (bits per character) beside val_loss.
objective says what a micro-batch's loss is and what validation reports: TokenLoss (below) for
pretraining and SFT, dpo.py's PreferenceObjective for preference tuning.

What train() does, step by step: the optimizers (optimizers.py) and the warmup + cosine
schedule over the run's real number of steps; gradient accumulation (DDP syncs the gradients
on the last micro-batch only); bf16/fp16 autocast and clipping; validation; metrics.jsonl,
the loss plot and progress lines; checkpoints (best.pt, the last --keep-last step_*.pt, and
one on SIGINT/SIGTERM) from which --resume continues exactly (checkpoint.py). The run's whole
configuration is printed in its header and written as OUT_DIR/config.json.

After train() come the pieces it calls, in the order it calls them.
"""
import contextlib
import math
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import kernels
from prompt import ANSWER_ENCODING
from checkpoint import check_resume, prune_step_checkpoints, rng_state, save_checkpoint, set_rng_state
from cli import config_line, write_config
from logbook import append_metrics, plot_loss_curves, read_metrics, write_metrics
from metrics import bits_per_char
from model import IGNORE_INDEX
from optimizers import build_optimizers, describe_optimizers, lr_multiplier
from refusal import Refusal
from train_flags import PEAK_FLOPS


def train(cfg, env, model, kind, tokenizer, train_batches, val_batches, train_data, resume=None, extra=None,
          val_text=None, objective=None):
    """Train model to the planned step; returns the last metrics row. See the module docstring."""
    objective = objective or TokenLoss()
    # what every checkpoint says it is; a resumed run must match its checkpoint's settings
    header = checkpoint_header(cfg, env, kind, model, tokenizer, train_data, extra)
    if resume is not None:
        check_resume(header, resume, env)

    # the model on its device, its optimizers, and on --resume the state to continue from
    optimizers, scaler, progress = set_up(cfg, env, model, train_batches, resume)
    step_model, eval_model = wrap_model(cfg, env, model)

    # how long the run is; the whole configuration goes into the header and config.json
    total_steps, warmup = plan(cfg, env, model, train_batches, objective.rows_per_item)
    flops_per_token = model.flops_per_token(window_length(cfg, model))
    record_config(cfg, env, total_steps, warmup, resume, {**(extra or {}), "flops_per_token": flops_per_token})
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
            step_loss, n_tokens = train_step(step_model, micro_batches, optimizers, scaler, cfg.grad_clip, env,
                                             objective)
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
                    row.update(evaluate(eval_model, val_batches(), env, objective))
                    if val_text:  # (tokens, characters) of the validation text
                        row["val_bpc"] = round(bits_per_char(row["val_loss"], *val_text), 6)
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


# ----------------------------------------------------------------------------- before the loop

def checkpoint_header(cfg, env, kind, model, tokenizer, train_data, extra):
    """What every checkpoint of the run says it is: kind, model shape, tokenizer, the plain
    values of cfg, the number of processes, the training data, and the script's extra entries."""
    config = {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool, type(None)))}
    return {"kind": kind, "model_args": model.args.to_dict(), "tokenizer": tokenizer.identity(), "config": config,
            "world_size": env.world_size, "train_data": [list(x) for x in train_data],
            "answer_encoding": ANSWER_ENCODING, **(extra or {})}


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


def window_length(cfg, model):
    """Positions per training example: --max-seq-len where the script has one (SFT may cut its
    examples shorter than the model's context), else the model's context length."""
    return min(getattr(cfg, "max_seq_len", 0) or model.args.max_seq_len, model.args.max_seq_len)


def plan(cfg, env, model, train_batches, rows_per_item=1):
    """(total optimizer steps, warmup steps) of the run, printed with what a step holds. The run
    takes the smallest of the budgets that are set; warmup is at most a tenth of it."""
    seq_len = window_length(cfg, model)
    rows = cfg.batch_size * rows_per_item  # a DPO item (a pair) is two rows
    tokens_per_step = rows * seq_len * cfg.grad_accum * env.world_size  # at most: SFT pads shorter
    candidates = []
    if cfg.max_steps:
        candidates.append(cfg.max_steps)
    if cfg.max_tokens:
        candidates.append(math.ceil(cfg.max_tokens / tokens_per_step))
    if cfg.epochs:
        candidates.append(math.ceil(cfg.epochs * train_batches.batches_per_epoch / cfg.grad_accum))
    if not candidates:
        raise Refusal("set a budget: --max-steps, --max-tokens or --epochs")
    total_steps = max(1, min(candidates))
    env.print(f"model: {model.num_params() / 1e6:.2f}M parameters "
              f"({model.num_params(exclude_embeddings=True) / 1e6:.2f}M without embeddings), "
              f"{env.world_size} process(es) on {env.device}, {str(env.ptdtype).removeprefix('torch.')}")
    env.print(f"tokens per optimizer step: {tokens_per_step:,} = {rows} rows x {seq_len} seq "
              f"x {cfg.grad_accum} accum x {env.world_size} procs; planned {total_steps:,} steps = "
              f"{total_steps * tokens_per_step:,} tokens ({train_batches.batches_per_epoch:,} "
              f"micro-batches per epoch per process)")
    return total_steps, min(cfg.warmup_steps, max(1, total_steps // 10))


def record_config(cfg, env, total_steps, warmup, resume, extra):
    """Print the run's whole configuration in its header and write it as OUT_DIR/config.json
    (rank 0): every flag, with the values resolved at run time in place of "auto" (device,
    dtype), the warmup the run really takes, and what only the run knows (processes, steps,
    the resumed checkpoint, the training FLOPs per token, the script's extra entries)."""
    resolved = dict(device=str(env.device), dtype=str(env.ptdtype).removeprefix("torch."), warmup_steps=warmup,
                    world_size=env.world_size, total_steps=total_steps,
                    resumed_from=resume["path"] if resume is not None else None, **(extra or {}))
    env.print(config_line(cfg, **resolved))
    if env.master:
        write_config(cfg.out_dir, cfg, **resolved)


# ----------------------------------------------------------------------------- one step

class TokenLoss:
    """The objective of pretraining and SFT: the mean cross entropy over the target tokens.

    An objective tells train_step what one micro-batch's loss is (loss: its mean over the
    micro-batch's units) and how many units it holds (units: here target tokens), and tells
    evaluate what to sum over the validation batches (sums: {score: sum}, and "n" the units,
    each score reported as sum / n). dpo.py's objective counts preference pairs instead, and
    its items (pairs) are two rows each (rows_per_item, for the plan's token count)."""

    rows_per_item = 1

    def units(self, y):
        return int((y != IGNORE_INDEX).sum())

    def loss(self, model, x, y):
        return model(x, y)

    def sums(self, model, x, y):
        n = (y != IGNORE_INDEX).sum()
        return {"val_loss": model(x, y).double() * n, "n": n.double()}


def train_step(model, micro_batches, optimizers, scaler, grad_clip, env, objective):
    """One optimizer step over this rank's micro-batches. The loss is the mean over every unit
    (target token; preference pair for DPO) of the step, on all ranks, so it does not depend on
    how the units are split into micro-batches and ranks. Returns (the step's loss as a tensor
    on the device, the step's positions on all ranks)."""
    # One small all-reduce per step: the step's real unit count (for the unit-weighted mean).
    # Without DDP it stays on the CPU, so the GPU never waits for it.
    counts = torch.tensor([sum(objective.units(y) for _, y in micro_batches),
                           sum(x.numel() for x, _ in micro_batches)],
                          dtype=torch.float64, device=env.device if env.ddp else "cpu")
    if env.ddp:
        dist.all_reduce(counts)
    n_targets = max(counts[0].item(), 1.0)
    step_loss = torch.zeros((), device=env.device)
    for i, (x, y) in enumerate(micro_batches):
        x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
        weight = objective.units(y) * env.world_size / n_targets  # DDP averages over ranks
        # DDP all-reduces the gradients in the last micro-batch's backward only
        sync = not env.ddp or i == len(micro_batches) - 1
        with (contextlib.nullcontext() if sync else model.no_sync()), env.autocast():
            loss = objective.loss(model, x, y) * weight
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
def evaluate(model, batches, env, objective=None):
    """The objective's validation scores ({"val_loss": ...} and any others it sums), each the
    unit-weighted mean over the validation batches of all ranks, rounded for the logs."""
    objective = objective or TokenLoss()
    model.eval()
    names, sums = None, None
    for x, y in batches:
        x, y = x.to(env.device), y.to(env.device)
        with env.autocast():
            batch = objective.sums(model, x, y)
        names = names or [k for k in batch if k != "n"]
        values = torch.stack([batch[k].double() for k in names + ["n"]])
        sums = values if sums is None else sums + values
    if sums is None:
        raise Refusal("validation has no batches: give --eval-batches 1 or more")
    if env.ddp:
        dist.all_reduce(sums)
    model.train()
    return {k: round((v / sums[-1].clamp(min=1)).item(), 6) for k, v in zip(names, sums)}


# ----------------------------------------------------------------------------- logs and checkpoints

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
              + "".join(f" | {k.removeprefix('val_')} {v:.4g}" for k, v in row.items()
                        if k.startswith("val_") and k != "val_loss")
              + f" | lr {row['lr']:.2e} | {row['tokens_per_s']:,.0f} tok/s"
              + (f" | mfu {100 * row['mfu']:.1f}%" if "mfu" in row else "")
              + f" | mem {row['peak_mem_mb']:,.0f} MB | eta {format_seconds(eta)}")


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


# ----------------------------------------------------------------------------- progress, time, stop

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
