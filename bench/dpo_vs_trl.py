"""Check dpo.py's preference losses against Hugging Face trl's DPOTrainer, on the same inputs.

    pip install trl==1.16.0  # a bench dependency, not one of the repository's
    python bench/dpo_vs_trl.py

dpo.py's --loss dpo is compared with trl's loss_type "sigmoid", and --loss ipo with trl's "ipo",
at beta 0.05, 0.1 and 0.5, in two checks:

1. tables: random per-token log-probabilities (float64) of 64 pairs of answers of random lengths
   after prompts of random lengths, for the policy and for the reference. dpo.py reads them
   through PreferenceObjective (answer_logprobs: summed for dpo, per-token mean for ipo; then
   preference_loss), trl through DPOTrainer._compute_loss, which sums them itself and, for ipo,
   divides the log-ratios by the answer's token count. Compared: each pair's loss and chosen and
   rejected rewards (trl is run on one pair at a time, since it returns only the batch mean), and
   the gradient of the batch's mean loss w.r.t. the policy's per-token log-probabilities; all
   within 1e-9.
2. model: a tiny random model.Transformer as the policy and a perturbed copy as the reference,
   16 random (prompt, chosen, rejected) token triples that each side batches its own way
   (dataset_prefs.answer_row + collate_pairs; trl's DataCollatorForPreference); the same
   comparisons, the gradient w.r.t. the model's parameters; within 1e-5 times the quantity's
   largest magnitude (at least 1), since the model scores tokens with fp32 logits. This one
   also checks which tokens each side scores (the prompt masked, the answer's eos counted, the
   labels shifted by one).

How trl is called: trl 1.16 has no standalone loss function; the loss is computed inline in the
private method DPOTrainer._compute_loss(self, model, inputs, return_outputs), which also runs the
models. It is called unbound, with a SimpleNamespace for the trainer that holds only the
attributes that method reads, set as DPOTrainer.__init__ sets them from a DPOConfig (trl's
defaults but beta and loss_type), and with stand-ins for the models that do what trl's
add_fused_lm_head patches a causal LM to do: model(input_ids=..., labels=..., fused_lm_head=True)
-> each next-token label's log-probability, 0 where the label is -100. That stand-in (a gather
of log_softmax over the shifted labels) is the one step of trl's path that is not trl's code.

One difference in definitions, allowed for here: for ipo, trl logs the rewards as beta times the
summed log-ratios, dpo.py as beta times the per-token mean ones (those its ipo loss uses), so
trl's ipo rewards are compared divided by the answer's token count. The losses are the same.

Prints one table and trl's version; exits 1 if a difference exceeds its tolerance, 2 if trl is
not installed.
"""
import copy
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataset_prefs import answer_row, collate_pairs  # noqa: E402
from dpo import PreferenceObjective  # noqa: E402
from model import IGNORE_INDEX, ModelArgs, Transformer  # noqa: E402

BETAS = (0.05, 0.1, 0.5)
LOSSES = {"dpo": "sigmoid", "ipo": "ipo"}  # dpo.py's name -> trl's loss_type
TABLE_TOL, MODEL_TOL = 1e-9, 1e-5
PAD, BOS, EOS = 0, 1, 2  # the tiny model's special ids; the other ids are prompt and answer tokens


# ----------------------------------------------------------------------------- trl's side

def trl_args(beta, loss_type):
    """A DPOConfig with trl's defaults but beta and loss_type; it is only read. use_cpu: without
    it, trl's bf16 default is refused on a machine without a GPU (nothing here runs on one)."""
    from trl import DPOConfig
    with warnings.catch_warnings():  # transformers' deprecation notice for a field left at its default
        warnings.simplefilter("ignore", FutureWarning)
        return DPOConfig(output_dir="unused", beta=beta, loss_type=[loss_type], report_to=[],
                         use_cpu=True)


def trainer_stand_in(args, policy, reference):
    """The attributes DPOTrainer._compute_loss reads, as DPOTrainer.__init__ sets them from args.
    A SimpleNamespace, so that an attribute it lacks fails loudly rather than defaulting."""
    same = lambda t: t  # one process: gathering across ranks returns the tensor
    return SimpleNamespace(
        model=policy, ref_model=reference, args=args,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=same, gather_for_metrics=same),
        beta=args.beta, loss_types=args.loss_type, loss_weights=args.loss_weights or [1.0] * len(args.loss_type),
        precompute_ref_logps=args.precompute_ref_log_probs,  # False: trl runs the reference and sums it itself
        ld_alpha=args.ld_alpha, f_divergence_type=args.f_divergence_type, use_weighting=args.use_weighting,
        aux_loss_enabled=False,  # set for mixture-of-experts models only
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0)


class FusedHead(torch.nn.Module):
    """What trl's add_fused_lm_head makes of a causal LM, for a scorer label_logps(input_ids,
    next-token labels) -> (B, T-1) log-probabilities: the FusedCausalLMOutput fields
    _compute_loss reads, log_probs 0 where the label is -100. The per-token metrics trl only
    logs (entropy, mean logits, top-1) are zeros."""

    is_gradient_checkpointing = False  # read by trl's disable_gradient_checkpointing

    def __init__(self, label_logps):
        super().__init__()
        self.label_logps = label_logps
        self.train(False)  # trl logs under "eval" then, and skips train-only token counting

    def forward(self, input_ids, labels, fused_lm_head, **unused):
        assert fused_lm_head
        labels = labels[:, 1:]
        log_probs = self.label_logps(input_ids, labels).masked_fill(labels == -100, 0.0)
        zeros = torch.zeros_like(log_probs.detach())
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def trl_scores(args, pairs, full):
    """trl's per-pair losses, rewards (B,) and its batch loss: pairs[i] and full are
    (inputs, policy, reference) for pair i alone and for the whole batch."""
    from trl.trainer.dpo_trainer import DPOTrainer
    losses, chosen, rejected = [], [], []
    for inputs, policy, reference in pairs:
        trainer = trainer_stand_in(args, policy, reference)
        losses.append(DPOTrainer._compute_loss(trainer, policy, inputs, return_outputs=False).detach())
        chosen.append(trainer._metrics["eval"]["rewards/chosen"][-1])  # means over the one pair
        rejected.append(trainer._metrics["eval"]["rewards/rejected"][-1])
    inputs, policy, reference = full
    batch_loss = DPOTrainer._compute_loss(trainer_stand_in(args, policy, reference), policy, inputs, False)
    dtype = losses[0].dtype
    return torch.stack(losses), torch.tensor(chosen, dtype=dtype), torch.tensor(rejected, dtype=dtype), batch_loss


def like_ours(kind, chosen, rejected, completion_mask):
    """trl's rewards in dpo.py's terms: for ipo, per answer token (see the module docstring)."""
    if kind != "ipo":
        return chosen, rejected
    n_chosen, n_rejected = completion_mask.sum(-1).chunk(2)
    return chosen / n_chosen, rejected / n_rejected


# ----------------------------------------------------------------------------- our side

class TokenTable(torch.nn.Module):
    """A stand-in model whose per-token cross entropies are a given table's negated log-probs,
    the one call answer_logprobs makes: model(x, y, per_token=True)."""

    def __init__(self, logps):
        super().__init__()
        self.logps = logps

    def forward(self, tokens, targets, per_token):
        assert per_token
        return -self.logps.masked_fill(targets == IGNORE_INDEX, 0.0)


def our_scores(kind, beta, policy, reference, x, y):
    """dpo.py's per-pair losses and rewards, as its training objective computes them."""
    losses, chosen, rejected, _ = PreferenceObjective(reference, beta, kind).pair_scores(policy, x, y)
    return losses, chosen, rejected


# ----------------------------------------------------------------------------- the checks

def largest(pairs, relative):
    """The largest |ours - trl| over (ours, trl) tensor pairs, and the scale its tolerance is
    multiplied by: 1, or with relative the largest |trl| (at least 1), as fp32 rounds relatively."""
    diff = max((a - b).abs().max().item() for a, b in pairs)
    scale = max([1.0] + [b.abs().max().item() for _, b in pairs]) if relative else 1.0
    return diff, scale


def compare(name, kind, beta, ours, theirs, grads, tol, relative=False):
    """One table row: the largest differences of the per-pair losses (and the batch means),
    the rewards and the gradients."""
    (loss, chosen, rejected), (t_loss, t_chosen, t_rejected, t_batch) = ours, theirs
    found = [largest([(loss, t_loss), (loss.mean(), t_batch.detach())], relative),
             largest([(chosen, t_chosen), (rejected, t_rejected)], relative),
             largest(list(zip(*grads)), relative)]
    ok = all(diff <= tol * scale for diff, scale in found)
    diffs = " ".join(f"{diff:>11.2e}" for diff, _ in found)
    bound = f"{tol:.0e}" + (" x|trl|" if relative else "")
    print(f"{name:<7} {kind:<4} {LOSSES[kind]:<8} {beta:<5} {diffs}  {bound:<13} {'ok' if ok else 'FAIL'}")
    return ok


def table_check(kind, beta, n_pairs=64, length=24):
    """Check 1: random per-token log-probs (float64), read by both sides."""
    g = torch.Generator().manual_seed(0)
    rows = 2 * n_pairs  # the chosen answers, then the rejected ones, as both sides order a batch
    # target j is token j + 1; the prompt is tokens 0..start, the answer the next `size` ones
    start = torch.randint(0, length - 1, (rows, 1), generator=g)
    size = torch.randint(1, length + 1, (rows, 1), generator=g).minimum(length - start)
    j = torch.arange(length)
    answer = (j >= start) & (j < start + size)  # (rows, length): the targets that count
    logps = lambda: torch.empty(rows, length, dtype=torch.float64).uniform_(0.02, 1.0, generator=g).log()
    policy_logps, ref_logps = logps().requires_grad_(), logps()

    x, y = torch.zeros(rows, length, dtype=torch.long), torch.where(answer, 1, IGNORE_INDEX)
    ours = our_scores(kind, beta, TokenTable(policy_logps), TokenTable(ref_logps), x, y)
    our_grad = torch.autograd.grad(ours[0].mean(), policy_logps)

    # trl's batch: tokens 0..length, completion_mask on the answer tokens, so the shifted labels
    # pick the same targets
    completion_mask = torch.cat([torch.zeros(rows, 1, dtype=torch.long), answer.long()], 1)
    inputs = lambda r: {"input_ids": torch.zeros(len(r), length + 1, dtype=torch.long),
                        "completion_mask": completion_mask[r]}
    head = lambda table, r: FusedHead(lambda input_ids, labels: table[r])
    everything = list(range(rows))
    pairs = [(inputs([i, n_pairs + i]), head(policy_logps, [i, n_pairs + i]), head(ref_logps, [i, n_pairs + i]))
             for i in range(n_pairs)]
    theirs = trl_scores(trl_args(beta, LOSSES[kind]), pairs,
                        (inputs(everything), head(policy_logps, everything), head(ref_logps, everything)))
    trl_grad = torch.autograd.grad(theirs[3], policy_logps)
    theirs = (theirs[0], *like_ours(kind, theirs[1], theirs[2], completion_mask), theirs[3])
    return compare("tables", kind, beta, ours, theirs, (our_grad, trl_grad), TABLE_TOL)


def tiny_models():
    """A random tiny policy and a reference near it (a copy with noise, so that the log-ratios
    are not all 0 as they are at the start of DPO)."""
    torch.manual_seed(0)
    policy = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=32))
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy.eval(), reference


def label_logps(model):
    """The stand-in for trl's fused head on our model: log_softmax of its fp32 logits, gathered
    at the next-token labels (trl's head drops the last position and shifts the labels)."""
    def score(input_ids, labels):
        logits = model.output(model.hidden_states(input_ids)[:, :-1]).float()
        return logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return score


def model_check(kind, beta, policy, reference, n_pairs=16):
    """Check 2: real answer log-probs of a tiny model, each side batching the same triples."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    g = torch.Generator().manual_seed(1)
    def tokens(lo, hi):  # between lo and hi - 1 random ids, none of them special
        return torch.randint(3, 64, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
    triples = [(tokens(1, 8), tokens(1, 12), tokens(1, 12)) for _ in range(n_pairs)]

    # ours: prompt, bos, answer, eos; the prompt and bos masked (dataset_prefs.answer_row)
    rows = lambda p, a: tuple(map(torch.tensor, answer_row(p, a, BOS, EOS, policy.args.max_seq_len)))
    x, y = collate_pairs([(rows(p, c), rows(p, r)) for p, c, r in triples], PAD)
    ours = our_scores(kind, beta, policy, reference, x, y)
    params = list(policy.parameters())
    our_grad = torch.autograd.grad(ours[0].mean(), params)

    # trl: the same tokens as trl's tokenization leaves them, the eos on each answer
    collate = DataCollatorForPreference(pad_token_id=PAD)
    examples = [{"prompt_ids": p + [BOS], "chosen_ids": c + [EOS], "rejected_ids": r + [EOS]} for p, c, r in triples]
    policy_head, ref_head = FusedHead(label_logps(policy)), FusedHead(label_logps(reference))
    pairs = [(collate([e]), policy_head, ref_head) for e in examples]
    full = collate(examples)
    theirs = trl_scores(trl_args(beta, LOSSES[kind]), pairs, (full, policy_head, ref_head))
    trl_grad = torch.autograd.grad(theirs[3], params)
    theirs = (theirs[0], *like_ours(kind, theirs[1], theirs[2], full["completion_mask"]), theirs[3])
    return compare("model", kind, beta, ours, theirs, (our_grad, trl_grad), MODEL_TOL, relative=True)


def main():
    torch.set_num_threads(1)
    try:
        import trl
    except ImportError:
        print("bench/dpo_vs_trl.py: pip install trl (a bench-only package) to run this check", file=sys.stderr)
        sys.exit(2)
    started = time.time()
    print(f"trl {trl.__version__}, torch {torch.__version__}")
    print("check   ours trl      beta   max|dloss| max|dreward|  max|dgrad|  tolerance")
    ok = [table_check(kind, beta) for kind in LOSSES for beta in BETAS]
    policy, reference = tiny_models()
    ok += [model_check(kind, beta, policy, reference) for kind in LOSSES for beta in BETAS]
    print(f"{sum(ok)}/{len(ok)} within tolerance ({time.time() - started:.1f}s)")
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
