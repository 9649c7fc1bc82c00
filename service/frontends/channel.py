"""One framed Unix-socket connection between the primary and a secondary front end, on the asyncio loop.

Requests and answers that come up in the same turn of the event loop (a batch's answers, a burst of requests) are
gathered and sent as one frame per model version at the end of the turn (:meth:`Channel.later`): framing and
writing cost per frame, not per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from typing import Any, cast

from service.frontends.messages import FrontendMessage
from service.workers.codec import FrameReader, encode
from service.workers.messages import Message

log = logging.getLogger("capsa.serve.frontends")


class Channel(asyncio.BufferedProtocol):
    """Frames in (to ``on_message``), frames out (:meth:`send`); a malformed frame closes the connection."""

    def __init__(self, on_message: Callable[[Channel, Any], None],
                 on_lost: Callable[[Channel], None]) -> None:
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.on_message = on_message
        self.on_lost = on_lost
        self.index = 0  # the secondary's index (set by its Hello on the primary's side)
        self._gathered: dict[Hashable, list[Any]] = {}
        self._flush: Callable[[Channel, Hashable, list[Any]], None] | None = None

    @property
    def open(self) -> bool:
        """Connected and not closing."""
        return self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            messages = self.reader.feed(nbytes)
        except Exception as exc:  # a malformed frame: the stream cannot be trusted any more
            log.error("malformed frame between front ends; closing the connection",
                      extra={"frontend": self.index, "error": f"{type(exc).__name__}: {exc}"})
            if self.transport is not None:
                self.transport.abort()
            return
        for message in messages:
            self.on_message(self, message)

    def send(self, message: FrontendMessage) -> bool:
        """Queue ``message`` (whole frames: the transport buffers); False when the connection is gone."""
        if not self.open:
            return False
        assert self.transport is not None
        self.transport.writelines(encode(cast(Message, message)))  # the codec carries registered types too
        return True

    def later(self, key: Hashable, item: Any, flush: Callable[[Channel, Hashable, list[Any]], None]) -> None:
        """Gather ``item`` under ``key``; at the end of this turn of the loop, ``flush(channel, key, items)`` is
        called once per key (in order of first use) to send them together."""
        if not self._gathered:
            self._flush = flush
            asyncio.get_running_loop().call_soon(self._send_gathered)
        items = self._gathered.get(key)
        if items is None:
            self._gathered[key] = [item]
        else:
            items.append(item)

    def _send_gathered(self) -> None:
        gathered, self._gathered = self._gathered, {}
        flush = self._flush
        assert flush is not None
        for key, items in gathered.items():
            flush(self, key, items)

    def close(self) -> None:
        """Close after what is queued is written."""
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost(self)
