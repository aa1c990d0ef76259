"""Checkpoints: one .pt file per save, holding only tensors and plain Python values, so it
loads with torch.load(weights_only=True) (no arbitrary unpickling). Written atomically: a
temporary file is renamed into place only once complete.

Layout of a checkpoint dict:
  format       CHECKPOINT_FORMAT
  kind         "pretrain" or "sft"
  model_args   ModelArgs.to_dict()
  tokenizer    Tokenizer.identity()
  model        the model's state_dict
  step         optimizer steps taken
  ...          whatever the training module adds (optimizer, scaler, rng, data position, config)

In an out dir: step_XXXXXXXX.pt for periodic saves and best.pt for the best validation loss.
"""
import json
import os
import re
from pathlib import Path

import torch

from model import ModelArgs, Transformer

CHECKPOINT_FORMAT = "baby-llama2-chinese/1"
STEP_PATTERN = re.compile(r"^step_(\d+)\.pt$")


def write_text_atomic(path, text):
    """Write text under a temporary name and rename it into place, so a reader never sees
    half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_checkpoint(path, ckpt):
    """Atomically write ckpt to path, with a readable .json of its config beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {"format": CHECKPOINT_FORMAT, **ckpt}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    summary = {k: ckpt[k] for k in ("format", "kind", "step", "model_args", "tokenizer") if k in ckpt}
    write_text_atomic(path.with_suffix(".json"), json.dumps(summary, ensure_ascii=False, indent=2))


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
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    steps = step_checkpoints(path)
    if prefer == "best" and (path / "best.pt").is_file():
        return path / "best.pt"
    if steps:
        return steps[-1]
    if (path / "best.pt").is_file():
        return path / "best.pt"
    raise FileNotFoundError(f"no checkpoint (best.pt or step_*.pt) in {path}")


def load_checkpoint(path, prefer="best"):
    """Load a checkpoint dict safely, onto the CPU; refuse files that are corrupt or not ours."""
    path = resolve_checkpoint(path, prefer)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is corrupt or not a safe checkpoint: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} checkpoint")
    for key in ("model_args", "model", "tokenizer"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path} has no '{key}' entry")
    ckpt["path"] = str(path)
    return ckpt


def model_from_checkpoint(ckpt, device="cpu"):
    """Build the Transformer a loaded checkpoint describes and load its weights."""
    model = Transformer(ModelArgs.from_dict(ckpt["model_args"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {ckpt.get('path')}: weights do not match its model_args: {e}") from None
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
        tok = load_tokenizer(tokenizer_path, download=not own)
    except TokenizerNotFound:
        if tokenizer_path or not own:
            raise
        raise TokenizerNotFound(
            f"checkpoint {ckpt.get('path')} was trained with its own tokenizer {recorded.get('name')}, recorded at "
            f"{recorded.get('path')}, which no longer exists.\nPass --tokenizer PATH to that tokenizer.model "
            f"(sha256 {recorded.get('sha256')}).") from None
    tok.check_identity(recorded, f"checkpoint {ckpt.get('path')}")
    return tok
