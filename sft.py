"""Supervised fine-tuning: a pretrained checkpoint learns to answer prompts, with the loss on
the answers only (normalized JSONL made by data_process.py sft).

    python sft.py --init out/pretrain --data data/sft/NAME.jsonl --out-dir out/sft
    torchrun --standalone --nproc_per_node=4 sft.py --init out/pretrain --data data/sft/NAME.jsonl
    python sft.py ... --resume      # continue exactly where the last checkpoint stopped

Validation uses NAME_val.jsonl beside the training file when it exists. The model's shape and
context length come from the --init checkpoint, whose tokenizer must be the one used here.
run() below builds the model and the batches; the training loop itself is trainer.train
(trainer.py).
"""
import argparse
from functools import partial
from pathlib import Path

import cli
import trainer
from batches import Batches, eval_batches, naming_worker_deaths
from checkpoint import CheckpointError, load_checkpoint, load_resume, model_from_checkpoint, tokenizer_for_checkpoint
from dataset_sft import SFTDataset, collate_sft, length_grouped_batches
from environment import run_script
from model import ModelArgs, Transformer
from refusal import Refusal
from train_flags import add_train_args

# Every default of sft.py, but the shared training ones it does not change
# (train_flags.TRAIN_DEFAULTS). Fine-tuning, not learning from scratch: a smaller learning rate
# than pretraining's, a few passes over a small set, no weight decay.
DEFAULTS = dict(init="out/pretrain", data="data/sft/sft.jsonl", tokenizer=None, max_seq_len=0, dropout=None,
                group_by_length=True, num_workers=2,
                batch_size=32, lr=5e-5, min_lr=5e-6, warmup_steps=100, weight_decay=0.0, epochs=3.0,
                eval_every=500, save_every=500, keep_last=2, out_dir="out/sft")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--init", help="pretraining checkpoint to start from: a .pt file or an out dir (its best.pt, else latest)")
    parser.add_argument("--data", help="normalized SFT JSONL ({prompt, answer} per line); NAME_val.jsonl beside it validates")
    parser.add_argument("--tokenizer", help="tokenizer.model (None: the one the checkpoint records)")
    parser.add_argument("--max-seq-len", type=int,
                        help="positions per example, longer ones are cut (0: the checkpoint's context length)")
    parser.add_argument("--dropout", type=float, help="dropout while fine-tuning (None: the checkpoint's)")
    parser.add_argument("--group-by-length", action=argparse.BooleanOptionalAction,
                        help="batch examples of similar length together (less padding); --no-group-by-length: random batches")
    parser.add_argument("--num-workers", type=int, help="DataLoader worker processes that tokenize the examples")
    add_train_args(parser)
    parser.set_defaults(**DEFAULTS)
    return parser.parse_args(argv)


def init_model(cfg):
    """The --init checkpoint's model and tokenizer, refused when they do not fit together."""
    init = load_checkpoint(cfg.init, prefer="best")
    tokenizer = tokenizer_for_checkpoint(init, cfg.tokenizer)  # raises when the sha256 differs
    model_args = dict(init["model_args"])
    if cfg.dropout is not None:
        model_args["dropout"] = cfg.dropout
    if model_args["vocab_size"] < tokenizer.vocab_size:
        raise CheckpointError(f"checkpoint {init['path']}: its model has {model_args['vocab_size']} token rows, "
                              f"but tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids")
    model = model_from_checkpoint({**init, "model_args": model_args})  # raises when the weights' shapes differ
    return model, tokenizer, init


def main(argv=None):
    return run_script("sft.py", run, parse_args(argv))


def run(cfg, env):
    model, tokenizer, init = init_model(cfg)
    env.print(f"init: {init['path']} ({init.get('kind')} checkpoint, step {init.get('step')})")
    resume = load_resume(cfg, env, "sft", tokenizer, inputs=[("--init", init["path"]), ("--data", cfg.data)])
    if resume:  # trainer.train loads the resumed weights into a model of the resumed shape
        model = Transformer(ModelArgs.from_dict(resume["model_args"]))
    resolve_max_seq_len(cfg, model)
    train_set, train_batches, val_batches = example_batches(cfg, env, tokenizer, SFTDataset, collate_sft, "examples",
                                                            cfg.num_workers)
    train_data = [(Path(cfg.data).name, int(train_set.lengths.sum()))]  # positions: change with the data and --max-seq-len
    with naming_worker_deaths(train_batches):
        return trainer.train(cfg, env, model, "sft", tokenizer, train_batches, val_batches, train_data, resume,
                             extra={"init": init["path"]})


def resolve_max_seq_len(cfg, model):
    """cfg.max_seq_len resolved (0: the model's context), so that the trainer's plan, FLOP
    count and config.json use it; refused outside 1..context."""
    max_seq_len = cfg.max_seq_len or model.args.max_seq_len
    if not 0 < max_seq_len <= model.args.max_seq_len:
        raise Refusal(f"--max-seq-len {max_seq_len}: give a length from 1 to the model's context length "
                      f"{model.args.max_seq_len}, or 0 for the checkpoint's")
    cfg.max_seq_len = max_seq_len


def example_batches(cfg, env, tokenizer, dataset_class, collate_fn, unit, num_workers=0):
    """(training set, its Batches, the validation batches or None) of --data and the
    NAME_val.jsonl beside it, batched by length unless --no-group-by-length (sft.py and dpo.py)."""
    data = Path(cfg.data)
    val_path = data.with_name(data.stem + "_val.jsonl")
    train_set = dataset_class(data, tokenizer, cfg.max_seq_len)
    val_set = dataset_class(val_path, tokenizer, cfg.max_seq_len) if val_path.is_file() else None
    env.print(f"data: {len(train_set):,} {unit}, {train_set.lengths.sum():,} positions in {data}; "
              + (f"validation {len(val_set):,} {unit} in {val_path}" if val_set else f"no {val_path}: no validation"))
    collate = partial(collate_fn, pad_id=tokenizer.pad_id)
    grouped = partial(length_grouped_batches, train_set.lengths, cfg.batch_size, cfg.seed,
                      rank=env.rank, world_size=env.world_size)
    train_batches = Batches(train_set, cfg.batch_size, cfg.seed, env, collate_fn=collate, num_workers=num_workers,
                            make_epoch=grouped if cfg.group_by_length else None)
    val_batches = (lambda: eval_batches(val_set, cfg.batch_size, cfg.eval_batches, env, collate)) if val_set else None
    return train_set, train_batches, val_batches


if __name__ == "__main__":
    main()
