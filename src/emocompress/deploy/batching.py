"""Dynamic batching for the HTTP server: concurrent requests merged into one model call. Torch-free.

Continuous batching: a request's texts wait in a bounded queue, and as soon as a worker is free, one collector
task takes the requests at the head of the queue (up to ``max_batch_size`` texts) and runs the model on them in
that worker's thread (ONNX Runtime and tokenizers release the GIL, so the event loop keeps accepting requests
meanwhile), then hands each request its own slice of the answers, in order; while requests wait, the worker
thread takes the next batch itself, without waiting for a turn of the event loop. A lone request on an idle server is
run at once; while every worker is busy, requests accumulate, and the next free worker takes them all. So batches
grow with the load without a timer. What is queued when several workers are free is shared among them.
``max_wait_ms`` (0 by default) adds an optional linger: a free worker waits until the oldest queued request has
waited that long (or the batch is full) before it starts.

A request is never split: one with more texts than ``max_batch_size`` runs alone (the predictor cuts it
into batches of its own ``batch_size``). Length bucketing belongs to the predictor, not here.
"""

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("emocompress.serve")


class QueueFull(Exception):
    """The queue holds ``max_queue`` texts already: the caller should answer 503 and ask to retry."""


@dataclass
class _Request:
    texts: list[str]
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Merge the texts of concurrent ``submit`` calls into model calls of at most ``max_batch_size`` texts.

    Args:
        predict: the model, ``texts -> one dict per text, in order`` (``ArtifactPredictor.predict``).
        max_batch_size: texts per model call (requests are merged until the next would not fit).
        max_wait_ms: linger: a free worker starts once the oldest queued request has waited this long or the
            batch is full; 0 (default): at once, with what is queued.
        max_queue: texts that may wait at once; ``submit`` raises ``QueueFull`` beyond it.
        on_batch: called with each answered batch's size after its model call (metrics).
        on_done: called after every batch, answered or failed: its texts have left the queue (the waiting room).
        workers: model calls that may run at once, each in its own thread.
    """

    def __init__(self, predict: Callable[[list[str]], list[dict]], max_batch_size: int = 32,
                 max_wait_ms: float = 0.0, max_queue: int = 1024, on_batch: Callable[[int], None] | None = None,
                 workers: int = 1, on_done: Callable[[], None] | None = None):
        for name, value, least in (("max_batch_size", max_batch_size, 1), ("max_wait_ms", max_wait_ms, 0),
                                   ("max_queue", max_queue, 1), ("workers", workers, 1)):
            if value < least:
                raise ValueError(f"{name} must be at least {least}, got {value}")
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.on_batch = on_batch or (lambda size: None)
        self.on_done = on_done or (lambda: None)
        self.queued = 0  # texts waiting, not yet in a model call
        self._pending: collections.deque[_Request] = collections.deque()
        self._lock = threading.Lock()  # _pending and queued: the worker threads take batches from them too
        self._stopping = False
        self._arrival = asyncio.Event()
        self.workers = workers
        self._task: asyncio.Task | None = None
        self._free: asyncio.Semaphore | None = None  # workers not running a batch (made on the serving loop)
        self._running: set[asyncio.Task] = set()
        # The model calls' own pool rather than to_thread's shared default one.
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="emocompress-model")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the collector on the running event loop."""
        self._free = asyncio.Semaphore(self.workers)
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="emocompress-batcher")

    async def stop(self) -> None:
        """Stop the collector; requests still waiting get ``asyncio.CancelledError``."""
        self._stopping = True
        tasks = [task for task in (self._task, *self._running) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with self._lock:
            while self._pending:
                self._pending.popleft().future.cancel()
            self.queued = 0
        self._pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, texts: list[str]) -> asyncio.Future:
        """A future of the model's answers for ``texts``, in order, once their batch has run. A plain future, not
        a coroutine: ``asyncio.wait_for`` on it needs no task of its own (a per-request cost of the server).
        Cancelling it (the caller gave up) drops its texts if they still wait.

        Raises:
            QueueFull: ``max_queue`` texts are waiting already.
            RuntimeError: the batcher is not running.
        The future raises whatever the model call raised, for every request of its batch.
        """
        if not self.running:
            raise RuntimeError("the batcher is not running")
        if self.queued + len(texts) > self.max_queue:
            raise QueueFull(f"{self.queued} texts are waiting, the queue holds {self.max_queue}")
        request = _Request(list(texts), asyncio.get_running_loop().create_future())
        request.future.add_done_callback(lambda future: future.cancelled() and self._drop(request))
        with self._lock:
            self._pending.append(request)
            self.queued += len(request.texts)
        self._arrival.set()
        return request.future

    def _drop(self, request: _Request) -> None:
        with self._lock:
            if request in self._pending:
                self._pending.remove(request)
                self.queued -= len(request.texts)

    async def _collect(self) -> None:
        while True:
            while not self._pending:
                self._arrival.clear()
                await self._arrival.wait()
            await self._free.acquire()  # while every worker is busy, more requests queue up for this batch
            if self.max_wait:
                await self._linger()
            with self._lock:
                batch = self._take(self.workers - len(self._running))
            if not batch:  # every waiting request was cancelled, or taken by a busy worker, meanwhile
                self._free.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._done)

    async def _linger(self) -> None:
        """Wait until the batch is full or the oldest queued request has waited ``max_wait``."""
        while self._pending and self.queued < self.max_batch_size:
            left = self._pending[0].arrived + self.max_wait - time.monotonic()
            if left <= 0:
                return
            self._arrival.clear()
            with contextlib.suppress(asyncio.TimeoutError):  # not the builtin TimeoutError before Python 3.11
                await asyncio.wait_for(self._arrival.wait(), left)

    def _done(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._free.release()

    def _take(self, free: int) -> list[_Request]:
        """Requests from the head of the queue whose texts fit in one batch (the first always does). A batch holds
        at most ``max_batch_size`` texts and the queue's share of the ``free`` workers (this one included): eight
        texts queued for two idle workers run as two calls of four at once, not one of eight beside an idle worker
        (a call's time grows with its texts: reports/http_server)."""
        batch, size, limit = [], 0, min(self.max_batch_size, -(-self.queued // free))  # ceil(queued / free)
        while self._pending and (not batch or size + len(self._pending[0].texts) <= limit):
            request = self._pending.popleft()
            self.queued -= len(request.texts)
            if not request.future.done():  # not cancelled by its caller meanwhile
                batch.append(request)
                size += len(request.texts)
        return batch

    async def _run(self, batch: list[_Request]) -> None:
        """Run ``batch`` in a worker thread (``_work``), which goes on with the next batches itself."""
        current = [batch]  # the batch the thread is on, for stop() to cancel its callers
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, self._work, current, loop)
        except asyncio.CancelledError:  # stop(): the callers of the batch in the model get cancelled too
            for request in current[0]:
                request.future.cancel()
            raise

    def _work(self, current: list[list[_Request]], loop: asyncio.AbstractEventLoop) -> None:
        """In a worker thread: run ``current[0]``, hand its answers to the event loop, and while requests wait (and
        no linger asks to wait for more) take the next batch here. Going back to the event loop between batches
        costs turns of it, and under overload a turn is long (every connection's work is in it): the model then
        idled between batches while the loop answered refusals (measured in reports/http_server, eighth run)."""
        while batch := current[0]:
            if self._stopping:  # taken, not run: their callers are cancelled, as stop() cancels what waits
                with contextlib.suppress(RuntimeError):  # the loop is closed: no caller is left
                    loop.call_soon_threadsafe(lambda: [request.future.cancel() for request in batch])
                return
            try:
                outcome = self.predict([text for request in batch for text in request.texts])
            except Exception as error:  # the model failed: every request of the batch fails, the server goes on
                log.exception("model call on %d texts failed", sum(len(request.texts) for request in batch))
                outcome = error
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server has stopped
                loop.call_soon_threadsafe(_settle, batch, outcome, self.on_batch, self.on_done)
            with self._lock:
                more = self._pending and (not self.max_wait or self.queued >= self.max_batch_size)
                current[0] = self._take(self.workers - len(self._running) + 1) if more else []  # + this one


def _settle(batch: list[_Request], outcome: list[dict] | Exception, on_batch: Callable[[int], None],
            on_done: Callable[[], None]) -> None:
    """On the event loop: each request of ``batch`` gets its slice of the answers, in order (or the error)."""
    try:
        if not isinstance(outcome, Exception):
            on_batch(sum(len(request.texts) for request in batch))
        start = 0
        for request in batch:
            end = start + len(request.texts)
            if not request.future.done():
                if isinstance(outcome, Exception):
                    request.future.set_exception(outcome)
                else:
                    request.future.set_result(outcome[start:end])
            start = end
    finally:  # after a failed batch too: requests waiting for room waited for the next answered batch, or in vain
        on_done()
