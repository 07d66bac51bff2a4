"""Which ONNX Runtime INT8 weight format keeps a model closest to its fp32 labels on this CPU?

    python benchmarks/int8_weights.py --model logs/teacher/version_0/hf_model --data ../shared/data/emotion/test.txt

Exports the model once to fp32 ONNX (``export_onnx``: fused attention), then quantizes that file with
``onnxruntime.quantization.quantize_dynamic`` four ways (8 or 7 bits, per tensor or per output channel,
embeddings included as ``quantize`` does with ``include_embeddings``). For each it prints the share of texts
whose label equals the fp32 model's, macro F1 against the gold labels, the mean absolute logit change, and the
median latency at batch 1 over interleaved rounds. On CPUs without VNNI the kernels add pairs of u8 x s8
products in saturating int16, which 8-bit weights can overflow; 7 bits (``reduce_range``) cannot.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic
from sklearn.metrics import f1_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from emocompress.artifact_format import ONNX_FILE
from emocompress.artifacts import export_onnx

SETTINGS = {"8-bit, per tensor": {}, "7-bit, per tensor": {"reduce_range": True},
            "8-bit, per channel": {"per_channel": True},
            "7-bit, per channel": {"per_channel": True, "reduce_range": True}}


def read_split(path: Path) -> tuple[list[str], list[str]]:
    rows = [line.rsplit(";", 1) for line in path.read_text().splitlines() if line.strip()]
    return [text for text, _ in rows], [label for _, label in rows]


def logits(session, tokenizer, texts, batch_size=64) -> np.ndarray:
    names = {i.name for i in session.get_inputs()}
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=128,
                          return_tensors="np")
        out.append(session.run(["logits"], {k: v for k, v in batch.items() if k in names})[0])
    return np.concatenate(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a fine-tuned hf_model folder")
    parser.add_argument("--data", type=Path, required=True, help="a text;label file, e.g. the test split")
    parser.add_argument("--latency_texts", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model)
    texts, labels = read_split(args.data)
    gold = np.array([model.config.label2id[label] for label in labels])
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    with tempfile.TemporaryDirectory() as tmp:
        fp32_file = export_onnx(model, Path(tmp) / "fp32", tokenizer) / ONNX_FILE
        sessions = {"fp32": ort.InferenceSession(str(fp32_file), options)}
        for name, extra in SETTINGS.items():
            out = Path(tmp) / f"{len(sessions)}.onnx"
            # the optimizer's fused ops carry no inferred types; they are all float (as in `quantize`)
            quantize_dynamic(str(fp32_file), str(out), weight_type=QuantType.QInt8, **extra,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            sessions[name] = ort.InferenceSession(str(out), options)
        reference = logits(sessions["fp32"], tokenizer, texts)
        singles = [dict(tokenizer([t], return_tensors="np")) for t in texts[:args.latency_texts]]
        times = {name: [] for name in sessions}
        for _ in range(args.rounds):  # interleaved, so drift of a shared machine hits every format alike
            for name, session in sessions.items():
                names = {i.name for i in session.get_inputs()}
                start = time.perf_counter()
                for batch in singles:
                    session.run(["logits"], {k: v for k, v in batch.items() if k in names})
                times[name].append((time.perf_counter() - start) / len(singles) * 1000)
        print("| weights | labels equal to fp32 | macro F1 | mean abs logit change | latency, batch 1 (ms) |")
        print("|---|---|---|---|---|")
        for name, session in sessions.items():
            out = reference if name == "fp32" else logits(session, tokenizer, texts)
            agree = (out.argmax(-1) == reference.argmax(-1)).mean()
            f1 = f1_score(gold, out.argmax(-1), average="macro")
            print(f"| {name} | {agree:.1%} | {f1:.4f} | {np.abs(out - reference).mean():.3f} | "
                  f"{statistics.median(times[name]):.2f} ({min(times[name]):.2f}-{max(times[name]):.2f}) |")


if __name__ == "__main__":
    main()
