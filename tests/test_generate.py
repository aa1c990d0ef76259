import pytest
import torch

from engine import generate
from generate import TextStream
from model import ModelArgs, Transformer
from sampling import NgramBlocker, Sampling, apply_repetition_penalty, sample_next_token

MAX_SEQ_LEN = 40
pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [[5, 6, 7], [9] * 10, list(range(3, 16)), [42]]


@pytest.fixture(scope="module")
def model():
    """A tiny untied model with large random weights, so greedy output varies from token to
    token; float64 so that batched and single-row arithmetic agree far below any tie."""
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101,
                     max_seq_len=MAX_SEQ_LEN, tie_embeddings=False)
    model = Transformer(args).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


def repeats_an_ngram(answer, token, n):
    """Would `token` make `answer` hold some n-token run twice? (the slow, obvious way)"""
    runs = [tuple(answer[i:i + n]) for i in range(len(answer) - n + 1)]
    return len(answer) >= n - 1 and tuple((answer + [token])[-n:]) in runs


def greedy_without_cache(model, prompt, max_new_tokens, eos_id=None, no_repeat_ngram_size=0, presence=0.0,
                         frequency=0.0):
    """The reference: the whole sequence through the model for every new token."""
    seq, out = list(prompt), []
    with torch.no_grad():
        while len(out) < max_new_tokens and len(seq) < MAX_SEQ_LEN:
            logits = model(torch.tensor([seq]))[0]
            for token in set(out):  # OpenAI's penalties, token by token
                logits[token] -= out.count(token) * frequency + presence
            if no_repeat_ngram_size:
                for token in range(logits.shape[-1]):
                    if repeats_an_ngram(out, token, no_repeat_ngram_size):
                        logits[token] = float("-inf")
            t = int(logits.argmax(-1))
            if t == eos_id:
                break
            out.append(t)
            seq.append(t)
    return out


def test_cached_greedy_equals_uncached_greedy(model):
    for prompt in PROMPTS:
        cached = generate(model, [prompt], 20)[0]
        assert len(cached) == 20
        assert cached == greedy_without_cache(model, prompt, 20)
    assert len(set(cached)) > 3  # the model really varies its output


def test_batched_prompts_of_different_lengths_equal_one_at_a_time(model):
    batched = generate(model, PROMPTS, 15)
    assert batched == [generate(model, [p], 15)[0] for p in PROMPTS]


def test_each_row_stops_at_eos_and_the_others_go_on(model):
    free = generate(model, PROMPTS, 15)
    eos = free[0][4]
    stopped = generate(model, PROMPTS, 15, eos_id=eos)
    for row_free, row_stopped in zip(free, stopped):
        expected = row_free[:row_free.index(eos)] if eos in row_free else row_free
        assert row_stopped == expected
    assert stopped[0] == free[0][:free[0].index(eos)]
    assert stopped == generate(model, PROMPTS, 15, eos_id=eos) == [
        greedy_without_cache(model, p, 15, eos_id=eos) for p in PROMPTS]


def test_generation_respects_max_seq_len(model):
    out = generate(model, [list(range(1, 36)), [7, 8]], 20)
    assert len(out[0]) == MAX_SEQ_LEN - 35 and len(out[1]) == 20  # each row's own context bounds it
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [list(range(1, MAX_SEQ_LEN + 1))], 5)
    with pytest.raises(ValueError, match="prompt of 0 tokens"):
        generate(model, [[3], []], 5)


def test_sampling_is_reproducible_with_a_seed(model):
    def sample(seed, **kw):
        return generate(model, PROMPTS, 12, sampling=Sampling(temperature=1.0, seed=seed, **kw))
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(3, top_k=1) == generate(model, PROMPTS, 12)  # top-1 sampling is greedy
    assert sample(4, top_p=0.9, repetition_penalty=1.3) == sample(4, top_p=0.9, repetition_penalty=1.3)


def test_top_k_top_p_and_repetition_penalty_filter_the_right_tokens():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next_token(logits, 1.0, top_p=0.6, generator=g).tolist()) == {0, 1}
    assert set(sample_next_token(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    assert set(sample_next_token(logits, 1.0, top_k=3, generator=g).tolist()) == {0, 1, 2}
    # a seen token loses: a positive logit is divided by the penalty, a negative one multiplied
    seen = torch.tensor([[True, False, True]])
    penalized = apply_repetition_penalty(torch.tensor([[2.0, 1.0, -1.0]]), seen, 4.0)
    assert penalized.tolist() == [[0.5, 1.0, -4.0]]
    assert int(sample_next_token(penalized)) == 1


class ByteTokenizer:
    """Ids -> byte strings, decoded as a SentencePiece tokenizer does: a character whose bytes
    are not all there yet shows as U+FFFD."""
    PIECES = ["答案".encode(), "好".encode(), "的".encode()[:2], "的".encode()[2:], "。".encode()]

    def decode_raw(self, ids):
        return b"".join(self.PIECES[i] for i in ids).decode("utf-8", errors="replace")

    def decode(self, ids):
        return self.decode_raw(ids).replace("\ufffd", "")


def test_ngram_blocker_forbids_exactly_the_tokens_that_repeat_a_run():
    blocker = NgramBlocker(3)
    for token in [1, 2, 3, 1, 2]:
        blocker.push(token)
    assert blocker.banned() == [3]  # 1 2 3 again
    blocker.push(4)
    assert blocker.banned() == []  # "2 4" never came before
    one = NgramBlocker(1)
    for token in [7, 5, 7]:
        one.push(token)
    assert one.banned() == [5, 7]  # size 1: no token twice


@pytest.mark.parametrize("presence, frequency", [(1.5, 0.0), (0.0, 0.7), (0.5, 0.5), (-1.0, 0.0)])
def test_presence_and_frequency_penalties_in_the_batch_equal_the_slow_reference(model, presence, frequency):
    got = generate(model, PROMPTS, 20, sampling=Sampling(presence_penalty=presence, frequency_penalty=frequency))
    assert got == [greedy_without_cache(model, p, 20, presence=presence, frequency=frequency) for p in PROMPTS]
    assert got != generate(model, PROMPTS, 20)  # the penalties changed some answer


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ngram_blocking_in_the_batch_equals_the_slow_reference(model, n):
    """Large random weights loop quickly; blocked, no answer holds an n-token run twice, and
    each row's answer is the one the obvious implementation gives."""
    got = generate(model, PROMPTS, 20, sampling=Sampling(no_repeat_ngram_size=n))
    assert got == [greedy_without_cache(model, p, 20, no_repeat_ngram_size=n) for p in PROMPTS]
    for answer in got:
        runs = [tuple(answer[i:i + n]) for i in range(len(answer) - n + 1)]
        assert len(runs) == len(set(runs))
    plain = generate(model, PROMPTS, 20)
    assert any(len({tuple(a[i:i + n]) for i in range(len(a) - n + 1)}) < len(a) - n + 1 for a in plain)


def test_text_stream_holds_unfinished_characters_and_stop_string_starts():
    shown = TextStream(ByteTokenizer())
    assert [shown.push(i) for i in range(5)] == ["答案", "好", "", "的", "。"]
    cut = TextStream(ByteTokenizer(), stops=["好的"])  # its 的 arrives in two pieces
    pieces = [cut.push(i) for i in range(4)]
    assert "".join(pieces) + cut.flush() == "答案" and cut.stopped
    unstopped = TextStream(ByteTokenizer(), stops=["好人"])  # held 好 is shown once it cannot start a stop
    assert "".join(unstopped.push(i) for i in range(5)) + unstopped.flush() == "答案好的。"
    cut_inside = TextStream(ByteTokenizer())  # the answer ends between the two pieces of 的
    assert "".join(cut_inside.push(i) for i in range(3)) + cut_inside.flush() == "答案好"
    stray = TextStream(ByteTokenizer())  # a lone first piece of 的 followed by 。: no U+FFFD shown
    assert "".join(stray.push(i) for i in [0, 2, 4]) + stray.flush() == "答案。"
    across = TextStream(ByteTokenizer(), stops=["案。"])  # a stop string around the dropped bytes is still found
    assert "".join(across.push(i) for i in [0, 2, 4]) + across.flush() == "答" and across.stopped
