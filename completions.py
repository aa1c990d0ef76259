"""POST /v1/completions, OpenAI's legacy text completion: a text (or token ids) continued as
it stands, with no chat prompt around it, and with `logprobs` each token's log-probability
and its most likely alternatives; `echo` puts the prompt's own tokens in front. This is what
log-likelihood evaluations send: lm-evaluation-harness's `local-completions` model asks with
the context and a candidate continuation as the prompt, `max_tokens` 1, `echo` and
`logprobs` 1, and sums the continuation's log-probabilities.

The prompt is scored as it stands, as lm_eval's own Hugging Face model scores it, so the two
agree; its first token has no log-probability (None, as in OpenAI's answer), and an empty
prompt starts from eos, the token between pretraining documents. Tokens are named by their
SentencePiece pieces, which are unique, so a token and its alternatives compare as strings.
"""
from typing import Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field

from chat_request import ApiError
from sampling import Sampling


class CompletionRequest(BaseModel):
    """OpenAI's legacy completion request, strict as the chat one is."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    prompt: Union[str, list[str], list[int], list[list[int]]]
    model: Optional[str] = None  # a label, as in chat
    max_tokens: int = Field(16, ge=0)  # 0 with echo: only score the prompt
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=1)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=10)
    no_repeat_ngram_size: Optional[int] = Field(None, ge=0, le=64)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: Optional[int] = Field(None, ge=0, lt=2 ** 63)
    stop: Union[str, list[str], None] = None
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)  # how many alternatives per token (OpenAI allows 5)
    n: int = Field(1, ge=1, le=1)
    best_of: Optional[int] = Field(None, ge=1, le=1)
    stream: bool = False
    suffix: Optional[str] = None
    user: Optional[str] = None


def check_completion_request(body):
    if body.stream:
        raise ApiError(400, "stream is not supported on /v1/completions; /v1/chat/completions streams",
                       param="stream", code="unsupported_value")
    if body.suffix:
        raise ApiError(400, "suffix (text after the completion) is not supported", param="suffix",
                       code="unsupported_value")


def prompt_items(body):
    """The request's prompts as a list: each a text or a list of token ids."""
    prompts = body.prompt
    return [prompts] if isinstance(prompts, str) or not prompts or isinstance(prompts[0], int) else prompts


def prompt_token_lists(body, tokenizer, vocab_size, context):
    """The request's prompts as token id lists (text is encoded, ids are checked; an empty one
    is [eos]), each with room in the context for max_tokens after it."""
    lists = []
    for i, p in enumerate(prompt_items(body)):
        ids = (tokenizer.encode(p) if isinstance(p, str) else list(p)) or [tokenizer.eos_id]
        if any(not 0 <= t < vocab_size for t in ids):
            raise ApiError(400, f"prompt {i}: token ids must be in 0..{vocab_size - 1}", param="prompt")
        if len(ids) + body.max_tokens > context:
            raise ApiError(400, f"prompt {i} is {len(ids)} tokens; with max_tokens {body.max_tokens} after it, that is "
                                f"over this model's context of {context} tokens", param="prompt",
                           code="context_length_exceeded")
        lists.append(ids)
    return lists


def sampling_of(body, defaults):
    def pick(name):
        value = getattr(body, name)
        return defaults[name] if value is None else value
    return Sampling(temperature=pick("temperature"), top_k=pick("top_k"), top_p=pick("top_p"),
                    repetition_penalty=pick("repetition_penalty"), no_repeat_ngram_size=pick("no_repeat_ngram_size"),
                    seed=pick("seed"), presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)


@torch.no_grad()
def token_logprobs(model, tokenizer, ids, n_top):
    """OpenAI's logprobs object for ids: each token's piece, its log-probability given the
    tokens before it (None for the first), its n_top most likely alternatives ({piece:
    log-probability}) and where its text starts in the decoded text."""
    seq = torch.tensor([ids], device=next(model.parameters()).device)
    logp = torch.log_softmax(model.logits(seq)[0, :-1].float(), dim=-1)  # (len(ids) - 1, V): token j + 1 given those before
    chosen = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:], device=logp.device)].tolist()
    top = logp.topk(n_top, dim=-1) if n_top else None
    return {"tokens": [tokenizer.id_to_piece(t) for t in ids], "token_logprobs": [None, *chosen],
            "top_logprobs": [None, *({tokenizer.id_to_piece(int(t)): float(v) for t, v in zip(top.indices[j], top.values[j])}
                                     for j in range(len(ids) - 1))] if top is not None else None,
            "text_offset": [len(tokenizer.decode(ids[:j])) for j in range(len(ids))]}
