import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import LinearCrossEntropy, OneDNNLinear, softmax_grad
from model import IGNORE_INDEX, ModelArgs, Transformer

needs_onednn = pytest.mark.skipif(kernels.onednn_linear_op() is None, reason="this torch has no oneDNN linear")


@needs_onednn
def test_onednn_linear_equals_f_linear_in_value_and_gradient():
    torch.manual_seed(0)
    layer = OneDNNLinear(16, 24, bias=False)
    x = torch.randn(2, 7, 16, requires_grad=True)
    y = layer(x)
    ref = F.linear(x, layer.weight)
    torch.testing.assert_close(y, ref)
    grads = torch.autograd.grad((y * y).sum(), (x, layer.weight))
    ref_grads = torch.autograd.grad((ref * ref).sum(), (x, layer.weight))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref)


# CPU's paths (oneDNN or MKL), and GPU's (padded vocabulary, the fused softmax step, here eager)
@pytest.mark.parametrize("loss_fn", [
    LinearCrossEntropy(chunk_rows=8, vocab_block=16, onednn=True),  # several chunks and blocks, ragged last ones
    LinearCrossEntropy(chunk_rows=8, vocab_block=16, onednn=False),
    LinearCrossEntropy(chunk_rows=8, vocab_multiple=64, fused=softmax_grad),
], ids=["onednn", "mkl", "gpu-path"])
def test_lean_loss_matches_plain_cross_entropy_in_value_and_gradient(loss_fn):
    if loss_fn.onednn and kernels.onednn_linear_op() is None:
        pytest.skip("this torch has no oneDNN linear")
    torch.manual_seed(0)
    h = torch.randn(2, 19, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    y = torch.randint(0, 50, (2, 19))
    y[0, :7] = IGNORE_INDEX
    y[1, -1] = IGNORE_INDEX
    loss = loss_fn(h, w, y)
    ref = F.cross_entropy(F.linear(h, w).view(-1, 50), y.view(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, ref)
    grads = torch.autograd.grad(2.5 * loss, (h, w))  # backward scales by the incoming gradient
    ref_grads = torch.autograd.grad(2.5 * ref, (h, w))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_lean_loss_under_bf16_autocast_returns_fp32_gradients():
    torch.manual_seed(0)
    h = torch.randn(24, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    y = torch.randint(0, 50, (24,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LinearCrossEntropy(chunk_rows=8)(h, w, y)
        ref = F.cross_entropy(F.linear(h, w).float(), y)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref)
    grads, ref_grads = torch.autograd.grad(loss, (h, w)), torch.autograd.grad(ref, (h, w))
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, atol=1e-2, rtol=2e-2)


@pytest.mark.parametrize("onednn", [True, False])
def test_speed_up_keeps_the_models_loss_gradients_and_tied_weights(onednn):
    torch.manual_seed(0)
    plain = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=101, max_seq_len=24))
    fast = Transformer(plain.args)
    fast.load_state_dict(plain.state_dict())
    described = kernels.speed_up(fast, "cpu", torch.float32, onednn=onednn)
    assert "lean loss" in described
    swapped = onednn and kernels.onednn_linear_op() is not None
    assert ("oneDNN" in described) == swapped
    assert isinstance(fast.layers[0].attention.wq, OneDNNLinear) == swapped
    assert fast.output.weight is fast.tok_embeddings.weight  # still tied
    assert fast.state_dict().keys() == plain.state_dict().keys()
    x, y = torch.randint(0, 101, (3, 16)), torch.randint(0, 101, (3, 16))
    loss, ref = fast(x, y), plain(x, y)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    for (name, p), r in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, r.grad, msg=name)


def grad_distance(a, b):
    """Largest relative difference ||a.grad - b.grad|| / ||b.grad|| over matching parameters."""
    return max(((p.grad - q.grad).norm() / q.grad.norm()).item() for p, q in zip(a.parameters(), b.parameters()))


# (device, autocast dtype, loss tolerance, gradient tolerance): bf16 rounds each matmul
# differently when compiled (fused kernels), so its tolerances are bf16's, not fp32's.
COMPILED_CASES = [
    pytest.param("cpu", torch.float32, 1e-5, 1e-4, id="cpu-fp32"),
    pytest.param("cpu", torch.bfloat16, 1e-2, 5e-2, id="cpu-bf16"),
    pytest.param("cuda", torch.bfloat16, 1e-2, 5e-2, id="cuda-bf16", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


@pytest.mark.parametrize("device, dtype, loss_tol, grad_tol", COMPILED_CASES)
def test_loss_traced_by_torch_compile_equals_eager_over_training_steps(device, dtype, loss_tol, grad_tol):
    """The lean loss inside a compiled model gives the eager loss and gradients at every one
    of 20 AdamW steps: the compiled copy is given the eager model's weights before each step."""
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=1000, max_seq_len=64)
    eager, traced = Transformer(args).to(device), Transformer(args).to(device)
    def device_loss(traced):  # on CPU: several chunks and vocabulary blocks; oneDNN runs eagerly only
        loss_fn = (LinearCrossEntropy(chunk_rows=96, vocab_block=256, onednn=True) if device == "cpu"
                   else LinearCrossEntropy.for_device(device, onednn=False))
        loss_fn.traced = traced
        return loss_fn
    eager.loss_fn, traced.loss_fn = device_loss(False), device_loss(True)
    compiled = torch.compile(traced)
    opt = torch.optim.AdamW(eager.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for step in range(20):
        traced.load_state_dict(eager.state_dict())
        x = torch.randint(0, args.vocab_size, (4, 64), generator=g).to(device)
        y = (7 * x + 3) % args.vocab_size  # a rule the model can learn in a few steps
        y[:, :5] = IGNORE_INDEX  # masked positions, as SFT's prompts
        losses = []
        for model in (compiled, eager):
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                loss = model(x, y)
            loss.backward()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= loss_tol * losses[1], (step, losses)
        assert grad_distance(traced, eager) <= grad_tol, step
        opt.step()
        opt.zero_grad()
        traced.zero_grad()
    assert losses[1] < 6.5  # it trained: ln(1000) = 6.91 at the start
