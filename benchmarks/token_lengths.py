"""Token lengths of a data set's train texts under a model's tokenizer: does ``max_length`` 128 hold?

    python benchmarks/token_lengths.py --data ../shared/data/goemotions_ekman
    python benchmarks/token_lengths.py --data ../shared/data/emotion
"""

import argparse

from emocompress.data.sources import DataSource
from emocompress.models import pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a data folder, as data.data of a run")
    parser.add_argument("--model_name", default=pretrained.PACKAGED_MINILM, help="whose tokenizer")
    parser.add_argument("--max_length", type=int, default=128)
    args = parser.parse_args()
    texts = list(DataSource(args.data).read("train")["text"])
    tokenizer = pretrained.load_tokenizer(args.model_name)
    lengths = sorted(len(ids) for ids in tokenizer(texts)["input_ids"])  # special tokens included
    n = len(lengths)
    print(f"{args.data}: {n} train texts, tokens mean {sum(lengths) / n:.1f}, median {lengths[n // 2]}, "
          f"99th percentile {lengths[int(0.99 * n)]}, max {lengths[-1]}, "
          f"past {args.max_length}: {sum(length > args.max_length for length in lengths)}")


if __name__ == "__main__":
    main()
