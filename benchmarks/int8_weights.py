"""Which ONNX Runtime INT8 weight format keeps a model closest to its fp32 labels on this CPU?

    python benchmarks/int8_weights.py --model logs/teacher/version_0/hf_model --data ../shared/data/emotion

Exports the model once to fp32 ONNX (``export_onnx``: fused attention), then quantizes that file four ways with
``quantize_onnx_file`` (8 or 7 bits, per tensor or per output channel, embeddings included as ``quantize`` does
with ``include_embeddings``). For each it prints the share of texts whose label equals the fp32 model's, macro
F1 against the gold labels, the mean absolute logit change, and the latency at batch 1: the median over
interleaved rounds (``emocompress.benchmark.timing.interleaved_times``) of each round's median call, with the least
and greatest round. On CPUs without VNNI the kernels add pairs of u8 x s8 products in saturating int16, which
8-bit weights can overflow; 7 bits (``reduce_range``) cannot.
"""

import argparse
import tempfile
from pathlib import Path

import torch
from sklearn.metrics import f1_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from emocompress.benchmark.timing import interleaved_times, percentile
from emocompress.compression.export import export_onnx, quantize_onnx_file
from emocompress.data.sources import DataSource
from emocompress.deploy.format import ONNX_FILE
from emocompress.models.loading import OrtClassifier

SETTINGS = {"8-bit, per tensor": {"per_channel": False, "reduce_range": False},
            "7-bit, per tensor": {"per_channel": False, "reduce_range": True},
            "8-bit, per channel": {"per_channel": True, "reduce_range": False},
            "7-bit, per channel": {"per_channel": True, "reduce_range": True}}


@torch.inference_mode()
def logits(model, tokenizer, texts, batch_size=64) -> torch.Tensor:
    return torch.cat([model(**tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=128,
                                        return_tensors="pt")).logits for i in range(0, len(texts), batch_size)])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a fine-tuned hf_model folder")
    parser.add_argument("--data", required=True, help="a data set, as data.data of the configs")
    parser.add_argument("--split", default="test")
    parser.add_argument("--latency_texts", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model)
    rows = DataSource(args.data).read(args.split)
    texts, gold = rows["text"], [model.config.label2id[label] for label in rows["label"]]
    with tempfile.TemporaryDirectory() as tmp:
        fp32_file = export_onnx(model, Path(tmp) / "fp32", tokenizer) / ONNX_FILE
        models = {"fp32": OrtClassifier(fp32_file, model.config, args.threads)}
        for name, options in SETTINGS.items():
            out = Path(tmp) / f"{len(models)}.onnx"
            quantize_onnx_file(fp32_file, out, **options)
            models[name] = OrtClassifier(out, model.config, args.threads)
        singles = [tokenizer([text], return_tensors="pt") for text in texts[:args.latency_texts]]
        times = interleaved_times({name: (lambda batch, m=m: m(**batch)) for name, m in models.items()}, singles,
                                  args.rounds, args.warmup)
        reference = logits(models["fp32"], tokenizer, texts)
        print("| weights | labels equal to fp32 | macro F1 | mean abs logit change | latency, batch 1 (ms) |")
        print("|---|---|---|---|---|")
        for name, m in models.items():
            out = reference if name == "fp32" else logits(m, tokenizer, texts)
            agree = (out.argmax(-1) == reference.argmax(-1)).float().mean()
            f1 = f1_score(gold, out.argmax(-1), average="macro")
            medians = [percentile(r, 50) for r in times[name]]
            print(f"| {name} | {agree:.1%} | {f1:.4f} | {(out - reference).abs().mean():.3f} | "
                  f"{percentile(medians, 50):.2f} ({min(medians):.2f}-{max(medians):.2f}) |")


if __name__ == "__main__":
    main()
