import queue

import pytest

from batch import Request, prefill_groups
from engine import BatchEngine, generate
from sampling import Sampling
from test_generate import MAX_SEQ_LEN, model  # noqa: F401 (model: a fixture, float64 with varied greedy output)

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [[5, 6, 7], [9] * 10, list(range(3, 16)), [42], [7, 7, 8, 1]]


class Collector:
    """A deliver() callback that records tokens and the finish reason."""

    def __init__(self):
        self.tokens, self.finish_reason = [], None

    def __call__(self, token, finish_reason):
        if token is not None:
            self.tokens.append(token)
        else:
            self.finish_reason = finish_reason


def run_to_end(engine, max_steps=500):
    for _ in range(max_steps):
        if not engine.step():
            return
    raise AssertionError("engine did not go idle")


def test_staggered_requests_decode_as_each_would_alone(model):
    """Requests join a running batch at different steps and leave at different steps (the
    batch holds 3, so two wait for a slot); each answer equals generate() on its own."""
    engine = BatchEngine(model, eos_id=None, pad_id=0, max_batch=3)
    limits = [20, 6, 12, 30, 9]
    got = [Collector() for _ in PROMPTS]
    for i in (0, 1):
        engine.submit(PROMPTS[i], limits[i], Sampling(), got[i])
    for _ in range(3):
        engine.step()
    for i in (2, 3, 4):
        engine.submit(PROMPTS[i], limits[i], Sampling(), got[i])
    run_to_end(engine)
    for prompt, limit, c in zip(PROMPTS, limits, got):
        assert c.tokens == generate(model, [prompt], limit)[0]
        assert c.finish_reason == "length"
    assert engine.stats["peak_batch"] == 3 and engine.stats["tokens_generated"] == sum(limits)
    assert engine.load() == (0, 0)


def test_eos_ends_a_row_and_the_context_bounds_the_answer(model):
    free = generate(model, PROMPTS, 15)
    eos = free[0][4]
    engine = BatchEngine(model, eos_id=eos, pad_id=0, max_batch=8)
    got = [Collector() for _ in PROMPTS]
    for prompt, c in zip(PROMPTS, got):
        engine.submit(prompt, 15, Sampling(), c)
    long_prompt, long_got = list(range(1, 36)), Collector()
    engine.submit(long_prompt, 100, Sampling(), long_got)
    run_to_end(engine)
    for prompt, c in zip(PROMPTS, got):
        assert c.tokens == generate(model, [prompt], 15, eos_id=eos)[0]
        assert c.finish_reason == ("stop" if len(c.tokens) < 15 else "length")
    assert got[0].finish_reason == "stop" and len(got[0].tokens) == 4
    assert long_got.tokens == generate(model, [long_prompt], 100, eos_id=eos)[0]
    assert len(long_got.tokens) <= MAX_SEQ_LEN - 35


def test_prefill_groups_keep_padding_small():
    requests = [Request([1] * n, 5, Sampling(), None) for n in (10, 1, 12, 3, 4, 30)]
    groups = [[len(r.prompt_ids) for r in g] for g in prefill_groups(requests)]
    assert groups == [[1], [3, 4], [10, 12], [30]]
    assert prefill_groups([]) == []


def test_each_row_samples_with_its_own_settings_and_seed(model):
    """A seeded sampling row draws the same tokens alone, beside greedy rows, and beside
    another sampling row; and the same as generate() with that seed."""
    sampling = Sampling(temperature=1.0, top_p=0.9, repetition_penalty=1.3, seed=123)

    def sampled(companions):
        engine = BatchEngine(model, eos_id=None, pad_id=0, max_batch=8)
        mine = Collector()
        for p in companions:
            engine.submit(p, 14, Sampling(temperature=0.8, seed=7) if len(p) > 5 else Sampling(), Collector())
        engine.submit(PROMPTS[0], 14, sampling, mine)
        run_to_end(engine)
        return mine.tokens

    alone = sampled([])
    assert alone == sampled(PROMPTS[1:3]) == sampled(PROMPTS[3:])
    reference = generate(model, [PROMPTS[0]], 14, sampling=sampling)[0]
    assert alone == reference
    assert alone != generate(model, [PROMPTS[0]], 14)[0]  # it really sampled


def test_a_cancelled_row_leaves_the_batch_and_the_others_go_on(model):
    engine = BatchEngine(model, eos_id=None, pad_id=0, max_batch=4)
    gone, stays = Collector(), Collector()
    request = engine.submit(PROMPTS[0], 30, Sampling(), gone)
    engine.submit(PROMPTS[1], 20, Sampling(), stays)
    for _ in range(3):
        engine.step()
    request.cancel()
    engine.step()
    assert gone.finish_reason == "cancelled" and len(gone.tokens) == 3
    assert engine.load() == (1, 0)
    run_to_end(engine)
    assert stays.tokens == generate(model, [PROMPTS[1]], 20)[0]
    assert engine.stats["tokens_generated"] == 23 and engine.stats["cancelled"] == 1


def test_cancel_all_ends_running_and_waiting_requests(model):
    engine = BatchEngine(model, eos_id=None, pad_id=0, max_batch=2)
    got = [Collector() for _ in range(3)]
    for prompt, c in zip(PROMPTS, got):
        engine.submit(prompt, 20, Sampling(), c)
    engine.step()
    engine.cancel_all()
    run_to_end(engine)
    assert [c.finish_reason for c in got] == ["cancelled"] * 3
    assert [len(c.tokens) for c in got] == [1, 1, 0]


def test_bad_requests_are_refused_at_submit(model):
    engine = BatchEngine(model, eos_id=None, pad_id=0)
    with pytest.raises(ValueError, match="max_seq_len 40"):
        engine.submit(list(range(1, 41)), 5, Sampling(), Collector())
    with pytest.raises(ValueError, match="prompt of 0 tokens"):
        engine.submit([], 5, Sampling(), Collector())
    with pytest.raises(ValueError, match="bad sampling"):
        engine.submit([1, 2], 5, Sampling(top_p=1.5), Collector())
    assert engine.load() == (0, 0)


def test_engine_thread_serves_requests_from_other_threads(model):
    engine = BatchEngine(model, eos_id=None, pad_id=0, max_batch=4)
    engine.start()
    events = [queue.Queue() for _ in PROMPTS]
    try:
        for prompt, q in zip(PROMPTS, events):
            engine.submit(prompt, 8, Sampling(), lambda t, r, q=q: q.put((t, r)))
        for prompt, q in zip(PROMPTS, events):
            tokens = []
            while (event := q.get(timeout=30))[0] is not None:
                tokens.append(event[0])
            assert tokens == generate(model, [prompt], 8)[0] and event[1] == "length"
    finally:
        engine.close()
    assert not engine.thread.is_alive()


def test_a_failing_receiver_cancels_only_its_own_row(model):
    engine = BatchEngine(model, eos_id=None, pad_id=0)

    def broken(token, finish_reason):
        raise RuntimeError("client gone")

    fine = Collector()
    engine.submit(PROMPTS[0], 10, Sampling(), broken)
    engine.submit(PROMPTS[1], 10, Sampling(), fine)
    run_to_end(engine)
    assert fine.tokens == generate(model, [PROMPTS[1]], 10)[0]
    assert engine.stats["cancelled"] == 1 and engine.stats["tokens_generated"] == 11


def test_an_error_inside_a_step_ends_its_rows_and_the_engine_goes_on(model, capsys):
    engine = BatchEngine(model, eos_id=None, pad_id=0)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    engine.batch.model = broken
    engine.start()
    try:
        failed = queue.Queue()
        engine.submit(PROMPTS[0], 5, Sampling(), lambda t, r: failed.put(r))
        assert failed.get(timeout=30) == "error"
        engine.batch.model = model
        served = queue.Queue()
        engine.submit(PROMPTS[0], 5, Sampling(), lambda t, r: served.put(t))
        assert [served.get(timeout=30) for _ in range(6)] == generate(model, [PROMPTS[0]], 5)[0] + [None]
    finally:
        engine.close()
    assert engine.stats["errors"] == 1 and "out of memory" in capsys.readouterr().err
