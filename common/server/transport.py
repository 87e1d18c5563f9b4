"""uvicorn's h11 protocol with a deadline for each request to arrive whole, headers and body: uvicorn 0.54 has only a
keep-alive timeout, between requests, so a client that stalls mid-headers (or mid-body) would hold its connection
forever. The deadline is not moved by more data, so dribbling a byte at a time does not extend it.

It reaches into H11Protocol's internals (`conn`, `transport`, `loop`, `client`, `logger`): uvicorn has no public hook
for a request deadline. tests/test_upstream.py checks their shape."""
from __future__ import annotations

import asyncio
from typing import Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from common.server import READ_TIMEOUT


class ReadTimeoutH11Protocol(H11Protocol):
    seconds: float = READ_TIMEOUT  # per server: read_timeout_protocol
    deadline: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def connection_lost(self, exc) -> None:
        self._stop_watching()
        super().connection_lost(exc)

    def _receiving(self) -> bool:
        """A request is (or may start) arriving: between requests, or in the middle of one's body."""
        return self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing()

    def _watch(self) -> None:
        if not self._receiving():
            self._stop_watching()
        elif self.deadline is None:  # the deadline of the request under way: not moved by more bytes
            self.deadline = self.loop.call_later(self.seconds, self._expired)

    def _stop_watching(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expired(self) -> None:
        self.deadline = None
        if self._receiving():
            where = "%s:%d - " % self.client if self.client else ""
            self.logger.info(f"{where}closed: the request did not arrive within {self.seconds:g} s")
            self.transport.close()


def read_timeout_protocol(seconds: float) -> type[ReadTimeoutH11Protocol]:
    """The protocol class for uvicorn.run(http=...): uvicorn builds one per connection, so the deadline is a class
    attribute of a subclass made for this server."""
    return type("ReadTimeoutH11Protocol", (ReadTimeoutH11Protocol,), {"seconds": seconds})
