"""The HTTP server's connection protocol: uvicorn's h11 one with a deadline for request headers. Torch-free."""

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("emocompress.serve")


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete within
    ``header_timeout_s`` of its opening or of the first byte of its next request. uvicorn has no such timeout: a
    slowloris sender (one header byte a second) held its connection for ever (reports/http_server). The body has
    its own deadline (``timeout_s``, 408), and an idle keep-alive connection uvicorn's ``timeout_keep_alive``."""

    def __init__(self, *args, header_timeout_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._deadline: asyncio.TimerHandle | None = None

    def _awaiting_headers(self) -> bool:
        return self.conn.their_state is h11.IDLE  # no complete request line and headers yet

    def _arm(self) -> None:
        if self._deadline is None and self._awaiting_headers():
            self._deadline = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self._awaiting_headers() and not self.transport.is_closing():
            log.info("%s:%d: closed, request headers not complete within header_timeout_s=%s",
                     *(self.client or ("-", 0)), self.header_timeout_s)
            self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()  # a connection that never sends a byte is closed too

    def data_received(self, data: bytes) -> None:
        self._arm()  # the first byte of a keep-alive connection's next request
        super().data_received(data)
        if not self._awaiting_headers():  # the headers are in: the request is uvicorn's now
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
