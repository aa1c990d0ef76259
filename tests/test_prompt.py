import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from prompt import chat_template, context_prompt, fit_prompt, messages_prompt, sft_prompt_ids

CONVERSATION = [{"role": "system", "content": "你是一名医生。"},
                {"role": "user", "content": "头痛怎么办？"}, {"role": "assistant", "content": "多休息。"},
                {"role": "user", "content": "发热呢？"}]


def test_messages_become_the_sft_prompt_text():
    assert messages_prompt(CONVERSATION) == "你是一名医生。\n问：头痛怎么办？\n答：多休息。\n发热呢？"
    assert messages_prompt(CONVERSATION[1:2]) == "头痛怎么办？"
    assert context_prompt([("a", "b")], "c") == "问：a\n答：b\nc"


@pytest.mark.parametrize("messages", [[], CONVERSATION[:3], [CONVERSATION[2], CONVERSATION[1]],
                                      [{"role": "user", "content": 3}]])
def test_malformed_conversations_are_refused(messages):
    with pytest.raises(ValueError):
        messages_prompt(messages)


@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:], CONVERSATION[1:2],
                                      [CONVERSATION[0], {"role": "system", "content": ""}, *CONVERSATION[1:]]])
def test_chat_template_renders_exactly_the_prompt_then_bos(messages):
    # rendered as transformers renders chat templates
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(chat_template()).render(messages=messages, add_generation_prompt=True, bos_token="<s>")
    assert text == messages_prompt(messages) + "<s>"


def test_fit_prompt_drops_the_oldest_turns_first_then_cuts_the_question(tiny_tokenizer):
    turns = [("头痛发热怎么办", "多休息多喝水"), ("咳嗽呢", "看医生")]
    full, dropped, cut = fit_prompt(tiny_tokenizer, turns, "还有呢", 1000)
    assert (full, dropped, cut) == (sft_prompt_ids(tiny_tokenizer, context_prompt(turns, "还有呢")), 0, False)
    last_turn = sft_prompt_ids(tiny_tokenizer, context_prompt(turns[1:], "还有呢"))
    assert fit_prompt(tiny_tokenizer, turns, "还有呢", len(last_turn)) == (last_turn, 1, False)
    ids, dropped, cut = fit_prompt(tiny_tokenizer, turns, "还有呢" * 20, 5)
    assert (len(ids), ids[-1], dropped, cut) == (5, tiny_tokenizer.bos_id, 2, True)
