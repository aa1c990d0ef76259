"""Pretrain the Llama2 model on tokenized .bin files (made by data_process.py pretrain).

    python pretrain.py --data 'data/pretrain/*.bin' --out-dir out/pretrain --max-tokens 5e9
    torchrun --standalone --nproc_per_node=4 pretrain.py --data 'data/pretrain/*.bin' ...
    python pretrain.py ... --resume      # continue exactly where the last checkpoint stopped

Validation uses the NAME_val.bin beside each training NAME.bin. The training machinery
(precision, DDP, schedule, checkpoints, metrics) lives in trainer.py.
"""
import argparse

import trainer
from chatglm_tokenizer import load_tokenizer
from dataset import PretrainDataset, find_bin_files
from model import ModelArgs, Transformer

# The seed's model (58.5M parameters, 512 tokens of context) with cosine decay, trained by
# Muon on the hidden matrices and AdamW on embeddings, norms and head: the same loss with
# about 0.56x the tokens of the seed's AdamW (bench/bench_recipe.py). --optimizer adamw is
# the seed recipe exactly.
MODEL_DEFAULTS = dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=0, max_seq_len=512, multiple_of=32, dropout=0.0)
TRAIN_DEFAULTS = dict(optimizer="muon", batch_size=8, grad_accum=4, lr=3e-4, min_lr=3e-5, warmup_steps=1000, weight_decay=0.1,
                      max_steps=0, max_tokens=0, epochs=1.0, eval_every=1000, eval_batches=50, save_every=1000,
                      keep_last=3, log_every=10, out_dir="out/pretrain")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["data/pretrain/*.bin"],
                        help="training .bin files, globs or directories (NAME_val.bin files are held out)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model the .bin files were made with (default: ChatGLM2)")
    m = parser.add_argument_group("model (ignored on --resume: the checkpoint's config is used)")
    m.add_argument("--dim", type=int, default=MODEL_DEFAULTS["dim"], help="model width")
    m.add_argument("--n-layers", type=int, default=MODEL_DEFAULTS["n_layers"], help="transformer blocks")
    m.add_argument("--n-heads", type=int, default=MODEL_DEFAULTS["n_heads"], help="attention heads")
    m.add_argument("--n-kv-heads", type=int, default=MODEL_DEFAULTS["n_kv_heads"],
                   help="key/value heads for grouped-query attention (0: as many as --n-heads)")
    m.add_argument("--max-seq-len", type=int, default=MODEL_DEFAULTS["max_seq_len"], help="context length of a training window")
    m.add_argument("--multiple-of", type=int, default=MODEL_DEFAULTS["multiple_of"], help="SwiGLU hidden size rounding")
    m.add_argument("--dropout", type=float, default=MODEL_DEFAULTS["dropout"], help="dropout probability")
    m.add_argument("--qk-norm", action="store_true", help="RMS-normalize queries and keys per head")
    m.add_argument("--untie-head", action="store_true", help="give the output head its own weights instead of the embedding's")
    trainer.add_train_args(parser, TRAIN_DEFAULTS)
    return parser.parse_args(argv)


def model_args_from_flags(cfg, vocab_size):
    return ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads or None,
                     vocab_size=vocab_size, multiple_of=cfg.multiple_of, max_seq_len=cfg.max_seq_len,
                     dropout=cfg.dropout, qk_norm=cfg.qk_norm, tie_embeddings=not cfg.untie_head)


def main(argv=None):
    cfg = parse_args(argv)
    env = trainer.setup(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer)
    resume = trainer.load_resume(cfg, "pretrain", tokenizer)
    args = ModelArgs.from_dict(resume["model_args"]) if resume else model_args_from_flags(cfg, tokenizer.vocab_size)
    model = Transformer(args)

    train_files, val_files = find_bin_files(cfg.data)
    if not val_files:
        raise FileNotFoundError(f"--data {cfg.data}: no NAME_val.bin beside the training files to validate on")
    identity = tokenizer.identity()
    train_set = PretrainDataset(train_files, args.max_seq_len, identity)
    val_set = PretrainDataset(val_files, args.max_seq_len, identity)
    env.print(f"data: {len(train_files)} training file(s), {train_set.n_tokens:,} tokens, {len(train_set):,} windows; "
              f"validation {val_set.n_tokens:,} tokens")
    train_batches = trainer.Batches(train_set, cfg.batch_size, cfg.seed, env)
    val_batches = lambda: trainer.eval_batches(val_set, cfg.batch_size, cfg.eval_batches, env)  # noqa: E731
    try:
        return trainer.train(cfg, env, model, "pretrain", tokenizer, train_batches, val_batches, resume)
    finally:
        env.close()


if __name__ == "__main__":
    main()
