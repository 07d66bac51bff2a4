"""How outputs are written (``emocompress.io``): with the permissions of a plain write, and never over the
current directory or a folder above it."""

import json
import os
import stat

import pytest

from emocompress.cli import main
from emocompress.io import atomic_dir, atomic_file, atomic_write_text, check_can_create, check_replaceable

from .conftest import REPO


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_permissions_a_plain_mkdir_or_open_would(tmp_path, umask):
    # A server running as another user must be able to read an export when the umask lets it (022), and
    # must not when the umask says private (077): whatever mkdir/open would do, outputs do.
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "a.txt").write_text("x")
        atomic_write_text(tmp_path / "file.txt", "x")
        with atomic_file(tmp_path / "file.bin", "wb") as f:
            f.write(b"x")
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "folder") == _mode(tmp_path / "plain") == 0o777 & ~umask
    assert _mode(tmp_path / "file.txt") == _mode(tmp_path / "file.bin") == _mode(tmp_path / "plain.txt") \
        == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin", "file.txt", "folder", "plain", "plain.txt"]


def _spellings(cwd):
    """Ways to name the current directory or a folder above it (cwd is <tmp>/report/tensorboard)."""
    return [".", "..", "../tensorboard", str(cwd), str(cwd.parent), "../../report"]


@pytest.mark.parametrize("index", range(6))
def test_no_output_replaces_the_current_directory_or_a_folder_above_it(tmp_path, monkeypatch, index):
    # Replacing an output folder removes it first: named as ".", "..", or an absolute path of the current
    # directory or above, that would remove the folder the command runs in, earlier results included.
    cwd = tmp_path / "report" / "tensorboard"  # names a report writes: "..' looks like an earlier report
    cwd.mkdir(parents=True)
    (cwd / "events").write_text("mine")
    monkeypatch.chdir(cwd)
    out = _spellings(cwd)[index]
    with pytest.raises(ValueError, match=r"is the current directory or a folder above it.*choose a new folder"):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="is the current directory or a folder above it"):
        check_replaceable(out, "marker.json", "a folder of ours")
    assert (cwd / "events").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["events", "report", "tensorboard"]


@pytest.mark.parametrize("out", [".", ".."])
def test_benchmark_and_vocab_refuse_an_out_dir_at_or_above_the_current_directory(
        out, emotion_dir, tiny_model_dir, tmp_path, monkeypatch, capsys):
    import emocompress.benchmark.run

    cwd = tmp_path / "report" / "tensorboard"
    cwd.mkdir(parents=True)
    (cwd / "model_comparison.csv").write_text("an earlier report's")  # "." looks like an earlier report too
    monkeypatch.chdir(cwd)
    measured = []
    monkeypatch.setattr(emocompress.benchmark.run, "measure", lambda *args, **kwargs: measured.append(args))
    for args in (["benchmark", "--models", json.dumps({"m": tiny_model_dir}), "--data", str(emotion_dir)],
                 ["vocab", "--data", str(emotion_dir), "--vocab_size", "120"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--out_dir", out])
        assert exit_info.value.code == 2
        assert "is the current directory or a folder above it" in capsys.readouterr().err
    assert not measured  # refused before anything is measured
    assert (cwd / "model_comparison.csv").read_text() == "an earlier report's"
    assert sorted(p.name for p in (tmp_path / "report").rglob("*")) == ["model_comparison.csv", "tensorboard"]


def test_an_out_dir_in_or_under_a_file_is_refused_before_any_work(emotion_dir, tiny_model_dir, tmp_path,
                                                                  monkeypatch, capsys):
    # benchmark measured every model and then failed to write its report (a traceback); vocab trained, then failed;
    # compress failed on mkdir with a FileExistsError traceback
    import emocompress.benchmark.run

    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    measured = []
    monkeypatch.setattr(emocompress.benchmark.run, "measure", lambda *args, **kwargs: measured.append(args))
    compress = ["compress", "-c", str(REPO / "configs" / "compress.yaml"), "--teacher", tiny_model_dir, "--base", "[]",
                "--test_base", "[]", "--first", "[]"]
    for args, out in ((["benchmark", "--models", json.dumps({"m": tiny_model_dir})], "notes.txt/report"),
                      (["vocab", "--vocab_size", "120"], "notes.txt/vocab"),
                      (compress, "notes.txt"), (compress, "notes.txt/search")):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--data", str(emotion_dir), "--out_dir", out])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"{out}: {tmp_path / 'notes.txt'} is a file, so the folder cannot be made there" in err, err
        assert "Traceback" not in err
    assert not measured
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emotion", "notes.txt"]
    check_can_create(tmp_path / "new" / "deeper")  # a folder that does not exist yet is fine


@pytest.mark.parametrize("dirname", ["..", ".", "", "a/b", "/tmp"])
def test_export_folder_names_stay_inside_the_run_folder(dirname):
    # <run>/.. is the folder of every run of the experiment: an export there would replace them all.
    from emocompress.callbacks.export import HFExport, OnnxExport
    from emocompress.compression.quantization import Int8Quantization

    for callback in (HFExport, OnnxExport, Int8Quantization):
        with pytest.raises(ValueError, match=rf"{callback.__name__}.dirname must be a plain folder name"):
            callback(dirname=dirname)


def _strict(text: str):
    """``json.loads`` as JavaScript's JSON.parse or jq read: the bare NaN/Infinity tokens are errors."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def test_an_undefined_metric_is_written_as_null_that_strict_parsers_read(tmp_path):
    from types import SimpleNamespace

    from emocompress.callbacks.metrics import TestMetricsWriter

    report = {"macro_f1": 0.5, "cohen_kappa": float("nan"), "intervals": {"cohen_kappa": [float("-inf"), 1.0]}}
    trainer = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path), is_global_zero=True)
    TestMetricsWriter().on_test_end(trainer, SimpleNamespace(test_report=report))
    assert _strict((tmp_path / "test_metrics.json").read_text()) == {
        "macro_f1": 0.5, "cohen_kappa": None, "intervals": {"cohen_kappa": [None, 1.0]}}
