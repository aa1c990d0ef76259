"""Preference tuning with DPO (Rafailov et al. 2023): a fine-tuned checkpoint learns to prefer
the chosen answer of each pair over the rejected one (pairs made by data_process.py prefs).

    python dpo.py --init out/sft --data data/prefs/NAME.jsonl --out-dir out/dpo
    torchrun --standalone --nproc_per_node=4 dpo.py --init out/sft --data data/prefs/NAME.jsonl
    python dpo.py ... --resume      # continue exactly where the last checkpoint stopped

The loss. For a prompt x with a chosen answer y_w and a rejected one y_l, let

    h = [log p(y_w|x) - log p_ref(y_w|x)] - [log p(y_l|x) - log p_ref(y_l|x)]

where p is the model being trained, p_ref a frozen copy of the --init model, and log p(y|x)
the sum of the answer tokens' log-probabilities (the prompt masked exactly as in SFT, eos
included). DPO minimizes -log sigmoid(beta * h): the chosen answer gains likelihood relative to
the rejected one, and beta sets how far from the reference that may pull the model. An answer's
implicit reward is beta * [log p(y|x) - log p_ref(y|x)]; the reward accuracy is how often the
chosen answer's beats the rejected one's (a tie counts half, so it is 0.5 before training,
where the model is its reference, and above 0.5 on held-out pairs only if DPO learned a
preference that carries over). --loss ipo (Azar et al. 2023) minimizes
(h - 1/(2 beta))^2 over per-token mean log-probabilities instead, which stops pushing a pair
once its margin is reached.

Validation uses NAME_val.jsonl beside the training file: the DPO loss, reward accuracy, reward
margin and the chosen and rejected answers' log-probabilities (a run that pushes both down
shows there), logged every --eval-every steps and, before training, for the --init model. The
training loop is trainer.train (trainer.py), as for pretrain.py and sft.py.
"""
import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F

import cli
import trainer
from checkpoint import load_resume
from dataset_prefs import PreferenceDataset, collate_pairs
from environment import run_script
from model import IGNORE_INDEX, ModelArgs, Transformer
from sft import example_batches, init_model, resolve_max_seq_len
from train_flags import add_train_args

# Every default of dpo.py but the shared training ones it does not change
# (train_flags.TRAIN_DEFAULTS). A small learning rate and few passes: DPO moves a fine-tuned
# model a little, and a preference set is small. batch_size counts pairs (2 rows each).
# Dropout stays off (no flag): at the start the model and its reference must score an answer alike.
DEFAULTS = dict(init="out/sft", data="data/prefs/prefs.jsonl", tokenizer=None, max_seq_len=0, beta=0.1, loss="dpo",
                dropout=0.0,
                group_by_length=True, batch_size=8, lr=1e-5, min_lr=1e-6, warmup_steps=20, weight_decay=0.0,
                epochs=1.0, eval_every=50, save_every=100, keep_last=2, out_dir="out/dpo")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--init", help="fine-tuned checkpoint to start from and to measure against (the frozen "
                                       "reference): a .pt file or an out dir (its best.pt, else latest)")
    parser.add_argument("--data", help="normalized preference JSONL ({prompt, chosen, rejected} per line); "
                                       "NAME_val.jsonl beside it validates")
    parser.add_argument("--tokenizer", help="tokenizer.model (None: the one the checkpoint records)")
    parser.add_argument("--max-seq-len", type=int,
                        help="positions per answer row; longer answers are cut (0: the checkpoint's context length)")
    parser.add_argument("--beta", type=float, help="how far from the reference the preference may pull the model")
    parser.add_argument("--loss", choices=["dpo", "ipo"], help="dpo: -log sigmoid(beta h) over summed log-probs; "
                                                              "ipo: (h - 1/(2 beta))^2 over per-token mean log-probs")
    parser.add_argument("--group-by-length", action=argparse.BooleanOptionalAction,
                        help="batch pairs of similar length together (less padding); --no-group-by-length: random batches")
    add_train_args(parser)
    parser.set_defaults(**DEFAULTS)
    cfg = parser.parse_args(argv)
    if not cfg.beta > 0:
        parser.error(f"--beta {cfg.beta}: give a positive number (0.1 is usual)")
    return cfg


# ----------------------------------------------------------------------------- the loss

def preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss="dpo"):
    """Per-pair losses and implicit rewards from the answers' log-probabilities (each (B,)):
    (loss, chosen_reward, rejected_reward). The rewards are beta times the log-ratios to the
    reference, as DPO defines them, for either loss."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    losses = -F.logsigmoid(beta * h) if loss == "dpo" else (h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def answer_logprobs(model, x, y, mean):
    """Each row's answer log-probability (2B,): the sum over its target tokens, or their mean."""
    logps = -model(x, y, per_token=True).sum(-1)
    return logps / (y != IGNORE_INDEX).sum(-1).clamp(min=1) if mean else logps


class PreferenceObjective:
    """trainer.train's objective for DPO: a batch is 2B rows (B chosen answers, then their B
    rejected ones, dataset_prefs.py); its units are the B pairs. The reference model is frozen:
    no gradients, evaluation mode, one forward per batch without autograd."""

    rows_per_item = 2

    def __init__(self, reference, beta, loss):
        self.reference, self.beta, self.kind = reference, beta, loss
        self.reference.eval().requires_grad_(False)

    def units(self, y):
        return y.shape[0] // 2

    def pair_scores(self, model, x, y):
        mean = self.kind == "ipo"
        policy = answer_logprobs(model, x, y, mean)
        with torch.no_grad():
            ref = answer_logprobs(self.reference, x, y, mean)
        n = self.units(y)
        losses, chosen_reward, rejected_reward = preference_loss(policy[:n], policy[n:], ref[:n], ref[n:],
                                                                 self.beta, self.kind)
        return losses, chosen_reward, rejected_reward, policy.detach()

    def loss(self, model, x, y):
        return self.pair_scores(model, x, y)[0].mean()

    def sums(self, model, x, y):
        losses, chosen_reward, rejected_reward, policy = self.pair_scores(model, x, y)
        n = self.units(y)
        margin = chosen_reward - rejected_reward
        # a tie counts half: before training every pair ties (the model is its reference), 0.5 = chance
        wins = (margin > 0).float() + 0.5 * (margin == 0).float()
        return {"val_loss": losses.sum(), "val_reward_acc": wins.sum(), "val_margin": margin.sum(),
                "val_chosen_logp": policy[:n].sum(), "val_rejected_logp": policy[n:].sum(),
                "n": torch.tensor(float(n), device=x.device)}


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    return run_script("dpo.py", run, parse_args(argv))


def run(cfg, env):
    model, tokenizer, init = init_model(cfg)
    env.print(f"init: {init['path']} ({init.get('kind')} checkpoint, step {init.get('step')})")
    if init.get("kind") == "pretrain":
        env.print("warning: --init is a pretraining checkpoint; DPO expects a fine-tuned one (sft.py) that "
                  "already answers in the prompt format")
    reference = copy.deepcopy(model)
    resume = load_resume(cfg, env, "dpo", tokenizer, inputs=[("--init", init["path"]), ("--data", cfg.data)])
    resolve_max_seq_len(cfg, model)
    train_set, train_batches, val_batches = example_batches(cfg, env, tokenizer, PreferenceDataset, collate_pairs, "pairs")
    objective = PreferenceObjective(reference.to(env.device), cfg.beta, cfg.loss)

    # the --init model's scores, so that what DPO gained is plain
    before = None
    if val_batches:
        model.to(env.device)
        before = trainer.evaluate(model, val_batches(), env, objective)
        env.print("before DPO: " + ", ".join(f"{k.removeprefix('val_')} {v:.4g}" for k, v in before.items()))
    if resume:  # trainer.train loads the resumed weights into a model of the resumed shape
        model = Transformer(ModelArgs.from_dict(resume["model_args"]))
    train_data = [(Path(cfg.data).name, int(train_set.lengths.sum()))]
    return trainer.train(cfg, env, model, "dpo", tokenizer, train_batches, val_batches, train_data, resume,
                         extra={"init": init["path"], "before_dpo": before}, objective=objective)


if __name__ == "__main__":
    main()
