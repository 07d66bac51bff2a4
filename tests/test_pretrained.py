"""Where models come from (``emocompress.models.pretrained``): a model folder's own Python code runs only when the
command line or config of this run allows it, never because a file (a checkpoint's hyper-parameters, a
Distiller's teacher) says so, and never by answering transformers' "[y/N]" prompt."""

import io
import json
import os
import shutil
import subprocess
import sys

import lightning
import pytest
import torch

from emocompress.benchmark.variants import load_for_benchmark
from emocompress.compression.distillation import Distiller
from emocompress.models import pretrained
from emocompress.models.classifier import EmotionClassifier

from .test_cli import CONFIGS

ID2LABEL = {0: "anger", 1: "joy", 2: "love"}
REFUSED = r"runs its own Python code .* only when this run allows it.*--data.trust_remote_code true"


@pytest.fixture
def remote_code_folder(tiny_model_dir, tmp_path):
    """(a model folder whose config and tokenizer config name its own code in ``auto_map``, the file that code
    creates on import). Its model type is unknown to transformers, so it loads only with its code, which is a
    plain BERT and its tokenizer."""
    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "code-ran"
    (folder / "custom_code.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import BertConfig, BertForSequenceClassification, BertTokenizer\n"
        "class CustomConfig(BertConfig):\n    model_type = 'custom-bert'\n"
        "class CustomModel(BertForSequenceClassification):\n    config_class = CustomConfig\n"
        "class CustomTokenizer(BertTokenizer):\n    pass\n")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "custom-bert"
    config["auto_map"] = {"AutoConfig": "custom_code.CustomConfig",
                          "AutoModelForSequenceClassification": "custom_code.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "CustomTokenizer"
    config["auto_map"] = {"AutoTokenizer": [None, "custom_code.CustomTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder, marker


@pytest.fixture
def answer_yes(monkeypatch):
    """Whoever asks "run the custom code? [y/N]" on stdin gets "y"."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 100))


def test_loaders_refuse_a_folder_s_code_in_one_line_even_if_stdin_says_yes(remote_code_folder, answer_yes):
    folder, marker = remote_code_folder
    for load in (pretrained.load_config, pretrained.load_model, pretrained.load_tokenizer):
        with pytest.raises(ValueError, match=REFUSED) as err:
            load(str(folder))
        assert str(folder) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def _checkpoint(path, hyper_parameters, state_dict):
    """A plain-data Lightning checkpoint (passes the weights_only check) with these hyper-parameters."""
    torch.save({"state_dict": state_dict, "hyper_parameters": hyper_parameters,
                "pytorch-lightning_version": lightning.__version__}, path)
    return str(path)


def test_a_checkpoint_s_own_trust_remote_code_is_never_obeyed(remote_code_folder, tiny_model_dir, tiny_teacher_dir,
                                                               tmp_path, answer_yes):
    folder, marker = remote_code_folder
    classifier = EmotionClassifier(tiny_model_dir, ID2LABEL)
    hparams = {**classifier.hparams, "model_name": str(folder), "trust_remote_code": True}
    ckpt = _checkpoint(tmp_path / "classifier.ckpt", hparams, classifier.state_dict())
    # the benchmark loads a classifier checkpoint, a Distiller checkpoint (whose teacher is the folder), and
    # a Distiller run takes the classifier checkpoint as its teacher: each with this run's setting, False
    student = Distiller(teacher=tiny_teacher_dir, student="pretrained", model_name=tiny_model_dir, id2label=ID2LABEL)
    distiller = _checkpoint(tmp_path / "distiller.ckpt",
                            {**student.hparams, "teacher": str(folder), "trust_remote_code": True},
                            student.state_dict())
    for path in (ckpt, distiller):
        with pytest.raises(ValueError, match=REFUSED):
            load_for_benchmark(path)
    with pytest.raises(ValueError, match=REFUSED):
        Distiller(teacher=ckpt, model_name=tiny_model_dir, id2label=ID2LABEL)
    assert not marker.exists()
    # over folders without code of their own, the same checkpoints load as ever
    for hparams, state in ((classifier.hparams, classifier.state_dict()), (student.hparams, student.state_dict())):
        path = _checkpoint(tmp_path / "plain.ckpt", {**hparams, "trust_remote_code": True}, state)
        model, tokenizer_path, _ = load_for_benchmark(path)
        assert tokenizer_path == tiny_model_dir and type(model).__name__ == "BertForSequenceClassification"


def _cli(*args, cwd, stdin: str = ""):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false",
           "HF_MODULES_CACHE": str(cwd / "hf_modules")}  # where transformers copies a folder's code to import it
    return subprocess.run([sys.executable, "-m", "emocompress.cli", *map(str, args)], cwd=cwd, env=env,
                          input=stdin, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_runs_a_folder_s_code_only_when_this_run_allows_it(remote_code_folder, emotion_dir, tiny_model_dir,
                                                              tmp_path):
    folder, marker = remote_code_folder
    fit = ["fit", "-c", CONFIGS / "trainer/default.yaml", "-c", CONFIGS / "overlays/tiny.yaml", "--data.data", emotion_dir,
           "--trainer.max_epochs", 1, "--test_after_fit", "false"]
    refused = _cli(*fit, "--model.model_name", folder, cwd=tmp_path, stdin="y\n" * 100)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "--data.trust_remote_code true" in refused.stderr and "Traceback" not in refused.stderr
    assert not marker.exists()
    # test a checkpoint that says trust_remote_code: true, with a folder whose model (not tokenizer) needs its
    # code: Lightning parses a --ckpt_path's hyper-parameters into the model's settings, but this run's false wins
    shutil.copy(os.path.join(tiny_model_dir, "tokenizer_config.json"), folder)
    classifier = EmotionClassifier(tiny_model_dir, ID2LABEL)
    ckpt = _checkpoint(tmp_path / "says-trust.ckpt",
                       {**classifier.hparams, "model_name": str(folder), "trust_remote_code": True},
                       classifier.state_dict())
    refused = _cli("test", "-c", CONFIGS / "trainer/default.yaml", "-c", CONFIGS / "overlays/tiny.yaml", "--data.data", emotion_dir,
                   "--model.model_name", folder, "--ckpt_path", ckpt, cwd=tmp_path, stdin="y\n" * 100)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "--data.trust_remote_code true" in refused.stderr
    assert not marker.exists()
    # allowed on this run's command line, the folder's code runs: the refusals above were the rule, not luck
    allowed = _cli(*fit, "--model.model_name", folder, "--data.trust_remote_code", "true", cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert marker.exists()
