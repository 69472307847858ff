"""ChatML, the conversation format of every Qwen chat model, with an assistant-only loss mask.

A conversation is rendered as one string per message::

    <|im_start|>{role}\\n{content}<|im_end|>\\n

In the token ids, ``<|im_start|>`` and ``<|im_end|>`` are single control tokens, while the
role and content are ordinary text. Here the content is encoded with special-token parsing
**off** by default: a user who types ``<|im_end|>`` gets the 6 plain tokens of that string, so
they cannot close their turn and forge an assistant or system message (prompt injection).

The rendering follows the Qwen2-Instruct template: if the first message is not a system
message, ``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n`` is prepended, and the
generation prompt is ``<|im_start|>assistant\\n``. The Qwen2.5-Instruct template renders the same
conversation the same way except for the default system text, :data:`QWEN25_SYSTEM_PROMPT`
(``system_prompt=system_prompt_for("qwen2.5")``); its ``tools`` block is not reproduced here. Qwen3
drops the default system prompt and adds ``<think>`` blocks: :mod:`qwen_edu.tokenizer.qwen3_chat`.

Control tokens: Qwen1.5, Qwen2 and Qwen2.5 share 151,643 regular tokens and the three control
tokens right after them (:data:`CONTROL_TOKEN_IDS`): ``<|endoftext|>`` ends a document (and pads),
``<|im_start|>`` opens a turn, ``<|im_end|>`` closes one (an instruct model's end of reply).

Loss mask convention (for supervised fine-tuning): 1 on the tokens of each assistant message's
content and on the ``<|im_end|>`` that closes it, 0 everywhere else -- system and user turns, every
``<|im_start|>role\\n`` header, and the ``"\\n"`` after each ``<|im_end|>``. The model must learn to
emit ``<|im_end|>`` (generation stops there), but never sees its own ``"\\n"`` as a target,
because decoding stops before it. A token that straddles the header and the content (possible
only when the content starts with whitespace: ``"\\n"`` + ``"\\n..."`` can become one token) counts
as content.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = [
    "ENDOFTEXT",
    "IM_START",
    "IM_END",
    "CONTROL_TOKEN_IDS",
    "DEFAULT_SYSTEM_PROMPT",
    "QWEN25_SYSTEM_PROMPT",
    "SYSTEM_PROMPTS",
    "system_prompt_for",
    "CHAT_ROLES",
    "ChatEncoding",
    "validate_messages",
    "render_chatml",
    "encode_chatml",
]

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# The ids in the real Qwen vocabulary: right after the 151,643 regular tokens (ids 0..151642).
CONTROL_TOKEN_IDS = {ENDOFTEXT: 151643, IM_START: 151644, IM_END: 151645}
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
QWEN25_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# The system text each instruct template adds when a conversation does not start with one.
SYSTEM_PROMPTS = {"qwen1.5": DEFAULT_SYSTEM_PROMPT, "qwen2": DEFAULT_SYSTEM_PROMPT, "qwen2.5": QWEN25_SYSTEM_PROMPT}
CHAT_ROLES = ("system", "user", "assistant")

AllowedSpecial = Literal["all"] | Collection[str]


class _ChatTokenizer(Protocol):
    special_tokens: Mapping[str, int]

    def encode(
        self,
        text: str,
        *,
        allowed_special: AllowedSpecial = ...,
        disallowed_special: Literal["all"] | Collection[str] = ...,
    ) -> list[int]: ...

    def id_to_token_bytes(self, token_id: int) -> bytes: ...


@dataclass(frozen=True)
class ChatEncoding:
    """A tokenised conversation: ``ids``, a same-length 0/1 ``loss_mask``, and the rendered ``text``."""

    ids: list[int]
    loss_mask: list[int]
    text: str

    def __len__(self) -> int:
        return len(self.ids)


def system_prompt_for(generation: str) -> str:
    """The default system prompt of a generation's instruct template (``"qwen2"``, ``"qwen2.5"``, ...)."""
    try:
        return SYSTEM_PROMPTS[generation]
    except KeyError:
        raise ValueError(f"no chat template known for {generation!r}; known: {sorted(SYSTEM_PROMPTS)}") from None


def validate_messages(messages: Iterable[Mapping[str, str]]) -> list[tuple[str, str]]:
    """Check a conversation and return it as ``(role, content)`` pairs.

    Each message must be a mapping with a ``role`` among ``system``/``user``/``assistant`` and a
    ``str`` ``content``; anything else raises a ``ValueError``/``TypeError`` naming the message.
    """
    if isinstance(messages, (str, bytes, Mapping)):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise TypeError(f"message {index} must be a dict with 'role' and 'content' keys, got {message!r}")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise ValueError(f"message {index} has unknown role {role!r}; expected one of {CHAT_ROLES}")
        if not isinstance(content, str):
            raise TypeError(f"message {index} ({role}) content must be a str, got {type(content).__name__}")
        checked.append((role, content))
    return checked


def _with_default_system(messages: list[tuple[str, str]], system_prompt: str | None) -> list[tuple[str, str]]:
    if messages and messages[0][0] != "system" and system_prompt is not None:
        return [("system", system_prompt), *messages]
    return messages


def render_chatml(
    messages: Iterable[Mapping[str, str]],
    *,
    add_generation_prompt: bool = False,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> str:
    """The conversation as one ChatML string, exactly as the Qwen2-Instruct template renders it.

    ``system_prompt`` is used when the first message is not a system message (``None``: add
    none). ``add_generation_prompt`` appends ``<|im_start|>assistant\\n`` for the model to answer.
    """
    turns = _with_default_system(validate_messages(messages), system_prompt)
    return _render_turns(turns, add_generation_prompt)


def _render_turns(turns: list[tuple[str, str]], add_generation_prompt: bool) -> str:
    text = "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in turns)
    if add_generation_prompt:
        text += f"{IM_START}assistant\n"
    return text


def encode_chatml(
    tokenizer: _ChatTokenizer,
    messages: Iterable[Mapping[str, str]],
    *,
    add_generation_prompt: bool = False,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    allowed_special: AllowedSpecial = (),
) -> ChatEncoding:
    """Token ids and assistant-only loss mask of a conversation (see the module docstring).

    ``allowed_special`` lists the special tokens that may be parsed *inside message contents*
    (default: none, so contents are always plain text; pass e.g. ``{"<tool_call>"}`` or
    ``"all"`` to opt in). ``<|im_start|>``/``<|im_end|>`` around messages are always control tokens.

    With the default, and contents that contain no special-token text, ``ids`` equal
    ``tokenizer.encode(encoding.text)``: text between two control tokens is encoded in one go,
    just as when the whole rendered string is encoded.
    """
    turns = _with_default_system(validate_messages(messages), system_prompt)
    try:
        im_start = tokenizer.special_tokens[IM_START]
        im_end = tokenizer.special_tokens[IM_END]
    except KeyError as error:
        raise ValueError(f"this tokenizer has no {error.args[0]} token: it cannot do ChatML") from None

    ids: list[int] = []
    mask: list[int] = []

    def add_text(text: str, *, mask_from_byte: int | None, allowed: AllowedSpecial = ()) -> None:
        """Encode ``text``; tokens ending after byte ``mask_from_byte`` get mask 1 (None: all 0)."""
        position = 0
        for token in tokenizer.encode(text, allowed_special=allowed, disallowed_special=()):
            position += len(tokenizer.id_to_token_bytes(token))
            ids.append(token)
            mask.append(int(mask_from_byte is not None and position > mask_from_byte))

    for role, content in turns:
        is_assistant = role == "assistant"
        header = f"{role}\n"
        ids.append(im_start)
        mask.append(0)
        add_text(
            header + content,
            mask_from_byte=len(header.encode("utf-8")) if is_assistant else None,
            allowed=allowed_special,
        )
        ids.append(im_end)
        mask.append(int(is_assistant))
        add_text("\n", mask_from_byte=None)
    if add_generation_prompt:
        ids.append(im_start)
        mask.append(0)
        add_text("assistant\n", mask_from_byte=None)

    return ChatEncoding(ids=ids, loss_mask=mask, text=_render_turns(turns, add_generation_prompt))
