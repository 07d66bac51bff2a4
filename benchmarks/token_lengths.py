"""Token lengths of a data set's train texts under a model's tokenizer: does ``max_length`` 128 hold? And the
padding per text of batches of ``--batch_size`` test texts, in file order and sorted by length (as ``predict`` and
the benchmark's throughput batch them).

    python benchmarks/token_lengths.py --data ../shared/data/goemotions_ekman
    python benchmarks/token_lengths.py --data ../shared/data/emotion
"""

import argparse

from emocompress.data.sampling import padding_per_text, sort_by_length
from emocompress.data.sources import DataSource
from emocompress.models import pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a data folder, as data.data of a run")
    parser.add_argument("--model_name", default=pretrained.PACKAGED_MINILM, help="whose tokenizer")
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    texts = list(DataSource(args.data).read("train")["text"])
    tokenizer = pretrained.load_tokenizer(args.model_name)
    lengths = sorted(len(ids) for ids in tokenizer(texts)["input_ids"])  # special tokens included
    n = len(lengths)
    print(f"{args.data}: {n} train texts, tokens mean {sum(lengths) / n:.1f}, median {lengths[n // 2]}, "
          f"99th percentile {lengths[int(0.99 * n)]}, max {lengths[-1]}, "
          f"past {args.max_length}: {sum(length > args.max_length for length in lengths)}")
    test = list(DataSource(args.data).read("test")["text"])
    kept = [len(ids) for ids in tokenizer(test, truncation=True, max_length=args.max_length)["input_ids"]]
    print(f"{len(test)} test texts in batches of {args.batch_size}: padding tokens per text "
          f"{padding_per_text(kept, range(len(kept)), args.batch_size):.2f} in file order, "
          f"{padding_per_text(kept, sort_by_length(kept), args.batch_size):.2f} sorted by length "
          f"(mean length {sum(kept) / len(kept):.1f})")


if __name__ == "__main__":
    main()
