"""The HTTP server's ASGI middleware and Prometheus metrics (``emocompress.deploy.http``): one access-log line and
the metrics of every request, and the 503 of a full queue before a request's body is read."""

import asyncio
import collections
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.responses import Response

from emocompress.deploy.batching import Batcher

access_log = logging.getLogger("emocompress.access")


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps may live in one process)."""

    PATHS = ("/", "/v1/predict", "/v1/model", "/health", "/ready", "/metrics")

    def __init__(self, max_batch_size: int):
        self.registry = CollectorRegistry()
        self.requests = Counter("emocompress_http_requests", "HTTP requests answered, by path and status",
                                ["path", "status"], registry=self.registry)
        self.latency = Histogram("emocompress_http_request_seconds", "time from request to response, by path",
                                 ["path"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        sizes = sorted({2 ** i for i in range(max_batch_size.bit_length())} | {max_batch_size})
        self.batch_size = Histogram("emocompress_batch_size", "texts per model call", registry=self.registry,
                                    buckets=sizes)
        self.queue_depth = Gauge("emocompress_queue_depth", "texts waiting for the model", registry=self.registry)
        self.waiting = Gauge("emocompress_waiting_for_room", "requests waiting for room in the full queue",
                             registry=self.registry)
        self.texts = Counter("emocompress_texts", "texts predicted", registry=self.registry)

    def observe(self, path: str, status: int, seconds: float) -> None:
        path = path if path in self.PATHS else "other"  # unknown paths must not grow the label set
        self.requests.labels(path, str(status)).inc()
        self.latency.labels(path).observe(seconds)

    def on_batch(self, size: int) -> None:
        self.batch_size.observe(size)
        self.texts.inc(size)


class AccessLog:
    """ASGI middleware: one log line and the metrics of every HTTP request, whatever its outcome."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500  # 500 unless a response starts (an unhandled error)

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - start
            self.metrics.observe(scope["path"], status, seconds)
            client = "{}:{}".format(*scope["client"]) if scope.get("client") else "-"
            access_log.info('%s "%s %s" %d %.1f ms', client, scope["method"], scope["path"][:200], status,
                            seconds * 1000)


class Room:
    """The requests that found the batcher's queue full, waiting, first come first served, for texts to leave it
    (as many as the queue holds texts: a waiting room as large as the queue).

    Args:
        batcher: the queue.
        wait_s: how long a request may wait for room; 0: none.
    """

    def __init__(self, batcher: Batcher, wait_s: float):
        self.batcher, self.wait_s = batcher, wait_s
        self.waiting = 0  # requests in ``wait``
        self._waiting: collections.deque[asyncio.Future] = collections.deque()

    @property
    def full(self) -> bool:
        """The queue is full, or requests wait for room already (a newcomer queues behind them)."""
        return self.waiting > 0 or self.batcher.queued >= self.batcher.max_queue

    async def wait(self) -> bool:
        """Whether room comes within ``wait_s``. At most ``max_queue`` requests wait: beyond, waiting would only
        hold connections (an open-loop flood gets its 503s either way) and keep clients from sending."""
        if not self.wait_s or self.waiting >= self.batcher.max_queue:
            return False
        while self._waiting and self._waiting[0].done():  # timed out: they wait alike, so the oldest go first
            self._waiting.popleft()
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        self.waiting += 1
        self.wake()  # there may be room already, if those ahead have been let in
        try:
            await asyncio.wait_for(future, self.wait_s)  # on timeout it is cancelled: ``wake`` passes it by
        except asyncio.TimeoutError:
            return False
        finally:
            self.waiting -= 1
        return True

    def wake(self) -> None:
        """On the event loop, once texts have left the queue: let in as many waiting requests as it has room for
        (counting one text each; one with more may still find it full when it submits, and gets its 503 then)."""
        room = self.batcher.max_queue - self.batcher.queued
        while room > 0 and self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_result(None)
                room -= 1


class RefuseWhenFull:
    """ASGI middleware: a ``/v1/predict`` request that finds the queue full waits for room (``Room``) without its
    body being read, and gets its 503 before its body is read, parsed or routed if none comes. Under overload,
    refusing must cost much less than answering, or the refusals take the CPU the answers need; and clients that
    retry at once instead of after ``Retry-After`` would take it all (reports/http_server, eighth and ninth runs):
    a request that waits costs no CPU."""

    def __init__(self, app, room: Room, refusal: Response):
        # a Starlette response is an ASGI app: this one 503 is sent to every request refused
        self.app, self.room, self.refusal = app, room, refusal

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/predict"
                and self.room.full and not await self.room.wait()):
            return await self.refusal(scope, receive, send)
        return await self.app(scope, receive, send)
