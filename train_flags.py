"""The flags every training script shares (pretrain.py, sft.py, dpo.py), with their defaults.

TRAIN_DEFAULTS is the one place those defaults live; a script overrides the few it needs in
its own DEFAULTS (parser.set_defaults), so `SCRIPT.py --help` shows the value that applies.

    parser = argparse.ArgumentParser(formatter_class=cli.HelpFormatter)
    ...                                    # the script's own flags (data, model)
    add_train_args(parser)                 # the flags below
    parser.set_defaults(**DEFAULTS)        # the script's defaults, its overrides of these included
"""
import argparse

import cli

# Shared defaults; a script overrides some with parser.set_defaults.
TRAIN_DEFAULTS = dict(
    batch_size=8, grad_accum=1, lr=3e-4, min_lr=3e-5, warmup_steps=1000, weight_decay=0.1,
    beta1=0.9, beta2=0.95, grad_clip=1.0, max_steps=0, max_tokens=0, epochs=0.0,
    eval_every=1000, eval_batches=50, save_every=1000, keep_last=3, log_every=10,
    optimizer="adamw", muon_lr=0.02, muon_momentum=0.95, muon_dtype="auto", dtype="auto", device="auto",
    compile=False, seed=1337, out_dir="out/train", stop_after_steps=0, peak_flops=0.0,
)

# Dense bf16 tensor-core peaks (FLOP/s) for the MFU estimate, by a part of the GPU's name;
# --peak-flops overrides.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12,
              "3090": 71e12, "A10G": 70e12, "V100": 125e12}


def add_train_args(parser):
    d = TRAIN_DEFAULTS
    g = parser.add_argument_group("training")
    g.add_argument("--out-dir", default=d["out_dir"], help="checkpoints, metrics.jsonl and the loss plot go here")
    g.add_argument("--resume", action="store_true", help="continue from the latest step_*.pt in --out-dir (fresh start if none)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out-dir that holds another run, moving that run aside whole (OUT_DIR.replaced-TIME)")
    g.add_argument("--batch-size", type=cli.POSITIVE_INT, default=d["batch_size"], help="micro-batch size per process")
    g.add_argument("--grad-accum", type=cli.POSITIVE_INT, default=d["grad_accum"], help="micro-batches per optimizer step (per process)")
    g.add_argument("--max-steps", type=cli.COUNT, default=d["max_steps"], help="budget in optimizer steps (0: unset)")
    g.add_argument("--max-tokens", type=cli.NON_NEGATIVE, default=d["max_tokens"], help="budget in training tokens (0: unset)")
    g.add_argument("--epochs", type=cli.NON_NEGATIVE, default=d["epochs"], help="budget in passes over the training data (0: unset)")
    g.add_argument("--stop-after-steps", type=cli.COUNT, default=d["stop_after_steps"],
                   help="stop with a checkpoint after this many steps in this invocation, keeping the planned schedule (0: never)")
    g.add_argument("--lr", type=cli.POSITIVE, default=d["lr"], help="peak learning rate (AdamW)")
    g.add_argument("--min-lr", type=cli.NON_NEGATIVE, default=d["min_lr"], help="learning rate at the end of the cosine decay")
    g.add_argument("--warmup-steps", type=cli.COUNT, default=d["warmup_steps"], help="linear warmup steps (capped at a tenth of the run)")
    g.add_argument("--weight-decay", type=cli.NON_NEGATIVE, default=d["weight_decay"], help="decoupled weight decay on >=2-D weights")
    g.add_argument("--beta1", type=cli.FRACTION, default=d["beta1"], help="AdamW beta1")
    g.add_argument("--beta2", type=cli.FRACTION, default=d["beta2"], help="AdamW beta2")
    g.add_argument("--grad-clip", type=cli.NON_NEGATIVE, default=d["grad_clip"], help="clip the gradient norm to this (0: off)")
    g.add_argument("--optimizer", choices=["adamw", "muon"], default=d["optimizer"],
                   help="adamw for everything, or muon for the hidden 2-D matrices and AdamW for the rest")
    g.add_argument("--muon-lr", type=cli.POSITIVE, default=d["muon_lr"], help="peak learning rate of Muon's matrices")
    g.add_argument("--muon-momentum", type=cli.FRACTION, default=d["muon_momentum"], help="Muon momentum")
    g.add_argument("--muon-dtype", choices=["auto", "bfloat16", "float32"], default=d["muon_dtype"],
                   help="dtype of Muon's Newton-Schulz iterations; auto: bf16 where the hardware computes it "
                        "natively (CUDA, CPUs with AVX512-BF16 or AMX), else fp32")
    g.add_argument("--eval-every", type=cli.COUNT, default=d["eval_every"], help="validate every N optimizer steps (0: only at the end)")
    g.add_argument("--eval-batches", type=cli.POSITIVE_INT, default=d["eval_batches"], help="validation micro-batches per process")
    g.add_argument("--save-every", type=cli.COUNT, default=d["save_every"], help="write step_*.pt every N optimizer steps (0: only at the end)")
    g.add_argument("--keep-last", type=cli.POSITIVE_INT, default=d["keep_last"], help="how many step_*.pt to keep")
    g.add_argument("--log-every", type=cli.COUNT, default=d["log_every"], help="log to stdout and metrics.jsonl every N steps (0: only at the end)")
    g.add_argument("--device", default=d["device"], help="auto, cpu, cuda or cuda:N (under torchrun: the local rank's GPU)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=d["dtype"],
                   help="autocast dtype; auto: bf16 on CUDA where supported, else fp16 (with loss scaling); fp32 on CPU")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d["compile"], help="torch.compile the model")
    g.add_argument("--seed", type=int, default=d["seed"], help="seed for the init, dropout and data order")
    g.add_argument("--peak-flops", type=cli.NON_NEGATIVE, default=d["peak_flops"], help="device peak FLOP/s for MFU (0: guess from the GPU name)")
    return parser

