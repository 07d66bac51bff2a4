"""The benchmark's figures of differences, report.html and the regenerate command (issue 33)."""

import csv
import itertools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from emocompress.benchmark.compare import compare
from emocompress.benchmark.regenerate import _add_class_intervals, main, read_rows
from emocompress.benchmark.report import write_report
from emocompress.evaluation.plots import class_difference_figure, close_figure, tradeoff_figure
from emocompress.evaluation.significance import class_differences_from_predictions, paired_class_differences
from tests.test_benchmark import _synthetic_variant

ID2LABEL = dict(enumerate(["anger", "joy", "love"]))
TARGET = [0, 1, 2] * 12
ENVIRONMENT = {"cpu": "test CPU", "cpu_flags": ["avx2"], "bootstrap": 200, "bootstrap_seed": 0, "baseline": "base",
               "command": "emocompress benchmark --models '{...}'"}


def _write_tiny_report(out: Path, kappa: float | None = None) -> None:
    """A tiny saved report: a baseline, a model worse on "joy" (predicted "anger" 9 times of 12), one the same;
    with ``kappa``, every model's Cohen's kappa set to it (NaN: undefined, as for a model predicting one class)."""
    worse = [0 if t == 1 and i < 27 else t for i, t in enumerate(TARGET)]
    variants = [_synthetic_variant("base", TARGET, TARGET, ID2LABEL),
                _synthetic_variant("worse", TARGET, worse, ID2LABEL),
                _synthetic_variant("same", TARGET, TARGET, ID2LABEL)]
    timing = {name: {"latency_ms_median": ms, "latency_ms_min": 0.9 * ms, "latency_ms_max": 1.1 * ms,
                     "latency_ms_p90": ms, "throughput_per_s": 1e3 / ms, "throughput_min_per_s": 900 / ms,
                     "throughput_max_per_s": 1100 / ms} for name, ms in (("base", 10.0), ("worse", 2.0), ("same", 5.0))}
    rows, per_class, reports, _ = compare(variants, timing, "base", 200, 0)
    if kappa is not None:
        for report in reports.values():
            report["cohen_kappa"] = report["intervals"]["cohen_kappa"][0] = report["runs"][0]["cohen_kappa"] = kappa
    predictions = {"labels": list(ID2LABEL.values()), "target": TARGET,
                   "predictions": {v.name: [p.tolist() for p in v.preds] for v in variants}}
    write_report(out, rows, per_class, reports, predictions, "test", "base", ENVIRONMENT, False, page_title="tiny")


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    _write_tiny_report(out)
    return out


def _rows(n: int) -> list[dict]:
    """n benchmark rows crowded as in a real study: pairs of near-identical latencies and sizes."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        ms, mb = (10.0, 90.0) if i == 0 else (1.0 + 0.02 * i + (i % 2) * 3, 15.0 + 0.1 * i + (i % 3) * 40)
        diff = 0.0 if i == 0 else float(rng.normal(-0.005, 0.004))
        rows.append({"model": f"variant number {i} (fp32)", "macro_f1": 0.88 + diff, "macro_f1_diff": diff,
                     "macro_f1_diff_low": diff - 0.006, "macro_f1_diff_high": diff + 0.006,
                     "latency_ms_median": ms, "latency_ms_min": 0.95 * ms, "latency_ms_max": 1.05 * ms, "size_mb": mb})
    return rows


def test_tradeoff_labels_do_not_overlap_on_20_models():
    fig = tradeoff_figure(_rows(20), latency_budget_ms=3.0)
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes[:2]:
        labels = [t for t in ax.texts if t.get_gid() == "point-label"]
        assert sorted(t.get_text() for t in labels) == sorted(str(i) for i in range(1, 21))
        boxes = [t.get_window_extent(renderer) for t in labels]
        overlapping = [(a.get_text(), b.get_text()) for (a, box_a), (b, box_b)
                       in itertools.combinations(zip(labels, boxes, strict=True), 2) if box_a.overlaps(box_b)]
        assert overlapping == []
        assert all(ax.bbox.contains(b.x0, b.y0) and ax.bbox.contains(b.x1, b.y1) for b in boxes)
        assert ax.get_xscale() == "log"
        assert any(line.get_label() == "Pareto front" for line in ax.lines)
    assert [line.get_xdata()[0] for line in fig.axes[0].lines if line.get_label().startswith("budget")] == [3.0]
    # the key names every model with its difference in points and interval
    key = "\n".join(t.get_text() for t in fig.axes[2].texts)
    assert "20  variant number 19 (fp32)" in key and "(baseline)" in key
    close_figure(fig)


def test_class_heatmap_is_centred_on_zero_and_marks_significant_cells():
    def row(model, label, change, low=None, high=None, support=10):
        return {"model": model, "class": label, "support": support, "f1_change": change, "f1_change_low": low,
                "f1_change_high": high}

    per_class = [row("base", "a", 0.0, 0.0, 0.0), row("base", "b", 0.0, 0.0, 0.0), row("base", "c", None, support=0),
                 row("m1", "a", -0.03, -0.05, -0.01), row("m1", "b", 0.01, -0.01, 0.03),
                 row("m1", "c", None, support=0),
                 row("m2", "a", 0.004, 0.001, 0.008), row("m2", "b", 0.0, -0.02, 0.02), row("m2", "c", None, support=0)]
    fig = class_difference_figure(per_class, "base")
    ax = fig.axes[0]
    norm = ax.images[0].norm
    assert norm.vcenter == 0 and norm.vmin == pytest.approx(-norm.vmax) and norm.vmax == pytest.approx(3.0)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["m1", "m2"]  # the baseline's row of zeros is left out
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["-3.0*", "+1.0", "absent", "+0.4*", "+0.0", "absent"]
    assert len([p for p in ax.patches if p.get_gid() == "significant"]) == 2
    close_figure(fig)


def test_per_class_paired_intervals_from_predictions_match_the_benchmarks(report_dir):
    per_class = read_rows(report_dir / "per_class.csv")
    joy = {r["model"]: r for r in per_class if r["class"] == "joy"}
    assert joy["worse"]["f1_change_high"] < 0 and joy["worse"]["f1_change_p"] < 0.05
    assert joy["same"]["f1_change_low"] == joy["same"]["f1_change_high"] == 0 and joy["same"]["f1_change_p"] == 1
    # recomputed from predictions.json with the report's settings: the same resamples, the same numbers
    stripped = [{k: v for k, v in r.items() if not k.startswith("f1_change_")} for r in per_class]
    _add_class_intervals(stripped, json.loads((report_dir / "predictions.json").read_text()), "base", ENVIRONMENT)
    for saved, recomputed in zip(per_class, stripped, strict=True):
        for key in ("f1_change_low", "f1_change_high", "f1_change_p"):
            assert recomputed[key] == pytest.approx(saved[key])
    # an absent class (no value on any resample) has no interval
    diffs = paired_class_differences(np.array([[0.5, np.nan], [0.6, np.nan]]), np.array([[0.4, np.nan]] * 2))
    assert diffs[1] == {"low": None, "high": None, "p": None} and diffs[0]["p"] == 0.0
    same = class_differences_from_predictions(np.array(TARGET), {"a": [np.array(TARGET)], "b": [np.array(TARGET)]},
                                              "a", 3, 100, 0)
    assert [d["p"] for d in same["b"]] == [1.0, 1.0, 1.0]


def test_html_report_is_self_contained_with_tables_and_figures(report_dir):
    page = (report_dir / "report.html").read_text()
    assert not re.search(r"https?://", page)
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<h1>tiny</h1>" in page and page.count('class="sortable"') == 2
    assert "Δ macro F1 (points)" in page and "<caption>worse</caption>" in page  # its confusion matrix
    # the worse model's significant joy change is starred and coloured; "same" is not
    assert re.search(r'<td class="worse" data-sort="-[0-9.]+">-[0-9.]+ \[-[0-9.]+, -[0-9.]+\] \*</td>', page)
    assert "test CPU" in page and "avx2" in page and "emocompress benchmark --models" in page


def test_regenerate_redraws_figures_and_page_without_measuring(report_dir, tmp_path, capsys):
    folder = tmp_path / "benchmark_old"
    shutil.copytree(report_dir, folder)
    for name in ("tradeoff.png", "per_class_f1.png", "report.html", "predictions.json"):
        (folder / name).unlink()
    environment = json.loads((folder / "environment.json").read_text())
    del environment["command"]  # an older report: no command recorded
    (folder / "environment.json").write_text(json.dumps(environment))
    tables = {name: (folder / name).read_bytes() for name in ("model_comparison.csv", "per_class.csv")}
    assert main([str(folder)]) == 0
    assert all((folder / name).stat().st_size > 0 for name in ("tradeoff.png", "per_class_f1.png", "report.html"))
    assert {name: (folder / name).read_bytes() for name in tables} == tables
    page = (folder / "report.html").read_text()
    assert "Benchmark report: benchmark_old" in page and "(not recorded)" in page
    assert capsys.readouterr().out.strip() == str(folder / "report.html")
    with open(folder / "model_comparison.csv") as f:
        assert [r["model"] for r in csv.DictReader(f)] == ["base", "worse", "same"]
    assert main([str(tmp_path / "nothing")]) == 2
    assert "nothing/model_comparison.csv is missing" in capsys.readouterr().err


def test_an_undefined_kappa_is_null_in_the_report_files_and_regenerate_reads_them(tmp_path):
    _write_tiny_report(tmp_path, kappa=float("nan"))
    for name in ("reports.json", "predictions.json", "environment.json"):
        text = (tmp_path / name).read_text()
        json.loads(text, parse_constant=lambda token: pytest.fail(f"{name}: bare {token}, which JSON.parse rejects"))
    saved = json.loads((tmp_path / "reports.json").read_text())
    assert saved["worse"]["cohen_kappa"] is None and saved["worse"]["intervals"]["cohen_kappa"][0] is None
    (tmp_path / "report.html").unlink()
    assert main([str(tmp_path)]) == 0 and (tmp_path / "report.html").stat().st_size > 0


@pytest.mark.slow
def test_report_page_in_a_headless_browser(report_dir):
    chromium = Path("/usr/bin/chromium")
    if not chromium.is_file():
        pytest.skip("no browser: /usr/bin/chromium is not installed (.ci/run installs it when root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        page = browser.new_page()
        errors = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto((report_dir / "report.html").as_uri())
        widths = page.eval_on_selector_all("img", "images => images.map(i => i.complete ? i.naturalWidth : 0)")
        assert len(widths) == 2 and all(w > 0 for w in widths)

        def first_column():
            return page.eval_on_selector_all("table.sortable >> nth=0 >> tbody tr",
                                             "rows => rows.map(r => r.cells[0].textContent)")

        assert first_column() == ["base", "worse", "same"]
        page.click("table.sortable >> nth=0 >> th >> text=latency ms")
        assert first_column() == ["worse", "same", "base"]  # 2, 5, 10 ms
        page.click("table.sortable >> nth=0 >> th >> text=latency ms")
        assert first_column() == ["base", "same", "worse"]
        page.click("table.sortable >> nth=0 >> th >> text=model")
        assert first_column() == ["base", "same", "worse"]
        browser.close()
    assert errors == []


def test_the_recorded_command_names_the_cli(monkeypatch):
    from emocompress.benchmark.report import invoking_command

    monkeypatch.setattr("sys.argv", ["/x/.venv/bin/emocompress", "benchmark", "--models", '{"a b": "p"}'])
    assert invoking_command() == """emocompress benchmark --models '{"a b": "p"}'"""
    monkeypatch.setattr("sys.argv", ["/repo/src/emocompress/cli.py", "benchmark", "-c", "x.yaml"])
    assert invoking_command() == "emocompress benchmark -c x.yaml"
