"""serve.py against real clients: the official openai package, raw HTTP, and the chat page in
a headless Chromium. One server (a child process on 127.0.0.1 and a free port) serves a tiny
checkpoint made here; the tests stop it at the end."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from openai import OpenAI

import eval as qa_eval
import serve
from checkpoint import save_checkpoint
from engine import BatchEngine, generate
from generate import load_for_inference
from model import ModelArgs, Transformer
from prompt import messages_prompt, sft_prompt_ids
from sampling import Sampling

pytestmark = pytest.mark.usefixtures("one_thread")
CONTEXT = 1024  # long enough that a 1000-token answer takes about a second: time to disconnect, or press stop
LONG = CONTEXT - 64  # an answer length no prompt here reaches the context's end before
FRONT_END = "http://front-end.example:3000"  # a web page on another origin that may call the API
QUESTIONS = ["头痛怎么办？", "感冒发烧了怎么办", "医生建议多休息吗", "胃痛", "心脏病人要注意什么", "糖尿病饮食",
             "咳嗽一直不好", "血压高吃什么药", "肝不好怎么检查", "肾病要运动吗", "发热头痛", "肠胃不好",
             "失眠怎么治疗", "老人感冒了", "孩子发热", "药要饭后吃吗"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_tokenizer):
    """Random weights, large enough that greedy answers vary from token to token and run on
    without eos for the questions above."""
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=tiny_tokenizer.vocab_size, max_seq_len=CONTEXT)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    path = tmp_path_factory.mktemp("sft") / "best.pt"
    save_checkpoint(path, {"kind": "sft", "model_args": args.to_dict(), "tokenizer": tiny_tokenizer.identity(),
                           "model": model.state_dict(), "step": 1})
    return path


@pytest.fixture(scope="module")
def url(ckpt):
    process, url = serve.start_subprocess(["--ckpt", str(ckpt), "--device", "cpu", "--threads", "1",
                                           "--cors-origins", FRONT_END])
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(url):
    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def client_url(client):
    return str(client.base_url).removesuffix("/").removesuffix("/v1")


def health(url):
    return httpx.get(url + "/health", timeout=10).json()


def wait_idle(url, timeout=15):
    deadline = time.monotonic() + timeout
    while (h := health(url))["active"] or h["waiting"]:
        assert time.monotonic() < deadline, f"server still busy: {h}"
        time.sleep(0.05)
    return h


def eval_predictions(ckpt, questions, max_new_tokens, tmp_path, *flags):
    """eval.py's greedy answers to the questions."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "多休息。"}, ensure_ascii=False) + "\n"
                            for q in questions), encoding="utf-8")
    qa_eval.evaluate(qa_eval.parse_args(["--ckpt", str(ckpt), "--data", str(data), "--out-dir", str(tmp_path / "eval"),
                                         "--max-new-tokens", str(max_new_tokens), "--batch-size", "16", *flags]))
    lines = (tmp_path / "eval" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def ask(client, question, **kw):
    return client.chat.completions.create(model="any", messages=[{"role": "user", "content": question}], **kw)


def streamed(client, messages, **kw):
    """(text, finish_reason, usage, number of content chunks) of a streamed answer."""
    text, finish, usage, n_chunks = "", None, None, 0
    for chunk in client.chat.completions.create(model="any", messages=messages, stream=True,
                                                stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                text, n_chunks = text + choice.delta.content, n_chunks + 1
            finish = choice.finish_reason or finish
    return text, finish, usage, n_chunks


# ----------------------------------------------------------------------------- answers

def test_openai_client_gets_eval_greedy_answer_whole_and_streamed(url, client, ckpt, tiny_tokenizer, tmp_path):
    expected = eval_predictions(ckpt, QUESTIONS[:3], 24, tmp_path)
    for question, want in zip(QUESTIONS[:3], expected):
        answer = ask(client, question, temperature=0, max_tokens=24)
        assert answer.choices[0].message.content == want["prediction"]
        assert answer.choices[0].finish_reason == "length" and answer.model == "baby-llama2-chinese"
        prompt_tokens = len(sft_prompt_ids(tiny_tokenizer, question))
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, 24)
        text, finish, usage, n_chunks = streamed(client, [{"role": "user", "content": question}],
                                                 temperature=0, max_tokens=24)
        assert text == want["prediction"] and finish == "length" and n_chunks > 5
        assert usage.completion_tokens == 24
    assert len(set(expected[0]["prediction"])) > 5  # the answers are not one repeated character


def test_ngram_blocking_field_gives_evals_answer(client, ckpt, tmp_path):
    want, = eval_predictions(ckpt, QUESTIONS[:1], 24, tmp_path, "--no-repeat-ngram-size", "2")
    answer = ask(client, QUESTIONS[0], temperature=0, max_tokens=24, extra_body={"no_repeat_ngram_size": 2})
    assert answer.choices[0].message.content == want["prediction"]


def test_models_and_health(url, client):
    assert [m.id for m in client.models.list().data] == ["baby-llama2-chinese"]
    assert client.models.retrieve("baby-llama2-chinese").max_model_len == CONTEXT
    missing = httpx.get(url + "/v1/models/gpt-4", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    h = health(url)
    assert h["status"] == "ok" and h["context_length"] == CONTEXT and h["defaults"]["temperature"] == 0.7


def test_tokenize_counts_the_prompt_a_chat_request_makes_however_long(url, client, tiny_tokenizer):
    messages = [{"role": "system", "content": "你是医生"}, {"role": "user", "content": QUESTIONS[0]},
                {"role": "assistant", "content": "多休息。"}, {"role": "user", "content": QUESTIONS[1]}]
    counted = httpx.post(url + "/tokenize", json={"messages": messages}, timeout=10).json()
    asked = client.chat.completions.create(model="any", messages=messages, temperature=0, max_tokens=2)
    assert counted["count"] == asked.usage.prompt_tokens == len(counted["tokens"])
    assert counted["tokens"] == sft_prompt_ids(tiny_tokenizer, messages_prompt(messages))
    assert counted["max_model_len"] == CONTEXT
    too_long = [{"role": "user", "content": "头痛" * CONTEXT}]  # counted, not refused: the client decides
    assert httpx.post(url + "/tokenize", json={"messages": too_long}, timeout=10).json()["count"] > CONTEXT
    bad = httpx.post(url + "/tokenize", json={"messages": []}, timeout=10)
    assert bad.status_code == 400 and "messages" in bad.json()["error"]["message"]
    icon = httpx.get(url + "/favicon.ico", timeout=10)
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")


def test_stop_strings_cut_the_answer_before_them(client):
    full = ask(client, QUESTIONS[0], temperature=0, max_tokens=40).choices[0].message.content
    stop = full[20:22]
    cut = full[:full.find(stop)]
    before = wait_idle(client_url(client))
    answer = ask(client, QUESTIONS[0], temperature=0, max_tokens=40, stop=[stop, "never appears"])
    assert answer.choices[0].message.content == cut and answer.choices[0].finish_reason == "stop"
    text, finish, _, _ = streamed(client, [{"role": "user", "content": QUESTIONS[0]}], temperature=0,
                                  max_tokens=40, stop=stop)
    assert (text, finish) == (cut, "stop")
    assert wait_idle(client_url(client))["cancelled"] == before["cancelled"]  # a stop string ends, not abandons
    long_stop = full[10:30]  # up to 4 stop strings, each of any length
    answer = ask(client, QUESTIONS[0], temperature=0, max_tokens=40, stop=long_stop)
    assert answer.choices[0].message.content == full[:full.find(long_stop)]


def test_seeded_sampling_repeats_and_multi_turn_and_system_messages_work(client):
    def sample(seed):
        return ask(client, QUESTIONS[1], temperature=1.0, top_p=0.9, seed=seed, max_tokens=20).choices[0].message.content
    assert sample(11) == sample(11) != sample(12)
    turns = [{"role": "system", "content": "你是一名医生。"}, {"role": "user", "content": QUESTIONS[0]},
             {"role": "assistant", "content": "多休息。"}, {"role": "user", "content": QUESTIONS[1]}]
    answer = client.chat.completions.create(model="any", messages=turns, temperature=0, max_tokens=8)
    assert answer.usage.prompt_tokens > ask(client, QUESTIONS[1], max_tokens=1).usage.prompt_tokens + 5
    parts = [{"role": "user", "content": [{"type": "text", "text": "头痛"}, {"type": "text", "text": "怎么办？"}]}]
    as_parts = client.chat.completions.create(model="any", messages=parts, temperature=0, max_tokens=8)
    assert as_parts.choices[0].message.content == ask(client, "头痛怎么办？", temperature=0, max_tokens=8).choices[0].message.content


# ----------------------------------------------------------------------------- bad input

def chat_url(url):
    return url + "/v1/chat/completions"


USER = [{"role": "user", "content": "头痛"}]
BAD_BODIES = [  # (body, the error's param or code, a word of its message)
    (b'{"messages": [', "invalid_json", "not valid JSON"),
    (b'[1, 2]', "invalid_json", "JSON object"),
    (b'\xff\xfe{}', "invalid_json", "not valid JSON"),
    ({}, "messages", "Field required"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": "头痛"}, "messages", "valid list"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages", "content"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages", "role"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages", "alternate"),
    ({"messages": USER + USER}, "messages", "alternate"),
    ({"messages": USER, "temperature": "hot"}, "temperature", "valid number"),
    ({"messages": USER, "temperature": -1}, "temperature", "greater than or equal"),
    ({"messages": USER, "temperature": 1e9}, "temperature", "less than or equal"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "temperature", "finite"),
    ({"messages": USER, "top_p": 0}, "top_p", "greater than"),
    ({"messages": USER, "top_p": 1.5}, "top_p", "less than"),
    ({"messages": USER, "top_k": 0}, "top_k", "greater than"),
    ({"messages": USER, "repetition_penalty": 0}, "repetition_penalty", "greater than"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens", "greater than"),
    ({"messages": USER, "max_tokens": "12"}, "max_tokens", "valid integer"),
    ({"messages": USER, "max_tokens": 1.5}, "max_tokens", "valid integer"),
    ({"messages": USER, "seed": -1}, "seed", "greater than"),
    ({"messages": USER, "stream": "yes"}, "stream", "valid boolean"),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"messages": USER, "n": 9}, "n", "less than"),
    ({"messages": USER, "n": 2, "stream": True}, "n", "not supported with stream"),
    ({"messages": USER, "max_tokens": 5, "max_completion_tokens": 6}, "max_tokens", "differ"),
    ({"messages": USER, "prompt_file": "/etc/passwd"}, "prompt_file", "Extra inputs"),
    (b'{"messages": [{"role": "user", "content": "\\ud800x"}]}', "messages", "lone surrogate"),
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid_json", "nested too deeply"),
    ({"messages": USER, "frequency_penalty": 3}, "frequency_penalty", "less than or equal"),
    ({"messages": USER, "logprobs": True, "stream": True}, "logprobs", "not supported with stream"),
    ({"messages": USER, "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ({"messages": USER, "response_format": {"type": "json_object"}}, "response_format", "not supported"),
]


def test_the_fields_front_ends_send_are_accepted_and_developer_is_system(client):
    """What chat front-ends send on every request, at values that ask for nothing missing."""
    sent = dict(presence_penalty=0, frequency_penalty=0, logprobs=False, response_format={"type": "text"},
                metadata={"app": "test"}, store=False, parallel_tool_calls=True)
    system = [{"role": "system", "content": "你是一名医生。"}, {"role": "user", "content": QUESTIONS[2]}]
    developer = [{"role": "developer", "content": "你是一名医生。"}, {"role": "user", "content": QUESTIONS[2]}]
    want = client.chat.completions.create(model="any", messages=system, temperature=0, max_tokens=12)
    got = client.chat.completions.create(model="any", messages=developer, temperature=0, max_tokens=12, **sent)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.usage.prompt_tokens == want.usage.prompt_tokens


def test_presence_and_frequency_penalties_reach_the_engine(client, ckpt):
    """The API's penalties are the engine's: the same answer as generating with them directly."""
    _, model, tokenizer = load_for_inference(ckpt, device="cpu")
    prompt = messages_prompt([{"role": "user", "content": QUESTIONS[1]}])
    ids = sft_prompt_ids(tokenizer, prompt)
    for presence, frequency in [(1.5, 0.0), (0.0, 2.0)]:
        want = generate(model, [ids], 24, eos_id=tokenizer.eos_id,
                        sampling=Sampling(presence_penalty=presence, frequency_penalty=frequency))[0]
        got = client.chat.completions.create(model="any", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                             temperature=0, max_tokens=24, presence_penalty=presence,
                                             frequency_penalty=frequency)
        assert got.choices[0].message.content == tokenizer.decode(want)


def test_chat_n_answers_and_logprobs(client, ckpt):
    """n sampled answers: answer i is the one seed + i gives alone; logprobs are the model's
    own for each answer token given the prompt and the answer before it."""
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    several = client.chat.completions.create(model="any", messages=messages, temperature=1.0, seed=5, n=3, max_tokens=10)
    alone = [client.chat.completions.create(model="any", messages=messages, temperature=1.0, seed=5 + i, max_tokens=10)
             for i in range(3)]
    assert [c.message.content for c in several.choices] == [a.choices[0].message.content for a in alone]
    assert len({c.message.content for c in several.choices}) > 1 and several.usage.completion_tokens == 30
    _, model, tok = load_for_inference(ckpt, device="cpu")
    prompt = sft_prompt_ids(tok, messages_prompt(messages))
    got = client.chat.completions.create(model="any", messages=messages, temperature=0, max_tokens=8, logprobs=True,
                                         top_logprobs=2)
    answer = generate(model, [prompt], 8, eos_id=tok.eos_id)[0]
    with torch.no_grad():
        logp = torch.log_softmax(model.logits(torch.tensor([prompt + answer]))[0, :-1], -1)
    content = got.choices[0].logprobs.content
    assert [e.token for e in content] == [tok.id_to_piece(t) for t in answer]
    assert [e.logprob for e in content] == pytest.approx([float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(answer)],
                                                         abs=1e-4)
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token for e in content)  # greedy: its own token first


def test_legacy_completions_score_and_continue_text_as_the_model_does(client, ckpt):
    """/v1/completions with echo and logprobs, as log-likelihood evaluations ask: every token's
    log-probability given those before it (none for the first) and its top alternative, equal
    to the model's own; the continuation is the engine's greedy one."""
    _, model, tok = load_for_inference(ckpt, device="cpu")
    texts = [QUESTIONS[0], QUESTIONS[2] + "多休息"]
    got = client.completions.create(model="any", prompt=texts, max_tokens=3, temperature=0, echo=True, logprobs=1)
    for text, choice in zip(texts, got.choices):
        ids = tok.encode(text)
        new = generate(model, [ids], 3, eos_id=tok.eos_id)[0]
        seq = [*ids, *new]
        with torch.no_grad():
            logp = torch.log_softmax(model.logits(torch.tensor([seq]))[0, :-1], -1)
        want = [float(logp[j, t]) for j, t in enumerate(seq[1:])]
        assert choice.text == text + tok.decode(new)
        assert choice.logprobs.tokens == [tok.id_to_piece(t) for t in seq]
        assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
        best = [tok.id_to_piece(int(logp[j].argmax())) for j in range(len(seq) - 1)]
        assert [next(iter(top)) for top in choice.logprobs.top_logprobs[1:]] == best
    ids = tok.encode(QUESTIONS[1])
    only = client.completions.create(model="any", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert only.choices[0].text == tok.decode(ids) and len(only.choices[0].logprobs.token_logprobs) == len(ids)
    assert only.usage.prompt_tokens == len(ids) and only.usage.completion_tokens == 0
    plain = client.completions.create(model="any", prompt=QUESTIONS[1], max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None and plain.usage.completion_tokens == 4
    for bad, param in [({"prompt": "x", "stream": True}, "stream"), ({"prompt": [10 ** 6]}, "prompt"),
                       ({"prompt": "x", "max_tokens": 10 ** 5}, "prompt"), ({"prompt": "x", "suffix": "y"}, "suffix")]:
        r = httpx.post(client_url(client) + "/v1/completions", json=bad, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, bad


@pytest.mark.parametrize("body, param, words", BAD_BODIES)
def test_bad_requests_get_an_openai_error_and_400(url, body, param, words):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(chat_url(url), headers={"Content-Type": "application/json"}, timeout=30, **kw)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and words in error["message"]
    assert param in (error["param"], error["code"])


def test_streamed_chunks_say_usage_null_until_the_last_and_cors_lets_a_front_end_in(url):
    body = {"messages": USER, "stream": True, "max_tokens": 5, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", chat_url(url), json=body, timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert all(e["usage"] is None for e in events[:-1]) and events[-1]["usage"]["completion_tokens"] == 5
    preflight = httpx.options(chat_url(url), timeout=10, headers={
        "Origin": FRONT_END, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == FRONT_END
    other = httpx.get(url + "/v1/models", headers={"Origin": "http://elsewhere.example"}, timeout=10)
    assert "access-control-allow-origin" not in other.headers


def test_a_prompt_longer_than_the_context_is_refused_with_the_numbers(url, tiny_tokenizer):
    question = "头痛发热" * 400
    n = len(sft_prompt_ids(tiny_tokenizer, question))
    r = httpx.post(chat_url(url), json={"messages": [{"role": "user", "content": question}]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert f"{n} tokens" in r.json()["error"]["message"] and f"context is {CONTEXT} tokens" in r.json()["error"]["message"]


def test_max_tokens_beyond_the_context_is_clamped_and_said_so(url, tiny_tokenizer):
    n = len(sft_prompt_ids(tiny_tokenizer, "头痛"))
    r = httpx.post(chat_url(url), json={"messages": USER, "max_tokens": 10 ** 6, "temperature": 0, "stop": "咳"},
                   timeout=60)
    assert r.status_code == 200
    assert r.json()["warnings"] == [f"max_tokens 1000000 clamped to {CONTEXT - n}: the prompt's {n} tokens and the "
                                    f"answer must fit the model's context of {CONTEXT} tokens"]
    assert r.json()["usage"]["completion_tokens"] <= CONTEXT - n
    with httpx.stream("POST", chat_url(url), json={"messages": USER, "max_tokens": 10 ** 6, "stream": True},
                      timeout=30) as r:  # streamed, the first chunk says it
        first = json.loads(next(r.iter_lines()).removeprefix("data: "))
    assert first["warnings"][0].startswith(f"max_tokens 1000000 clamped to {CONTEXT - n}")


def test_oversized_bodies_get_413_and_the_server_goes_on(url):
    big = json.dumps({"messages": [{"role": "user", "content": "头" * (1 << 20)}]}).encode()
    r = httpx.post(chat_url(url), content=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunked():  # no Content-Length: the server counts what arrives
        for i in range(0, len(big), 1 << 16):
            yield big[i:i + 1 << 16]
    try:
        r = httpx.post(chat_url(url), content=chunked(), timeout=30)
        assert r.status_code == 413
    except httpx.TransportError:
        pass  # the server may close the connection before the client has sent everything
    assert httpx.post(chat_url(url), json={"messages": USER, "max_tokens": 3}, timeout=30).status_code == 200


def test_wrong_paths_and_methods_get_openai_errors(url):
    for method, path, status in [("GET", "/v1/nothing", 404), ("GET", "/chat.html", 404), ("GET", "/../serve.py", 404),
                                 ("GET", "/v1/chat/completions", 405), ("DELETE", "/health", 405)]:
        r = httpx.request(method, url + path, timeout=10)
        assert r.status_code == status and "message" in r.json()["error"]


def test_the_model_field_is_a_label_never_a_file(client):
    answer = client.chat.completions.create(model="../../etc/passwd", messages=USER, max_tokens=2)
    assert answer.model == "baby-llama2-chinese" and answer.usage.completion_tokens == 2


# ----------------------------------------------------------------------------- clients that leave, clients together

def test_a_client_that_disconnects_stops_its_row(url, client):
    full = ask(client, QUESTIONS[2], temperature=0, max_tokens=LONG)
    assert full.usage.completion_tokens == LONG  # so a row that runs on would generate this many
    for stream in (True, False):
        before = wait_idle(url)
        body = {"messages": [{"role": "user", "content": QUESTIONS[2]}], "temperature": 0, "max_tokens": LONG,
                "stream": stream}
        if stream:
            with httpx.stream("POST", chat_url(url), json=body, timeout=30) as r:
                chunks = 0
                for line in r.iter_lines():
                    chunks += line.startswith("data: {")
                    if chunks == 3:
                        break  # leaving the block closes the connection mid-stream
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(chat_url(url), json=body, timeout=httpx.Timeout(30, read=0.3))
        after = wait_idle(url)
        # a row that runs on generates all LONG tokens; how many come before the server notices
        # depends on the machine's speed (the non-streaming check polls every DISCONNECT_POLL_S)
        assert after["tokens_generated"] - before["tokens_generated"] < LONG
        assert after["cancelled"] == before["cancelled"] + 1


def test_16_concurrent_streaming_clients_all_get_their_answers(url, client, ckpt, tmp_path):
    expected = [p["prediction"] for p in eval_predictions(ckpt, QUESTIONS, 48, tmp_path)]
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        results = list(pool.map(lambda q: streamed(client, [{"role": "user", "content": q}], temperature=0,
                                                   max_tokens=48), QUESTIONS))
    assert [text for text, _, _, _ in results] == expected
    assert all(finish == "length" and usage.completion_tokens == 48 for _, finish, usage, _ in results)
    assert health(url)["peak_batch"] >= 8  # they shared decode steps


def test_ctrl_c_ends_open_streams_and_the_server_exits_cleanly(ckpt, capfd):
    process, own_url = serve.start_subprocess(["--ckpt", str(ckpt), "--device", "cpu", "--threads", "1"])
    try:
        body = {"messages": USER, "temperature": 0, "max_tokens": LONG, "stream": True}
        with httpx.stream("POST", chat_url(own_url), json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            process.send_signal(signal.SIGINT)
            rest = [line for line in lines if line]
        assert json.loads(rest[-2].removeprefix("data: "))["error"]["code"] == "server_shutdown"
        assert rest[-1] == "data: [DONE]"
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    assert "Traceback" not in capfd.readouterr().err


def test_a_client_too_slow_with_headers_or_body_is_dropped(ckpt, capfd):
    """Half a request line, or headers with half the body they announce: dropped after
    --read-timeout instead of holding a socket open forever; the server goes on."""
    process, own_url = serve.start_subprocess(["--ckpt", str(ckpt), "--device", "cpu", "--threads", "1",
                                               "--read-timeout", "1"])
    host, port = own_url.removeprefix("http://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=10) as slow_headers:
            slow_headers.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            started = time.monotonic()
            assert slow_headers.recv(1024) == b""  # closed by the server
            assert 0.5 < time.monotonic() - started < 8
        with socket.create_connection((host, int(port)), timeout=10) as slow_body:
            slow_body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 100\r\n\r\n{\"messages\": ")
            answer = b"".join(iter(lambda: slow_body.recv(4096), b"")).decode()  # up to the server's close
            assert answer.startswith("HTTP/1.1 408") and "request_timeout" in answer
        assert health(own_url)["status"] == "ok"
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "Traceback" not in capfd.readouterr().err


# ----------------------------------------------------------------------------- in-process: the API key, the flags

def local_app(ckpt, **settings):
    """serve.py's app in this process (TestClient runs it, engine thread included)."""
    _, model, tok = load_for_inference(ckpt, device="cpu")
    defaults = vars(serve.parse_args(["--ckpt", str(ckpt)]))
    return TestClient(serve.create_app(serve.Server(BatchEngine(model, tok.eos_id, tok.pad_id, 2), tok, defaults,
                                                    **settings)))


def test_api_key_guards_the_api_but_not_the_page(ckpt):
    with local_app(ckpt, api_key="sekret") as http:
        body = {"messages": USER, "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = http.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert http.get("/v1/models", headers=headers).status_code == 401
        good = {"Authorization": "Bearer sekret"}
        assert http.post("/v1/chat/completions", json=body, headers=good).json()["usage"]["completion_tokens"] == 2
        assert http.get("/health").status_code == 200
        page = http.get("/")
        assert page.status_code == 200 and "<textarea" in page.text and "sekret" not in page.text


def test_a_full_queue_gets_503(ckpt):
    with local_app(ckpt, max_waiting=0) as http:
        r = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy"


def test_bad_flags_and_a_taken_port_stop_with_one_line(tmp_path, ckpt):
    with pytest.raises(SystemExit, match="serve.py: error: checkpoint .*nothing does not exist"):
        serve.main(["--ckpt", str(tmp_path / "nothing"), "--port", "0"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot listen on --host 127.0.0.1 --port {port}"):
            serve.main(["--ckpt", str(ckpt), "--port", str(port)])
    with pytest.raises(SystemExit):
        serve.parse_args(["--top-p", "2"])


# ----------------------------------------------------------------------------- the page in a browser

@pytest.fixture
def browser():
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    fonts = subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True).stdout if shutil.which("fc-list") else ""
    if not (chromium and chromedriver and fonts.strip()):
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser test: .ci/run installs chromium, chromium-driver and fonts-wqy-microhei")
        pytest.skip("no chromium, chromedriver or Chinese font (Debian: apt-get install chromium chromium-driver "
                    "fonts-wqy-microhei)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    options = Options()
    options.binary_location = chromium
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, to check it stays clean
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()


def wait_for(condition, timeout=20, what="the page"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


CHINESE_RENDERS = (  # 头 drawn in the page's font differs from a character no font has (a box)
    "const c = document.createElement('canvas'), g = c.getContext('2d'), s = getComputedStyle(document.body);"
    "g.font = s.fontSize + ' ' + s.fontFamily;"
    "const px = (ch) => { g.clearRect(0, 0, c.width, c.height); g.fillText(ch, 4, 24);"
    "                     return g.getImageData(0, 0, c.width, c.height).data.join(); };"
    "return px('头') !== px('\\uE000') && px('\\uE000') === px('\\uE001');")


STORE = "baby-llama2-chinese.conversation"  # the page's local-storage key


def saved_turns(browser):
    """The conversation as the page keeps it in local storage."""
    return browser.execute_script(f"return (JSON.parse(localStorage.getItem('{STORE}') || 'null') || {{}}).turns || [];")


def last_answer(browser):
    """The last finished answer's text, exactly as it was received."""
    answers = [t["content"] for t in saved_turns(browser) if t["role"] == "assistant"]
    return answers[-1] if answers else ""


def shown_answer_length(browser):
    return browser.execute_script("const b = document.querySelectorAll('.msg.assistant .text');"
                                  "return b.length ? b[b.length - 1].textContent.length : 0;")


def wait_for_answers(browser, n):
    from selenium.webdriver.common.by import By
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == n
             and browser.find_element(By.ID, "send").is_enabled(), what=f"answer {n}")


def test_chat_page_streams_an_answer_stops_it_and_goes_on(browser, url, client, tiny_tokenizer):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    find = browser.find_element
    browser.get(url + "/")
    wait_for(lambda: f"context {CONTEXT}" in find(By.ID, "status").text, what="the status line")
    assert browser.execute_script(CHINESE_RENDERS)
    find(By.TAG_NAME, "summary").click()
    find(By.ID, "temperature").send_keys("0")
    find(By.ID, "max_tokens").send_keys(str(LONG))
    find(By.ID, "input").send_keys(QUESTIONS[0])
    find(By.ID, "send").click()
    lengths = set()
    wait_for(lambda: lengths.add(shown_answer_length(browser)) or len(lengths - {0}) >= 3, what="a growing answer")
    find(By.ID, "stop").click()
    wait_for_answers(browser, 1)
    partial = last_answer(browser)
    assert "(stopped)" in find(By.CSS_SELECTOR, ".msg.assistant .tag").text
    assert find(By.CSS_SELECTOR, ".msg.user").text == QUESTIONS[0]  # Chinese arrives intact
    full = ask(client, QUESTIONS[0], temperature=0, max_tokens=LONG).choices[0].message.content
    assert 0 < len(partial) < len(full) and full.startswith(partial)  # stopped before the end
    wait_idle(url)

    # a second turn: the page sends the conversation, stopped answer included
    find(By.ID, "max_tokens").clear()
    find(By.ID, "max_tokens").send_keys("12")
    find(By.ID, "input").send_keys(QUESTIONS[1], Keys.ENTER)
    wait_for_answers(browser, 2)
    turns = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": partial},
             {"role": "user", "content": QUESTIONS[1]}]
    second = client.chat.completions.create(model="any", messages=turns, temperature=0, max_tokens=12)
    assert last_answer(browser) == second.choices[0].message.content

    # a question that leaves room for 12 new tokens only without the first turn: the page
    # counts the prompt first and leaves that turn out, so the answer is not cut
    turns.append({"role": "assistant", "content": last_answer(browser)})
    question = long_question(tiny_tokenizer, turns, room=12)
    browser.execute_script("document.getElementById('input').value = arguments[0];", question)
    find(By.ID, "send").click()
    wait_for_answers(browser, 3)
    assert "earlier turns left out" in find(By.ID, "note").text and "clamped" not in find(By.ID, "note").text
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.dropped")) == 2
    third = client.chat.completions.create(model="any", messages=turns[2:] + [{"role": "user", "content": question}],
                                           temperature=0, max_tokens=12)
    assert last_answer(browser) == third.choices[0].message.content
    kept = saved_turns(browser)

    # a reload keeps the conversation, the left-out turns still faded; Clear forgets it
    browser.refresh()
    wait_for_answers(browser, 3)
    assert [m.text for m in browser.find_elements(By.CSS_SELECTOR, ".msg.user .text")] == \
        [QUESTIONS[0], QUESTIONS[1], question]
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.dropped")) == 2 and saved_turns(browser) == kept
    find(By.ID, "clear").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == [] and find(By.ID, "note").text == ""
    browser.refresh()
    wait_for(lambda: "context" in find(By.ID, "status").text, what="the status line")
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == [] and saved_turns(browser) == []


def long_question(tok, turns, room):
    """A question whose prompt leaves `room` new tokens after the last two turns alone, and
    not after all of them."""
    def n_tokens(messages, question):
        return len(sft_prompt_ids(tok, messages_prompt(messages + [{"role": "user", "content": question}])))
    question = ""
    while n_tokens(turns[2:], question + "头痛发热") + room <= CONTEXT:
        question += "头痛发热"
    assert n_tokens(turns, question) + room > CONTEXT, "the test's question must not fit with every turn"
    return question


LAYOUT = (  # what a reader would see wrong: text outside its box, boxes over each other, a narrow input
    "const msgs = [...document.querySelectorAll('.msg')], problems = [];"
    "msgs.forEach((m, i) => {"
    "  if (m.scrollHeight > m.clientHeight + 1 || m.scrollWidth > m.clientWidth + 1) problems.push('text outside message ' + i);"
    "  const next = msgs[i + 1];"
    "  if (next && m.getBoundingClientRect().bottom > next.getBoundingClientRect().top + 0.5) problems.push('message ' + i + ' overlaps the next');"
    "});"
    "const input = document.getElementById('input').getBoundingClientRect();"
    "if (input.width < 0.6 * (window.innerWidth - 32)) problems.push('input ' + input.width + ' px wide of ' + window.innerWidth);"
    "for (const id of ['send', 'stop', 'clear']) {"
    "  const r = document.getElementById(id).getBoundingClientRect();"
    "  if (r.right > window.innerWidth || r.bottom > window.innerHeight) problems.push(id + ' off the screen');"
    "}"
    "if (document.documentElement.scrollWidth > window.innerWidth) problems.push('the page scrolls sideways');"
    "return problems;")


@pytest.mark.parametrize("width", [360, 1000])
def test_chat_page_fits_the_screen_and_answers_can_be_copied_and_asked_again(browser, url, client, width):
    from selenium.webdriver.common.by import By
    find = browser.find_element
    browser.set_window_size(width, 720)
    browser.get(url + "/")
    wait_for(lambda: "context" in find(By.ID, "status").text, what="the status line")
    assert abs(browser.execute_script("return window.innerWidth;") - width) <= 20
    find(By.TAG_NAME, "summary").click()
    find(By.ID, "temperature").send_keys("0")
    find(By.ID, "max_tokens").send_keys("60")
    for i, question in enumerate(QUESTIONS[:4]):  # four turns, the page scrolled as answers arrive
        find(By.ID, "input").send_keys(question)
        find(By.ID, "send").click()
        wait_for_answers(browser, i + 1)
    assert browser.execute_script(LAYOUT) == []
    assert [b.is_displayed() for b in browser.find_elements(By.CSS_SELECTOR, ".regenerate")] == [False] * 3 + [True]
    first = last_answer(browser)
    find(By.CSS_SELECTOR, ".msg.assistant:last-of-type .regenerate").click()  # greedy: the same answer again
    wait_for(lambda: not find(By.ID, "send").is_enabled(), timeout=5, what="regenerating")
    wait_for_answers(browser, 4)
    assert last_answer(browser) == first and len(saved_turns(browser)) == 8
    copy = browser.find_elements(By.CSS_SELECTOR, ".copy")[0]
    copy.click()
    wait_for(lambda: "Copied" in copy.text, timeout=5, what="the copy button")
    # nothing in the browser's console: no missing icon, no advice on the key field, no error
    assert browser.get_log("browser") == []


def test_chat_page_keeps_a_failed_question_and_shows_lists_as_lists(browser, url):
    from selenium.webdriver.common.by import By
    find = browser.find_element
    browser.get(url + "/")
    wait_for(lambda: "context" in find(By.ID, "status").text, what="the status line")
    find(By.TAG_NAME, "summary").click()
    find(By.ID, "temperature").send_keys("5")  # beyond the API's range: the server answers 400
    find(By.ID, "input").send_keys(QUESTIONS[2])
    find(By.ID, "send").click()
    wait_for(lambda: "error" in find(By.ID, "note").text and find(By.ID, "send").is_enabled(), what="the error")
    assert "temperature" in find(By.ID, "note").text
    assert find(By.ID, "input").get_attribute("value") == QUESTIONS[2]  # back in the input, to send again
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == [] and saved_turns(browser) == []

    answer = "可以这样做：\n1. 多休息，\n2. 多喝水。\n\n- 必要时就医"
    saved = {"turns": [{"role": "user", "content": QUESTIONS[2]}, {"role": "assistant", "content": answer}]}
    browser.execute_script(f"localStorage.setItem('{STORE}', arguments[0]);", json.dumps(saved, ensure_ascii=False))
    browser.refresh()
    wait_for_answers(browser, 1)
    lines = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .line")
    assert [line.text for line in lines] == answer.split("\n")
    assert [("item" in line.get_attribute("class")) for line in lines] == [False, True, True, False, True]
