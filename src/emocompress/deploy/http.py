"""An HTTP model server for an ONNX artifact folder: dynamic batching, limits, Prometheus metrics, a page to try
it. Torch-free: Starlette, uvicorn, prometheus_client, and the runtime the folder needs.

    emocompress serve logs/teacher_onnx/version_0/onnx --host 127.0.0.1 --port 8000
    curl -s localhost:8000/v1/predict -d '{"texts": ["i feel so happy", "this is infuriating"]}'

Endpoints: ``POST /v1/predict`` (``{"texts": [...]}`` or ``{"text": "..."}`` -> ``{"predictions": [{"label",
"probs"}, ...]}`` in input order), ``GET /v1/model`` (labels, limits), ``GET /health`` (the process answers),
``GET /ready`` (the model is loaded and the batcher runs), ``GET /metrics`` (Prometheus text) and ``GET /`` (a page
to type a text and see a bar per emotion). Concurrent requests are merged into model calls by
``emocompress.deploy.batching.Batcher``. Every refusal is a JSON object ``{"error": ..., "field"|"limit": ...}``:
400 for a body that is not the JSON above (naming the field), 413 for a body over ``max_body_bytes`` or more than
``max_texts`` texts, 422 for a text over ``max_chars`` characters, 408 for a body not received within
``timeout_s``, 503 with ``Retry-After`` when ``max_queue`` texts already wait and no room comes within
``queue_wait_ms``, 504 when the answer takes longer
than ``timeout_s``, 500 (logged, never a traceback) if the model call fails. SIGTERM stops accepting
connections, lets the requests in flight finish (at most ``drain_s``), then exits 0. See docs/serving.md.
"""

import asyncio
import contextlib
import copy
import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from emocompress.deploy.batching import Batcher, QueueFull
from emocompress.deploy.middleware import AccessLog, Metrics, RefuseWhenFull, Room, access_log
from emocompress.deploy.page import PAGE
from emocompress.deploy.protocol import header_deadline_protocol
from emocompress.deploy.runtime import precision_hint
from emocompress.deploy.serve import (  # its module is the stdin/stdout server
    MAX_PADDING,
    MAX_PADDING_HELP,
    ArtifactPredictor,
    OneLineParser,
    add_inference_precision,
    dynamic_int8_warning,
)

log = logging.getLogger("emocompress.serve")


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Settings:
    """What a server accepts and how it batches (each is a ``--flag`` of ``emocompress serve``)."""

    max_batch_size: int = _setting(8, "texts per model call (a batch is padded to its longest text)")
    max_padding: float = _setting(MAX_PADDING, MAX_PADDING_HELP)
    max_wait_ms: float = _setting(0.0, "linger: a free worker waits until the oldest queued request has waited this "
                                       "long (or the batch is full); 0: run what is queued at once")
    max_queue: int = _setting(256, "texts waiting for the model before new requests wait for room (queue_wait_ms), "
                                   "then get 503")
    queue_wait_ms: float = _setting(250.0, "a request that finds the queue full waits this long for room, its body "
                                           "unread, before its 503; 0: refuse at once")
    max_texts: int = _setting(64, "texts per request (413 beyond)")
    max_body_bytes: int = _setting(1_000_000, "bytes per request body (413 beyond)")
    max_chars: int = _setting(10_000, "characters per text (422 beyond)")
    timeout_s: float = _setting(10.0, "per request: the body must arrive within it (408), then the answer (504)")
    header_timeout_s: float = _setting(10.0, "a connection whose request headers are not complete within it is closed")
    drain_s: float = _setting(30.0, "on SIGTERM: the longest wait for the requests in flight")
    max_connections: int = _setting(1024, "connections and requests at once (503 beyond)")
    workers: int = _setting(0, "model calls at once; 0: one per core, each on one ONNX Runtime thread")

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            # 0 means: no linger, one call per core, only texts of one length in a call
            if value < 0 or value == 0 and f.name not in ("max_wait_ms", "workers", "max_padding", "queue_wait_ms"):
                raise ValueError(f"--{f.name} must be positive, got {value}")
        if self.max_queue < self.max_texts:  # a request of max_texts texts could never be queued
            raise ValueError(f"--max_queue {self.max_queue} is below --max_texts {self.max_texts}; raise it or "
                             "lower --max_texts")
        self.workers = self.workers or _cores()


def _cores() -> int:
    """The cores this process may run on (fewer than the machine's in a container or under taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def batch_mates_warning(predictor, settings: Settings) -> str | None:
    """Why answers may depend on batch mates, or None (``dynamic_int8_warning`` at ``--max_batch_size``)."""
    return dynamic_int8_warning(predictor, settings.max_batch_size, "--max_batch_size")


class ApiError(Exception):
    """A refused request: its status and the JSON body that says why."""

    def __init__(self, status: int, message: str, headers: dict | None = None, **detail):
        super().__init__(message)
        self.status, self.headers, self.body = status, headers, {"error": message, **detail}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, self.status, headers=self.headers)


def busy(settings: Settings) -> ApiError:
    return ApiError(503, f"busy: {settings.max_queue} texts may wait (max_queue) and the queue is full; retry after "
                         "a second", headers={"Retry-After": "1"}, limit="max_queue")


def parse_texts(body: bytes, settings: Settings) -> list[str]:
    """The texts of a ``/v1/predict`` body, or ``ApiError`` naming what is wrong with it.

    >>> parse_texts(b'{"text": "hi"}', Settings())
    ['hi']
    >>> parse_texts(b'{"texts": ["a", 3]}', Settings())
    Traceback (most recent call last):
    ...
    emocompress.deploy.http.ApiError: texts[1] must be a string, got int
    """
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as error:  # not UTF-8, not JSON, nested too deep
        raise ApiError(400, f"the body is not JSON ({type(error).__name__}: {str(error)[:200]}); "
                            'send {"texts": ["...", ...]} or {"text": "..."}', field="body") from None
    if not isinstance(payload, dict) or len(payload) != 1 or not {"text", "texts"} & set(payload):
        keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise ApiError(400, f'the body must be an object with one key, "texts" (a list of strings) or "text" '
                            f"(a string), got {str(keys)[:200]}", field="body")
    if "text" in payload:
        texts, names = [payload["text"]], ["text"]
    else:
        texts = payload["texts"]
        if not isinstance(texts, list) or not texts:
            got = f"{len(texts)} texts" if isinstance(texts, list) else type(texts).__name__
            raise ApiError(400, f"texts must be a non-empty list of strings, got {got}", field="texts")
        names = [f"texts[{i}]" for i in range(len(texts))]
    if len(texts) > settings.max_texts:
        raise ApiError(413, f"{len(texts)} texts in one request, more than max_texts={settings.max_texts}; "
                            "split them into several requests", limit="max_texts", max=settings.max_texts)
    for name, text in zip(names, texts):
        if not isinstance(text, str):
            raise ApiError(400, f"{name} must be a string, got {type(text).__name__}", field=name)
        if len(text) > settings.max_chars:
            raise ApiError(422, f"{name} has {len(text)} characters, more than max_chars={settings.max_chars}; "
                                "shorten it (the model reads only its first max_length tokens)",
                           field=name, limit="max_chars", max=settings.max_chars)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:  # tokenizers refuses such a text, failing every request of its batch
            raise ApiError(400, f"{name} holds a lone surrogate ({text[error.start].encode('unicode_escape').decode()} "
                                f"at character {error.start}), which is no Unicode character; send the character "
                                "itself or its UTF-16 pair", field=name) from None
    return texts


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes; 499 (nginx's "client
    closed request", for the log and the metrics: nobody is left to read it) if the client has gone."""
    declared = request.headers.get("content-length", "")
    too_big = ApiError(413, f"the body exceeds max_body_bytes={limit}; send fewer or shorter texts",
                       limit="max_body_bytes", max=limit)
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
    except ClientDisconnect:  # e.g. while it waited for room in the queue
        raise ApiError(499, "the client closed the connection before its body was read") from None
    return bytes(body)


def create_app(predictor, settings: Settings | None = None) -> Starlette:
    """The Starlette app serving ``predictor`` (an ``ArtifactPredictor``: ``predict(texts)``, ``labels``,
    ``max_length``, ``backend``, ``precision``); its batcher starts and stops with the app's lifespan."""
    settings = settings or Settings()
    metrics = Metrics(settings.max_batch_size)

    # after every batch, answered or failed, its texts have left the queue (and the next batch's, taken already):
    # waiting requests are let in
    batcher = Batcher(predictor.predict, settings.max_batch_size, settings.max_wait_ms, settings.max_queue,
                      on_batch=metrics.on_batch, workers=settings.workers, on_done=lambda: room.wake())
    room = Room(batcher, settings.queue_wait_ms / 1000)
    metrics.queue_depth.set_function(lambda: batcher.queued)
    metrics.waiting.set_function(lambda: room.waiting)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        log.info("ready: %d labels, max_length %d, %s", len(predictor.labels), predictor.max_length, settings)
        if warning := batch_mates_warning(predictor, settings):
            log.warning(warning)
        yield
        await batcher.stop()

    async def refused(request: Request, error: ApiError):
        return error.response()

    async def unrouted(request: Request, error: HTTPException):  # 404, 405: JSON like every other refusal
        return JSONResponse({"error": error.detail, "path": request.url.path[:200]}, error.status_code,
                            headers=error.headers)

    async def failed(request: Request, error: Exception):  # logged with its traceback; the client gets none
        log.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return JSONResponse({"error": "internal error; the server's log has the details"}, 500)

    async def submit(texts: list[str]) -> asyncio.Future:
        """The batcher's future of ``texts``; a request that finds the queue full waits for room once before its 503
        (requests read and parsed at once can pass ``RefuseWhenFull`` together and find it full here)."""
        for attempt in range(2):
            try:
                return batcher.submit(texts)
            except QueueFull:
                if attempt or not await room.wait():
                    raise busy(settings) from None

    async def predict(request: Request):
        deadline = time.monotonic() + settings.timeout_s
        try:
            body = await asyncio.wait_for(_read_body(request, settings.max_body_bytes), settings.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the body was not received within timeout_s={settings.timeout_s}",
                           limit="timeout_s") from None
        answers = await submit(parse_texts(body, settings))
        try:
            results = await asyncio.wait_for(answers, max(deadline - time.monotonic(), 0.001))
        except asyncio.TimeoutError:
            raise ApiError(504, f"no answer within timeout_s={settings.timeout_s}; the server is overloaded",
                           limit="timeout_s") from None
        return JSONResponse({"predictions": results})

    async def model(request: Request):
        return JSONResponse({"labels": predictor.labels, "max_length": predictor.max_length,
                             "limits": asdict(settings)})

    async def health(request: Request):
        return JSONResponse({"status": "ok"})

    async def ready(request: Request):
        if not batcher.running:
            return JSONResponse({"status": "not ready"}, 503)
        return JSONResponse({"status": "ready"})

    async def prometheus(request: Request):
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def page(request: Request):
        return HTMLResponse(PAGE)

    # Starlette rather than FastAPI: nothing here needs FastAPI's request validation or OpenAPI, and its layers
    # cost CPU on the event loop for every request (measured in reports/http_server, seventh run).
    routes = [Route("/v1/predict", predict, methods=["POST"]), Route("/v1/model", model),
              Route("/health", health), Route("/ready", ready), Route("/metrics", prometheus), Route("/", page)]
    middleware = [Middleware(AccessLog, metrics=metrics),
                  Middleware(RefuseWhenFull, room=room, refusal=busy(settings).response())]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware,
                    exception_handlers={ApiError: refused, HTTPException: unrouted, Exception: failed})
    app.state.batcher, app.state.metrics = batcher, metrics
    return app


def make_server(app: Starlette, host: str, port: int, settings: Settings, log_level: str = "info",
                http: str = "auto") -> uvicorn.Server:
    """A uvicorn server for ``app``: our access log instead of uvicorn's, the drain deadline, the connection cap,
    the header deadline on the ``http`` protocol (``auto``: httptools when installed, else h11); the event loop is
    uvicorn's ``auto`` (uvloop when installed)."""
    logging_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    logging_config["handlers"]["emocompress"] = {"class": "logging.StreamHandler", "formatter": "default",
                                                 "stream": "ext://sys.stderr"}
    # The server's two loggers only: configuring the package's "emocompress" logger would leave this handler (and
    # the stderr of the moment) to every later `emocompress` command run in the same process.
    for name in (log.name, access_log.name):
        logging_config["loggers"][name] = {"handlers": ["emocompress"], "level": "INFO", "propagate": False}
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            log_config=logging_config, timeout_graceful_shutdown=settings.drain_s,
                            limit_concurrency=settings.max_connections, server_header=False,
                            http=header_deadline_protocol(http, settings.header_timeout_s))
    return uvicorn.Server(config)


def _exit_on(signum: int, code: int) -> None:
    """After a graceful shutdown uvicorn raises the signal again; handled here, it exits ``code`` instead
    of dying of it (a SIGTERM'd server that drained cleanly exits 0, as process managers expect)."""
    signal.signal(signum, lambda *_: sys.exit(code))


def main(argv: list[str] | None = None) -> None:
    """``emocompress serve FOLDER [--host H] [--port P] [--max_batch_size N ...]``: serve the folder over HTTP."""
    parser = OneLineParser(prog="emocompress serve", description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="artifact folder: ONNX (OnnxExport, export_onnx, onnxruntime INT8) or OpenVINO (export_openvino, its INT8)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num_threads", type=int, default=None,
                        help="runtime (ONNX Runtime, OpenVINO) threads per model call (default: the cores shared among --workers)")
    parser.add_argument("--http", default="auto", choices=["auto", "httptools", "h11"],
                        help="HTTP parser: httptools (C, the fastest), h11 (pure Python); auto: httptools when installed")
    add_inference_precision(parser)
    parser.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    for f in fields(Settings):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default,
                            help=f"{f.metadata['help']} (default {f.default})")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:  # the socket layer served 70000 on 4464 (70000 - 65536) and exited 3 on -1
        parser.error(f"--port must be from 0 to 65535 (0: a free port), got {args.port}")
    try:
        settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
        threads = args.num_threads or max(1, _cores() // settings.workers)
        # One run of the graph per batcher batch, cut only where its padding would cost more than a call's overhead.
        predictor = ArtifactPredictor(args.folder, threads, batch_size=settings.max_batch_size,
                                      max_padding=settings.max_padding,
                                      inference_precision=precision_hint(args.inference_precision))
    except ValueError as error:
        parser.error(str(error))
    _exit_on(signal.SIGTERM, 0)
    _exit_on(signal.SIGINT, 128 + signal.SIGINT)
    server = make_server(create_app(predictor, settings), args.host, args.port, settings, args.log_level, args.http)
    try:
        server.run()
    except SystemExit:
        if server.started:
            raise
        # a port in use or an unknown host: uvicorn logged why and exits 3, a code no other command ends with
        parser.error(f"--host {args.host} --port {args.port}: cannot listen there (the line above says why); give a "
                     "free --port, or an address of this machine as --host")
    if not server.started:
        sys.exit(1)


if __name__ == "__main__":
    main()
