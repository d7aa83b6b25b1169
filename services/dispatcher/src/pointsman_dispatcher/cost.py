"""Token estimates and cost arithmetic, shared by routing (expected cost) and accounting (usage).

Routing must price a query before any provider has counted its tokens, so input tokens are
estimated from the text with the usual ~4 characters per token rule plus a small per-message
overhead (role markers, separators). The estimate only ranks and bounds candidates; the cost that
is reported after a call is always computed from the provider's own usage figures.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4  # role marker and separators around each message
REPLY_PRIMING_TOKENS = 3  # the assistant turn the model is asked to start
TOKENS_PER_MTOK = 1_000_000


@dataclass(frozen=True, slots=True)
class Price:
    """List price of one model, in US dollars per one million tokens."""

    input_per_mtok: float
    output_per_mtok: float


def estimate_text_tokens(text: str) -> int:
    """Tokens in one text, rounded up (0 for an empty text)."""
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def estimate_prompt_tokens(contents: Iterable[str], system_prompt: str | None = None) -> int:
    """Input tokens of a chat request made of these message contents (and a system prompt)."""
    total = REPLY_PRIMING_TOKENS
    for content in contents:
        total += estimate_text_tokens(content) + MESSAGE_OVERHEAD_TOKENS
    if system_prompt:
        total += estimate_text_tokens(system_prompt) + MESSAGE_OVERHEAD_TOKENS
    return total


def cost_usd(price: Price, input_tokens: int, output_tokens: int) -> float:
    """What a call with this usage costs at this price."""
    return (
        input_tokens * price.input_per_mtok + output_tokens * price.output_per_mtok
    ) / TOKENS_PER_MTOK
