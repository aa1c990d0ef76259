import torch
import torch.nn.functional as F

from model import IGNORE_INDEX, KVCache, ModelArgs, Transformer


def tiny_model(**kw):
    torch.manual_seed(0)
    return Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=101, max_seq_len=24, **kw))


def test_seed_config_parameter_count():
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
    cache = KVCache(model.args, 2, 24, "cpu", torch.float32)
    with torch.no_grad():
        first = model(x[:, :7], cache=cache)
        steps = [model(x[:, t:t + 1], cache=cache) for t in range(7, 12)]
    torch.testing.assert_close(first, full[:, 6], atol=1e-5, rtol=1e-4)
    for t, logits in zip(range(7, 12), steps):
        torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=1e-4)
