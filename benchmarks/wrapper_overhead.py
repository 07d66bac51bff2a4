"""What does our wrapper add to a call of the bare runtime? (issue 30: at most 5%)

    PYTHONPATH=$PWD/src python benchmarks/wrapper_overhead.py --data ../shared/data/emotion \\
        --folders logs/int8/version_0/int8 logs/openvino_int8/version_0/openvino_int8 --out OUT

Wall-clock ratios on a shared 2-core machine swing by ±25% between runs (reports/runtimes, run 5-7), far more
than the wrapper could cost. So everything here runs on one thread (ONNX Runtime ``intra_op_num_threads=1``,
``inter_op_num_threads=1``; OpenVINO ``INFERENCE_NUM_THREADS=1``; the tokenizer's own thread pool off), where
inference runs on the calling thread, and each call is timed in *this thread's CPU time* (``time.thread_time``),
which other processes preempting us do not add to. Each block also records the process's CPU time and the wall
time, and the table prints both ratios: thread/process CPU near 1 says no work ran on threads we do not count,
thread CPU/wall near 1 says the machine was quiet.

For each artifact folder (ONNX Runtime ``model.onnx`` or OpenVINO ``model.xml``), at batch 1 and batch 32
(``--batch_sizes``), on the same test texts in file order:
  * pre-tokenized, same (B, T) int64 inputs: the bare runtime (``session.run(None, feeds)[0]``, or
    ``compiled(feeds)[0]`` of OpenVINO) against ``open_runtime(...).logits`` (the deploy layer ``serve`` uses) and
    ``load_artifact(folder)(**tensors).logits``; all three call the one session (compiled model) ``load_artifact``
    opened;
  * end to end, texts in, label and probabilities out: the bare runtime behind the same ``tokenizers`` tokenizer
    (padding to the longest, truncation to the folder's ``max_length``), softmax and argmax, against
    ``ArtifactPredictor.predict`` (``serve``'s predictor).
Variants of one setting are timed in ``--blocks`` interleaved blocks of ``--calls`` calls (``--calls_batched``
at batch > 1; ``emocompress.benchmark.timing.interleaved_times``, each block starting with another variant).
Overhead: the median over blocks of (variant's median call / the bare runtime's median call in the same block)
- 1, with a 95% bootstrap interval over blocks, and the median per-call difference in µs.
"""

import argparse
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # encode_batch on the calling thread, where its time is counted

import numpy as np
import torch

from emocompress.benchmark.timing import interleaved_times
from emocompress.data.sources import DataSource
from emocompress.deploy.format import read_metadata
from emocompress.deploy.serve import ArtifactPredictor, _softmax
from emocompress.evaluation.significance import bootstrap_indices
from emocompress.hardware import cpu_info
from emocompress.models.loading import load_artifact


def bare_runtime(runtime):
    """(``feeds -> (B, C) logits`` through the runtime's own API, the graph's input names) of our runtime's session
    or compiled model: the same object the wrappers call, so only the wrapper's code differs (two sessions of one
    file differ by a few percent in speed: their weights sit at other addresses)."""
    if hasattr(runtime, "session"):  # ONNX Runtime
        return (lambda feeds: runtime.session.run(None, feeds)[0]), runtime.input_names
    return (lambda feeds: runtime.compiled(feeds)[0]), runtime.input_names  # OpenVINO, its own infer request


def bare_encoder(folder: Path, names: list[str]):
    """``texts -> feeds``: the folder's ``tokenizers`` tokenizer as a practitioner would call it (padding on the
    right to the longest text, truncation to ``max_length``), (B, T) int64 arrays of the graph's inputs ``names``."""
    from tokenizers import Tokenizer

    meta = read_metadata(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(meta.max_length)
    tokenizer.enable_padding(pad_id=meta.pad_id or 0, pad_token=meta.pad_token or "[PAD]")
    fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}

    def encode(texts: list[str]) -> dict[str, np.ndarray]:
        encodings = tokenizer.encode_batch(texts)
        return {n: np.array([getattr(e, fields[n]) for e in encodings], dtype=np.int64) for n in names}
    return encode


def variants(folder: Path, texts: list[str], batch_size: int) -> dict[str, tuple[dict, list]]:
    """setting -> (name -> call of one input, the inputs); the first name of a setting is its bare baseline."""
    classifier = load_artifact(folder, num_threads=1)
    # one call per batch, as the bare call makes: the wrapper's cost, not its length cuts
    predictor = ArtifactPredictor(folder, num_threads=1, batch_size=batch_size, max_padding=None)
    predictor.runtime = classifier.runtime  # one session (or compiled model) under every variant
    run, names = bare_runtime(classifier.runtime)
    encode = bare_encoder(folder, names)
    batches = [texts[s:s + batch_size] for s in range(0, len(texts) - batch_size + 1, batch_size)]
    feeds = [encode(b) for b in batches]
    tensors = [{n: torch.from_numpy(a) for n, a in f.items()} for f in feeds]
    labels = predictor.labels

    def pipeline(texts: list[str]):  # texts -> labels and probabilities, as ArtifactPredictor answers
        probs = _softmax(run(encode(texts)))
        return [labels[i] for i in probs.argmax(-1)], probs

    tokenized = {"bare runtime": lambda i: run(feeds[i]),
                 "open_runtime().logits": lambda i: classifier.runtime.logits(feeds[i]),
                 "load_artifact()(**tensors)": lambda i: classifier(**tensors[i]).logits}
    texts_in = {"tokenizer + bare runtime + softmax": lambda i: pipeline(batches[i]),
                "ArtifactPredictor.predict": lambda i: predictor.predict(batches[i])}
    inputs = list(range(len(batches)))
    return {"pre-tokenized": (tokenized, inputs), "texts in, labels out": (texts_in, inputs)}


def measure(fns: dict, inputs: list, blocks: int, warmup: int, resamples: int = 2000) -> dict:
    """Time ``fns`` in interleaved blocks of thread CPU time; overheads against the first of ``fns``."""
    totals = {name: {"process_ms": 0.0, "wall_ms": 0.0} for name in fns}

    @contextmanager
    def meter(name):  # the whole block in process CPU and wall time, to check what thread time misses
        process, wall = time.process_time(), time.perf_counter()
        yield
        totals[name]["process_ms"] += (time.process_time() - process) * 1e3
        totals[name]["wall_ms"] += (time.perf_counter() - wall) * 1e3

    times = interleaved_times(fns, inputs, blocks, warmup, around=meter, clock=time.thread_time)
    medians = {name: np.median(np.array(t), axis=1) for name, t in times.items()}  # (blocks,) ms
    bare = list(fns)[0]
    idx = bootstrap_indices(blocks, resamples, seed=0)
    rows = {}
    for name in fns:
        ratio = medians[name] / medians[bare]
        thread_ms = float(np.sum(times[name]))
        rows[name] = {"call_ms": float(np.median(medians[name])),
                      "overhead": float(np.median(ratio) - 1),
                      "overhead_low": float(np.percentile(np.median(ratio[idx], axis=1), 2.5) - 1),
                      "overhead_high": float(np.percentile(np.median(ratio[idx], axis=1), 97.5) - 1),
                      "overhead_us": float(np.median(medians[name] - medians[bare]) * 1e3),
                      "thread_over_process": thread_ms / totals[name]["process_ms"],
                      "thread_over_wall": thread_ms / totals[name]["wall_ms"]}
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folders", nargs="+", required=True, help="ONNX Runtime or OpenVINO artifact folders")
    parser.add_argument("--data", required=True, help="a data set, as data.data of the configs (its test texts)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--calls", type=int, default=50, help="calls per block at batch 1")
    parser.add_argument("--calls_batched", type=int, default=4, help="calls per block at larger batch sizes")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", help="folder for results.json (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    test = DataSource(args.data).read("test")["text"]
    results = []
    for folder in map(Path, args.folders):
        for batch_size in args.batch_sizes:
            calls = args.calls if batch_size == 1 else args.calls_batched
            for setting, (fns, inputs) in variants(folder, test[:calls * batch_size], batch_size).items():
                rows = measure(fns, inputs, args.blocks, min(args.warmup, calls))
                results += [{"folder": str(folder), "batch_size": batch_size, "setting": setting, "variant": name,
                             **row} for name, row in rows.items()]
    lines = ["| folder | batch | setting | variant | CPU ms/call | overhead (95% CI) | µs/call | "
             "thread/process CPU | thread CPU/wall |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {Path(r['folder']).name} | {r['batch_size']} | {r['setting']} | {r['variant']} | "
                     f"{r['call_ms']:.3f} | {r['overhead']:+.2%} ({r['overhead_low']:+.2%}, {r['overhead_high']:+.2%}) "
                     f"| {r['overhead_us']:+.0f} | {r['thread_over_process']:.3f} | {r['thread_over_wall']:.3f} |")
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"args": vars(args), "cpu": cpu_info(), "rows": results},
                                                     indent=2))


if __name__ == "__main__":
    main()
