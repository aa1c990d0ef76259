"""The training recipes behind pretrain.py's flags: which optimizer gets which parameters."""
import os
import subprocess
import sys
from pathlib import Path

import torch

import pretrain
from model import Transformer
from muon import Muon
from optimizers import build_optimizers

ROOT = Path(__file__).resolve().parent.parent
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


def test_muon_auto_dtype_follows_the_kernels_torch_dispatches_to():
    # ATEN_CPU_CAPABILITY=avx2 stands in for an AVX2-only CPU: fp32, whatever /proc/cpuinfo says
    code = "import muon; print(muon.newton_schulz_dtype('cpu'))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch.float32"


def test_muon_auto_dtype_is_bf16_only_with_avx512_kernels_and_bf16_flags(monkeypatch):
    import muon
    flags = {"avx512": "flags : avx2 avx512f avx512_bf16\n", "plain": "flags : avx2 avx512f\n"}
    for capability, cpu, want in [("AVX512", "avx512", torch.bfloat16), ("AVX2", "avx512", torch.float32),
                                  ("AVX512", "plain", torch.float32)]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        monkeypatch.setattr(muon.Path, "read_text", lambda self, text=flags[cpu]: text)
        assert muon.newton_schulz_dtype("cpu") == want, (capability, cpu)
