"""Offline sizing of `emocompress serve`: how to spend the cores, and whether a linger pays. No HTTP, no clients
over sockets: the predictor and the batcher in one process, configurations interleaved round by round, so a
machine shared with other work slows them alike (compare the ratios, not the absolute numbers).

    PYTHONPATH=$PWD/src python benchmarks/serve_sizing.py --folder FOLDER --data ../shared/data/emotion/test.txt

1. Model calls: texts per second and ms per call of one call at a time on every core (``1x<cores>``) against one
   call per core on one thread each (``<cores>x1``), at batches of 1, 8 and 32 texts.
2. The batcher: closed-loop clients sending one text each (1, 8, 32 of them) through ``Batcher``, with both ways of
   spending the cores, ``max_wait_ms`` 0 against a linger of 2 and 5 ms.
"""

import argparse
import asyncio
import concurrent.futures
import json
import os
import statistics
import time

from emocompress.deploy.batching import Batcher
from emocompress.deploy.serve import ArtifactPredictor


def _calls(predictor: ArtifactPredictor, texts: list[str], batch: int, workers: int, seconds: float) -> dict:
    """``workers`` threads calling ``predictor.predict`` on batches of ``batch`` texts for ``seconds``."""
    stop = time.monotonic() + seconds

    def loop(offset: int) -> list[float]:
        times, i = [], offset
        while time.monotonic() < stop:
            chunk = [texts[(i + k) % len(texts)] for k in range(batch)]
            start = time.perf_counter()
            predictor.predict(chunk)
            times.append(time.perf_counter() - start)
            i += batch * workers
        return times

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        times = [t for part in pool.map(loop, [w * batch for w in range(workers)]) for t in part]
    return {"texts_per_s": len(times) * batch / seconds, "ms_per_call": 1000 * statistics.median(times)}


async def _clients(predictor, texts: list[str], clients: int, max_wait_ms: float, workers: int,
                   seconds: float, max_batch_size: int) -> dict:
    sizes = []
    batcher = Batcher(predictor.predict, max_batch_size, max_wait_ms, max_queue=4096, on_batch=sizes.append,
                      workers=workers)
    batcher.start()
    latencies, stop = [], time.monotonic() + seconds

    async def client(offset: int):
        i = offset
        while time.monotonic() < stop:
            start = time.perf_counter()
            await batcher.submit([texts[i % len(texts)]])
            latencies.append(time.perf_counter() - start)
            i += clients

    await asyncio.gather(*(client(c) for c in range(clients)))
    await batcher.stop()
    latencies.sort()
    return {"req_per_s": len(latencies) / seconds, "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)], "mean_batch": statistics.mean(sizes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", required=True, help="artifact folder (ORT INT8, fp32 or OpenVINO)")
    parser.add_argument("--data", required=True, help="text file, one 'text;label' per line")
    parser.add_argument("--seconds", type=float, default=3.0, help="per configuration and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max_batch_size", type=int, default=8)
    parser.add_argument("--out", help="JSON file for the medians over rounds")
    args = parser.parse_args()
    texts = [line.rsplit(";", 1)[0] for line in open(args.data, encoding="utf-8").read().splitlines()[:512]]
    cores = len(os.sched_getaffinity(0))
    # One predictor per thread count; the server shares one among its workers too.
    predictors = {n: ArtifactPredictor(args.folder, n, batch_size=64) for n in sorted({1, cores})}
    runs = {}
    for _ in range(args.rounds):
        for batch in (1, 8, 32):
            for workers, threads in ((1, cores), (cores, 1)):
                key = f"calls batch {batch} {workers}x{threads}"
                runs.setdefault(key, []).append(_calls(predictors[threads], texts, batch, workers, args.seconds))
        for clients in (1, 8, 32):
            for workers, threads in ((1, cores), (cores, 1)):
                for linger in (0.0, 2.0, 5.0):
                    key = f"batcher {clients} clients {workers}x{threads} max_wait_ms {linger:g}"
                    runs.setdefault(key, []).append(asyncio.run(_clients(
                        predictors[threads], texts, clients, linger, workers, args.seconds, args.max_batch_size)))
    medians = {key: {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]} for key, rows in runs.items()}
    for key, row in medians.items():
        print(f"{key:40s} {json.dumps(row)}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            json.dump({"folder": args.folder, "cores": cores, "rounds": args.rounds, "seconds": args.seconds,
                       "medians": medians, "runs": runs}, out, indent=1)


if __name__ == "__main__":
    main()
