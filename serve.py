"""Serve a checkpoint over HTTP: an OpenAI-compatible chat API, and a chat page for a browser.

    python serve.py --ckpt out/sft                      # http://127.0.0.1:8000
    python serve.py --ckpt out/sft --host 0.0.0.0 --port 8000 --api-key KEY

Endpoints:
  POST /v1/chat/completions  OpenAI's chat completion: messages in, the answer out, whole or
                             streamed as server-sent events (chat.completion.chunk, then [DONE])
  GET  /v1/models            the one model served
  GET  /health               liveness, load and the server's sampling defaults
  GET  /                     chat.html, a chat page (no build step, nothing fetched from elsewhere)

Messages become the prompt through prompt.py, the format SFT trained on, so temperature 0
gives exactly eval.py's greedy answer. Every request goes to one BatchEngine (engine.py):
requests that arrive together, or while others are decoding, share the model's decode steps,
and a client that disconnects stops its row. Bad requests get OpenAI's error object
({"error": {"message", "type", "param", "code"}}) with a 4xx status; the server goes on.
The request's "model" is only a label: no request names a file to read or write.
"""
import argparse
import asyncio
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
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from engine import BatchEngine, Sampling
from generate import TextStream, add_generation_args, check_sampling, load_for_inference
from prompt import messages_prompt, sft_prompt_ids

# -----------------------------------------------------------------------------
# defaults (flags override); the sampling ones apply to requests that leave a field out.
# repetition_penalty stays 1 so that temperature 0 alone gives eval.py's greedy answer.
GENERATION = dict(ckpt="out/sft", max_new_tokens=256, temperature=0.7, top_k=None, top_p=0.9,
                  repetition_penalty=1.0, seed=None)
HOST, PORT = "127.0.0.1", 8000
MODEL_NAME = "baby-llama2-chinese"
MAX_BATCH = 16  # rows decoded together (each holds a KV cache slot of the full context)
MAX_WAITING = 256  # requests queued beyond the batch before new ones get 503
MAX_BODY_BYTES = 1 << 20
API_KEY_ENV = "BABYLLAMA_API_KEY"
PAGE = Path(__file__).with_name("chat.html")
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
# -----------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered as OpenAI's error object with an HTTP status."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self):
        return JSONResponse(self.body(), status_code=self.status)


# ----------------------------------------------------------------------------- the request body

class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    # extra fields ("name", or "refusal" echoed back from an earlier answer) are ignored
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self):
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    """POST /v1/chat/completions: the OpenAI fields this server honours, plus top_k and
    repetition_penalty (named as vLLM names them). Types are strict ("5" is not 5), numbers
    finite, and an unknown field is an error rather than silently ignored."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    messages: list[Message] = Field(min_length=1)
    model: Optional[str] = None  # a label: there is one model, and it never names a file
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=1)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=10)
    seed: Optional[int] = Field(None, ge=0, lt=2 ** 63)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, Annotated[list[str], Field(max_length=4)], None] = None  # up to 4 strings, each any length
    n: int = Field(1, ge=1, le=1)  # one answer per request
    user: Optional[str] = None


async def read_body(request, limit):
    """The raw body, refused with 413 past `limit` bytes (declared or actually sent)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes", code="body_too_large")
    return bytes(body)


def parse_chat_request(raw):
    try:
        data = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and bad UTF-8 both
        raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        message = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in errors[:3])
        raise ApiError(400, message, param=str(errors[0]["loc"][0]) if errors[0]["loc"] else None,
                       code="invalid_value") from None


# ----------------------------------------------------------------------------- request -> engine

def prompt_ids(server, body):
    """Messages -> the SFT prompt's ids; a prompt the context cannot hold is refused."""
    try:
        text = messages_prompt([{"role": m.role, "content": m.text()} for m in body.messages])
    except ValueError as e:
        raise ApiError(400, str(e), param="messages", code="invalid_messages") from None
    ids = sft_prompt_ids(server.tok, text)
    context = server.context_length
    if len(ids) >= context:
        raise ApiError(400, f"the prompt is {len(ids)} tokens, but this model's context is {context} tokens and must "
                            f"hold the prompt and at least 1 new token: shorten the messages or drop earlier turns",
                       param="messages", code="context_length_exceeded")
    return ids


def generation_settings(server, body, prompt_len):
    """-> (max_new_tokens, Sampling, warnings). A token limit beyond what the context leaves
    after the prompt is clamped, and a warning says so."""
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens differ; give one", param="max_tokens")
    asked = body.max_completion_tokens or body.max_tokens
    room = server.context_length - prompt_len
    warnings = []
    if asked is not None and asked > room:
        warnings.append(f"max_tokens {asked} clamped to {room}: the prompt's {prompt_len} tokens and the answer "
                        f"must fit the model's context of {server.context_length} tokens")
    max_new = min(asked or server.defaults["max_new_tokens"], room)
    d = server.defaults

    def pick(name):
        value = getattr(body, name)
        return d[name] if value is None else value

    sampling = Sampling(temperature=pick("temperature"), top_k=pick("top_k"), top_p=pick("top_p"),
                        repetition_penalty=pick("repetition_penalty"), seed=pick("seed"))
    return max_new, sampling, warnings


class Mailbox:
    """Carries events from the engine's thread to asyncio queues on the event loop. Waking
    the loop is a system call; the first event of a decode step wakes it, and the rest of
    that step's events (one per row) ride along instead of each waking it again."""

    def __init__(self, loop):
        self.loop, self.lock, self.pending, self.scheduled = loop, threading.Lock(), [], False

    def post(self, queue, event):  # on the engine's thread
        with self.lock:
            self.pending.append((queue, event))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._hand_over)

    def _hand_over(self):  # on the event loop
        with self.lock:
            pending, self.pending, self.scheduled = self.pending, [], False
        for queue, event in pending:
            queue.put_nowait(event)


class Completion:
    """One request on its way from the engine's thread to the event loop: the engine's
    deliver() posts (token, finish_reason) to an asyncio queue, pieces() turns them into text."""

    def __init__(self, server, prompt, max_new_tokens, sampling, stops):
        self.mailbox, self.events = server.mailbox, asyncio.Queue()
        self.prompt_tokens, self.text = len(prompt), TextStream(server.tok, stops)
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
        return sse({**meta, "object": "chat.completion.chunk", "choices": [choice], **extra})

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

    def __init__(self, engine, tok, defaults, model_name=MODEL_NAME, api_key=None,
                 max_waiting=MAX_WAITING, max_body_bytes=MAX_BODY_BYTES):
        self.engine, self.tok, self.defaults, self.model_name = engine, tok, defaults, model_name
        self.api_key, self.max_waiting, self.max_body_bytes = api_key, max_waiting, max_body_bytes
        self.context_length = engine.args.max_seq_len
        self.created = int(time.time())
        self.page = PAGE.read_text(encoding="utf-8")
        self.mailbox = None  # made on the event loop when the app starts


async def chat_completions(server, http_request):
    body = parse_chat_request(await read_body(http_request, server.max_body_bytes))
    prompt = prompt_ids(server, body)
    max_new, sampling, warnings = generation_settings(server, body, len(prompt))
    if server.engine.load()[1] >= server.max_waiting:
        raise ApiError(503, f"the server is busy ({server.max_waiting} requests waiting); try again shortly",
                       code="server_busy", kind="server_error")
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    completion = Completion(server, prompt, max_new, sampling, stops)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(stream_events(completion, meta, warnings, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    answer = await whole_answer(completion, http_request)
    if answer is None:
        raise ApiError(499, "client closed the request")  # nobody reads this
    text, finish_reason = answer
    if finish_reason in ("error", "cancelled"):
        raise ended_early(finish_reason)
    result = {**meta, "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
         "logprobs": None}], "usage": completion.usage()}
    return {**result, "warnings": warnings} if warnings else result


def health(server):
    active, waiting = server.engine.load()
    d = server.defaults
    defaults = {"max_tokens": d["max_new_tokens"], **{k: d[k] for k in ("temperature", "top_p", "top_k",
                                                                       "repetition_penalty", "seed")}}
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

    async def check_api_key(request: Request):  # async: a plain def would run in a worker thread
        expected = f"Bearer {server.api_key}".encode()
        if server.api_key and not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    @app.post("/v1/chat/completions", dependencies=[Depends(check_api_key)])
    async def post_chat_completions(request: Request):
        return await chat_completions(server, request)

    @app.get("/v1/models", dependencies=[Depends(check_api_key)])
    async def get_models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "baby-llama2-chinese", "max_model_len": server.context_length}]}

    @app.get("/health")
    async def get_health():
        return health(server)

    @app.get("/")
    async def get_page():
        # the page needs nothing from anywhere else, and says so to the browser
        csp = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'"
        return HTMLResponse(server.page, headers={"Content-Security-Policy": csp})

    return app


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Serve a checkpoint: an OpenAI-compatible chat API and a chat page. "
                                "--max-new-tokens and the sampling flags are the defaults for requests that leave "
                                "the field out (no --seed: a fresh random seed per request).")
    add_generation_args(p, GENERATION)  # the sampling flags: defaults for requests that leave a field out
    p.add_argument("--host", default=HOST, help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=PORT, help="port to listen on (0: any free one, printed at start)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV} when set)")
    p.add_argument("--model-name", default=MODEL_NAME, help="the model id that /v1/models and answers show")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="most requests decoded together")
    p.add_argument("--max-waiting", type=int, default=MAX_WAITING, help="requests queued beyond that before 503")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for the model (default: torch's choice)")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="largest request body (413 beyond)")
    args = p.parse_args(argv)
    if args.max_batch < 1 or args.max_waiting < 0 or args.max_body_bytes < 1 or (args.threads or 1) < 1:
        p.error("--max-batch, --max-body-bytes and --threads must be >= 1, --max-waiting >= 0")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    try:
        check_sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    except ValueError as e:
        p.error(str(e))
    return args


def listen_socket(host, port):
    """Bind the address before the model loads, so a taken port fails at once."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    return sock


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


def main(argv=None):
    args = parse_args(argv)
    try:
        sock = listen_socket(args.host, args.port)
    except OSError as e:
        sys.exit(f"serve.py: error: cannot listen on --host {args.host} --port {args.port}: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ckpt, model, tok = load_for_inference(args.ckpt, args.tokenizer, args.device)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"serve.py: error: {e}")
    if ckpt.get("kind") != "sft":
        print(f"warning: {ckpt['path']} is a '{ckpt.get('kind')}' checkpoint; serve.py prompts it like an SFT model",
              file=sys.stderr)
    host, port = sock.getsockname()[:2]
    if not ipaddress.ip_address(host).is_loopback and not args.api_key:
        print(f"warning: listening on {host} without --api-key: anyone who reaches this port can use the model",
              file=sys.stderr)
    engine = BatchEngine(model, tok.eos_id, tok.pad_id, args.max_batch)
    server = Server(engine, tok, vars(args), args.model_name, args.api_key, args.max_waiting, args.max_body_bytes)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    print(f"serve.py: {ckpt['path']} ({ckpt.get('kind')}, step {ckpt.get('step')}, context {server.context_length}) "
          f"listening on {url} (chat page {url}/, API {url}/v1)", file=sys.stderr, flush=True)
    config = uvicorn.Config(create_app(server), log_level="warning", access_log=False, timeout_graceful_shutdown=3)
    try:
        Uvicorn(config, engine).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises Ctrl-C again once it has shut down gracefully
        pass


if __name__ == "__main__":
    main()
