"""The HTTP server (emocompress serve): a real uvicorn server on a free loopback port, a real HTTP client, a tiny
ONNX export; batching, limits and bad input, metrics, SIGTERM drain, the page in a headless browser."""

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from emocompress.compression.export import export_onnx
from emocompress.deploy.batching import Batcher
from emocompress.deploy.http import Settings, batch_mates_warning, create_app, main, make_server
from emocompress.deploy.serve import ArtifactPredictor
from emocompress.deploy.serve import main as serve_main
from tests.conftest import make_texts

# The server as a deployment runs it: `emocompress serve ...` with torch, transformers and lightning imports failing.
_BLOCKED_CLI = """
import sys
for name in ("torch", "transformers", "lightning"):
    sys.modules[name] = None
from emocompress.__main__ import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def folder(tiny_teacher_dir, tmp_path_factory):
    """An fp32 ONNX export of the tiny teacher (a random head: predictions differ from text to text a little)."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    return export_onnx(model, tmp_path_factory.mktemp("http") / "onnx", tokenizer)


@pytest.fixture(scope="module")
def predictor(folder):
    return ArtifactPredictor(folder, num_threads=1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _running(predictor, http="auto", **settings):
    """The base URL of a uvicorn server for ``predictor`` running in a thread on a free loopback port."""
    settings = Settings(**settings)
    server = make_server(create_app(predictor, settings), "127.0.0.1", _free_port(), settings, log_level="warning",
                         http=http)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):  # bounded: 10 s
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "the server did not start within 10 s"
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# small limits, so each is cheap to cross
_LIMITS = {"max_texts": 8, "max_chars": 200, "max_body_bytes": 4000, "max_batch_size": 16}


@pytest.fixture(scope="module")
def url(predictor):
    with _running(predictor, **_LIMITS) as base:
        yield base


def _texts(n: int, seed: int) -> list[str]:
    return make_texts(["anger", "joy", "love"][seed % 3], n, seed)


def _metric(text: str, name: str) -> float:
    """The sum of a Prometheus metric's samples named exactly ``name`` (all label values)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.split("{")[0].split(" ")[0] == name)


def test_concurrent_requests_are_batched_and_answered_in_order(url, predictor):
    requests = [_texts(1 + i % 5, seed=i) for i in range(40)]  # 1 to 5 texts each, 120 in all

    async def send_all():
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return await asyncio.gather(*(client.post("/v1/predict", json={"texts": texts}) for texts in requests))

    before = httpx.get(f"{url}/metrics").text
    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [200] * len(requests)
    for texts, response in zip(requests, responses):
        served, offline = response.json()["predictions"], predictor.predict(texts)
        assert [p["label"] for p in served] == [p["label"] for p in offline]
        for got, expected in zip(served, offline):  # padded to another batch's longest text: float noise only
            assert list(got["probs"]) == predictor.labels
            assert got["probs"] == pytest.approx(expected["probs"], abs=1e-5)
    after = httpx.get(f"{url}/metrics").text
    texts = _metric(after, "emocompress_texts_total") - _metric(before, "emocompress_texts_total")
    calls = _metric(after, "emocompress_batch_size_count") - _metric(before, "emocompress_batch_size_count")
    assert texts == sum(map(len, requests))
    assert calls < len(requests)  # requests shared model calls
    assert _metric(after, "emocompress_batch_size_sum") - _metric(before, "emocompress_batch_size_sum") == texts


def test_endpoints_answer(url, predictor):
    one = httpx.post(f"{url}/v1/predict", json={"text": "i feel so happy"})
    assert one.status_code == 200
    assert one.json()["predictions"] == predictor.predict(["i feel so happy"])  # a batch of one, as offline
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/ready").json() == {"status": "ready"}
    model = httpx.get(f"{url}/v1/model").json()
    assert model["labels"] == predictor.labels and model["limits"]["max_texts"] == 8
    page = httpx.get(f"{url}/")
    assert page.headers["content-type"].startswith("text/html") and "v1/predict" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # self-contained
    metrics = httpx.get(f"{url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("emocompress_http_requests_total", "emocompress_http_request_seconds_bucket",
                 "emocompress_batch_size_bucket", "emocompress_queue_depth"):
        assert name in metrics.text
    assert re.search(r'emocompress_http_requests_total\{path="/v1/predict",status="200"\} [1-9]', metrics.text)
    nowhere, wrong_method = httpx.get(f"{url}/nowhere"), httpx.get(f"{url}/v1/predict")
    assert (nowhere.status_code, nowhere.json()) == (404, {"error": "Not Found", "path": "/nowhere"})
    assert (wrong_method.status_code, wrong_method.headers["allow"]) == (405, "POST")
    assert wrong_method.json()["error"] == "Method Not Allowed"


@pytest.fixture(scope="module")
def openvino_int8(tiny_teacher_dir, tmp_path_factory):
    """An OpenVINO NNCF INT8 folder of the tiny teacher (static: scales fixed at calibration)."""
    pytest.importorskip("openvino", reason="the OpenVINO backend needs the openvino package")
    pytest.importorskip("nncf", reason="OpenVINO INT8 needs the nncf package")
    from emocompress.compression.openvino import export_openvino

    model = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    calibration = [text for seed in range(3) for text in _texts(20, seed)]
    return export_openvino(model, tmp_path_factory.mktemp("http") / "ov_int8", tokenizer, precision="int8",
                           calibration_texts=calibration)


@pytest.mark.parametrize("kind", ["onnx_fp32", pytest.param("openvino_int8", marks=pytest.mark.slow)])
def test_batched_answers_equal_each_text_alone(kind, request):
    """Folders whose answers do not depend on batch mates: through the server, merged into batches of texts of
    other lengths, each text gets what the model gives it alone."""
    predictor = ArtifactPredictor(request.getfixturevalue("folder" if kind == "onnx_fp32" else kind), num_threads=1)
    requests = [_texts(1 + i % 3, seed=100 + i) for i in range(24)]
    with _running(predictor, max_batch_size=16, workers=1) as base:
        before = httpx.get(f"{base}/metrics").text
        responses = asyncio.run(_post_all(base, [{"texts": texts} for texts in requests]))
        calls = _metric(httpx.get(f"{base}/metrics").text, "emocompress_batch_size_count") - \
            _metric(before, "emocompress_batch_size_count")
    assert calls < len(requests)  # requests shared model calls
    for texts, response in zip(requests, responses):
        for text, got in zip(texts, response.json()["predictions"]):
            alone = predictor.predict([text])[0]
            assert got["label"] == alone["label"]
            assert got["probs"] == pytest.approx(alone["probs"], abs=1e-4)


@pytest.fixture(scope="module")
def ort_int8(tiny_teacher_dir, tmp_path_factory):
    """An ONNX Runtime dynamic INT8 folder of the tiny teacher."""
    from emocompress.compression.export import quantize

    int8 = tmp_path_factory.mktemp("http") / "int8"
    quantize(AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir), "onnxruntime", out_dir=int8,
             tokenizer=AutoTokenizer.from_pretrained(tiny_teacher_dir))
    return int8


def test_dynamic_int8_warns_that_answers_depend_on_batch_mates(ort_int8, folder):
    warning = batch_mates_warning(ArtifactPredictor(ort_int8), Settings(max_batch_size=8))
    assert re.search(r"dynamic INT8 .* --max_batch_size 8 .* OpenVINO INT8 folder .* fp32 folder, or "
                     r"--max_batch_size 1$", warning)
    assert batch_mates_warning(ArtifactPredictor(ort_int8), Settings(max_batch_size=1)) is None
    assert batch_mates_warning(ArtifactPredictor(folder), Settings(max_batch_size=8)) is None  # fp32


def test_stdin_server_warns_about_batch_mates_as_the_http_server_does(ort_int8, folder, tmp_path, capsys):
    texts, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    texts.write_text("i feel happy\nfurious\n")
    for served, batch_size, warned in ((ort_int8, 4, True), (ort_int8, 1, False), (folder, 4, False)):
        serve_main([str(served), "--input", str(texts), "--output", str(out), "--batch_size", str(batch_size)])
        err = capsys.readouterr().err.strip()
        assert bool(re.fullmatch(r"python -m emocompress.deploy.serve: warning: this ONNX Runtime dynamic INT8 folder "
                                 r".* --batch_size 4 .* or --batch_size 1", err)) == warned, err
        assert len(out.read_text().splitlines()) == 2


_BAD = {  # case -> (body bytes, status, what the message says, "field" or "limit" it names)
    "not_json": (b'{"texts": [', 400, r"the body is not JSON", {"field": "body"}),
    "not_utf8": (b'{"text": "\xff\xfe"}', 400, r"the body is not JSON", {"field": "body"}),
    "nested_deep": (b"[" * 100_000 + b"]" * 100_000, 413, r"max_body_bytes=4000", {"limit": "max_body_bytes"}),
    "nested": (b"[" * 1500 + b"]" * 1500, 400, r"the body is not JSON|must be an object", {"field": "body"}),
    "a_list": (b'["hi"]', 400, r"must be an object with one key", {"field": "body"}),
    "unknown_key": (b'{"txts": ["hi"]}', 400, r"one key, \"texts\" .* got \['txts'\]", {"field": "body"}),
    "both_keys": (b'{"text": "a", "texts": ["b"]}', 400, r"one key", {"field": "body"}),
    "texts_not_list": (b'{"texts": "hi"}', 400, r"texts must be a non-empty list of strings, got str",
                       {"field": "texts"}),
    "texts_empty": (b'{"texts": []}', 400, r"got 0 texts", {"field": "texts"}),
    "text_not_str": (b'{"text": 3}', 400, r"text must be a string, got int", {"field": "text"}),
    "item_not_str": (b'{"texts": ["a", null]}', 400, r"texts\[1\] must be a string, got NoneType",
                     {"field": "texts[1]"}),
    "too_many_texts": (json.dumps({"texts": ["a"] * 9}).encode(), 413, r"9 texts .* max_texts=8",
                       {"limit": "max_texts"}),
    # valid JSON, but no Unicode text: it once failed its batch with a 500, and every request merged into it
    "lone_surrogate": (b'{"texts": ["a", "\\ud800"]}', 400,
                       r"texts\[1\] holds a lone surrogate \(\\ud800 at character 0\)", {"field": "texts[1]"}),
    "text_too_long": (json.dumps({"texts": ["a", "b" * 201]}).encode(), 422, r"texts\[1\] has 201 .* max_chars=200",
                      {"limit": "max_chars", "field": "texts[1]"}),
    "body_too_big": (json.dumps({"texts": ["a" * 150] * 30}).encode(), 413, r"max_body_bytes=4000",
                     {"limit": "max_body_bytes"}),
}


@pytest.mark.parametrize("case", list(_BAD))
def test_bad_requests_are_refused_naming_the_field_or_limit(url, case):
    body, status, message, names = _BAD[case]
    response = httpx.post(f"{url}/v1/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    answer = response.json()
    assert re.search(message, answer["error"]), answer
    assert names.items() <= answer.items()
    assert "Traceback" not in response.text
    assert httpx.post(f"{url}/v1/predict", json={"text": "still serving"}).status_code == 200


def test_streamed_body_over_the_limit_is_refused(url):
    def chunks():  # no Content-Length: the server counts as it reads
        for _ in range(10):
            yield b" " * 1000

    response = httpx.post(f"{url}/v1/predict", content=chunks())
    assert response.status_code == 413 and response.json()["limit"] == "max_body_bytes"


class _Slow:
    """The predictor, ``seconds`` slower per model call (or failing), to fill the queue."""

    def __init__(self, predictor, seconds: float = 0.0, fail: bool = False, fail_first: int = 0):
        self.predictor, self.seconds, self.fail, self.fail_first = predictor, seconds, fail, fail_first
        self.labels, self.max_length = predictor.labels, predictor.max_length
        self.backend, self.precision = predictor.backend, predictor.precision

    def predict(self, texts):
        time.sleep(self.seconds)
        self.fail_first -= 1  # fail_first: only the first calls fail
        if self.fail or self.fail_first >= 0:
            raise RuntimeError("secret internals")
        return self.predictor.predict(texts)


async def _post_all(url, bodies, **client_options):
    async with httpx.AsyncClient(base_url=url, timeout=30, **client_options) as client:
        return await asyncio.gather(*(client.post("/v1/predict", json=body) for body in bodies))


def test_full_queue_answers_503_with_retry_after(predictor):
    with _running(_Slow(predictor, 0.3), max_batch_size=1, max_wait_ms=0, max_queue=2, max_texts=2,
                  queue_wait_ms=0) as base:
        responses = asyncio.run(_post_all(base, [{"text": f"text {i}"} for i in range(8)]))
        statuses = sorted(r.status_code for r in responses)
        busy = [r for r in responses if r.status_code == 503]
        # at least the two that fit in the queue are answered; the rest arrive while it is full
        assert statuses.count(200) >= 2 and len(busy) >= 3 and set(statuses) == {200, 503}
        assert all(r.headers["retry-after"] == "1" and r.json()["limit"] == "max_queue" for r in busy)
        time.sleep(0.4)
        assert httpx.post(f"{base}/v1/predict", json={"text": "after"}).status_code == 200
        assert _metric(httpx.get(f"{base}/metrics").text, "emocompress_queue_depth") == 0


def test_a_full_queue_refuses_before_reading_the_body(predictor):
    async def scenario(base):
        one_connection = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=base, timeout=30) as client, \
                httpx.AsyncClient(base_url=base, timeout=30, limits=one_connection) as other:
            running = asyncio.ensure_future(client.post("/v1/predict", json={"text": "a"}))
            await asyncio.sleep(0.2)  # taken by the only worker
            waiting = asyncio.ensure_future(client.post("/v1/predict", json={"text": "b"}))
            await asyncio.sleep(0.2)  # queued: the queue of one text is full
            refused = await other.post("/v1/predict", content=b"not even JSON")  # 503, not 400: never parsed
            answers = await asyncio.gather(running, waiting)
            again = await other.post("/v1/predict", json={"text": "c"})  # the same keep-alive connection
            return refused, answers, again

    with _running(_Slow(predictor, 0.6), max_batch_size=1, max_queue=1, max_texts=1, workers=1,
                  queue_wait_ms=0) as base:
        refused, answers, again = asyncio.run(scenario(base))
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["limit"] == "max_queue" and "busy" in refused.json()["error"]
        assert [r.status_code for r in answers] == [200, 200] and again.status_code == 200
        metrics = httpx.get(f"{base}/metrics").text
        assert re.search(r'emocompress_http_requests_total\{path="/v1/predict",status="503"\} 1\.0', metrics)


def test_a_request_that_finds_the_queue_full_waits_for_room_then_gets_503(predictor):
    async def scenario(base, n, waiting):
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            posts = [asyncio.ensure_future(client.post("/v1/predict", json={"text": f"text {i}"})) for i in range(n)]
            for _ in range(100):  # bounded: 5 s
                metrics = (await client.get("/metrics")).text
                if _metric(metrics, "emocompress_waiting_for_room") == waiting:
                    break
                await asyncio.sleep(0.05)
            return _metric(metrics, "emocompress_waiting_for_room"), await asyncio.gather(*posts)

    # one worker, 1 s a call, room for two texts: one in the model, two queued, two waiting (the room's bound), the
    # others refused at once
    with _running(_Slow(predictor, 1.0), max_batch_size=1, max_queue=2, max_texts=1, workers=1,
                  queue_wait_ms=5000) as base:
        waiting, answers = asyncio.run(scenario(base, 6, waiting=2))
        refused = [r for r in answers if r.status_code == 503]
        assert waiting == 2 and len(refused) in (1, 2) and {r.status_code for r in answers} == {200, 503}
        assert all(r.elapsed.total_seconds() < 0.5 for r in refused)  # the waiting room was full: no wait
        assert [r.json()["predictions"][0] for r in answers if r.status_code == 200] == \
            predictor.predict([f"text {i}" for i, r in enumerate(answers) if r.status_code == 200])
    # a wait shorter than a model call: a request that waits in vain gets its 503 after waiting, not at once
    with _running(_Slow(predictor, 0.6), max_batch_size=1, max_queue=1, max_texts=1, workers=1,
                  queue_wait_ms=200) as base:
        _, answers = asyncio.run(scenario(base, 3, waiting=1))
        refused = [r for r in answers if r.status_code == 503]
        assert 200 in {r.status_code for r in answers} and any(r.elapsed.total_seconds() >= 0.19 for r in refused)
        assert all(r.headers["retry-after"] == "1" for r in refused)


async def _until(client: httpx.AsyncClient, holds) -> str:
    """The server's /metrics text once ``holds(text)``; polled, bounded: 10 s."""
    for _ in range(200):
        if holds(metrics := (await client.get("/metrics")).text):
            return metrics
        await asyncio.sleep(0.05)
    raise AssertionError("the server never got there")


async def _fill_the_queue(client: httpx.AsyncClient) -> list[asyncio.Future]:
    """The posts of "a", in the model, and "b", filling a queue of one text (workers=1, max_queue=1)."""
    posts = [asyncio.ensure_future(client.post("/v1/predict", json={"text": "a"}))]
    await asyncio.sleep(0.2)  # "a" in the model
    posts.append(asyncio.ensure_future(client.post("/v1/predict", json={"text": "b"})))
    await _until(client, lambda m: _metric(m, "emocompress_queue_depth") == 1)  # "b" fills the queue
    return posts


def test_a_client_gone_while_its_request_waited_is_logged_499_not_500(predictor):
    body = b'{"text": "gone"}'
    request = (b"POST /v1/predict HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n%s" % (len(body), body))

    status_499 = r'emocompress_http_requests_total\{path="/v1/predict",status="499"\} 1\.0'

    async def scenario(base, port):
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            def until(holds):
                return _until(client, holds)

            posts = await _fill_the_queue(client)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            await writer.drain()
            await until(lambda m: _metric(m, "emocompress_waiting_for_room") == 1)
            writer.close()
            answers = await asyncio.gather(*posts)
            return answers, await until(lambda m: re.search(status_499, m))

    with _running(_Slow(predictor, 1.0), max_batch_size=1, max_queue=1, max_texts=1, workers=1,
                  queue_wait_ms=5000) as base:
        answers, metrics = asyncio.run(scenario(base, int(base.rsplit(":", 1)[1])))
        assert [r.status_code for r in answers] == [200, 200] and 'status="500"' not in metrics


def test_requests_waiting_for_room_are_let_in_after_a_failed_batch(predictor):
    # the waiting room was woken only after answered batches: after failed ones a waiting request waited for the next
    # answered batch, here in vain (both batches ahead of it fail), and got its 503 at the end of queue_wait_ms
    async def scenario(base):
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            def until(holds):
                return _until(client, holds)

            posts = await _fill_the_queue(client)
            posts.append(asyncio.ensure_future(client.post("/v1/predict", json={"text": "c"})))
            await until(lambda m: _metric(m, "emocompress_waiting_for_room") == 1)  # "c" waits for room
            return await asyncio.gather(*posts)

    with _running(_Slow(predictor, 1.0, fail_first=2), max_batch_size=1, max_queue=1, max_texts=1, workers=1,
                  queue_wait_ms=5000) as base:
        answers = asyncio.run(scenario(base))
        assert [r.status_code for r in answers] == [500, 500, 200]
        assert answers[2].json()["predictions"] == predictor.predict(["c"])


def test_slow_answer_504_and_slow_body_408(predictor):
    with _running(_Slow(predictor, 1.0), timeout_s=0.3) as base:
        late = httpx.post(f"{base}/v1/predict", json={"text": "late"})
        assert late.status_code == 504 and late.json()["limit"] == "timeout_s"

        def slowly():
            yield b'{"text": '
            time.sleep(0.6)
            yield b'"slow"}'

        response = httpx.post(f"{base}/v1/predict", content=slowly())
        assert response.status_code == 408 and "timeout_s=0.3" in response.json()["error"]
        assert httpx.get(f"{base}/health").status_code == 200


def _closed(sock: socket.socket) -> bool:
    """The server closed ``sock`` (waiting up to its timeout to see)."""
    try:
        return sock.recv(1) == b""
    except (TimeoutError, socket.timeout):  # still open
        return False
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_slow_header_senders_are_closed_at_the_header_deadline(predictor, http):
    with _running(predictor, http, header_timeout_s=1.0) as base:
        port = int(base.rsplit(":", 1)[1])
        silent, slow = socket.create_connection(("127.0.0.1", port)), socket.create_connection(("127.0.0.1", port))
        start, closed = time.monotonic(), {}
        try:
            for sock in (silent, slow):
                sock.settimeout(0.25)
            for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n":  # slowloris: never the blank line
                for name, sock in (("silent", silent), ("slow", slow)):
                    if name not in closed and _closed(sock):
                        closed[name] = time.monotonic() - start
                if len(closed) == 2 or time.monotonic() - start > 8:
                    break
                with contextlib.suppress(OSError):  # closed by the server
                    slow.send(bytes([byte]))
                time.sleep(0.25)
        finally:
            silent.close()
            slow.close()
        assert set(closed) == {"silent", "slow"}, closed
        assert all(0.9 <= seconds < 4 for seconds in closed.values()), closed  # generous: a shared CPU
        assert httpx.get(f"{base}/health").status_code == 200
        assert httpx.post(f"{base}/v1/predict", json={"text": "still serving"}).status_code == 200


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_header_deadline_spares_idle_keep_alive_and_split_headers(predictor, http):
    """The deadline counts from a request's first byte: a keep-alive connection idle longer than it between two
    requests, and headers sent in pieces within it, are served."""
    request = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n"
    with _running(predictor, http, header_timeout_s=2.0) as base, \
            socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=5) as sock:
        for pause in (0.0, 3.0):  # 3 s idle: beyond the header deadline, within uvicorn's keep-alive (5 s)
            time.sleep(pause)
            sock.sendall(request[:20])
            time.sleep(0.5)  # a quarter of the deadline between two pieces of the headers
            sock.sendall(request[20:] + b'{"text": "hi!"}')
            assert _response(sock).startswith(b"HTTP/1.1 200"), pause


def _response(sock: socket.socket) -> bytes:
    """One whole HTTP response from ``sock`` (headers and body may come in separate segments)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"<closed>\r\n\r\n"
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(m.group(1)) if (m := re.search(rb"content-length: (\d+)", head, re.I)) else 0
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return head + b"\r\n\r\n" + body


def test_max_padding_cuts_batches_without_changing_answers(folder, predictor):
    """Texts sorted by length are cut into model calls whose padding stays within max_padding of their tokens;
    each answer equals the text's alone (fp32)."""
    texts = [text * (1 + i % 4) for i, text in enumerate(_texts(24, 7))]  # lengths 1x to 4x
    alone = [predictor.predict([text])[0] for text in texts]
    cut = ArtifactPredictor(folder, num_threads=1, batch_size=8)  # max_padding 0.25 by default
    whole = ArtifactPredictor(folder, num_threads=1, batch_size=8, max_padding=None)
    for got in (cut.predict(texts), whole.predict(texts)):
        assert [g["label"] for g in got] == [a["label"] for a in alone]
        assert max(abs(g["probs"][k] - p) for g, a in zip(got, alone) for k, p in a["probs"].items()) < 1e-4
    assert cut.padding_stats["padded_tokens"] <= 0.25 * cut.padding_stats["tokens"]
    assert cut.padding_stats["padded_tokens"] < whole.padding_stats["padded_tokens"]


def test_http_auto_is_httptools_when_installed_else_h11(monkeypatch):
    from emocompress.deploy import protocol

    assert protocol.header_deadline_protocol("auto", 1.0).func.__name__ == "HttpToolsHeaderDeadline"
    monkeypatch.setattr(protocol.importlib.util, "find_spec", lambda name: None)  # httptools not installed
    assert protocol.header_deadline_protocol("auto", 1.0).func is protocol.H11HeaderDeadline
    with pytest.raises(ValueError, match="--http must be auto, httptools or h11, got 'h2'"):
        protocol.header_deadline_protocol("h2", 1.0)


def test_model_failure_is_500_without_internals(predictor):
    with _running(_Slow(predictor, fail=True)) as base:
        response = httpx.post(f"{base}/v1/predict", json={"texts": ["a", "b"]})
        assert response.status_code == 500
        assert response.json() == {"error": "internal error; the server's log has the details"}
        assert "secret" not in response.text and "Traceback" not in response.text
        assert httpx.get(f"{base}/ready").status_code == 200


def test_bad_folder_and_settings_exit_2_in_one_line(tmp_path, capsys):
    for run, argv, message in (
            (main, [str(tmp_path / "missing")], rf"{tmp_path / 'missing'}: not a folder"),
            (main, [str(tmp_path), "--max_queue", "0"], r"--max_queue must be positive, got 0"),
            (main, [str(tmp_path), "--max_queue", "8"], r"--max_queue 8 is below --max_texts 64; raise it"),
            (main, [str(tmp_path), "--max_padding", "-1"], r"--max_padding must be positive, got -1"),
            # the socket layer served 70000 on port 4464, and -1 ended uvicorn with exit code 3
            (main, [str(tmp_path), "--port", "70000"], r"--port must be from 0 to 65535 \(0: a free port\), got 70000"),
            (main, [str(tmp_path), "--port", "-1"], r"--port must be from 0 to 65535"),
            # argparse's own errors came after its usage lines
            (main, [str(tmp_path), "--port", "abc"], r"emocompress serve: error: argument --port: invalid int value"),
            (serve_main, [str(tmp_path), "--input", str(tmp_path / "nope.txt")],
             r"python -m emocompress.deploy.serve: error: --input .*nope\.txt does not exist"),
            # python -m emocompress.deploy.serve with --port is this server
            (serve_main, [str(tmp_path / "missing"), "--port", "0"], r"emocompress serve: error: .*not a folder")):
        with pytest.raises(SystemExit) as exit_info:
            run(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_a_port_in_use_exits_2_naming_it(folder, capsys, monkeypatch):
    # uvicorn logged the bind error and exited 3 (docs/serving.md said 1), a code no other command ends with
    monkeypatch.setattr("emocompress.deploy.http._exit_on", lambda *args: None)  # keep pytest's own signal handlers
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            main([str(folder), "--port", str(port)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("address already in use" in line for line in err[:-1])  # uvicorn's reason, above ours
    assert err[-1] == (f"emocompress serve: error: --host 127.0.0.1 --port {port}: cannot listen there (the line above "
                       "says why); give a free --port, or an address of this machine as --host")


@pytest.mark.slow
def test_command_refuses_a_bad_folder_without_torch(tmp_path):
    done = subprocess.run([sys.executable, "-c", _BLOCKED_CLI, "serve", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith(f"emocompress serve: error: {tmp_path / 'missing'}: not a folder; ")


@pytest.mark.slow
def test_sigterm_drains_requests_in_flight_then_exits_0(folder, tmp_path):
    port = _free_port()
    # max_wait_ms 2000: a lone request waits 2 s in the batcher, so it is in flight when SIGTERM comes
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-c", _BLOCKED_CLI, "serve", str(folder), "--port", str(port),
                               "--max_wait_ms", "2000", "--drain_s", "20"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        for _ in range(300):  # bounded: 30 s
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        result = {}
        client = threading.Thread(target=lambda: result.update(r=httpx.post(
            f"http://127.0.0.1:{port}/v1/predict", json={"texts": ["i feel happy", "furious"]}, timeout=30)))
        started = time.monotonic()
        client.start()
        for _ in range(100):  # until the request waits in the batcher (bounded: 10 s; a fixed sleep lost the race)
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            if _metric(metrics, "emocompress_queue_depth") == 2:
                break
            time.sleep(0.1)
        server.send_signal(signal.SIGTERM)
        client.join(timeout=30)
        assert server.wait(timeout=30) == 0
        assert result["r"].status_code == 200 and len(result["r"].json()["predictions"]) == 2
        assert time.monotonic() - started >= 1.9  # answered after its wait, not cut short
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        server.kill()
        out, err = server.communicate()
    access = [line for line in err.splitlines() if '"POST /v1/predict" 200' in line or '"GET /ready"' in line]
    assert len([line for line in access if "POST" in line]) == 1, err
    assert "Traceback" not in err, err


def test_batcher_merges_up_to_max_batch_size_and_runs_workers_at_once():
    calls, both = [], threading.Barrier(2, timeout=5)

    def predict(texts):
        calls.append(list(texts))
        if len(calls) <= 2:
            both.wait()  # passes only if the first two model calls run at the same time
        return [{"label": text.upper()} for text in texts]

    async def scenario():
        batcher = Batcher(predict, max_batch_size=4, max_wait_ms=50, workers=2)
        batcher.start()
        try:
            requests = [["a", "b"], ["c"], ["d", "e"], ["f", "g", "h", "i", "j"], ["k"]]
            answers = await asyncio.gather(*(batcher.submit(texts) for texts in requests))
            assert answers == [[{"label": t.upper()} for t in texts] for texts in requests]
            # a request is never split: [d, e] does not fit beside [a, b] + [c]; the 5 texts run alone
            assert calls[:3] == [["a", "b", "c"], ["d", "e"], ["f", "g", "h", "i", "j"]] and calls[3] == ["k"]
            with pytest.raises(asyncio.TimeoutError):  # a caller that gives up leaves nothing queued behind
                await asyncio.wait_for(batcher.submit(["x"] * 3), 0.001)
            assert batcher.queued == 0
        finally:
            await batcher.stop()

    asyncio.run(scenario())


def test_a_lone_request_runs_at_once_and_a_linger_waits():
    async def answer_after(max_wait_ms: float) -> float:
        batcher = Batcher(lambda texts: [{"label": t} for t in texts], max_wait_ms=max_wait_ms)
        batcher.start()
        try:
            start = time.monotonic()
            assert await batcher.submit(["a"]) == [{"label": "a"}]
            return time.monotonic() - start
        finally:
            await batcher.stop()

    assert asyncio.run(answer_after(0)) < 0.15  # the default: no wait for company (generous: a shared CPU)
    assert asyncio.run(answer_after(300)) >= 0.29  # the optional linger


def test_requests_arriving_while_the_worker_is_busy_form_the_next_batch():
    calls, entered, release = [], threading.Event(), threading.Event()

    def predict(texts):
        calls.append(list(texts))
        entered.set()
        assert release.wait(5)  # the first call holds the only worker until the others have queued
        return [{"label": text.upper()} for text in texts]

    async def scenario():
        batcher = Batcher(predict, max_batch_size=4, workers=1)
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(["a"]))
            await asyncio.get_running_loop().run_in_executor(None, entered.wait, 5)
            requests = [["b"], ["c", "d"], ["e"], ["f", "g"]]  # the last does not fit beside the first three
            later = [asyncio.ensure_future(batcher.submit(texts)) for texts in requests]
            while batcher.queued < 6:
                await asyncio.sleep(0.01)
            release.set()
            assert await first == [{"label": "A"}]
            answers = await asyncio.gather(*later)
            assert answers == [[{"label": t.upper()} for t in texts] for texts in requests]
        finally:
            await batcher.stop()

    asyncio.run(scenario())
    assert calls == [["a"], ["b", "c", "d", "e"], ["f", "g"]]


def test_a_busy_worker_takes_the_next_batch_without_the_event_loop():
    calls, entered = [], threading.Event()

    def predict(texts):
        calls.append(list(texts))
        entered.set()
        time.sleep(0.02)
        return [{"label": text.upper()} for text in texts]

    async def scenario():
        batcher = Batcher(predict, max_batch_size=1, workers=1)
        batcher.start()
        try:
            futures = [batcher.submit([text]) for text in "abcde"]
            await asyncio.get_running_loop().run_in_executor(None, entered.wait, 5)
            time.sleep(0.5)  # the event loop is blocked (as by a storm of requests): the worker goes on alone
            ran_meanwhile = len(calls)
            assert await asyncio.gather(*futures) == [[{"label": text.upper()}] for text in "abcde"]
            return ran_meanwhile
        finally:
            await batcher.stop()

    assert asyncio.run(scenario()) == 5  # one (the batch already running) if each batch waited for the loop
    assert calls == [[text] for text in "abcde"]


def test_concurrent_submits_and_cancellations_lose_or_mix_nothing():
    import random

    rng, predicted = random.Random(0), []

    def predict(texts):
        predicted.extend(texts)
        time.sleep(rng.random() / 500)  # calls of 0-2 ms, so the two workers and the loop interleave
        return [{"label": text} for text in texts]

    async def scenario():
        batcher = Batcher(predict, max_batch_size=5, max_queue=10_000, workers=2)
        batcher.start()
        try:
            requests = [[f"r{i}t{j}" for j in range(rng.randint(1, 7))] for i in range(300)]
            futures = []
            for texts in requests:
                futures.append(batcher.submit(texts))
                if rng.random() < 0.2:
                    await asyncio.sleep(0)  # let batches start between arrivals
            for future in futures[::7]:  # some callers give up, maybe while their batch runs
                future.cancel()
            answers = await asyncio.gather(*futures, return_exceptions=True)
            assert batcher.queued == 0 and not batcher._pending
            return requests, answers
        finally:
            await batcher.stop()

    requests, answers = asyncio.run(scenario())
    for texts, answer in zip(requests, answers):
        assert isinstance(answer, asyncio.CancelledError) or answer == [{"label": text} for text in texts]
    assert sum(not isinstance(answer, BaseException) for answer in answers) >= 250
    assert len(predicted) == len(set(predicted))  # no text predicted twice


def test_what_is_queued_is_shared_among_idle_workers():
    calls, both = [], threading.Barrier(2, timeout=5)

    def predict(texts):
        calls.append(len(texts))
        both.wait()  # passes only if the two model calls run at the same time
        return [{"label": text} for text in texts]

    async def scenario():
        batcher = Batcher(predict, max_batch_size=8, workers=2)
        batcher.start()
        try:
            texts = [f"t{i}" for i in range(7)]
            answers = await asyncio.gather(*(batcher.submit([text]) for text in texts))
            assert answers == [[{"label": text}] for text in texts]
        finally:
            await batcher.stop()

    asyncio.run(scenario())
    assert sorted(calls) == [3, 4]  # not 7 beside an idle worker


def test_page_shows_the_label_and_a_bar_per_emotion(url, predictor):
    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("no /usr/bin/chromium (Debian's chromium package)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors = []
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            page.fill("#text", "i feel so happy today")
            page.click("#predict")
            page.wait_for_selector("#bars .row", timeout=10_000)
            expected = predictor.predict(["i feel so happy today"])[0]
            assert page.inner_text("#label") == expected["label"]
            rows = page.query_selector_all("#bars .row")
            assert [row.get_attribute("data-label") for row in rows] == predictor.labels
            widths = [float(row.query_selector(".bar").evaluate("e => e.style.width").rstrip("%")) for row in rows]
            assert widths == pytest.approx([100 * p for p in expected["probs"].values()], abs=0.06)
            assert page.query_selector(".row.top").get_attribute("data-label") == expected["label"]
            page.fill("#text", "x" * 201)  # over max_chars: the page shows the server's message
            page.click("#predict")
            page.wait_for_function("document.getElementById('error').textContent.includes('max_chars')")
            assert not errors or all("422" in e for e in errors), errors
        finally:
            browser.close()
