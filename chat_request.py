"""The request serve.py answers, POST /v1/chat/completions, as OpenAI defines it: the body's
schema (pydantic models, strict: "5" is not 5, numbers finite, an unknown field an error),
reading and parsing a body, what it asks the engine for (the prompt, the token limit, the
sampling), and OpenAI's error object that every refused request gets.
"""
import asyncio
import json
from typing import Annotated, Literal, Optional, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prompt import messages_prompt, sft_prompt_ids
from sampling import Sampling


class ApiError(Exception):
    """An error answered as OpenAI's error object with an HTTP status."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self):
        return JSONResponse(self.body(), status_code=self.status)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    # extra fields ("name", or "refusal" echoed back from an earlier answer) are ignored;
    # "developer" is OpenAI's newer name for the system role
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self):
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # json_schema's schema and the like
    type: str


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    """POST /v1/chat/completions: the OpenAI fields this server honours, plus top_k and
    repetition_penalty (named as vLLM names them) and no_repeat_ngram_size (transformers' name). Types are strict ("5" is not 5), numbers
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
    no_repeat_ngram_size: Optional[int] = Field(None, ge=0, le=64)  # as transformers' generate names it
    seed: Optional[int] = Field(None, ge=0, lt=2 ** 63)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, Annotated[list[str], Field(max_length=4)], None] = None  # up to 4 strings, each any length
    n: int = Field(1, ge=1, le=8)  # answers per request (more than one: not streamed)
    user: Optional[str] = None
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)  # OpenAI's, over the answer's tokens
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    # Sent by OpenAI front-ends on every request. Accepted where their value asks for nothing
    # this server lacks (check_unsupported refuses the rest); metadata and store are labels.
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None
    parallel_tool_calls: Optional[bool] = None


def check_unsupported(body):
    """400 for a field whose value asks for what this server cannot do, naming what can."""
    if body.stream and (body.logprobs or body.n > 1):
        param = "logprobs" if body.logprobs else "n"
        raise ApiError(400, f"{param} is not supported with stream; ask without stream", param=param,
                       code="unsupported_value")
    if body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    if body.response_format is not None and body.response_format.type != "text":
        raise ApiError(400, f"response_format {body.response_format.type!r} is not supported: answers are plain text",
                       param="response_format", code="unsupported_value")


async def read_body(request, limit, timeout):
    """The raw body, refused with 413 past `limit` bytes (declared or actually sent), and with
    408 when it has not all arrived within `timeout` seconds."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit} bytes", code="body_too_large")
    body = bytearray()

    async def collect():
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise ApiError(413, f"request body is over the limit of {limit} bytes", code="body_too_large")

    try:
        await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s (serve.py --read-timeout)",
                       code="request_timeout") from None
    return bytes(body)


def parse_chat_request(raw):
    body = parse_body(raw, ChatRequest)
    check_unsupported(body)
    return body


def parse_body(raw, schema):
    """A raw body -> the schema's pydantic object; every way it can be wrong is a 400."""
    try:
        data = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and bad UTF-8 both
        raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        message = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in errors[:3])
        raise ApiError(400, message, param=str(errors[0]["loc"][0]) if errors[0]["loc"] else None,
                       code="invalid_value") from None


class TokenizeRequest(BaseModel):
    """POST /tokenize, in vLLM's shape: the chat prompt these messages make, counted."""
    model_config = ConfigDict(extra="forbid", strict=True)
    messages: list[Message] = Field(min_length=1)
    model: Optional[str] = None


def prompt_ids(body, tokenizer, context):
    """Messages -> the SFT prompt's ids; a prompt the context cannot hold is refused."""
    ids = messages_ids(body.messages, tokenizer)
    if len(ids) >= context:
        raise ApiError(400, f"the prompt is {len(ids)} tokens, but this model's context is {context} tokens and must "
                            f"hold the prompt and at least 1 new token: shorten the messages or drop earlier turns",
                       param="messages", code="context_length_exceeded")
    return ids


def messages_ids(messages, tokenizer):
    """Messages -> the SFT prompt's ids, whatever their length."""
    for i, m in enumerate(messages):
        try:
            m.text().encode("utf-8")
        except UnicodeEncodeError:  # JSON's "\ud800" escape: a surrogate with no partner is no character
            raise ApiError(400, f"message {i}: its content holds a lone surrogate (an unpaired \\uD800-\\uDFFF "
                                f"escape), which is not text", param="messages", code="invalid_messages") from None
    try:
        text = messages_prompt([{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                                for m in messages])
    except ValueError as e:
        raise ApiError(400, str(e), param="messages", code="invalid_messages") from None
    return sft_prompt_ids(tokenizer, text)


def generation_settings(body, defaults, context, prompt_len):
    """-> (max_new_tokens, Sampling, warnings); defaults (the server's flags) fill the fields
    the body leaves out. A token limit beyond what the context leaves after the prompt is
    clamped, and a warning says so."""
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens differ; give one", param="max_tokens")
    asked = body.max_completion_tokens or body.max_tokens
    room = context - prompt_len
    warnings = []
    if asked is not None and asked > room:
        warnings.append(f"max_tokens {asked} clamped to {room}: the prompt's {prompt_len} tokens and the answer "
                        f"must fit the model's context of {context} tokens")
    max_new = min(asked or defaults["max_new_tokens"], room)

    def pick(name):
        value = getattr(body, name)
        return defaults[name] if value is None else value

    sampling = Sampling(temperature=pick("temperature"), top_k=pick("top_k"), top_p=pick("top_p"),
                        repetition_penalty=pick("repetition_penalty"), seed=pick("seed"),
                        no_repeat_ngram_size=pick("no_repeat_ngram_size"),
                        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0)
    return max_new, sampling, warnings
