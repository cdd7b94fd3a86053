"""Prompts for ``adapterkit generate`` on chat adapters: the same chat template as training.

An adapter trained on chat data (``run.json``'s ``columns`` has ``messages``) renders each ``--prompt`` with the
chat template it was trained with (``--chat-template`` at training time, stored in ``run.json``, else the base
tokenizer's), the generation prompt appended, exactly as ``data.ChatRenderer`` rendered the training prompts. A
prompt may be plain text (one user message) or a JSON list of ``{"role", "content"}`` messages (a system prompt,
earlier turns). A JSON messages prompt is rendered with the chat template for any adapter.
"""

from __future__ import annotations

import json
from typing import Any

from .data import ChatRenderer, DataError, normalize_messages, read_chat_template

__all__ = ["parse_messages", "chat_prompt"]


def parse_messages(prompt: str) -> list[dict[str, str]] | None:
    """The messages of a prompt written as a JSON list of ``{"role", "content"}`` objects, else None (text)."""
    text = prompt.strip()
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        return None
    return normalize_messages(value, "--prompt")


def chat_prompt(tokenizer: Any, prompt: str, run: dict[str, Any], *, raw: bool = False,
                chat_template: str | None = None) -> str | None:  # fmt: skip
    """The text to generate from for ``prompt``, or None when the prompt is not a chat (neither a chat adapter nor a
    JSON messages list, or ``raw``): the caller then uses its prompt template. The text already holds the
    template's special tokens: tokenize it with ``add_special_tokens=False``.

    ``chat_template``: a Jinja file or built-in name overriding the one the adapter was trained with.

    Raises:
        DataError: a chat prompt and no chat template (the message says how to give one).
    """
    if raw:
        return None
    messages = parse_messages(prompt)
    trained_on_chat = "messages" in (run.get("columns") or {})
    if messages is None and not trained_on_chat:
        return None
    if messages is None:
        messages = [{"role": "user", "content": prompt}]
    template = read_chat_template(chat_template) or run.get("chat_template")
    try:
        renderer = ChatRenderer(tokenizer, template)
    except DataError as e:
        raise DataError(
            f"{e} (a JSON messages --prompt needs one; or pass --raw to send the text as it is)"
        ) from None
    return renderer.generation_text(messages)
