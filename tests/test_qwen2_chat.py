"""Qwen2 / Qwen2.5 chat format, token for token against the real tokenizer_config.json templates.

The templates in tests/data/chat_templates are the checkpoints' own Jinja text (provenance in the
README there), rendered offline with transformers' renderer. Ids come from the real Qwen vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from qwen_edu.tokenizer import QWEN_NUM_REGULAR_TOKENS, load_tokenizer, render_chatml
from qwen_edu.tokenizer.chat import (
    CONTROL_TOKEN_IDS,
    DEFAULT_SYSTEM_PROMPT,
    QWEN25_SYSTEM_PROMPT,
    system_prompt_for,
)

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
GENERATIONS = {"qwen2": "qwen2_instruct.jinja", "qwen2.5": "qwen2_5_instruct.jinja"}

CONVERSATIONS = [
    [{"role": "user", "content": "Hello, how are you?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2 + 2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And in Chinese?"}],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."},
     {"role": "user", "content": "写一首关于春天的诗。"}, {"role": "assistant", "content": "春风拂面，\n花开满园。"}],
    [{"role": "user", "content": "  leading and trailing spaces \n"}, {"role": "assistant", "content": "\n\nok"}],
    # a system message that is not the first one is an ordinary turn in both templates
    [{"role": "user", "content": "hi"}, {"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}],
]


def reference(generation: str, messages, add_generation_prompt: bool) -> str:
    template = (TEMPLATES / GENERATIONS[generation]).read_text(encoding="utf-8")
    return render_jinja_template([messages], chat_template=template, add_generation_prompt=add_generation_prompt)[0][0]


@pytest.fixture(scope="module")
def tokenizers():
    return {"qwen2": load_tokenizer(special_tokens="qwen2"), "qwen2.5": load_tokenizer(special_tokens="qwen2.5")}


@pytest.mark.parametrize("generation", sorted(GENERATIONS))
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_token_for_token_against_the_checkpoint_template(tokenizers, generation, messages, add_generation_prompt):
    expected_text = reference(generation, messages, add_generation_prompt)
    system = system_prompt_for(generation)
    assert render_chatml(messages, add_generation_prompt=add_generation_prompt, system_prompt=system) == expected_text
    tok = tokenizers[generation]
    encoding = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, system_prompt=system)
    # transformers tokenizes the rendered string with its special tokens recognised; so does encode()
    assert encoding.ids == tok.encode(expected_text)
    assert encoding.text == expected_text


def test_default_system_prompts_differ_between_qwen2_and_qwen25(tokenizers):
    messages = [{"role": "user", "content": "Hi"}]
    assert reference("qwen2", messages, True).startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
    assert reference("qwen2.5", messages, True).startswith(f"<|im_start|>system\n{QWEN25_SYSTEM_PROMPT}<|im_end|>\n")
    assert QWEN25_SYSTEM_PROMPT == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    with pytest.raises(ValueError, match="no chat template known for 'qwen9'"):
        system_prompt_for("qwen9")


def test_control_tokens_follow_the_regular_vocabulary(tokenizers):
    assert QWEN_NUM_REGULAR_TOKENS == 151_643
    for tok in tokenizers.values():
        for text, token_id in CONTROL_TOKEN_IDS.items():
            assert tok.special_tokens[text] == token_id
            assert tok.encode(text) == [token_id]
        assert min(tok.special_tokens.values()) == QWEN_NUM_REGULAR_TOKENS
    encoding = tokenizers["qwen2"].apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    # <|im_start|> system \n ... : every turn opens with 151644 and closes with 151645 then "\n" (198)
    assert encoding.ids[:3] == [151644, 8948, 198]
    assert encoding.ids.count(151644) == 3 and encoding.ids.count(151645) == 2
    assert encoding.ids[-3:] == [151644, 77091, 198]  # the generation prompt "<|im_start|>assistant\n"


def test_shipped_qwen2_template_is_the_one_chapter_1_checks():
    from tests.test_tokenizer_chat import QWEN2_TEMPLATE

    assert (TEMPLATES / "qwen2_instruct.jinja").read_text(encoding="utf-8") == QWEN2_TEMPLATE
