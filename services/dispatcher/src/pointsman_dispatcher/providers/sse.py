"""An incremental Server-Sent Events parser (the WHATWG event-stream format).

OpenAI, Anthropic and Gemini all stream over SSE, with different line endings (``\\n`` vs
``\\r\\n``) and with frames split arbitrarily across network reads; this parser takes text in
any pieces and returns complete events only.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from pointsman_dispatcher.providers.base import ProviderError
from pointsman_dispatcher.providers.transport import INVALID_BODY


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str  # "message" when the frame has no ``event:`` field
    data: str
    id: str | None = None


class SseParser:
    """Feed decoded text, get the events completed by it."""

    def __init__(self) -> None:
        self._buffer = ""
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, text: str) -> list[SseEvent]:
        buffer = self._buffer + text
        events: list[SseEvent] = []
        start = 0
        end = len(buffer)
        while start < end:
            newline = buffer.find("\n", start)
            carriage = buffer.find("\r", start, newline if newline != -1 else end)
            if carriage != -1:
                if carriage == end - 1:
                    break  # maybe the first half of "\r\n": wait for the next piece
                line = buffer[start:carriage]
                start = carriage + (2 if buffer[carriage + 1] == "\n" else 1)
            elif newline != -1:
                line = buffer[start:newline]
                start = newline + 1
            else:
                break
            event = self._line(line)
            if event is not None:
                events.append(event)
        self._buffer = buffer[start:]
        return events

    def close(self) -> list[SseEvent]:
        """Flush at end of stream. A frame without its blank line is incomplete: dropped."""
        rest = self._buffer
        self._buffer = ""
        if rest.endswith("\r"):
            return self.feed(rest[:-1] + "\n")
        return []

    def _line(self, line: str) -> SseEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = SseEvent(self._event or "message", "\n".join(self._data), self._id)
            self._event = ""
            self._data = []
            return event
        if line[0] == ":":
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


class SseStreamDecoder:
    """Base of the SSE-based provider decoders: bytes → UTF-8 → events → text deltas.

    Subclasses implement :meth:`on_event`; a frame of the wrong shape becomes
    ``invalid_response`` here, so the transport never misreads a caller's exception as one.
    """

    provider = "sse"

    def __init__(self) -> None:
        self._parser = SseParser()
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._finished = False

    @property
    def finished(self) -> bool:
        return self._finished

    def feed(self, chunk: bytes) -> list[str]:
        return self._deltas(self._parser.feed(self._utf8.decode(chunk)))

    def close(self) -> list[str]:
        tail = self._parser.feed(self._utf8.decode(b"", final=True))
        return self._deltas(tail + self._parser.close())

    def on_event(self, event: SseEvent) -> str | None:
        """Handle one event; return the text it adds, if any."""
        raise NotImplementedError

    def _deltas(self, events: list[SseEvent]) -> list[str]:
        deltas: list[str] = []
        for event in events:
            try:
                delta = self.on_event(event)
            except ProviderError:
                raise
            except INVALID_BODY as exc:
                raise ProviderError(
                    "invalid_response",
                    f"{self.provider}: unparseable stream frame ({type(exc).__name__})",
                    200,
                ) from None
            if delta:
                deltas.append(delta)
        return deltas
