import csv
import json
import logging
import os
import time

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, recall_score
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from emocompress.benchmark.report import _comparison_markdown, check_out_dir
from emocompress.benchmark.run import benchmark
from emocompress.benchmark.timing import interleaved_times, time_calls
from emocompress.benchmark.variants import count_parameters, file_sizes_mb, load_for_benchmark
from emocompress.cli import main
from emocompress.compression.quantization import quantize
from tests.conftest import REPO

ID2LABEL = {0: "anger", 1: "joy", 2: "love"}


def test_file_sizes_are_megabytes_of_ten_to_the_six(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(bytes(2_500_000))
    size, gz = file_sizes_mb(path)
    assert size == 2.5
    assert gz < 0.01  # all zeros compress to almost nothing


def test_nonzero_count_sees_pruned_weights():
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight[0] = 0
        layer.weight[1, :2] = 0
        layer.bias.fill_(1.0)
    assert count_parameters(layer) == (15, 15 - 6)


def test_counts_survive_quantization(tiny_model_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    total, _ = count_parameters(model)
    assert count_parameters(quantize(model, "torch"))[0] == total


def test_interleaved_timing_keeps_relative_cost_and_interleaves_rounds():
    calls = []
    now = [0.0]  # a clock that advances by each call's cost: sleep() overshot by ~1 ms under load (CI failed)

    def fake(name, cost_ms):
        def call(x):
            calls.append((name, x))
            now[0] += cost_ms / 1e3
        return call

    times = interleaved_times({"fast": fake("fast", 2), "slow": fake("slow", 6)}, list(range(4)), rounds=3, warmup=1,
                              clock=lambda: now[0])
    assert [len(r) for r in times["fast"]] == [4, 4, 4] and len(times["slow"]) == 3
    assert np.allclose(times["fast"], 2) and np.allclose(times["slow"], 6)  # ms per call, each call timed alone
    # warm-up first, then every variant once per round, rounds starting with a different variant
    order = [name for i, (name, _) in enumerate(calls) if i == 0 or calls[i - 1][0] != name]
    assert calls[:2] == [("fast", 0), ("slow", 0)]
    assert order == ["fast", "slow", "fast", "slow", "fast", "slow"]  # warm-up | fast slow | slow fast | fast slow
    assert [x for name, x in calls[2:6]] == [0, 1, 2, 3]


def test_a_list_of_runs_parses_as_one_variant(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark", "--models", '{"teacher": ["logs/a/seed_1/hf_model", "logs/a/seed_2/hf_model"], '
                                       '"int8": "logs/int8/version_0/int8"}', "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "logs/a/seed_2/hf_model" in out and "logs/int8/version_0/int8" in out


def test_markdown_marks_differences_whose_interval_excludes_zero():
    def row(name, low, high, runs=1):
        values = {"model": name, "runs": runs, "params": 10, "nonzero_params": 9, "size_mb": 1.0, "gzip_mb": 0.5,
                  "latency_ms_median": 2.0, "latency_ms_min": 1.5, "latency_ms_max": 2.5, "latency_ms_p90": 3.0,
                  "throughput_per_s": 100.0, "throughput_min_per_s": 90.0, "throughput_max_per_s": 110.0,
                  "macro_f1_diff": (low + high) / 2, "macro_f1_diff_low": low, "macro_f1_diff_high": high,
                  "macro_f1_diff_p": 0.01, "mcnemar_p": 0.02, "mcnemar_only_model_correct": 1,
                  "mcnemar_only_base_correct": 9, "speedup": 1.0, "compression": 1.0, "gzip_compression": 1.0}
        for key in ("macro_f1", "balanced_accuracy", "cohen_kappa", "accuracy"):
            values |= {key: 0.9, f"{key}_std": 0.01 if runs > 1 else None, f"{key}_low": 0.88, f"{key}_high": 0.92}
        return values

    lines = _comparison_markdown([row("base", 0.0, 0.0), row("worse", -0.03, -0.01, runs=3),
                                  row("same", -0.01, 0.02)], "base").splitlines()
    assert lines[2].count(" *") == 0 and "0.9000 [0.8800, 0.9200]" in lines[2]
    assert "-0.0200 [-0.0300, -0.0100] *" in lines[3] and "0.9000 ± 0.0100 [0.8800, 0.9200]" in lines[3]
    assert "[-0.0100, +0.0200] |" in lines[4] and "0.020 (1/9)" in lines[4]


def test_latency_harness_on_a_stub_with_known_sleep():
    calls = []

    def stub(x):
        calls.append(x)
        time.sleep(0.005)

    times = time_calls(stub, list(range(20)), warmup=5)
    assert len(calls) == 25 and len(times) == 20  # warm-up calls are made but not timed
    # the fastest of 20 calls: a sleep is never shorter than asked, and one of 20 is rarely delayed on a busy machine
    assert 5.0 <= min(times) < 9.0  # milliseconds


def test_thread_time_clock_counts_cpu_work_not_waiting():
    def spin(x):  # about 5 ms of this thread's CPU
        end = time.thread_time() + 0.005
        while time.thread_time() < end:
            pass

    times = interleaved_times({"sleep": lambda x: time.sleep(0.005), "spin": spin}, [0, 1, 2], rounds=2, warmup=0,
                              clock=time.thread_time)
    assert max(t for r in times["sleep"] for t in r) < 1.0  # ms: sleeping costs no CPU
    assert min(t for r in times["spin"] for t in r) >= 5.0


@pytest.fixture
def exported(tiny_model_dir, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=3, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()},
        ignore_mismatched_sizes=True)
    model.save_pretrained(tmp_path / "fp32")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.save_pretrained(tmp_path / "fp32")
    quantize(model, "onnxruntime", include_embeddings=True, out_dir=tmp_path / "int8", tokenizer=tokenizer)
    return tmp_path / "fp32", tmp_path / "int8"


def test_report_folder_and_per_class_table(emotion_dir, exported, make_datamodule, tmp_path, caplog):
    fp32, int8 = exported
    out = tmp_path / "report"
    with caplog.at_level(logging.INFO, logger="emocompress"):
        rows = benchmark({"fp32": str(fp32), "int8": str(int8), "fp32 x2": [str(fp32), str(fp32)]},
                         data=str(emotion_dir), out_dir=str(out), latency_samples=5, warmup=2, rounds=2,
                         pairs=[["int8", "fp32 x2"], ["fp32 x2", "fp32"]])
    with (out / "model_comparison.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["model"] for r in table] == ["fp32", "int8", "fp32 x2"]
    assert {"size_mb", "gzip_mb", "latency_ms_median", "latency_ms_p90", "throughput_per_s", "macro_f1",
            "balanced_accuracy", "cohen_kappa", "accuracy", "params", "nonzero_params", "speedup"} <= set(table[0])
    assert float(table[0]["speedup"]) == 1.0
    # energy of the timed calls, labelled with its kind (codecarbon estimates it on machines without RAPL)
    method = "measured" if os.access("/sys/class/powercap/intel-rapl/subsystem", os.R_OK) else "estimated"
    assert all(float(r["energy_kwh_per_1k"]) > 0 and float(r["energy_kwh_per_1k_batch1"]) > 0 for r in table)
    assert {r["energy_method"] for r in table} == {method}
    assert f") {method} |" in (out / "model_comparison.md").read_text()
    assert rows[0]["size_mb"] == pytest.approx((fp32 / "model.safetensors").stat().st_size / 1e6)
    for name in ("confusion_fp32.png", "confusion_int8.png", "confusion_fp32_x2.png", "tradeoff.png",
                 "per_class_f1.png", "model_comparison.md", "per_class.md", "predictions.json", "report.html"):
        assert (out / name).stat().st_size > 0
    # intervals hold their estimate; timing spread holds its median; empty std for one run
    for row in rows:
        for key in ("macro_f1", "balanced_accuracy", "cohen_kappa", "accuracy"):
            assert row[f"{key}_low"] <= row[key] + 1e-9 and row[key] <= row[f"{key}_high"] + 1e-9, (row["model"], key)
        assert row["latency_ms_min"] <= row["latency_ms_median"] <= row["latency_ms_max"]
        assert row["throughput_min_per_s"] <= row["throughput_per_s"] <= row["throughput_max_per_s"]
    assert table[0]["macro_f1_std"] == "" and table[0]["runs"] == "1"
    # two runs of the same model: mean = the one run, std 0, a difference of exactly 0, McNemar p = 1
    seeds = rows[2]
    assert (seeds["runs"], seeds["macro_f1"], seeds["macro_f1_std"]) == (2, rows[0]["macro_f1"], 0.0)
    assert (seeds["macro_f1_diff"], seeds["macro_f1_diff_low"], seeds["macro_f1_diff_high"]) == (0.0, 0.0, 0.0)
    assert (seeds["macro_f1_diff_p"], seeds["mcnemar_p"]) == (1.0, 1.0)
    assert "p (bootstrap)" in (out / "model_comparison.md").read_text()
    # pairs: against "fp32 x2" (the same predictions as the baseline) int8 gets the baseline's own comparison
    with (out / "pairs.csv").open() as f:
        pairs = list(csv.DictReader(f))
    assert [(p["model"], p["reference"]) for p in pairs] == [("int8", "fp32 x2"), ("fp32 x2", "fp32")]
    for key in ("macro_f1_diff", "macro_f1_diff_low", "macro_f1_diff_high", "macro_f1_diff_p", "mcnemar_p"):
        assert float(pairs[0][key]) == pytest.approx(rows[1][key]), key
        assert float(pairs[1][key]) == (1.0 if key.endswith("_p") else 0.0), key
    assert "| int8 | fp32 x2 |" in (out / "pairs.md").read_text()
    # the per-text predictions are kept for later paired tests, and agree with the reported metrics
    saved = json.loads((out / "predictions.json").read_text())
    assert len(saved["predictions"]["fp32 x2"]) == 2 and saved["paths"]["fp32 x2"] == [str(fp32), str(fp32)]
    assert f1_score(saved["target"], saved["predictions"]["int8"][0], average="macro", labels=[0, 1, 2],
                    zero_division=0) == pytest.approx(rows[1]["macro_f1"], abs=1e-6)
    environment = json.loads((out / "environment.json").read_text())
    assert {"cpu", "cpu_vendor", "cpu_flags", "onnxruntime", "torch", "rounds", "bootstrap"} <= set(environment)
    # the fastest model per batch size: the row with the least latency / most texts/s among the eligible ones
    picks = json.loads((out / "fastest.json").read_text())
    assert set(picks) == {"baseline", "criterion", "by_batch_size", "overall", "excluded"}
    assert [(p["batch_size"], p["measure"]) for p in picks["by_batch_size"]] == [(1, "latency_ms_median"),
                                                                                (32, "throughput_per_s")]
    eligible = [r for r in rows if r["model"] == "fp32" or r["macro_f1_diff_high"] >= 0]
    assert picks["by_batch_size"][0]["model"] == min(eligible, key=lambda r: r["latency_ms_median"])["model"]
    assert picks["by_batch_size"][1]["model"] == max(eligible, key=lambda r: r["throughput_per_s"])["model"]
    assert picks["overall"] in picks["by_batch_size"]
    assert "## Fastest" in (out / "model_comparison.md").read_text()
    assert "<h2>Fastest</h2>" in (out / "report.html").read_text()
    assert f"batch 32: {picks['by_batch_size'][1]['model']} " in caplog.text

    # per-class F1 and accuracy equal scikit-learn's on the same model's predictions
    model, _, _ = load_for_benchmark(fp32)
    dm = make_datamodule(fp32)
    dm.setup("test")
    preds, target = [], []
    with torch.no_grad():
        for batch in dm.test_dataloader():
            preds.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1))
            target.append(batch["labels"])
    preds, target = torch.cat(preds), torch.cat(target)
    with (out / "per_class.csv").open() as f:
        per_class = [r for r in csv.DictReader(f) if r["model"] == "fp32"]
    np.testing.assert_array_equal(saved["predictions"]["fp32"][0], preds.numpy())
    f1 = f1_score(target, preds, average=None, labels=[0, 1, 2], zero_division=0)
    recall = recall_score(target, preds, average=None, labels=[0, 1, 2], zero_division=0)
    for i, row in enumerate(per_class):
        assert row["class"] == ID2LABEL[i]
        assert float(row["f1"]) == pytest.approx(f1[i], abs=1e-6)
        assert float(row["accuracy"]) == pytest.approx(recall[i], abs=1e-6)
        assert float(row["f1_change"]) == 0.0
        assert float(row["f1_low"]) <= float(row["f1"]) <= float(row["f1_high"])

    # a run with a bad model path fails before measuring: the last complete report is left as it was, no temp folder
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(ValueError, match="not a folder"):
        benchmark({"fp32": str(fp32), "broken": str(tmp_path / "missing")}, data=str(emotion_dir), out_dir=str(out),
                  latency_samples=2, warmup=1)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []

    # re-running into a previous report replaces it, keeping the study's write-up (reports/<study>/README.md)
    (out / "confusion_int8.png").unlink()
    (out / "README.md").write_text("# my study\n")
    benchmark({"fp32": str(fp32)}, data=str(emotion_dir), out_dir=str(out), latency_samples=2, warmup=1, rounds=1)
    assert not (out / "confusion_int8.png").exists() and (out / "confusion_fp32.png").is_file()
    assert (out / "README.md").read_text() == "# my study\n"


def test_throughput_batches_texts_by_length_and_keeps_the_split_order(emotion_dir, exported, make_datamodule):
    from emocompress.benchmark.variants import measure
    from emocompress.data.sampling import padding_per_text, sort_by_length

    fp32, _ = exported
    variant = measure("fp32", [str(fp32)], str(emotion_dir), "test", latency_samples=2, batch_size=3, max_samples=None)
    dm = make_datamodule(fp32)
    dm.setup("test")
    lengths = dm.splits["test"]["length"]
    padding = variant.static["padded_tokens_per_text"]
    assert padding == padding_per_text(lengths, sort_by_length(lengths), 3) < padding_per_text(lengths, range(9), 3)
    widths = [b["input_ids"].shape[1] for b in variant.batches]
    assert widths == sorted(widths, reverse=True)
    model = load_for_benchmark(fp32)[0]
    with torch.no_grad():  # each text alone, in the split's order
        alone = [model(**dm.tokenizer(t, return_tensors="pt")).logits.argmax(-1).item() for t in dm.texts("test")]
    assert variant.preds[0].tolist() == alone and variant.target.tolist() == dm.splits["test"]["labels"]


def test_each_model_reads_texts_cut_where_its_training_and_server_cut_them(emotion_dir, exported, tmp_path):
    from emocompress.benchmark.variants import measure
    from emocompress.deploy.serve import ArtifactPredictor

    fp32, _ = exported
    model = AutoModelForSequenceClassification.from_pretrained(fp32)
    folder = str(tmp_path / "int8_4")  # served at 4 tokens a text (its artifact.json)
    quantize(model, "onnxruntime", out_dir=folder, tokenizer=AutoTokenizer.from_pretrained(fp32), max_length=4)
    short, default = (measure(name, [str(path)], str(emotion_dir), "test", latency_samples=2, batch_size=4,
                              max_samples=None) for name, path in (("int8 at 4", folder), ("fp32", fp32)))
    assert (short.static["max_length"], default.static["max_length"]) == (4, 128)
    assert max(b["input_ids"].shape[1] for b in short.batches) == 4 < max(b["input_ids"].shape[1]
                                                                          for b in default.batches)
    # the benchmark's answers are the server's, text by text (both the ONNX Runtime INT8 session at batch 1)
    texts = [line.rsplit(";", 1)[0] for line in (emotion_dir / "test.txt").read_text().splitlines()]
    served = ArtifactPredictor(folder, batch_size=1).predict(texts)
    labels = list(short.id2label.values())
    single = measure("int8 at 4", [folder], str(emotion_dir), "test", latency_samples=2, batch_size=1, max_samples=None)
    assert [labels[p] for p in single.preds[0]] == [answer["label"] for answer in served]


def test_benchmark_subcommand(emotion_dir, exported, tmp_path):
    fp32, _ = exported
    main(["benchmark", "--models", f'{{"fp32": "{fp32}"}}', "--data", str(emotion_dir),
          "--out_dir", str(tmp_path / "r"), "--latency_samples", "3", "--warmup", "1", "--rounds", "1"])
    assert (tmp_path / "r" / "model_comparison.csv").is_file()


def test_refuses_to_replace_a_folder_that_is_not_a_report(tmp_path):
    out = tmp_path / "reports"
    out.mkdir()
    (out / "model_comparison.csv").write_text("old")
    (out / "teacher_test_metrics.json").write_text("{}")  # a committed result, not something a report writes
    (out / "notes.txt").write_text("mine")
    # refused before anything is loaded or measured: the model path here is never read
    with pytest.raises(ValueError, match=r"reports holds files no report writes \(notes.txt, teacher_test_metrics"
                                         r".json\).*choose a new --out_dir"):
        check_out_dir(out)
    with pytest.raises(ValueError, match="choose a new --out_dir"):
        benchmark({"m": str(tmp_path)}, out_dir=str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "model_comparison.csv").read_text() == "old"
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_out_dir(tmp_path / "a_file")
    check_out_dir(tmp_path / "new")  # a new folder is fine
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty")  # so is an empty one


def test_committed_reports_count_as_reports_of_ours():
    # every report folder in the repo may be replaced by a re-run; reports/ itself may not
    # (reports/teacher and reports/training_speed hold other measurements: not benchmark reports)
    folders = [p for p in (REPO / "reports").iterdir() if (p / "model_comparison.csv").is_file()]
    assert folders
    for folder in folders:
        check_out_dir(folder)
    with pytest.raises(ValueError, match="choose a new --out_dir"):
        check_out_dir(REPO / "reports")


def test_every_bad_model_path_is_named_before_anything_is_measured(tmp_path, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError) as error:
        benchmark({"ok": tiny_model_dir, "a": str(tmp_path / "missing"), "b": str(tmp_path / "empty"),
                   "seeds": [tiny_model_dir, str(tmp_path / "gone.ckpt")]}, out_dir=str(tmp_path / "r"))
    message = str(error.value)
    assert "missing: not a folder" in message and "empty: no weights file" in message and "gone.ckpt" in message
    assert f"{tiny_model_dir}:" not in message
    assert not (tmp_path / "r").exists()


def test_benchmark_rejects_an_unknown_baseline_or_pair(exported):
    with pytest.raises(ValueError, match="baseline 'nope' is not one of the models"):
        benchmark({"fp32": str(exported[0])}, baseline="nope")
    with pytest.raises(ValueError, match=r"pairs entry \['fp32', 'nope'\] must be \[model, reference\]"):
        benchmark({"fp32": str(exported[0])}, pairs=[["fp32", "nope"]])


def _synthetic_variant(name: str, target: list[int], preds: list[int], id2label: dict[int, str]):
    """A benchmark row measured without a model: its predictions and the report metrics_report makes of them."""
    from sklearn.metrics import confusion_matrix

    from emocompress.benchmark.variants import Variant
    from emocompress.models.classifier import classification_metrics, metrics_report

    metrics = classification_metrics(len(id2label))
    metrics.update(torch.tensor(preds), torch.tensor(target))
    confusion = torch.tensor(confusion_matrix(target, preds, labels=list(id2label)))
    static = {"params": 10, "nonzero_params": 10, "sparsity": 0.0, "size_mb": 1.0, "gzip_mb": 0.5}
    return Variant(name, [name], None, static, id2label, [], [], np.array(target), preds=[np.array(preds)],
                   reports=[metrics_report(metrics.compute(), confusion, id2label)])


def test_report_names_absent_classes_and_keeps_every_models_figure(tmp_path):
    from emocompress.benchmark.compare import compare
    from emocompress.benchmark.report import write_report

    id2label = dict(enumerate(["anger", "joy", "love", "fear"]))  # "fear" has no text in the split
    target = [0, 0, 1, 1, 2, 2, 1, 0]
    variants = [_synthetic_variant("a/b", target, [0, 1, 1, 1, 2, 2, 1, 0], id2label),
                _synthetic_variant("a b", target, [0, 0, 1, 3, 2, 0, 1, 0], id2label),  # predicts "fear" once
                _synthetic_variant("A B", target, target, id2label)]
    timing = dict.fromkeys(("latency_ms_median", "latency_ms_min", "latency_ms_max", "latency_ms_p90",
                            "throughput_per_s", "throughput_min_per_s", "throughput_max_per_s"), 1.0)
    rows, per_class, reports, pairs = compare(variants, {v.name: timing for v in variants}, "a/b", 50, 0)
    write_report(tmp_path, rows, per_class, reports, {}, "test", "a/b", {}, False)

    # three names that differ only by punctuation or case: three figures, each named in reports.json
    saved = json.loads((tmp_path / "reports.json").read_text())
    figures = [saved[name]["confusion_figure"] for name in ("a/b", "a b", "A B")]
    assert len({f.casefold() for f in figures}) == 3
    assert sorted(p.name for p in tmp_path.glob("confusion_*.png")) == sorted(figures)
    # the absent class: empty cells, not 0.0, and named in per_class.md and reports.json
    with (tmp_path / "per_class.csv").open() as f:
        fear = [r for r in csv.DictReader(f) if r["class"] == "fear"]
    assert len(fear) == 3
    for row in fear:
        assert row["support"] == "0"
        assert all(row[key] == "" for key in ("f1", "f1_low", "f1_high", "accuracy", "f1_change", "accuracy_change"))
    assert saved["a b"]["absent_classes"] == ["fear"] and saved["a b"]["per_class"]["fear"]["f1"] is None
    assert "Absent from the test split (support 0, so no F1 or accuracy; empty cells): fear." in \
        (tmp_path / "per_class.md").read_text()
    assert (tmp_path / "per_class_f1.png").stat().st_size > 0
    # the present classes keep their numbers: "a b" got joy 2 of 3 right
    joy = next(r for r in per_class if r["model"] == "a b" and r["class"] == "joy")
    assert joy["accuracy"] == pytest.approx(2 / 3)


def _row(model, ms, per_s, diff, high):
    return {"model": model, "latency_ms_median": ms, "throughput_per_s": per_s, "macro_f1": 0.8 + diff,
            "macro_f1_diff": diff, "macro_f1_diff_low": diff - 0.02, "macro_f1_diff_high": high}


def test_fastest_breaks_ties_by_macro_f1_then_row_order_and_falls_back_to_the_baseline():
    from emocompress.benchmark.compare import fastest

    rows = [_row("base", 10.0, 100.0, 0.0, 0.0), _row("a", 4.0, 200.0, -0.01, 0.01), _row("b", 4.0, 200.0, 0.0, 0.02),
            _row("c", 4.0, 200.0, 0.0, 0.02), _row("worse", 1.0, 900.0, -0.1, -0.05)]
    picks = fastest(rows, "base", 16)
    # equal speed: the higher macro F1 (b over a), then the earlier row (b over c); "worse" is faster but excluded
    assert [(p["batch_size"], p["model"], p["speedup"]) for p in picks["by_batch_size"]] == [(1, "b", 2.5),
                                                                                              (16, "b", 2.0)]
    assert picks["overall"]["batch_size"] == 1 and picks["overall"]["texts_per_s"] == 250.0
    assert picks["excluded"] == ["worse"]
    # nothing both faster and not significantly worse: the baseline itself; a row without an interval is not eligible
    rows = [_row("base", 10.0, 100.0, 0.0, 0.0), _row("worse", 1.0, 900.0, -0.1, -1e-9), _row("old", 1.0, 900.0, 0, None)]
    picks = fastest(rows, "base", 32)
    assert [(p["model"], p["speedup"]) for p in picks["by_batch_size"]] == [("base", 1.0), ("base", 1.0)]
    assert picks["excluded"] == ["worse", "old"]


def test_a_significantly_worse_model_is_never_the_fastest_in_the_report(tmp_path):
    from emocompress.benchmark.compare import compare
    from emocompress.benchmark.report import write_report

    id2label = dict(enumerate(["anger", "joy", "love"]))
    target = [i % 3 for i in range(60)]
    wrong = [(t + 1) % 3 if i % 2 else t for i, t in enumerate(target)]  # half wrong
    variants = [_synthetic_variant("fp32", target, target, id2label),
                _synthetic_variant("int8", target, target, id2label),
                _synthetic_variant("broken", target, wrong, id2label)]
    speeds = {"fp32": (10.0, 100.0), "int8": (3.0, 250.0), "broken": (1.0, 1000.0)}  # broken: fastest by far
    timing = {name: {"latency_ms_median": ms, "latency_ms_min": ms, "latency_ms_max": ms, "latency_ms_p90": ms,
                     "throughput_per_s": per_s, "throughput_min_per_s": per_s, "throughput_max_per_s": per_s}
              for name, (ms, per_s) in speeds.items()}
    rows, per_class, reports, _ = compare(variants, timing, "fp32", 1000, 0)
    picks = write_report(tmp_path, rows, per_class, reports, {}, "test", "fp32", {"batch_size": 8}, False)
    assert rows[2]["macro_f1_diff_high"] < 0
    saved = json.loads((tmp_path / "fastest.json").read_text())
    assert saved == picks and saved["excluded"] == ["broken"]
    assert [(p["batch_size"], p["model"]) for p in saved["by_batch_size"]] == [(1, "int8"), (8, "int8")]
    assert saved["by_batch_size"][0]["speedup"] == pytest.approx(10 / 3)
    markdown = (tmp_path / "model_comparison.md").read_text()
    assert "- batch 1: int8 3.00 ms (3.3x the baseline), macro F1 +0.0 [+0.0, +0.0] points" in markdown
    assert "- batch 8: int8 250.0 texts/s (2.5x the baseline)" in markdown
    assert "Left out as significantly worse: broken." in markdown
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Fastest</h2>" in page and "fastest overall: int8 at batch 1, 333.3 texts/s" in page


def test_no_fastest_section_for_a_report_without_a_batch_size(tmp_path):
    from emocompress.benchmark.report import fastest_picks

    rows = [_row("base", 10.0, 100.0, 0.0, 0.0), _row("a", 4.0, 200.0, 0.0, 0.01)]
    assert fastest_picks(rows, "base", {}) is None  # reports/benchmark_distill: no batch size recorded
    assert fastest_picks(rows[:1] + [_row("a", 4.0, 200.0, 0.0, None)], "base", {"batch_size": 32}) is None
    assert fastest_picks(rows, "base", {"batch_size": 32})["by_batch_size"][1]["model"] == "a"


@pytest.mark.parametrize(("option", "value"), [
    ("latency_samples", 0), ("latency_samples", -3), ("batch_size", 0), ("rounds", 0), ("warmup", -1),
    ("num_threads", 0), ("num_threads", -2), ("max_samples", 0)])
def test_timing_options_below_one_are_refused_before_predicting(emotion_dir, tiny_model_dir, tmp_path, monkeypatch,
                                                                option, value):
    # Today latency_samples 0 predicts every model first and then crashes on an empty list of timings.
    import emocompress.benchmark.run as bench

    def measured(*args, **kwargs):
        raise AssertionError("measured before the settings were checked")

    monkeypatch.setattr(bench, "measure", measured)
    with pytest.raises(ValueError, match=rf"benchmark: {option} must be at least {0 if option == 'warmup' else 1}, "
                                         rf"got {value}"):
        benchmark({"m": tiny_model_dir}, data=str(emotion_dir), out_dir=str(tmp_path / "r"), **{option: value})
