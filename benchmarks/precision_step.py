"""One MiniLM training step in fp32 and in bf16 autocast on this CPU: is bf16 worth it here?

    python benchmarks/precision_step.py --steps 12

bf16 is fast only where the CPU computes it in hardware (AVX512-BF16, AMX); elsewhere torch emulates it.
Times forward, backward and a fused AdamW step of the packaged all-MiniLM-L6-v2 on a random batch of
``batch_size`` texts of ``tokens`` tokens, and prints the median step after one untimed step, and the part of
it spent in the optimizer (gradient clipping, AdamW, zeroing): the most a training loop could save without
computing less.

    python benchmarks/precision_step.py --compile --tokens 16 24 32

adds bf16 steps of ``torch.compile(model, dynamic=True)`` at each length (one graph for all of them), and
the seconds its first steps took to compile.
"""

import argparse
import statistics
import time

import torch
from transformers import AutoModelForSequenceClassification

from emocompress.hardware import cpu_has_native_bf16
from emocompress.models import pretrained


def step_seconds(model, optimizer, batch, labels, bf16: bool, steps: int) -> tuple[float, float]:
    """Median seconds of a whole step and of its optimizer part."""
    times, optimizer_times = [], []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(**batch).logits
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        middle = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
        optimizer_times.append(time.perf_counter() - middle)
    return statistics.median(times[1:]), statistics.median(optimizer_times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--bf16_steps", type=int, default=3, help="fewer: emulated bf16 takes seconds a step")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--tokens", type=int, nargs="+", default=[24], help="one or more sequence lengths")
    parser.add_argument("--compile", action="store_true", help="also time bf16 steps of the compiled model")
    args = parser.parse_args()
    torch.manual_seed(0)
    path = pretrained.resolve(pretrained.PACKAGED_MINILM)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=6).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    labels = torch.randint(0, 6, (args.batch_size,))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_native_bf16()}")
    runs = [("fp32", model, False, args.steps), ("bf16 autocast", model, True, args.bf16_steps)]
    if args.compile:
        # one graph with a symbolic length rather than one per length; the first call of each new shape
        # may still recompile, so the untimed first step of every length absorbs that
        compiled = torch.compile(model, dynamic=True)
        start = time.perf_counter()
        for tokens in args.tokens:
            step_seconds(compiled, optimizer, random_batch(args.batch_size, tokens), labels, True, 1)
        print(f"torch.compile: first steps at {args.tokens} tokens took {time.perf_counter() - start:.0f} s")
        runs.append(("bf16 compiled", compiled, True, args.bf16_steps))
    for tokens in args.tokens:
        batch = random_batch(args.batch_size, tokens)
        for name, forward, bf16, steps in runs:
            seconds, in_optimizer = step_seconds(forward, optimizer, batch, labels, bf16, steps)
            print(f"{tokens:3d} tokens  {name:<14}{seconds * 1e3:8.0f} ms a step  {args.batch_size / seconds:7.1f} "
                  f"samples/s  (clip + AdamW + zero_grad {in_optimizer * 1e3:.0f} ms)")


def random_batch(batch_size: int, tokens: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(1000, 20000, (batch_size, tokens)),
            "attention_mask": torch.ones(batch_size, tokens, dtype=torch.long)}


if __name__ == "__main__":
    main()
