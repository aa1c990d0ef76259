"""Serve a checkpoint over HTTP: an OpenAI-compatible chat API, and a chat page for a browser.

    python serve.py --ckpt out/sft                      # http://127.0.0.1:8000
    python serve.py --ckpt out/sft --host 0.0.0.0 --port 8000 --api-key KEY

Endpoints:
  POST /v1/chat/completions  OpenAI's chat completion: messages in, the answer out, whole or
                             streamed as server-sent events (chat.completion.chunk, then [DONE])
  POST /v1/completions       OpenAI's legacy text completion, with logprobs and echo (completions.py)
  GET  /v1/models            the one model served
  POST /tokenize             the number of tokens messages make as a prompt (vLLM's shape), so
                             that a client can drop old turns before a request instead of after
  GET  /health               liveness, load and the server's sampling defaults
  GET  /                     chat.html, a chat page (no build step, nothing fetched from elsewhere),
                             and its icon at /favicon.ico

Messages become the prompt through prompt.py, the format SFT trained on, so temperature 0
gives exactly eval.py's greedy answer. Every request goes to one BatchEngine (engine.py):
requests that arrive together, or while others are decoding, share the model's decode steps,
and a client that disconnects stops its row. Bad requests get OpenAI's error object
({"error": {"message", "type", "param", "code"}}) with a 4xx status; the server goes on.
The request's "model" is only a label: no request names a file to read or write.
--max-new-tokens and the sampling flags are the defaults for requests that leave a field out
(no --seed: a fresh random seed per request); flags left unset take the checkpoint's
generation_config.json where it has one. chat_request.py holds the request's schema.
"""
import argparse
import asyncio
import functools
import hmac
import ipaddress
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import h11
import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

import cli
from chat_request import (ApiError, TokenizeRequest, generation_settings, messages_ids, parse_body, parse_chat_request,
                          prompt_ids, read_body)
from completions import (CompletionRequest, check_completion_request, prompt_items, prompt_token_lists, sampling_of,
                         token_logprobs)
from engine import BatchEngine
from checkpoint import ANSWERING_KINDS
from generate import TextStream, add_generation_args, load_for_inference, resolve_decoding, sampling_from
from refusal import Refusal, one_line_refusals

# -----------------------------------------------------------------------------
# defaults (flags override); the sampling ones apply to requests that leave a field out, and
# the checkpoint's generation_config.json replaces them where it has a value (as it does for
# eval.py, so that temperature 0 alone gives eval.py's greedy answer).
GENERATION = dict(ckpt="out/sft", max_new_tokens=256, temperature=0.7, top_k=None, top_p=0.9,
                  repetition_penalty=1.0, no_repeat_ngram_size=0, seed=None)
HOST, PORT = "127.0.0.1", 8000
MODEL_NAME = "baby-llama2-chinese"
MAX_BATCH = 16  # rows decoded together (each holds a KV cache slot of the full context)
MAX_WAITING = 256  # requests queued beyond the batch before new ones get 503
MAX_BODY_BYTES = 1 << 20
READ_TIMEOUT_S = 30.0  # a request's headers, and then its body, must each arrive within this
API_KEY_ENV = "BABYLLAMA_API_KEY"
PAGE = Path(__file__).with_name("chat.html")
ICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="26" rx="7" fill="#1d4ed8"/>'
        '<path d="M8 24 6 31l9-7z" fill="#1d4ed8"/><text x="16" y="19" font-size="15" text-anchor="middle" '
        'fill="#fff" font-family="sans-serif">AI</text></svg>')  # a speech bubble: the page's tab icon
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
# -----------------------------------------------------------------------------


# ----------------------------------------------------------------------------- request -> engine

class Mailbox:
    """Carries events from the engine's thread to asyncio queues on the event loop. Waking
    the loop is a system call; the first event of a decode step wakes it, and the rest of
    that step's events (one per row) ride along instead of each waking it again."""

    def __init__(self, loop):
        self.loop, self.lock, self.pending, self.scheduled = loop, threading.Lock(), [], False

    def post(self, inbox, event):  # on the engine's thread
        with self.lock:
            self.pending.append((inbox, event))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._hand_over)

    def _hand_over(self):  # on the event loop
        with self.lock:
            pending, self.pending, self.scheduled = self.pending, [], False
        for inbox, event in pending:
            inbox.put_nowait(event)


class Completion:
    """One request on its way from the engine's thread to the event loop: the engine's
    deliver() posts (token, finish_reason) to an asyncio queue, pieces() turns them into text."""

    def __init__(self, server, prompt, max_new_tokens, sampling, stops):
        self.mailbox, self.events = server.mailbox, asyncio.Queue()
        self.prompt_tokens, self.text = len(prompt), TextStream(server.tokenizer, stops)
        self.request = server.engine.submit(prompt, max_new_tokens, sampling, self._deliver)

    def _deliver(self, token, finish_reason):  # on the engine's thread
        self.mailbox.post(self.events, (token, finish_reason))

    async def pieces(self):
        """Yields (text, None) per token (text '' while it waits, see TextStream), then
        (text, finish_reason) once. Leaving early (the client went away) cancels the row."""
        try:
            while True:
                token, finish_reason = await self.events.get()
                if token is None:
                    yield self.text.flush(), finish_reason
                    return
                piece = self.text.push(token)
                if self.text.stopped:
                    self.request.cancel("stop")  # the row ends as asked, not as an abandoned answer
                    yield piece, "stop"
                    return
                yield piece, None  # '' too: a token whose text waits still is a token
        finally:
            self.request.cancel()  # a no-op when the row has ended already

    def usage(self):
        n = len(self.text.ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}


# ----------------------------------------------------------------------------- responses

def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def ended_early(finish_reason):
    """The error for an answer the engine ended ("error", or "cancelled" at shutdown)."""
    if finish_reason == "error":
        return ApiError(500, "generation failed inside the server; see its log", code="generation_error",
                        kind="server_error")
    return ApiError(503, "the server is shutting down", code="server_shutdown", kind="server_error")


async def stream_events(completion, meta, warnings, include_usage):
    """The server-sent events of a streamed answer: a first chunk with the role (and any
    warnings), sent when the first token is generated so that its arrival is the time to
    first token; one chunk per piece of text; a last one with finish_reason; then [DONE]."""
    def chunk(delta, finish_reason=None, **extra):
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        usage = {"usage": None} if include_usage else {}  # OpenAI's chunks say "no usage yet" when it was asked for
        return sse({**meta, "object": "chat.completion.chunk", "choices": [choice], **usage, **extra})

    first = True
    try:
        async for piece, finish_reason in completion.pieces():
            if first:
                yield chunk({"role": "assistant", "content": ""}, **({"warnings": warnings} if warnings else {}))
                first = False
            if finish_reason in ("error", "cancelled"):
                yield sse(ended_early(finish_reason).body())
                break
            if piece:
                yield chunk({"content": piece})
            if finish_reason is not None:
                yield chunk({}, finish_reason)
    finally:  # the client may be gone while this waits at a yield, not inside pieces()
        completion.request.cancel()
    if include_usage:
        yield sse({**meta, "object": "chat.completion.chunk", "choices": [], "usage": completion.usage()})
    yield "data: [DONE]\n\n"


async def whole_answer(completion, http_request):
    """The whole answer as (text, finish_reason), or None when the client disconnected
    first (its row is cancelled then)."""
    async def gather():
        parts, finish_reason = [], None
        async for piece, finish_reason in completion.pieces():
            parts.append(piece)
        return "".join(parts), finish_reason

    task = asyncio.ensure_future(gather())
    while not task.done():
        await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not task.done() and await http_request.is_disconnected():
            task.cancel()
            completion.request.cancel()
            return None
    return task.result()


# ----------------------------------------------------------------------------- the app

class Server:
    """What the endpoints share: the engine, the tokenizer and the settings."""

    def __init__(self, engine, tokenizer, defaults, model_name=MODEL_NAME, api_key=None,
                 max_waiting=MAX_WAITING, max_body_bytes=MAX_BODY_BYTES, cors_origins=(), read_timeout=READ_TIMEOUT_S):
        self.engine, self.tokenizer, self.defaults, self.model_name = engine, tokenizer, defaults, model_name
        self.model = engine.batch.model  # completions' logprobs score with it beside the engine
        self.api_key, self.max_waiting, self.max_body_bytes = api_key, max_waiting, max_body_bytes
        self.cors_origins, self.read_timeout = list(cors_origins), read_timeout
        self.context_length = engine.args.max_seq_len
        self.created = int(time.time())
        self.page = PAGE.read_text(encoding="utf-8")
        self.mailbox = None  # made on the event loop when the app starts


async def chat_completions(server, http_request):
    body = parse_chat_request(await read_body(http_request, server.max_body_bytes, server.read_timeout))
    prompt = prompt_ids(body, server.tokenizer, server.context_length)
    max_new, sampling, warnings = generation_settings(body, server.defaults, server.context_length, len(prompt))
    if server.engine.load()[1] >= server.max_waiting:
        raise ApiError(503, f"the server is busy ({server.max_waiting} requests waiting); try again shortly",
                       code="server_busy", kind="server_error")
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    # n answers: the seed of answer i is seed + i, so that they differ when sampled and repeat when asked again
    running = [Completion(server, prompt, max_new, replace(sampling, seed=None if sampling.seed is None else
                                                           (sampling.seed + i) % 2 ** 63), stops) for i in range(body.n)]
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(stream_events(running[0], meta, warnings, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        choices = await chat_choices(server, body, prompt, running, http_request)
    finally:
        for completion in running:  # a client gone, or an error: the other answers stop too
            completion.request.cancel()
    n_prompt, n_answer = len(prompt), sum(len(c.text.ids) for c in running)
    result = {**meta, "object": "chat.completion", "choices": choices,
              "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_answer, "total_tokens": n_prompt + n_answer}}
    return {**result, "warnings": warnings} if warnings else result


async def chat_choices(server, body, prompt, running, http_request):
    """The whole answers of the running completions, as the chat API's choices."""
    choices = []
    for i, completion in enumerate(running):
        answer = await whole_answer(completion, http_request)
        if answer is None:
            raise ApiError(499, "client closed the request")  # nobody reads this
        text, finish_reason = answer
        if finish_reason in ("error", "cancelled"):
            raise ended_early(finish_reason)
        logprobs = None
        if body.logprobs:
            scored = await asyncio.to_thread(token_logprobs, server.model, server.tokenizer,
                                             prompt + completion.text.ids, body.top_logprobs or 0)
            logprobs = chat_logprobs(scored, len(prompt))
        choices.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                        "logprobs": logprobs})
    return choices


async def text_choices(server, body, prompts, running, http_request):
    """Each prompt's choice: its completion (none when max_tokens is 0) and, asked for, its logprobs."""
    tokenizer = server.tokenizer
    choices = []
    for i, (ids, completion) in enumerate(zip(prompts, running)):
        text, finish_reason, new = "", "length", []
        if completion is not None:
            answer = await whole_answer(completion, http_request)
            if answer is None:
                raise ApiError(499, "client closed the request")
            text, finish_reason = answer
            if finish_reason in ("error", "cancelled"):
                raise ended_early(finish_reason)
            new = completion.text.ids
        logprobs = None
        if body.logprobs is not None:
            logprobs = await asyncio.to_thread(token_logprobs, server.model, tokenizer, ids + new, body.logprobs)
            if not body.echo:
                logprobs = {k: v[len(ids):] if v is not None else None for k, v in logprobs.items()}
        item = prompt_items(body)[i]
        prompt_text = item if isinstance(item, str) else tokenizer.decode(ids)
        choices.append({"index": i, "text": (prompt_text if body.echo else "") + text, "logprobs": logprobs,
                        "finish_reason": finish_reason})
    return choices


def chat_logprobs(scored, start):
    """completions.token_logprobs' object, from token `start` on, in the chat API's shape:
    {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}."""
    def entry(token, logprob):
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
    tops = scored["top_logprobs"] or [{}] * len(scored["tokens"])
    return {"content": [{**entry(token, logprob), "top_logprobs": [entry(t, v) for t, v in top.items()]}
                        for token, logprob, top in zip(scored["tokens"][start:], scored["token_logprobs"][start:],
                                                       tops[start:])]}


async def completions(server, http_request):
    """The legacy text completion (completions.py): each prompt continued as it stands, all of
    them decoded together; with logprobs, one forward pass scores the prompt and the answer."""
    body = parse_body(await read_body(http_request, server.max_body_bytes, server.read_timeout), CompletionRequest)
    check_completion_request(body)
    tokenizer = server.tokenizer
    prompts = prompt_token_lists(body, tokenizer, server.engine.args.vocab_size, server.context_length)
    sampling, stops = sampling_of(body, server.defaults), [body.stop] if isinstance(body.stop, str) else body.stop or []
    if server.engine.load()[1] + len(prompts) > server.max_waiting:
        raise ApiError(503, f"the server is busy ({server.max_waiting} requests waiting); try again shortly",
                       code="server_busy", kind="server_error")
    running = [Completion(server, ids, body.max_tokens, sampling, stops) if body.max_tokens else None for ids in prompts]
    try:
        choices = await text_choices(server, body, prompts, running, http_request)
    finally:
        for completion in filter(None, running):  # a client gone, or an error: the others stop too
            completion.request.cancel()
    n_generated = sum(len(c.text.ids) for c in running if c is not None)
    n_prompt = sum(map(len, prompts))
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": server.model_name, "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_generated, "total_tokens": n_prompt + n_generated}}


async def tokenize(server, http_request):
    """POST /tokenize: {"messages"} -> {"count", "max_model_len", "tokens"}, the prompt that
    /v1/chat/completions would build from them, however long (nothing is refused for length)."""
    body = parse_body(await read_body(http_request, server.max_body_bytes, server.read_timeout), TokenizeRequest)
    ids = messages_ids(body.messages, server.tokenizer)
    return {"count": len(ids), "max_model_len": server.context_length, "tokens": ids}


def health(server):
    active, waiting = server.engine.load()
    d = server.defaults
    defaults = {"max_tokens": d["max_new_tokens"], **{k: d[k] for k in ("temperature", "top_p", "top_k",
                                                                       "repetition_penalty", "no_repeat_ngram_size",
                                                                       "seed")}}
    return {"status": "ok", "model": server.model_name, "context_length": server.context_length,
            "max_batch": server.engine.max_batch, "active": active, "waiting": waiting,
            **server.engine.stats, "defaults": defaults}


def add_error_handlers(app):
    """Every error, whatever raised it, leaves as OpenAI's error object."""
    @app.exception_handler(ApiError)
    async def api_error(request, e):
        return e.response()

    @app.exception_handler(HTTPException)  # routing: 404 unknown path, 405 wrong method
    async def http_error(request, e):
        response = ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").response()
        response.headers.update(e.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return ApiError(400, str(e)).response()

    @app.exception_handler(Exception)
    async def server_error(request, e):
        return ApiError(500, f"internal error: {type(e).__name__}", kind="server_error").response()


def create_app(server):
    """The FastAPI app; the engine's thread runs while the app does."""
    @asynccontextmanager
    async def lifespan(app):
        server.mailbox = Mailbox(asyncio.get_running_loop())
        server.engine.start()
        yield
        server.engine.close()

    app = FastAPI(title="baby-llama2-chinese", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)
    if server.cors_origins:  # a front-end served from another origin may call the API (browsers ask first)
        app.add_middleware(CORSMiddleware, allow_origins=server.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])

    async def check_api_key(request: Request):  # async: a plain def would run in a worker thread
        expected = f"Bearer {server.api_key}".encode()
        if server.api_key and not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    @app.post("/v1/chat/completions", dependencies=[Depends(check_api_key)])
    async def post_chat_completions(request: Request):
        return await chat_completions(server, request)

    @app.post("/v1/completions", dependencies=[Depends(check_api_key)])
    async def post_completions(request: Request):
        return await completions(server, request)

    def model_card():
        return {"id": server.model_name, "object": "model", "created": server.created,
                "owned_by": "baby-llama2-chinese", "max_model_len": server.context_length}

    @app.get("/v1/models", dependencies=[Depends(check_api_key)])
    async def get_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(check_api_key)])
    async def get_model(model_id: str):
        if model_id != server.model_name:
            raise ApiError(404, f"model '{model_id}' does not exist; this server has '{server.model_name}'",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/tokenize", dependencies=[Depends(check_api_key)])
    async def post_tokenize(request: Request):
        return await tokenize(server, request)

    @app.get("/health")
    async def get_health():
        return health(server)

    @app.get("/")
    async def get_page():
        # the page needs nothing from anywhere else, and says so to the browser
        csp = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'"
        return HTMLResponse(server.page, headers={"Content-Security-Policy": csp})

    @app.get("/favicon.ico")
    async def get_icon():
        return Response(ICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    return app


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    add_generation_args(p, GENERATION)  # the sampling flags: defaults for requests that leave a field out
    p.add_argument("--host", default=HOST, help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=PORT, help="port to listen on (0: any free one, printed at start)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (None: ${API_KEY_ENV} when set)")
    p.add_argument("--model-name", default=MODEL_NAME, help="the model id that /v1/models and answers show")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="most requests decoded together")
    p.add_argument("--max-waiting", type=int, default=MAX_WAITING, help="requests queued beyond that before 503")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for the model (None: torch's choice)")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="largest request body (413 beyond)")
    p.add_argument("--cors-origins", nargs="*", default=[], metavar="ORIGIN",
                   help="web origins whose pages may call the API (e.g. http://localhost:3000; '*' for any; none: same origin only)")
    p.add_argument("--read-timeout", type=float, default=READ_TIMEOUT_S,
                   help="seconds a client has to send a request's headers, and then its body (> 0); slower ones are dropped")
    cfg = p.parse_args(argv)
    if cfg.max_batch < 1 or cfg.max_waiting < 0 or cfg.max_body_bytes < 1 or (cfg.threads or 1) < 1:
        p.error("--max-batch, --max-body-bytes and --threads must be >= 1, --max-waiting >= 0")
    if not cfg.read_timeout > 0:
        p.error("--read-timeout must be > 0 seconds")
    try:
        cfg.decoding_from = resolve_decoding(cfg, GENERATION)
        sampling_from(cfg)
    except Refusal as e:
        p.error(str(e))
    if cfg.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    cfg.api_key = cfg.api_key or os.environ.get(API_KEY_ENV)  # read here: --help never shows a key
    return cfg


def listen_socket(host, port):
    """Bind the address before the model loads, so a taken port fails at once."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    return sock


class ReadTimeoutProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, except that a connection whose request headers have not
    all arrived `read_timeout` seconds after it opened, or after its last answer, is closed
    (uvicorn alone waits for them forever, one open socket per slow client). The body has
    its own deadline, in read_body, which answers 408."""

    def __init__(self, *args, read_timeout, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_timeout, self.headers_due = read_timeout, None

    def connection_made(self, transport):
        super().connection_made(transport)
        self.wait_for_headers()

    def on_response_complete(self):
        super().on_response_complete()
        self.wait_for_headers()

    def connection_lost(self, exc):
        super().connection_lost(exc)
        if self.headers_due is not None:
            self.headers_due.cancel()

    def wait_for_headers(self):
        if self.headers_due is not None:
            self.headers_due.cancel()
        self.headers_due = self.loop.call_later(self.read_timeout, self.drop_if_still_waiting)

    def drop_if_still_waiting(self):
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # no request, or only part of its headers


class Uvicorn(uvicorn.Server):
    """uvicorn's server, except that Ctrl-C or SIGTERM also cancels the answers being
    generated, so open streams end at once instead of holding up the shutdown."""

    def __init__(self, config, engine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame):
        self.engine.cancel_all()
        super().handle_exit(sig, frame)


def start_subprocess(flags, timeout=120):
    """Run `serve.py FLAGS --port 0` as a child process and wait until it answers /health;
    returns (process, url). For tests and benchmarks: stop it with process.terminate().
    The child's stderr is passed on to ours."""
    process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *flags, "--port", "0"],
                               stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace")
    lines = queue.Queue()

    def forward():
        for line in process.stderr:
            sys.stderr.write(line)
            lines.put(line)

    threading.Thread(target=forward, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            found = re.search(r"listening on (http://\S+)", lines.get(timeout=0.5))
        except queue.Empty:
            continue
        while found and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(found.group(1) + "/health", timeout=5):
                    return process, found.group(1)
            except OSError:
                time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"serve.py {' '.join(flags)} did not start within {timeout} s (its stderr is above)")


def serve(cfg):
    try:
        sock = listen_socket(cfg.host, cfg.port)
    except OSError as e:
        raise Refusal(f"cannot listen on --host {cfg.host} --port {cfg.port}: {e}") from None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ckpt, model, tokenizer = load_for_inference(cfg.ckpt, cfg.tokenizer, cfg.device)
    if ckpt.get("kind") not in ANSWERING_KINDS:
        print(f"warning: {ckpt['path']} is a '{ckpt.get('kind')}' checkpoint; serve.py prompts it like an SFT model",
              file=sys.stderr)
    host, port = sock.getsockname()[:2]
    if not ipaddress.ip_address(host).is_loopback and not cfg.api_key:
        print(f"warning: listening on {host} without --api-key: anyone who reaches this port can use the model",
              file=sys.stderr)
    engine = BatchEngine(model, tokenizer.eos_id, tokenizer.pad_id, cfg.max_batch)
    server = Server(engine, tokenizer, vars(cfg), cfg.model_name, cfg.api_key, cfg.max_waiting, cfg.max_body_bytes,
                    cfg.cors_origins, cfg.read_timeout)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    if cfg.decoding_from:
        print(f"serve.py: decoding defaults from {cfg.decoding_from} (a flag overrides each)", file=sys.stderr)
    print(f"serve.py: {ckpt['path']} ({ckpt.get('kind')}, step {ckpt.get('step')}, context {server.context_length}) "
          f"listening on {url} (chat page {url}/, API {url}/v1)", file=sys.stderr, flush=True)
    config = uvicorn.Config(create_app(server), log_level="warning", access_log=False, timeout_graceful_shutdown=3,
                            http=functools.partial(ReadTimeoutProtocol, read_timeout=cfg.read_timeout))
    try:
        Uvicorn(config, engine).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises Ctrl-C again once it has shut down gracefully
        pass


def main(argv=None):
    cfg = parse_args(argv)
    with one_line_refusals("serve.py"):
        serve(cfg)


if __name__ == "__main__":
    main()
