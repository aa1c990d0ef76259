"""The training recipes behind pretrain.py's flags: which optimizer gets which parameters."""
import torch

import pretrain
from model import Transformer
from muon import Muon
from optimizers import build_optimizers

LAYER_MATRICES = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                  "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def build(*flags):
    cfg = pretrain.parse_args(["--dim", "32", "--n-layers", "2", "--n-heads", "4", *flags])
    model = Transformer(pretrain.model_args_from_flags(cfg, vocab_size=101))
    return model, build_optimizers(cfg, model, torch.device("cpu"))


def names_of(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_default_is_muon_and_the_upstream_recipe_is_one_flag_away():
    assert pretrain.parse_args([]).optimizer == "muon"
    model, optimizers = build("--optimizer", "adamw")
    assert [type(o) for o in optimizers] == [torch.optim.AdamW]
    decay, no_decay = optimizers[0].param_groups
    assert names_of(model, decay["params"]) == {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert names_of(model, no_decay["params"]) == {n for n, p in model.named_parameters() if p.dim() < 2}
    assert (decay["lr"], decay["betas"], decay["weight_decay"], no_decay["weight_decay"]) == (3e-4, (0.9, 0.95), 0.1, 0.0)
    assert model.output.weight is model.tok_embeddings.weight


def test_muon_recipe_takes_hidden_matrices_and_adamw_the_rest():
    model, optimizers = build("--optimizer", "muon", "--muon-lr", "0.03", "--lr", "2e-3", "--qk-norm", "--untie-head")
    adamw, muon = optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    hidden = {f"layers.{i}.{m}.weight" for i in range(2) for m in LAYER_MATRICES}
    assert names_of(model, muon.param_groups[0]["params"]) == hidden
    (group,) = muon.param_groups
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.03, 0.95, True, 0.1)
    decay, no_decay = adamw.param_groups
    assert names_of(model, decay["params"]) == {"tok_embeddings.weight", "output.weight"}
    assert "layers.0.attention.q_norm.weight" in names_of(model, no_decay["params"])
    assert decay["lr"] == 2e-3
    # every parameter is optimized exactly once
    owned = [id(p) for o in optimizers for g in o.param_groups for p in g["params"]]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())
    assert model.output.weight is not model.tok_embeddings.weight


def test_muon_dtype_flag_sets_the_newton_schulz_dtype():
    assert build("--optimizer", "muon", "--muon-dtype", "float32")[1][1].ns_dtype == torch.float32
    assert build("--optimizer", "muon", "--muon-dtype", "bfloat16")[1][1].ns_dtype == torch.bfloat16
