"""Checkpoints: one .pt file per save, holding only tensors and plain Python values, so it
loads with torch.load(weights_only=True) (no arbitrary unpickling). Written atomically
(atomic.py): a temporary file is renamed into place only once complete.

Checksums. Every checkpoint carries a CRC-32 of each of its tensors (dtype, shape and bytes)
and one of all its other values, and every load (resume, sft --init, eval, chat, export)
recomputes and compares them: a file with flipped bytes is refused with a message naming it
and the entry that differs, never used. (A truncated file fails earlier, in torch.load.) The
checksums guard against accidental damage (disk, copy, transfer), where a CRC-32 misses one
damaged tensor in 4 billion; they are stored in the file they check, so no hash could guard
against deliberate edits anyway, and a CRC-32 costs less than a cryptographic hash
(bench/bench_checkpoint.py measures both). A checkpoint written before checksums existed
(format /1) still loads, with a warning that it could not be verified.

Layout of a checkpoint dict:
  format       CHECKPOINT_FORMAT
  kind         "pretrain", "sft" or "dpo" (ANSWERING_KINDS answer prompts)
  model_args   ModelArgs.to_dict()
  tokenizer    Tokenizer.identity()
  model        the model's state_dict
  step         optimizer steps taken
  ...          whatever the training module adds (optimizer, scaler, rng, data position, config)
  checksums    {"values": CRC-32 of everything but the tensors, "tensors": {name: CRC-32}}

In an out dir: step_XXXXXXXX.pt for periodic saves and best.pt for the best validation loss.

Resuming (--resume). load_resume picks the newest checkpoint of the out dir that verifies
(setting damaged ones aside), check_resume compares the run's settings with the ones it was
saved with (refusing changes that would silently break the exact continuation), and
rng_state / set_rng_state carry every process's random state across, so a resumed run
reproduces the uninterrupted one bit for bit. prune_step_checkpoints keeps the last K.
"""
import fcntl
import json
import os
import re
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from atomic import AtomicFile, naming_errors, write_json_atomic
from model import ModelArgs, Transformer
from refusal import Refusal

# the kinds of checkpoint that answer prompts in prompt.py's format (fine-tuned by sft.py, then dpo.py)
ANSWERING_KINDS = ("sft", "dpo")

CHECKPOINT_FORMAT = "baby-llama2-chinese/2"
UNCHECKED_FORMAT = "baby-llama2-chinese/1"  # written before checksums: loads, unverified
STEP_PATTERN = re.compile(r"^step_(\d+)\.pt$")
CHECKSUM_THREADS = min(8, os.cpu_count() or 1)  # zlib.crc32 releases the GIL, so threads run in parallel


class CheckpointError(Refusal):
    """A checkpoint that cannot be used: corrupt, not ours, or failing its checksums."""


# ----------------------------------------------------------------------------- checksums

def canonical(obj, name, tensors):
    """obj as plain JSON-able values, the same before saving and after loading; each tensor is
    replaced by its name and collected into `tensors` (name -> tensor)."""
    if isinstance(obj, torch.Tensor):
        tensors[name] = obj
        return f"tensor {name}"
    if isinstance(obj, dict):  # OrderedDicts too; keys may be ints (optimizer states)
        return {"dict": [[repr(k), canonical(v, f"{name}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [canonical(v, f"{name}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, float):
        return repr(obj)  # exact, and inf/nan stay distinct
    return obj if isinstance(obj, (int, str, bool, type(None))) else repr(obj)


def crc32(data, start=0):
    return f"{zlib.crc32(data, start):08x}"


def tensor_crc32(t):
    """CRC-32 of a tensor's dtype, shape and bytes."""
    head = zlib.crc32(f"{t.dtype} {tuple(t.shape)}".encode())
    return crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(), head)


def storage_key(t):
    """Where a tensor's bytes live: equal for the tensors that share them (tied weights)."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype, t.device


def checksums(ckpt):
    """{"values": CRC-32, "tensors": {name: CRC-32}} of ckpt (its "checksums" and "path" aside)."""
    tensors = {}
    values = canonical({k: v for k, v in ckpt.items() if k not in ("checksums", "path")}, "", tensors)
    keys = {name: storage_key(t) for name, t in tensors.items()}
    first = {}  # storage -> the first tensor in it: shared bytes are read once
    for name, key in keys.items():
        first.setdefault(key, name)
    largest_first = sorted(first.values(), key=lambda n: -tensors[n].nbytes)  # keeps the threads evenly busy
    with ThreadPoolExecutor(CHECKSUM_THREADS) as pool:
        digests = dict(zip(largest_first, pool.map(lambda n: tensor_crc32(tensors[n]), largest_first)))
    return {"values": crc32(json.dumps(values).encode()),
            "tensors": {name: digests[first[key]] for name, key in keys.items()}}


def verify(ckpt, path):
    """Refuse a checkpoint whose contents differ from the checksums saved with it."""
    saved = ckpt.get("checksums")
    if not isinstance(saved, dict) or not isinstance(saved.get("tensors"), dict):
        raise CheckpointError(f"checkpoint {path} has no checksums: the file is damaged; use an earlier checkpoint")
    actual = checksums(ckpt)
    differ = [] if saved.get("values") == actual["values"] else ["its plain values (step, config, ...)"]
    names = set(saved["tensors"]) | set(actual["tensors"])
    differ += sorted(n.lstrip("/") for n in names if saved["tensors"].get(n) != actual["tensors"].get(n))
    if differ:
        raise CheckpointError(f"checkpoint {path} is damaged: {len(differ)} of its entries differ from their "
                              f"checksums (first: {differ[0]}); use an earlier checkpoint")


# ----------------------------------------------------------------------------- files

def save_checkpoint(path, ckpt):
    """Atomically write ckpt, with its checksums, to path, and a readable .json of its config
    beside it."""
    path = Path(path)
    ckpt = {"format": CHECKPOINT_FORMAT, **{k: v for k, v in ckpt.items() if k not in ("path", "checksums")}}
    ckpt["checksums"] = checksums(ckpt)
    with AtomicFile(path, "wb") as out:
        torch.save(ckpt, out.f)
    summary = {k: ckpt[k] for k in ("format", "kind", "step", "model_args", "tokenizer") if k in ckpt}
    write_json_atomic(path.with_suffix(".json"), summary)


def step_checkpoints(out_dir):
    """Periodic checkpoints in out_dir, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(out_dir).glob("step_*.pt") if (m := STEP_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path, prefer="best"):
    """An out dir or a checkpoint file -> a checkpoint file. In a dir, prefer='best' takes
    best.pt when it exists, else the latest step; prefer='latest' takes the latest step."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a checkpoint file or a training out dir")
    steps = step_checkpoints(path)
    if prefer == "best" and (path / "best.pt").is_file():
        return path / "best.pt"
    if steps:
        return steps[-1]
    if (path / "best.pt").is_file():
        return path / "best.pt"
    raise CheckpointError(f"no checkpoint (best.pt or step_*.pt) in {path}")


def load_checkpoint(path, prefer="best"):
    """Load a checkpoint dict safely, onto the CPU, and verify its checksums; refuse files that
    are corrupt or not ours (CheckpointError)."""
    path = resolve_checkpoint(path, prefer)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, overwritten, or a pickle of arbitrary objects
        reason = str(e).split(". ")[0][:200]  # torch's messages go on for lines
        raise CheckpointError(f"checkpoint {path} is corrupt (truncated or overwritten) or not a safe checkpoint: "
                              f"{type(e).__name__}: {reason}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (CHECKPOINT_FORMAT, UNCHECKED_FORMAT):
        raise CheckpointError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} checkpoint")
    if ckpt["format"] == CHECKPOINT_FORMAT:
        verify(ckpt, path)
    else:
        print(f"warning: checkpoint {path} was written before checkpoints had checksums; it cannot be verified",
              file=sys.stderr, flush=True)  # stderr: chat.py --prompt keeps stdout for the answer
    for key in ("model_args", "model", "tokenizer"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path} has no '{key}' entry")
    ckpt["path"] = str(path)
    return ckpt


def load_latest_good(out_dir):
    """The newest step_*.pt of out_dir that loads and verifies, else its best.pt (None if there
    is neither), and [(path, reason)] of those tried before that failed. Raises
    CheckpointError if none verifies."""
    best = [Path(out_dir) / "best.pt"] if (Path(out_dir) / "best.pt").is_file() else []
    damaged = []
    for path in step_checkpoints(out_dir)[::-1] + best:
        try:
            return load_checkpoint(path), damaged
        except CheckpointError as e:
            damaged.append((path, str(e)))
    if damaged:
        raise CheckpointError(f"no checkpoint in {out_dir} is usable ({'; '.join(reason for _, reason in damaged)}); "
                              f"move them away to start afresh")
    return None, []


def model_from_checkpoint(ckpt, device="cpu"):
    """Build the Transformer a loaded checkpoint describes and load its weights."""
    model = Transformer(ModelArgs.from_dict(ckpt["model_args"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {ckpt.get('path')}: weights do not match its model_args: {e}") from None
    return model.to(device)


def tokenizer_for_checkpoint(ckpt, tokenizer_path=None):
    """The tokenizer a checkpoint was trained with: the given path, else the one its record
    names, else the usual search; its hash must match the record. An own vocabulary is never
    looked for on the Hub (no repo there holds it): when its recorded file is gone, the error
    names that path at once."""
    from chatglm_tokenizer import CHATGLM2_SHA256, TokenizerNotFound, load_tokenizer
    recorded = ckpt["tokenizer"]
    own = recorded.get("sha256") != CHATGLM2_SHA256
    if tokenizer_path is None and recorded.get("path") and Path(recorded["path"]).is_file():
        tokenizer_path = recorded["path"]
    try:
        tokenizer = load_tokenizer(tokenizer_path, download=not own)
    except TokenizerNotFound:
        if tokenizer_path or not own:
            raise
        raise TokenizerNotFound(
            f"checkpoint {ckpt.get('path')} was trained with its own tokenizer {recorded.get('name')}, recorded at "
            f"{recorded.get('path')}, which no longer exists.\nPass --tokenizer PATH to that tokenizer.model "
            f"(sha256 {recorded.get('sha256')}).") from None
    tokenizer.check_identity(recorded, f"checkpoint {ckpt.get('path')}")
    return tokenizer


# ----------------------------------------------------------------------------- resuming a run

LOCK_FILE = ".lock"  # in an out dir while a run writes it; holds the run's pid
_held_locks = {}  # out dir -> its open lock file: a lock lasts until the process ends (kill -9 included)


def lock_out_dir(out):
    """Take the out dir's lock, or refuse naming the process that holds it: two runs writing
    one out dir would interleave their checkpoints. Creates the dir."""
    if out in _held_locks:  # this process again (a test, or a run after an --overwrite)
        return
    with naming_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise Refusal(f"--out-dir {out} is being written by another run (pid {holder}): wait for it to end, "
                      f"or choose another --out-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held_locks[out] = fd


def claim_out_dir(cfg, env, inputs=()):
    """Make sure a run cannot destroy what is already written: --out-dir may not be an input
    ((flag, path) pairs) or hold one; no other run may be writing it (its lock); and without
    --resume it may not hold another run's checkpoints, which a fresh run would overwrite and
    prune; --overwrite moves that run aside whole (OUT_DIR.replaced-TIME), never mixing the two."""
    out = Path(cfg.out_dir).resolve()
    for flag, path in inputs:
        p = Path(path).resolve()
        if p == out or out in p.parents:
            raise Refusal(f"--out-dir {cfg.out_dir} holds {flag} {path}: the run would write over its own input; "
                          f"choose another --out-dir")
    if env.master:
        lock_out_dir(out)
    if cfg.resume:
        return
    old = sorted(p.name for p in out.glob("*.pt"))
    if old and not cfg.overwrite:
        raise Refusal(f"--out-dir {cfg.out_dir} holds another run's checkpoints ({', '.join(old[:3])}"
                      f"{', ...' if len(old) > 3 else ''}): continue it with --resume, move it aside with --overwrite, "
                      f"or choose another --out-dir")
    if old and env.master:
        aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        with naming_errors(out):
            os.replace(out, aside)
        env.print(f"--overwrite: moved the previous run in {cfg.out_dir} to {aside}")
        os.close(_held_locks.pop(out))  # that lock went aside with the old run
        lock_out_dir(out)


def load_resume(cfg, env, kind, tokenizer, inputs=()):
    """The checkpoint to continue from when --resume is given: the newest step_*.pt of
    cfg.out_dir that loads and passes its checksums (else best.pt), or None when there is none
    yet. The ones tried before that failed (damaged, truncated) are said so and set aside as
    NAME.pt.damaged, so that pruning never counts them among the checkpoints it keeps.
    Refuses a checkpoint of another kind or another tokenizer. First claim_out_dir checks
    that the out dir is the run's to write (inputs: the run's (flag, path) inputs)."""
    claim_out_dir(cfg, env, inputs)
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
RESUME_MUST_MATCH = ("batch_size", "grad_accum", "seed", "group_by_length", "max_seq_len",
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
    before = resume.get("train_data", header["train_data"])
    names = [name for name, _ in before] == [name for name, _ in header["train_data"]]
    cut_otherwise = old.get("max_seq_len") != new.get("max_seq_len")  # the same files' tokens, cut to another length
    if before != header["train_data"] and not (names and cut_otherwise):
        refused.append(f"--data {describe_data(resume['train_data'])} -> {describe_data(header['train_data'])}")
    if refused:
        raise Refusal(f"--resume: {'; '.join(refused)} since checkpoint {resume['path']}; a resumed run keeps "
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

