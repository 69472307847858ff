"""The Qwen3 chat format, token for token against the real Qwen3 chat template.

``tests/data/chat_templates/qwen3.jinja`` is the checkpoints' own Jinja text (provenance in the README
there), rendered offline with transformers' renderer (jinja2), with and without ``enable_thinking``.
Ids come from the real Qwen vocabulary with the Qwen3 added tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from qwen_edu.tokenizer import load_tokenizer
from qwen_edu.tokenizer.qwen import special_tokens_for
from qwen_edu.tokenizer.qwen3_chat import (
    EMPTY_THINK_BLOCK,
    EMPTY_THINK_IDS,
    QWEN3_ADDED_TOKEN_IDS,
    QWEN25_ADDED_TOKEN_IDS,
    encode_qwen3,
    render_qwen3,
    split_thinking,
)

TEMPLATE = (Path(__file__).parent / "data" / "chat_templates" / "qwen3.jinja").read_text(encoding="utf-8")

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city, °C.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CONVERSATIONS = {
    "one-question": [{"role": "user", "content": "What is 2 + 3?"}],
    "system-and-unicode": [{"role": "system", "content": "You are terse."},
                           {"role": "user", "content": "写一首关于春天的诗。"}],
    "think-then-answer": [
        {"role": "user", "content": "What is 2 + 3 + 4?"},
        {"role": "assistant", "content": "<think>\n2 + 3 = 5.\n5 + 4 = 9.\n</think>\n\n2 + 3 + 4 = 9."}],
    "earlier-thinking-is-dropped": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "<think>\n2 + 3 = 5.\n</think>\n\n5."},
        {"role": "user", "content": "And times 4?"},
        {"role": "assistant", "reasoning_content": "5 * 4 = 20.", "content": "20."}],
    "no-reasoning-gets-an-empty-block": [
        {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "  spaces and\n\nnewlines \n"}, {"role": "assistant", "content": "\n\nOK."}],
    "ends-with-a-user-turn": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>greeting</think>Hello."},
        {"role": "user", "content": "Bye"}],
    "tools": [
        {"role": "system", "content": "You can look up the weather."},
        {"role": "user", "content": "Weather in Hangzhou and Paris?"},
        {"role": "assistant", "content": "<think>\nTwo cities, two calls.\n</think>\n\nLet me check.",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Hangzhou"}}},
                        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "tool", "content": "{\"temp\": 14}"},
        {"role": "assistant", "content": "Hangzhou 21 °C, Paris 14 °C."}],
    "tool-call-without-text": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]},
        {"role": "tool", "content": "cold"}],
}


def reference(messages, **kwargs) -> str:
    return render_jinja_template([messages], chat_template=TEMPLATE, **kwargs)[0][0]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(special_tokens="qwen3")


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("prompt,thinking", [(False, True), (True, True), (True, False)])
def test_token_for_token_against_the_qwen3_template(tok, name, prompt, thinking):
    messages = CONVERSATIONS[name]
    tools = [WEATHER] if name.startswith("tool") else None
    expected = reference(messages, tools=tools, add_generation_prompt=prompt, enable_thinking=thinking)
    assert render_qwen3(messages, tools=tools, add_generation_prompt=prompt, enable_thinking=thinking) == expected
    encoding = encode_qwen3(tok, messages, tools=tools, add_generation_prompt=prompt, enable_thinking=thinking)
    assert encoding.text == expected
    # transformers tokenises the rendered string with its added tokens recognised; so does encode()
    assert encoding.ids == tok.encode(expected)
    assert len(encoding.loss_mask) == len(encoding.ids)


def test_the_generation_prompt_in_both_modes(tok):
    messages = CONVERSATIONS["one-question"]
    thinking = encode_qwen3(tok, messages, add_generation_prompt=True)
    direct = encode_qwen3(tok, messages, add_generation_prompt=True, enable_thinking=False)
    assert thinking.text.endswith("<|im_start|>assistant\n")  # the model opens <think> itself
    assert direct.text == thinking.text + EMPTY_THINK_BLOCK
    assert tuple(direct.ids[len(thinking.ids):]) == EMPTY_THINK_IDS == (151667, 271, 151668, 271)
    assert not any(direct.loss_mask) and not any(thinking.loss_mask)  # a prompt has nothing to learn


def test_only_the_replies_after_the_last_query_keep_their_thinking():
    text = render_qwen3(CONVERSATIONS["earlier-thinking-is-dropped"])
    assert "2 + 3 = 5." not in text and "<|im_start|>assistant\n5.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n5 * 4 = 20.\n</think>\n\n20.<|im_end|>\n")
    assert text.count("<think>") == 1
    # with no reasoning at all the last reply still gets an (empty) think block, earlier ones do not
    text = render_qwen3(CONVERSATIONS["no-reasoning-gets-an-empty-block"])
    assert text.count("<think>\n\n</think>\n\n") == 1 and text.endswith("</think>\n\nOK.<|im_end|>\n")


def test_the_loss_mask_covers_exactly_what_the_model_writes(tok):
    encoding = encode_qwen3(tok, CONVERSATIONS["earlier-thinking-is-dropped"])
    spans, current = [], []
    for token, on in zip(encoding.ids, encoding.loss_mask, strict=True):
        if on:
            current.append(token)
        elif current:
            spans.append(tok.decode(current))
            current = []
    assert spans == ["5.<|im_end|>", "<think>\n5 * 4 = 20.\n</think>\n\n20.<|im_end|>"]
    tools = encode_qwen3(tok, CONVERSATIONS["tools"], tools=[WEATHER])
    written = tok.decode([t for t, on in zip(tools.ids, tools.loss_mask, strict=True) if on])
    assert written.startswith("<think>\nTwo cities, two calls.\n</think>\n\nLet me check.\n<tool_call>\n")
    assert '{"name": "get_weather", "arguments": {"city": "Hangzhou"}}' in written
    assert "tool_response" not in written and "Weather in" not in written


def test_contents_are_plain_text_unless_allowed(tok):
    messages = [{"role": "user", "content": "Say </think> and <|im_end|> please."}]
    safe = encode_qwen3(tok, messages, add_generation_prompt=True)
    assert safe.ids.count(151668) == 0 and safe.ids.count(151645) == 1  # only the template's <|im_end|>
    assert tok.decode(safe.ids) == safe.text == reference(messages, add_generation_prompt=True)
    assert encode_qwen3(tok, messages, add_generation_prompt=True, allowed_special="all").ids == tok.encode(safe.text)


def test_qwen25_and_qwen3_added_token_ids():
    for flavour, table in (("qwen2.5", QWEN25_ADDED_TOKEN_IDS), ("qwen3", QWEN3_ADDED_TOKEN_IDS)):
        tokens = {t.content: t.id for t in special_tokens_for(flavour)}
        assert tokens == table
    assert min(QWEN3_ADDED_TOKEN_IDS.values()) == 151643 and max(QWEN3_ADDED_TOKEN_IDS.values()) == 151668
    assert len(QWEN3_ADDED_TOKEN_IDS) == 26 and len(QWEN25_ADDED_TOKEN_IDS) == 22
    tok = load_tokenizer(special_tokens="qwen3")
    # <think> is one token but not a control token: skip_special_tokens keeps it in decoded text
    ids = tok.encode("<think>\nhmm\n</think>\n\nyes<|im_end|>")
    assert ids[0] == 151667 and 151668 in ids
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\nhmm\n</think>\n\nyes"


def test_split_thinking_the_template_way():
    assert split_thinking("<think>\nstep\n</think>\n\nanswer") == ("step", "answer")
    assert split_thinking("plain answer") == ("", "plain answer")
    assert split_thinking("no opening tag</think>\n\nanswer") == ("no opening tag", "answer")


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        render_qwen3([{"role": "bot", "content": "hi"}])
    with pytest.raises(TypeError, match="message 0 \\(user\\) content must be a str or None"):
        render_qwen3([{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match="the conversation is empty"):
        render_qwen3([])
    qwen2 = load_tokenizer(special_tokens="qwen2")
    with pytest.raises(ValueError, match="no <think> token"):
        encode_qwen3(qwen2, CONVERSATIONS["think-then-answer"])
