"""The Qwen3 chat format: ChatML plus a ``<think>`` block, with thinking and non-thinking modes.

Qwen3 is one model with two modes (reference ``qwen_later_generations.md`` §6.2). Its chat template
renders exactly like :func:`qwen_edu.tokenizer.chat.render_chatml` (no default system prompt) except
for the assistant turns:

* an assistant reply is ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``; the reasoning comes from the
  message's ``reasoning_content`` or is split off its content at ``</think>``;
* only the replies *after the last user query* keep their think block (and the final reply always
  gets one, empty if there is no reasoning). Earlier replies are rendered with the answer alone:
  the thinking of past turns is dropped from the context, so a multi-turn training example must be
  rendered the same way or the model trains on contexts it never sees at inference;
* the generation prompt is ``<|im_start|>assistant\\n``; with ``enable_thinking=False`` the template
  appends an **empty think block** ``<think>\\n\\n</think>\\n\\n`` (ids 151667, 271, 151668, 271), so
  the model starts answering at once. With thinking on, the model opens ``<think>`` itself.

Tools (``tools=[json schema, ...]``, assistant ``tool_calls``, ``tool`` messages) are rendered as the
template does: a ``# Tools`` system block, ``<tool_call>`` JSON lines, and tool results merged into one
user turn of ``<tool_response>`` blocks.

Token ids: :data:`QWEN25_ADDED_TOKEN_IDS` / :data:`QWEN3_ADDED_TOKEN_IDS` are the published ids of the
Qwen2.5 and Qwen3 tokenizers' added tokens (151643-151664 and 151643-151668). :func:`encode_qwen3`
tokenises a conversation with the template's control tokens as single ids and message contents as plain
text (special-token text in a content stays text unless ``allowed_special`` says otherwise), and
returns an assistant-only loss mask: 1 on everything the model generates (think block, answer, tool
calls, the closing ``<|im_end|>``), 0 on prompts, headers and the ``\\n`` after ``<|im_end|>``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qwen_edu.tokenizer.chat import CONTROL_TOKEN_IDS, IM_END, IM_START, ChatEncoding

__all__ = [
    "THINK_START",
    "THINK_END",
    "EMPTY_THINK_BLOCK",
    "EMPTY_THINK_IDS",
    "QWEN25_ADDED_TOKEN_IDS",
    "QWEN3_ADDED_TOKEN_IDS",
    "QWEN3_ROLES",
    "Segment",
    "qwen3_segments",
    "render_qwen3",
    "encode_qwen3",
    "split_thinking",
]

THINK_START, THINK_END = "<think>", "</think>"
EMPTY_THINK_BLOCK = f"{THINK_START}\n\n{THINK_END}\n\n"

#: The added tokens of the Qwen2.5 tokenizers, with their ids (right after the 151,643 regular tokens).
QWEN25_ADDED_TOKEN_IDS: dict[str, int] = {
    **CONTROL_TOKEN_IDS,  # <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645
    "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649,
    "<|quad_start|>": 151650, "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657,
    "</tool_call>": 151658, "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662, "<|repo_name|>": 151663, "<|file_sep|>": 151664,
}
#: Qwen3 adds tool responses and the think block.
QWEN3_ADDED_TOKEN_IDS: dict[str, int] = {
    **QWEN25_ADDED_TOKEN_IDS, "<tool_response>": 151665, "</tool_response>": 151666, THINK_START: 151667,
    THINK_END: 151668,
}
#: ``<think>\n\n</think>\n\n`` in the Qwen vocabulary ("\n\n" is one regular token, 271).
EMPTY_THINK_IDS = (QWEN3_ADDED_TOKEN_IDS[THINK_START], 271, QWEN3_ADDED_TOKEN_IDS[THINK_END], 271)
QWEN3_ROLES = ("system", "user", "assistant", "tool")

# The special tokens the template itself writes; in its text they are always single tokens.
_TEMPLATE_TOKENS = (IM_START, IM_END, THINK_START, THINK_END, "<tool_call>", "</tool_call>", "<tool_response>",
                    "</tool_response>")
_TEMPLATE_TOKEN_RE = re.compile("(" + "|".join(re.escape(t) for t in _TEMPLATE_TOKENS) + ")")
_TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                 "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                 "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                 "\"arguments\": <args-json-object>}\n</tool_call>")


@dataclass(frozen=True)
class Segment:
    """A piece of the rendered conversation: ``control`` (one special token the template writes), or
    text; ``content`` marks text that comes from a message; ``trainable`` what the model generates."""

    text: str
    control: bool = False
    content: bool = False
    trainable: bool = False


class _Builder:
    def __init__(self) -> None:
        self.segments: list[Segment] = []

    def template(self, text: str, trainable: bool = False) -> None:
        """Template text: its special tokens become control segments."""
        for i, part in enumerate(_TEMPLATE_TOKEN_RE.split(text)):
            if part:
                self.segments.append(Segment(part, control=i % 2 == 1, trainable=trainable))

    def content(self, text: str, trainable: bool = False) -> None:
        if text:
            self.segments.append(Segment(text, content=True, trainable=trainable))


def _tojson(value: Any) -> str:
    """transformers' ``tojson`` filter: ``json.dumps`` with ``ensure_ascii=False`` and default separators."""
    return json.dumps(value, ensure_ascii=False)


def _check(messages: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    if isinstance(messages, (str, bytes, Mapping)):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    checked = list(messages)
    if not checked:
        raise ValueError("the conversation is empty")
    for index, message in enumerate(checked):
        if not isinstance(message, Mapping) or "role" not in message:
            raise TypeError(f"message {index} must be a dict with a 'role' key, got {message!r}")
        if message["role"] not in QWEN3_ROLES:
            raise ValueError(f"message {index} has unknown role {message['role']!r}; expected one of {QWEN3_ROLES}")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise TypeError(f"message {index} ({message['role']}) content must be a str or None, "
                            f"got {type(content).__name__}")
        if message.get("tool_calls") and message["role"] != "assistant":
            raise ValueError(f"message {index}: only assistant messages carry tool_calls")
    return checked


def _is_query(message: Mapping[str, Any]) -> bool:
    """A real user query: a user message that is not just a wrapped tool response."""
    content = message.get("content")
    return (message["role"] == "user" and isinstance(content, str)
            and not (content.startswith("<tool_response>") and content.endswith("</tool_response>")))


def split_thinking(text: str) -> tuple[str, str]:
    """``(reasoning, answer)`` of an assistant text, the template's way: everything before the first
    ``</think>`` (after any ``<think>``, trimmed of newlines) is reasoning; the answer is what follows
    the last ``</think>``. Without ``</think>``: ``("", text)``."""
    if THINK_END not in text:
        return "", text
    reasoning = text.split(THINK_END)[0].rstrip("\n").split(THINK_START)[-1].lstrip("\n")
    return reasoning, text.split(THINK_END)[-1].lstrip("\n")


def _tool_calls(out: _Builder, calls: Sequence[Mapping[str, Any]], content: str) -> None:
    for j, call in enumerate(calls):
        if j or content:
            out.template("\n", trainable=True)
        call = call.get("function") or call
        arguments = call.get("arguments")
        out.template('<tool_call>\n{"name": "', trainable=True)
        out.content(str(call["name"]), trainable=True)
        out.template('", "arguments": ', trainable=True)
        out.content(arguments if isinstance(arguments, str) else _tojson(arguments), trainable=True)
        out.template("}\n</tool_call>", trainable=True)


def qwen3_segments(messages: Iterable[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
                   add_generation_prompt: bool = False, enable_thinking: bool = True) -> list[Segment]:
    """The conversation as :class:`Segment` s, in the order the Qwen3 template writes them."""
    messages = _check(messages)
    out = _Builder()
    first_system = messages[0]["role"] == "system"
    if tools:
        out.template(f"{IM_START}system\n")
        if first_system:
            out.content(messages[0].get("content") or "")
            out.template("\n\n")
        out.template(_TOOLS_HEADER + "".join("\n" + _tojson(dict(tool)) for tool in tools) + _TOOLS_FOOTER
                     + f"{IM_END}\n")
    elif first_system:
        out.template(f"{IM_START}system\n")
        out.content(messages[0].get("content") or "")
        out.template(f"{IM_END}\n")
    last_query = next((i for i in range(len(messages) - 1, -1, -1) if _is_query(messages[i])), len(messages) - 1)
    for i, message in enumerate(messages):
        role = message["role"]
        content = message.get("content") if isinstance(message.get("content"), str) else ""
        last = i == len(messages) - 1
        if role == "user" or (role == "system" and i > 0):
            out.template(f"{IM_START}{role}\n")
            out.content(content)
            out.template(f"{IM_END}\n")
        elif role == "assistant":
            reasoning = message.get("reasoning_content")
            if not isinstance(reasoning, str):
                reasoning, content = split_thinking(content) if THINK_END in content else ("", content)
            out.template(f"{IM_START}assistant\n")
            if i > last_query and (last or reasoning):
                out.template(f"{THINK_START}\n", trainable=True)
                out.content(reasoning.strip("\n"), trainable=True)
                out.template(f"\n{THINK_END}\n\n", trainable=True)
                content = content.lstrip("\n")
            out.content(content, trainable=True)
            _tool_calls(out, message.get("tool_calls") or (), content)
            out.template(IM_END, trainable=True)
            out.template("\n")
        elif role == "tool":
            if i == 0 or messages[i - 1]["role"] != "tool":
                out.template(f"{IM_START}user")
            out.template("\n<tool_response>\n")
            out.content(content)
            out.template("\n</tool_response>")
            if last or messages[i + 1]["role"] != "tool":
                out.template(f"{IM_END}\n")
    if add_generation_prompt:
        out.template(f"{IM_START}assistant\n" + ("" if enable_thinking else EMPTY_THINK_BLOCK))
    return out.segments


def render_qwen3(messages: Iterable[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
                 add_generation_prompt: bool = False, enable_thinking: bool = True) -> str:
    """The conversation as one string, exactly as the Qwen3 chat template renders it (see the module
    docstring; ``enable_thinking`` only matters for the generation prompt)."""
    return "".join(s.text for s in qwen3_segments(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                                  enable_thinking=enable_thinking))


def encode_qwen3(tokenizer: Any, messages: Iterable[Mapping[str, Any]], *,
                 tools: Sequence[Mapping[str, Any]] | None = None, add_generation_prompt: bool = False,
                 enable_thinking: bool = True, allowed_special: Any = ()) -> ChatEncoding:
    """Token ids, assistant-only loss mask and rendered text of a Qwen3 conversation.

    The template's own special tokens are single ids (the tokenizer must have them: a Qwen3 tokenizer,
    or any tokenizer given ``<think>`` and ``</think>``); the text between two of them is encoded in one
    go, so that with contents free of special-token text ``ids == tokenizer.encode(text)``, as
    transformers tokenises the rendered template. A token that straddles prompt and generated text
    counts as generated.
    """
    segments = qwen3_segments(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                              enable_thinking=enable_thinking)
    specials = tokenizer.special_tokens
    ids: list[int] = []
    mask: list[int] = []
    run: list[Segment] = []

    def flush() -> None:
        if not run:
            return
        text = "".join(s.text for s in run)
        trainable: list[tuple[int, int]] = []
        start = 0
        for s in run:
            end = start + len(s.text.encode("utf-8"))
            if s.trainable:
                trainable.append((start, end))
            start = end
        position = 0
        for token in tokenizer.encode(text, allowed_special=allowed_special, disallowed_special=()):
            end = position + len(tokenizer.id_to_token_bytes(token))
            ids.append(token)
            mask.append(int(any(a < end and position < b for a, b in trainable)))
            position = end
        run.clear()

    for segment in segments:
        if not segment.control:
            run.append(segment)
            continue
        flush()
        if segment.text not in specials:
            raise ValueError(f"this tokenizer has no {segment.text} token: it cannot encode the Qwen3 chat format")
        ids.append(specials[segment.text])
        mask.append(int(segment.trainable))
    flush()
    return ChatEncoding(ids=ids, loss_mask=mask, text="".join(s.text for s in segments))
