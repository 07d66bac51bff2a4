"""Which runtime serves a model fastest at batch 1 and batch 32, ours against what a practitioner would pick?

    python benchmarks/runtimes.py --model logs/teacher/version_0/hf_model --data ../shared/data/emotion \\
        --test_texts 200 --rounds 3 --threads 2 --out reports/runtimes

Builds, from one fine-tuned ``hf_model`` folder, in one process:
  * torch fp32 (sdpa attention), the baseline;
  * ours, through ``load_artifact`` (``OrtClassifier``): ONNX Runtime dynamic INT8 (``quantize``, embeddings too,
    the default of ``configs/overlays/quantize.yaml``), also timed as the bare ONNX Runtime session to show what
    the wrapper adds; OpenVINO fp32 (``export_openvino``); OpenVINO INT8 through NNCF, accuracy-controlled on val
    (``export_openvino(precision="int8", validation=...)``, ``configs/overlays/openvino.yaml``), also served with
    ``--inference_precision auto`` (OpenVINO's bf16 float parts where the CPU has them, through ``open_runtime``);
  * the peers at their documented settings, written with their own APIs only: OpenVINO + NNCF post-training INT8
    with ``model_type=TRANSFORMER`` straight from the HF model (``convert_model``, ``nncf.quantize``,
    ``save_model``'s defaults, ``compile_model`` with only the thread count), and ONNX Runtime static QDQ INT8 of
    the MatMuls only (``quant_pre_process``, ``quantize_static``, per-channel, 7-bit weights on CPUs without
    VNNI, 8-bit with it), both calibrated on the same train texts.
  * with ``--nncf_presets``, two more NNCF INT8 IRs of the same model: NNCF's default preset (no model type) and
    the TRANSFORMER type with the PERFORMANCE preset: does quantizing more than the documented setting buy speed?

Then times them in interleaved rounds (``emocompress.benchmark.timing.interleaved_times``, same threads): batch 1 over
the first ``--test_texts`` test texts, and batch 32 over the same texts, once in file order and once sorted by
token count, every variant fed the same padded arrays (the engines alone). And, texts in and class ids out, the same
texts as requests of 32 in file order (what a caller with 32 texts has): the peers as their users call them (the
request tokenized, padded to its longest text, one call), ours through ``ArtifactPredictor`` (the request sorted by
token count and cut into calls where padding would add more than ``max_padding`` of the tokens), one untimed pass
first (OpenVINO compiles kernels for each new input shape once). Macro F1 is each model's on those texts (batches of
32, untimed), with a 95% paired-bootstrap interval of its difference to torch fp32
(``emocompress.evaluation.significance``). Batch 1 is also compared round by round with the faster peer. Prints
markdown tables and writes ``results.json`` to ``--out``.
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from emocompress.benchmark.timing import interleaved_times, percentile
from emocompress.compression.export import export_onnx, quantize
from emocompress.compression.openvino import export_openvino, macro_f1
from emocompress.data.sources import DataSource
from emocompress.deploy.format import ONNX_FILE, OPENVINO_FILE, OPENVINO_WEIGHTS_FILE, read_metadata
from emocompress.deploy.runtime import open_runtime
from emocompress.deploy.serve import ArtifactPredictor
from emocompress.evaluation.significance import bootstrap_indices, paired_difference, resampled_metrics
from emocompress.hardware import cpu_info
from emocompress.models import pretrained
from emocompress.models.loading import load_artifact, load_classifier

NAMES = ("input_ids", "attention_mask", "token_type_ids")


def encode(tokenizer, texts: list[str], max_length: int = 128) -> dict[str, np.ndarray]:
    """(B, T) int64 inputs of ``texts``, padded on the right to the longest."""
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return {n: encoded[n].astype(np.int64) if n in encoded else np.zeros_like(encoded["input_ids"]) for n in NAMES}


def batches(tokenizer, texts: list[str], size: int, by_length: bool) -> list[dict[str, np.ndarray]]:
    order = sorted(range(len(texts)), key=lambda i: len(tokenizer(texts[i])["input_ids"])) if by_length \
        else range(len(texts))
    order = list(order)
    return [encode(tokenizer, [texts[i] for i in order[s:s + size]]) for s in range(0, len(order), size)]


def peer_openvino(model, calibration: list[dict], out: Path, threads: int, **settings):
    """OpenVINO + NNCF INT8 as its documentation shows it for transformers (TRANSFORMER model type), or with
    other ``nncf.quantize`` ``settings``."""
    import nncf
    import openvino as ov

    example = {n: torch.ones(1, 8, dtype=torch.long) for n in NAMES}
    ov_model = ov.convert_model(model, example_input=example)
    settings = {"model_type": nncf.ModelType.TRANSFORMER, **settings}
    quantized = nncf.quantize(ov_model, nncf.Dataset(calibration), subset_size=len(calibration), **settings)
    ov.save_model(quantized, out / "model.xml")
    compiled = ov.Core().compile_model(str(out / "model.xml"), "CPU", {"INFERENCE_NUM_THREADS": threads})
    return (lambda feeds: compiled(feeds)[0]), [out / "model.xml", out / "model.bin"]


def peer_ort_static(model, tokenizer, calibration: list[dict], out: Path, threads: int):
    """ONNX Runtime static QDQ INT8 of the MatMuls, as its quantization guide shows it."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calibration)

        def get_next(self):
            return next(self.items, None)

    fp32 = export_onnx(model, out / "fp32", tokenizer, optimize=False) / ONNX_FILE
    # symbolic shape inference fails on transformers' masks; the ONNX one is enough for the MatMuls
    quant_pre_process(str(fp32), str(out / "pre.onnx"), skip_symbolic_shape=True)
    # 7-bit weights only where the guide advises them: CPUs without VNNI (u8s8 products saturate there)
    vnni = {"avx512_vnni", "avx_vnni"} & set(cpu_info()["cpu_flags"])
    quantize_static(str(out / "pre.onnx"), str(out / "qdq.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=not vnni,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(out / "qdq.onnx"), options, providers=["CPUExecutionProvider"])
    return (lambda feeds: session.run(None, feeds)[0]), [out / "qdq.onnx"]


def ours(model, tokenizer, train: list[str], val: tuple[list[str], list[int]], out: Path, args) -> dict:
    """name -> (call on numpy inputs or on torch tensors, which, the files shipped) for our backends (their folders:
    ``out / "ort_int8"``, ``"ov_fp32"``, ``"ov_int8"``)."""
    ort_int8 = quantize(model, "onnxruntime", include_embeddings=True, out_dir=out / "ort_int8", tokenizer=tokenizer)
    folders = {"ours, OpenVINO fp32": export_openvino(model, out / "ov_fp32", tokenizer),
               "ours, OpenVINO INT8 accuracy-controlled": export_openvino(
                   model, out / "ov_int8", tokenizer, precision="int8", calibration_texts=train, validation=val,
                   max_drop=args.max_drop, calibration_samples=args.calibration)}
    session = load_artifact(out / "ort_int8", args.threads).session
    variants = {
        "ours, ORT dynamic INT8 (bare session)": ((lambda f: session.run(None, f)[0]), "np",
                                                  [out / "ort_int8" / ONNX_FILE]),
        "ours, ORT dynamic INT8 (load_artifact)": (_torch_call(load_artifact(out / "ort_int8", args.threads)), "pt",
                                                   [out / "ort_int8" / ONNX_FILE])}
    del ort_int8
    for name, folder in folders.items():
        variants[name] = (_torch_call(load_artifact(folder, args.threads)), "pt",
                          [folder / OPENVINO_FILE, folder / OPENVINO_WEIGHTS_FILE])
    # the same INT8 folder served with `--inference_precision auto`: OpenVINO's bf16 float parts where the CPU has them
    folder = folders["ours, OpenVINO INT8 accuracy-controlled"]
    runtime = open_runtime(folder / OPENVINO_FILE, read_metadata(folder).labels, args.threads, inference_precision=None)
    variants["ours, OpenVINO INT8 accuracy-controlled, precision auto"] = (
        runtime.logits, "np", [folder / OPENVINO_FILE, folder / OPENVINO_WEIGHTS_FILE])
    return variants


def _torch_call(model):
    return lambda feeds: model(**feeds).logits


def request_calls(variants: dict, tokenizer, out: Path, label2id: dict, threads: int) -> dict:
    """name -> call on a request's texts returning class ids: the peers as their users call them (``encode``: the
    request padded to its longest text, one call), ours through ``ArtifactPredictor`` with its defaults (length cuts
    at ``max_padding``), as ``emocompress serve`` and ``predict`` answer."""
    def padded(call):
        return lambda texts: np.asarray(call(encode(tokenizer, texts))).argmax(-1)

    def predicted(predictor):
        return lambda texts: np.array([label2id[r["label"]] for r in predictor.predict(texts)])

    calls = {name: padded(variants[name][0]) for name in variants if name.startswith("peer: ")}
    for name, folder, precision in (("ORT dynamic INT8", "ort_int8", "f32"), ("OpenVINO INT8", "ov_int8", "f32"),
                                    ("OpenVINO INT8, precision auto", "ov_int8", None)):
        calls[f"ours, {name} (ArtifactPredictor)"] = predicted(
            ArtifactPredictor(out / folder, threads, inference_precision=precision))
    return calls


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a fine-tuned hf_model folder or EmotionClassifier .ckpt (or "
                                                        "the packaged MiniLM, for speed only: its head is untrained)")
    parser.add_argument("--data", required=True, help="a data set, as data.data of the configs")
    parser.add_argument("--test_texts", type=int, default=200)
    parser.add_argument("--val_texts", type=int, default=500, help="val texts of the accuracy control")
    parser.add_argument("--calibration", type=int, default=300, help="train texts that calibrate static INT8")
    parser.add_argument("--max_drop", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--nncf_presets", action="store_true",
                        help="also NNCF's default preset and the TRANSFORMER type's PERFORMANCE preset")
    parser.add_argument("--out", default="reports/runtimes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    source = DataSource(args.data)
    labels = sorted(set(source.read("train")["label"]))
    model_path = pretrained.resolve(args.model)
    if args.model.endswith(".ckpt"):  # an EmotionClassifier checkpoint (e.g. a teacher's best epoch so far)
        model, tokenizer = load_classifier(args.model)
        model.eval()
    elif set(pretrained.load_config(model_path).id2label.values()) == set(labels):
        model, tokenizer = pretrained.load_model(model_path).eval(), pretrained.load_tokenizer(model_path)
    else:  # the packaged MiniLM: a random head, so only the timings and sizes mean anything
        tokenizer = pretrained.load_tokenizer(model_path)
        print(f"{args.model} was not fine-tuned on {labels}: its head is untrained, macro F1 means nothing")
        model = pretrained.load_model(model_path, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                      label2id={n: i for i, n in enumerate(labels)}, ignore_mismatched_sizes=True)
        model.eval()
    label2id = model.config.label2id
    test, val = source.read("test"), source.read("val")
    texts, target = test["text"][:args.test_texts], np.array([label2id[x] for x in test["label"][:args.test_texts]])
    train = source.read("train")["text"][:args.calibration]
    val = (val["text"][:args.val_texts], [label2id[x] for x in val["label"][:args.val_texts]])
    calibration = [encode(tokenizer, [t]) for t in train]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp / "torch")  # the fp32 weights file as shipped
        variants = {"torch fp32": (_torch_call(model), "pt", [tmp / "torch" / "model.safetensors"])}
        variants |= ours(model, tokenizer, train, val, tmp, args)
        (tmp / "peer_ov").mkdir()
        call, files = peer_openvino(model, calibration, tmp / "peer_ov", args.threads)
        variants["peer: OpenVINO + NNCF INT8 (TRANSFORMER)"] = (call, "np", files)
        if args.nncf_presets:  # does quantizing more than the TRANSFORMER preset buy speed?
            import nncf
            for name, settings in {"NNCF default preset (no model type)": {"model_type": None},
                                   "NNCF TRANSFORMER, PERFORMANCE preset": {
                                       "preset": nncf.QuantizationPreset.PERFORMANCE}}.items():
                (tmp / name).mkdir()
                call, files = peer_openvino(model, calibration, tmp / name, args.threads, **settings)
                variants[f"OpenVINO INT8, {name}"] = (call, "np", files)
        call, files = peer_ort_static(model, tokenizer, calibration, tmp, args.threads)
        variants["peer: ORT static QDQ INT8, MatMul only"] = (call, "np", files)
        rows = measure(variants, tokenizer, texts, target, len(labels), args)
        rows[-1]["requests"] = measure_requests(request_calls(variants, tokenizer, tmp, label2id, args.threads),
                                                texts, target, len(labels), args)
    write(rows, args)


def measure(variants: dict, tokenizer, texts: list[str], target: np.ndarray, num_classes: int, args) -> list[dict]:
    inputs = {"singles": [encode(tokenizer, [t]) for t in texts], "batch 32": batches(tokenizer, texts, 32, False),
              "batch 32 sorted": batches(tokenizer, texts, 32, True)}
    as_torch = {k: [{n: torch.from_numpy(a) for n, a in f.items()} for f in v] for k, v in inputs.items()}

    def calls(kind: str) -> dict:
        return {name: (lambda i, c=call, k=k: c((inputs if k == "np" else as_torch)[kind][i]))
                for name, (call, k, _) in variants.items()}

    times = {kind: interleaved_times(calls(kind), list(range(len(inputs[kind]))), args.rounds,
                                     args.warmup if kind == "singles" else 1) for kind in inputs}
    idx = bootstrap_indices(len(target), args.bootstrap, seed=0)
    rows, base = [], None
    batched = calls("batch 32")
    with torch.inference_mode():
        for name, (call, kind, files) in variants.items():
            preds = np.concatenate([np.asarray(batched[name](i)).argmax(-1) for i in range(len(inputs["batch 32"]))])
            samples = resampled_metrics(target, preds, num_classes, idx)["macro_f1"]
            f1 = macro_f1(target, preds, num_classes)
            base = base or (samples, f1)
            medians = [percentile(r, 50) for r in times["singles"][name]]
            row = {"variant": name, "macro_f1": f1,
                   "f1_diff": {"diff": f1 - base[1], **paired_difference(samples, base[0])},
                   "mb": sum(f.stat().st_size for f in files) / 1e6,
                   "batch1_ms": [percentile(medians, 50), min(medians), max(medians)], "batch1_round_ms": medians}
            for kind in ("batch 32", "batch 32 sorted"):
                per_s = [len(texts) / (sum(r) / 1e3) for r in times[kind][name]]
                row[kind] = [percentile(per_s, 50), min(per_s), max(per_s)]
            rows.append(row)
    padded = {kind: sum(int(f["input_ids"].size - f["attention_mask"].sum()) for f in inputs[kind]) / len(texts)
              for kind in ("batch 32", "batch 32 sorted")}
    rows.append({"padded_tokens_per_text": padded})
    return rows


def measure_requests(calls: dict, texts: list[str], target: np.ndarray, num_classes: int, args) -> list[dict]:
    """Each call's texts/s on ``texts`` as requests of 32 in file order (median over rounds, least, greatest), its
    texts/s over the first peer's in each round (the same rounds: median, least, greatest) and its macro F1."""
    requests = [texts[s:s + 32] for s in range(0, len(texts), 32)]
    times = interleaved_times({n: (lambda i, c=c: c(requests[i])) for n, c in calls.items()},
                              list(range(len(requests))), args.rounds, warmup=len(requests))
    per_s = {name: np.array([len(texts) / (sum(r) / 1e3) for r in rounds]) for name, rounds in times.items()}
    peer = per_s[next(iter(calls))]
    rows = []
    for name, call in calls.items():
        ratios = per_s[name] / peer
        preds = np.concatenate([call(r) for r in requests])
        rows.append({"variant": name, "texts_per_s": [percentile(list(per_s[name]), 50), per_s[name].min(),
                                                      per_s[name].max()],
                     "ratio_to_first_peer": [percentile(list(ratios), 50), ratios.min(), ratios.max()],
                     "macro_f1": macro_f1(target, preds, num_classes)})
    return rows


def write(rows: list[dict], args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "cpu": cpu_info(), "rows": rows}, indent=2))
    lines = ["| variant | batch 1 ms, median (min-max) | batch 32 texts/s | batch 32 sorted texts/s | macro F1 | "
             "diff to torch fp32 (95% CI) | MB |", "|---|---|---|---|---|---|---|"]
    for r in rows[:-1]:
        def rate(v):
            return f"{v[0]:.0f} ({v[1]:.0f}-{v[2]:.0f})"
        d = r["f1_diff"]
        lines.append(f"| {r['variant']} | {r['batch1_ms'][0]:.2f} ({r['batch1_ms'][1]:.2f}-{r['batch1_ms'][2]:.2f}) | "
                     f"{rate(r['batch 32'])} | {rate(r['batch 32 sorted'])} | {r['macro_f1']:.4f} | "
                     f"{d['diff']:+.4f} ({d['low']:+.4f}, {d['high']:+.4f}) | "
                     f"{r['mb']:.1f} |")
    lines.append(f"\npadded tokens per text at batch 32: {rows[-1]['padded_tokens_per_text']}")
    # batch 1 paired by round: the same round's medians, so drift between rounds (this VM's batch-1 times are
    # bimodal) moves both sides of each ratio
    peer = min((r for r in rows[:-1] if r["variant"].startswith("peer: ")), key=lambda r: r["batch1_ms"][0])
    lines += ["", f"Batch 1, the faster peer's ({peer['variant']}) median ms over each variant's, round by round:", "",
              "| variant | median of rounds (min-max) |", "|---|---|"]
    for r in rows[:-1]:
        ratios = np.array(peer["batch1_round_ms"]) / np.array(r["batch1_round_ms"])
        lines.append(f"| {r['variant']} | {np.median(ratios):.2f}x ({ratios.min():.2f}-{ratios.max():.2f}) |")
    lines += ["", "Requests of 32 texts in file order, texts in, class ids out:", "",
              "| variant | texts/s, median (min-max) | over the OpenVINO + NNCF peer, median of rounds (min-max) | "
              "macro F1 |", "|---|---|---|---|"]
    for r in rows[-1]["requests"]:
        (v, lo, hi), (q, qlo, qhi) = r["texts_per_s"], r["ratio_to_first_peer"]
        lines.append(f"| {r['variant']} | {v:.0f} ({lo:.0f}-{hi:.0f}) | {q:.2f}x ({qlo:.2f}-{qhi:.2f}) | "
                     f"{r['macro_f1']:.4f} |")
    print("\n".join(lines))
    (out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
