"""Pretrain the Llama2 model on tokenized .bin files (made by data_process.py pretrain).

    python pretrain.py --data 'data/pretrain/*.bin' --out-dir out/pretrain --max-tokens 5e9
    torchrun --standalone --nproc_per_node=4 pretrain.py --data 'data/pretrain/*.bin' ...
    python pretrain.py ... --resume      # continue exactly where the last checkpoint stopped

Validation uses the NAME_val.bin beside each training NAME.bin. run() below builds the model
and the batches; the training loop itself is trainer.train (trainer.py).
"""
import argparse
from dataclasses import fields

import numpy as np

import cli
import trainer
from batches import Batches, eval_batches
from chatglm_tokenizer import load_tokenizer
from checkpoint import load_resume
from corpus import DataError
from dataset import PretrainDataset, find_bin_files
from environment import run_script
from model import ModelArgs, Transformer
from refusal import Refusal
from train_flags import add_train_args

# Every default of pretrain.py, but the model's (ModelArgs' defaults in model.py) and the shared
# training ones this does not change (train_flags.TRAIN_DEFAULTS). Upstream's model with cosine
# decay, trained by Muon on the hidden matrices and AdamW on embeddings, norms and head;
# --optimizer adamw is upstream's recipe.
DEFAULTS = dict(data=["data/pretrain/*.bin"], tokenizer=None,
                optimizer="muon", grad_accum=4, epochs=1.0, out_dir="out/pretrain")
VAL_TEXT_TOKENS = 1_000_000  # validation tokens decoded to count their characters (val_bpc)

# The ModelArgs fields that are flags, with their help. A field's flag is its name with dashes
# (n_kv_heads: --n-kv-heads), with the field's default and the default's type; a bool field,
# off by default, is a switch. vocab_size is the tokenizer's.
MODEL_FLAGS = {
    "dim": "model width",
    "n_layers": "transformer blocks",
    "n_heads": "attention heads",
    "n_kv_heads": "key/value heads for grouped-query attention (default, or 0: as many as --n-heads)",
    "max_seq_len": "context length of a training window",
    "multiple_of": "SwiGLU hidden size rounding",
    "dropout": "dropout probability",
    "qk_norm": "RMS-normalize queries and keys per head",
}


def add_model_args(parser):
    m = parser.add_argument_group("model (ignored on --resume: the checkpoint's config is used)")
    defaults = {field.name: field.default for field in fields(ModelArgs)}
    for name, text in MODEL_FLAGS.items():
        flag, default = "--" + name.replace("_", "-"), defaults[name]
        if isinstance(default, bool):
            m.add_argument(flag, action="store_true", help=text)
        else:  # a None default (n_kv_heads) stands for an int
            m.add_argument(flag, type=int if default is None else type(default), default=default, help=text)
    # tie_embeddings is on by default, so its flag turns it off
    m.add_argument("--untie-head", action="store_true", help="give the output head its own weights instead of the embedding's")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--data", nargs="+", help="training .bin files, globs or directories (NAME_val.bin files are held out)")
    parser.add_argument("--tokenizer", help="tokenizer.model the .bin files were made with (None: ChatGLM2)")
    add_model_args(parser)
    add_train_args(parser)
    parser.set_defaults(**DEFAULTS)
    return parser.parse_args(argv)


def model_args_from_flags(cfg, vocab_size):
    """The ModelArgs the model flags ask for; refused (one line) when they do not fit together."""
    model_args = {name: getattr(cfg, name) for name in MODEL_FLAGS}
    model_args["n_kv_heads"] = model_args["n_kv_heads"] or None  # 0 means None too: as many as n_heads
    try:
        return ModelArgs(**model_args, vocab_size=vocab_size, tie_embeddings=not cfg.untie_head)
    except ValueError as e:  # ModelArgs checks its shape (dim divisible by n_heads, ...)
        raise Refusal(f"model flags: {e}") from None


def main(argv=None):
    return run_script("pretrain.py", run, parse_args(argv))


def run(cfg, env):
    tokenizer = load_tokenizer(cfg.tokenizer)
    resume = load_resume(cfg, env, "pretrain", tokenizer, inputs=[("--data", d) for d in cfg.data])
    model_args = (ModelArgs.from_dict(resume["model_args"]) if resume
                  else model_args_from_flags(cfg, tokenizer.vocab_size))
    model = Transformer(model_args)

    train_files, val_files = find_bin_files(cfg.data)
    if not val_files:
        raise DataError(f"--data {' '.join(cfg.data)}: no NAME_val.bin beside the training files to "
                        f"validate on (data_process.py pretrain writes one unless --val-fraction 0)")
    identity = tokenizer.identity()
    train_set = PretrainDataset(train_files, model_args.max_seq_len, identity, model_args.vocab_size)
    val_set = PretrainDataset(val_files, model_args.max_seq_len, identity, model_args.vocab_size)
    env.print(f"data: {len(train_files)} training file(s), {train_set.n_tokens:,} tokens, {len(train_set):,} "
              f"windows; validation {val_set.n_tokens:,} tokens")
    train_batches = Batches(train_set, cfg.batch_size, cfg.seed, env)
    val_batches = lambda: eval_batches(val_set, cfg.batch_size, cfg.eval_batches, env)  # noqa: E731
    val_text = text_size(val_files, tokenizer)
    env.print(f"validation text: {val_text[1] / val_text[0]:.2f} characters per token "
              f"(over its first {val_text[0]:,} tokens), which turns val_loss into val_bpc")
    train_data = [(f.name, meta["n_tokens"]) for f, meta in zip(train_set.files, train_set.metas)]
    return trainer.train(cfg, env, model, "pretrain", tokenizer, train_batches, val_batches, train_data, resume,
                         val_text=val_text)


def text_size(bin_files, tokenizer, max_tokens=VAL_TEXT_TOKENS):
    """(tokens, characters) of the text in uint16 .bin files, decoded up to max_tokens tokens:
    the ratio that turns a loss per token into bits per character (metrics.bits_per_char)."""
    tokens = chars = 0
    for f in bin_files:
        ids = np.memmap(f, dtype="<u2", mode="r")[:max_tokens - tokens]
        tokens += len(ids)
        chars += len(tokenizer.decode(ids.tolist()))
        if tokens >= max_tokens:
            break
    return tokens, chars


if __name__ == "__main__":
    main()
