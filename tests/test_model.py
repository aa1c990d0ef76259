import pytest
import torch
import torch.nn.functional as F

from batch import KVCache
from model import IGNORE_INDEX, ModelArgs, Transformer, apply_rope


def tiny_model(**kw):
    torch.manual_seed(0)
    return Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=101, max_seq_len=24, **kw))


def test_default_config_parameter_count():
    model = Transformer(ModelArgs())  # dim 512, 8 layers, 8 heads, vocab 64793
    assert round(model.num_params() / 1e6, 1) == 58.5


def test_loss_equals_plain_cross_entropy_with_ignore_index():
    model = tiny_model()
    x = torch.randint(0, 101, (3, 16))
    y = torch.randint(0, 101, (3, 16))
    y[0, :5] = IGNORE_INDEX
    loss = model(x, y)
    ref = F.cross_entropy(model.logits(x).view(-1, 101), y.view(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, ref)


def test_kv_cache_logits_equal_full_forward():
    model = tiny_model(n_kv_heads=2).eval()
    x = torch.randint(0, 101, (2, 12))
    full = model.logits(x)
    cache, positions = KVCache(model.args, 2, "cpu", torch.float32), torch.arange(12).repeat(2, 1)
    with torch.no_grad():
        cache.prefill([0, 1], [0, 0])
        first = model(x[:, :7], positions=positions[:, :7], cache=cache)
        steps = []
        for t in range(7, 12):
            cache.decode(positions[:, t])
            steps.append(model(x[:, t:t + 1], positions=positions[:, t:t + 1], cache=cache))
    torch.testing.assert_close(first, full[:, 6], atol=1e-5, rtol=1e-4)
    for t, logits in zip(range(7, 12), steps):
        torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=1e-4)


def test_sdpa_attention_equals_manual_softmax_attention():
    model = tiny_model(n_kv_heads=2, qk_norm=True)
    attn, x = model.layers[0].attention, torch.randn(2, 10, 32)
    cos, sin = model.rope(10)
    B, T, H, D = 2, 10, 4, 8
    q = attn.wq(x).view(B, T, H, D).transpose(1, 2)
    k = attn.wk(x).view(B, T, 2, D).transpose(1, 2)
    v = attn.wv(x).view(B, T, 2, D).transpose(1, 2)
    q, k = apply_rope(attn.q_norm(q), cos, sin), apply_rope(attn.k_norm(k), cos, sin)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # each kv head serves 2 query heads
    scores = (q @ k.transpose(-1, -2)) / D ** 0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    manual = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D))
    torch.testing.assert_close(attn(x, cos, sin), manual, atol=1e-5, rtol=1e-4)


def test_tiny_model_overfits_one_batch(one_thread):
    model = tiny_model()
    x = torch.randint(0, 101, (4, 16))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
