"""Conversation shaping shared by the adapters (pure).

Anthropic, Bedrock and Gemini take the system prompt outside the turns, and OpenAI wants it as
the first message; all of them want one system text, so every system part is gathered here.
"""

from __future__ import annotations

from pointsman_dispatcher.providers.base import ChatMessage, ChatRequest


def split_system(request: ChatRequest) -> tuple[str | None, list[ChatMessage]]:
    """The request's system text (its ``system`` field, then any system-role messages, in
    order) and the remaining user/assistant turns."""
    parts = [request.system] if request.system else []
    turns: list[ChatMessage] = []
    for message in request.messages:
        if message.role == "system":
            parts.append(message.content)
        else:
            turns.append(message)
    return ("\n\n".join(parts) if parts else None), turns
