import pytest
import torch

from muon import Muon, newton_schulz

# The default (upstream) config's hidden matrices: wq/wk/wv/wo (512, 512), w1/w3 (1376, 512), w2 (512, 1376)
SHAPES = [(512, 512)] * 4 + [(1376, 512), (512, 1376), (1376, 512)]


def twin_params(seed=0):
    torch.manual_seed(seed)
    start = [torch.randn(s) * 0.02 for s in SHAPES]
    return [torch.nn.Parameter(t.clone()) for t in start], [torch.nn.Parameter(t.clone()) for t in start], start


def step_both(ours, theirs, opt_ours, opt_theirs, steps=3):
    for _ in range(steps):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape)
            p.grad, q.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()


@pytest.mark.parametrize("ns_dtype, tolerance", [(torch.bfloat16, 0.0), (torch.float32, 0.03)])
def test_update_equals_torch_muon_on_the_default_configs_matrices(ns_dtype, tolerance):
    """In bf16 (what torch.optim.Muon computes in) the updates agree exactly; in fp32 within
    bf16's rounding, relative to the size of the update."""
    ours, theirs, start = twin_params()
    kw = dict(lr=0.02, momentum=0.95, weight_decay=0.1)
    step_both(ours, theirs, Muon(ours, ns_dtype=ns_dtype, **kw), torch.optim.Muon(theirs, **kw))
    for p, q, p0 in zip(ours, theirs, start):
        assert (p - q).abs().max() <= tolerance * (q - p0).abs().max()


def test_state_dict_has_torch_muons_layout_and_round_trips():
    ours, theirs, _ = twin_params()
    opt, ref = Muon(ours, lr=0.02), torch.optim.Muon(theirs, lr=0.02)
    step_both(ours, theirs, opt, ref, steps=1)
    state, ref_state = opt.state_dict(), ref.state_dict()
    assert state["param_groups"][0].keys() == ref_state["param_groups"][0].keys()
    assert state["state"][0].keys() == ref_state["state"][0].keys() == {"momentum_buffer"}
    again = Muon(ours, lr=0.02)
    again.load_state_dict(state)
    torch.testing.assert_close(again.state[ours[0]]["momentum_buffer"], opt.state[ours[0]]["momentum_buffer"])


def test_newton_schulz_makes_singular_values_about_one():
    torch.manual_seed(0)
    G = torch.randn(3, 64, 32) @ torch.diag(torch.logspace(-2, 0, 32))  # condition number 100
    s = torch.linalg.svdvals(newton_schulz(G, dtype=torch.float32))
    assert 0.6 < s.min() and s.max() < 1.3  # the quintic trades exactness for speed


def test_refuses_non_matrix_parameters():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.ones(4))])
