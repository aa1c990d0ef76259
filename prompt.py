"""The one definition of the prompt an SFT model is trained and asked with.

An SFT example is  prompt_ids + [bos] + answer_ids + [eos]:  the bos token separates the
prompt from the answer, and the model ends its answer with eos. A multi-turn conversation
becomes one prompt text: an optional system text on its own line, each earlier turn as
"问：{question}\\n答：{answer}\\n", then the current question:

    你是一名医生。\\n问：头痛怎么办？\\n答：多休息。\\n发热呢？  + <bos>

data_process.py writes SFT data with this rule, dataset_sft.py encodes it, eval.py, chat.py
and serve.py prompt with it, and export.py's chat template (and Ollama template) are generated
from it, so every consumer of the model asks in the format it learned.
"""
QUESTION_TAG, ANSWER_TAG, LINE_END = "问：", "答：", "\n"


def context_prompt(turns, question, system=""):
    """Prompt text for `question` after the earlier (question, answer) `turns`."""
    head = system + LINE_END if system else ""
    return head + "".join(f"{QUESTION_TAG}{q}{LINE_END}{ANSWER_TAG}{a}{LINE_END}" for q, a in turns) + question


def sft_prompt_ids(tokenizer, prompt_text):
    """The prompt's ids as SFT trained them: the text's ids, then bos; the answer follows."""
    return tokenizer.encode(prompt_text) + [tokenizer.bos_id]


# How answers are encoded, recorded in every checkpoint as "answer_encoding". Checkpoints
# without the entry were trained with each answer encoded on its own, so they begin answers
# with SentencePiece's bare dummy-prefix piece '▁', which SentencePiece drops on decoding and
# llama.cpp prints as a space.
ANSWER_ENCODING = "continuation"


def answer_ids(tokenizer, answer, encoding=ANSWER_ENCODING):
    """The answer's ids as SFT trains them: a continuation of the prompt, without the '▁'
    SentencePiece puts before a text's first word, so the first answer token is text.
    encoding: a checkpoint's "answer_encoding", to score a model as it learned (None: the old way)."""
    return tokenizer.encode(answer, dummy_prefix=encoding != ANSWER_ENCODING)


def answers_ids(tokenizer, answers):
    """answer_ids of many answers at once (on all cores)."""
    return tokenizer.encode_batch(answers, dummy_prefix=False)


def messages_prompt(messages):
    """OpenAI-style chat messages -> prompt text. System messages (the last one counts, as
    in data_process.py) go first; user and assistant turns must alternate and end with user."""
    system, turns, question = "", [], None
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: 'content' must be a string")
        if role == "system":
            system = content
        elif role == "user" and question is None:
            question = content
        elif role == "assistant" and question is not None:
            turns.append((question, content))
            question = None
        else:
            raise ValueError(f"message {i} ({role}): user and assistant turns must alternate, starting with user")
    if question is None:
        raise ValueError("the last message must be a user message")
    return context_prompt(turns, question, system)


def fit_prompt(tokenizer, turns, question, budget, system=""):
    """Prompt ids for `question` within `budget` tokens: the oldest turns are dropped first;
    when even the bare question is too long its start is cut (the bos stays last).
    Returns (ids, turns_dropped, question_cut)."""
    for first in range(len(turns) + 1):
        ids = sft_prompt_ids(tokenizer, context_prompt(turns[first:], question, system))
        if len(ids) <= budget:
            return ids, first, False
    return ids[-budget:], len(turns), True


def chat_template():
    """A Jinja chat template (Hugging Face `apply_chat_template`, vLLM, llama.cpp's
    --chat-template) that renders messages exactly as messages_prompt does, then bos."""
    q, a, end = QUESTION_TAG, ANSWER_TAG, LINE_END.encode("unicode_escape").decode()
    return (
        "{%- set ns = namespace(system='') -%}"
        "{%- for message in messages if message['role'] == 'system' -%}"
        "{%- set ns.system = message['content'] + '" + end + "' if message['content'] else '' -%}"
        "{%- endfor -%}"
        "{{ ns.system }}"
        "{%- for message in messages if message['role'] != 'system' -%}"
        "{%- if message['role'] == 'user' and loop.last -%}{{ message['content'] }}"
        "{%- elif message['role'] == 'user' -%}{{ '" + q + "' + message['content'] + '" + end + "' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ '" + a + "' + message['content'] + '" + end + "' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ bos_token }}{%- endif -%}"
    )


def ollama_template(bos_token):
    """The same prompt as a Go template for an Ollama Modelfile: Ollama passes the system text
    as .System (several system messages joined by a blank line, where messages_prompt keeps
    the last) and the turns as .Messages; the last user turn is the question."""
    q, a, end = QUESTION_TAG, ANSWER_TAG, LINE_END
    return (
        "{{ if .System }}{{ .System }}" + end + "{{ end }}"
        "{{ range $i, $m := .Messages }}"
        '{{ if eq $m.Role "user" }}'
        "{{ if eq (len (slice $.Messages $i)) 1 }}{{ $m.Content }}" + bos_token +
        "{{ else }}" + q + "{{ $m.Content }}" + end + "{{ end }}"
        '{{ else if eq $m.Role "assistant" }}' + a + "{{ $m.Content }}" + end +
        "{{ end }}{{ end }}"
    )
