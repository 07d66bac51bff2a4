"""The HTTP server's connection protocols: uvicorn's httptools one (the fast C parser) or its h11 one (pure Python,
the fallback without httptools), each with a deadline for request headers. Torch-free."""

import asyncio
import functools
import importlib.util
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("emocompress.serve")


class _HeaderDeadline:
    """Close a connection whose request headers are not complete within ``header_timeout_s`` of its opening or of
    the first byte of its next request. uvicorn has no such timeout: a slowloris sender (one header byte a second)
    held its connection for ever (reports/http_server). The body has its own deadline (``timeout_s``, 408), and an
    idle keep-alive connection uvicorn's ``timeout_keep_alive``. A subclass says when headers are awaited."""

    header_timeout_s: float
    _deadline: asyncio.TimerHandle | None = None

    def _awaiting_headers(self) -> bool:
        raise NotImplementedError

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
        super().data_received(data)
        if self._awaiting_headers():  # from the first byte of a request whose headers are incomplete
            self._arm()
        else:  # the headers are in: the request is uvicorn's now
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class H11HeaderDeadline(_HeaderDeadline, H11Protocol):
    """uvicorn's h11 protocol with the header deadline."""

    def __init__(self, *args, header_timeout_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s

    def _awaiting_headers(self) -> bool:
        return self.conn.their_state is h11.IDLE  # no complete request line and headers yet


def _httptools_protocol():
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HttpToolsHeaderDeadline(_HeaderDeadline, HttpToolsProtocol):
        """uvicorn's httptools protocol with the header deadline: headers are awaited from the connection's
        opening and from each request's first byte (the parser's ``on_message_begin``) until the parser's
        ``on_headers_complete``."""

        def __init__(self, *args, header_timeout_s: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.header_timeout_s = header_timeout_s
            self._headers_pending = True

        def _awaiting_headers(self) -> bool:
            return self._headers_pending

        def on_message_begin(self) -> None:
            self._headers_pending = True
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._headers_pending = False
            super().on_headers_complete()

    return HttpToolsHeaderDeadline


def header_deadline_protocol(http: str, header_timeout_s: float):
    """uvicorn's ``http`` setting for our server: the protocol class (``auto``: httptools when it is installed,
    as uvicorn's own ``auto`` picks, else h11) with the header deadline bound."""
    if http not in ("auto", "httptools", "h11"):
        raise ValueError(f"--http must be auto, httptools or h11, got {http!r}")
    if http == "auto":
        http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    protocol = _httptools_protocol() if http == "httptools" else H11HeaderDeadline
    return functools.partial(protocol, header_timeout_s=header_timeout_s)
