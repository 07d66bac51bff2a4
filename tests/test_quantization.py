import json
import subprocess
import sys

import pytest
import torch
from lightning.pytorch import Trainer
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from emocompress.callbacks.metrics import TestMetricsWriter
from emocompress.compression.export import quantize
from emocompress.compression.quantization import Int8Quantization, OnCpu
from emocompress.data.datamodule import EmotionDataModule
from emocompress.deploy.format import ONNX_FILE, TORCH_WEIGHTS_FILE
from emocompress.models.classifier import EmotionClassifier
from emocompress.models.loading import OrtClassifier, load_artifact

TEXTS = ["i feel so happy today", "furious", "really loving and tender the day was"]

# Reload in a fresh interpreter and print the logits, so nothing is shared with the test process.
_RELOAD = """
import sys, torch
from transformers import AutoTokenizer
from emocompress.models.loading import load_artifact
model = load_artifact(sys.argv[1])
batch = AutoTokenizer.from_pretrained(sys.argv[1])(sys.argv[2:], return_tensors="pt", padding=True)
with torch.no_grad():
    print(model(**batch).logits.tolist())
"""


@pytest.fixture
def fp32(tiny_model_dir):
    torch.manual_seed(0)  # the 3-label head is freshly initialised: seed it, so logits are the same every run
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3,
                                                               ignore_mismatched_sizes=True).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("include_embeddings", [False, True])
def test_saved_int8_reloads_in_a_fresh_process_with_identical_logits(fp32, tmp_path, backend, include_embeddings):
    model, tokenizer = fp32
    quantized = quantize(model, backend, include_embeddings, tmp_path / "int8", tokenizer=tokenizer)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = quantized(**batch).logits
        reference = model(**batch).logits
    reloaded = subprocess.run([sys.executable, "-c", _RELOAD, tmp_path / "int8", *TEXTS], capture_output=True,
                              text=True, check=True).stdout
    assert torch.equal(torch.tensor(json.loads(reloaded)), logits)
    assert (logits - reference).abs().max() < 0.1  # INT8 is close to fp32, not equal
    assert logits.argmax(-1).tolist() == reference.argmax(-1).tolist()


def test_torch_backend_makes_linear_layers_int8(fp32):
    quantized = quantize(fp32[0], "torch")
    linears = [m for m in quantized.modules() if isinstance(m, DynamicInt8Linear)]
    assert len(linears) == sum(isinstance(m, torch.nn.Linear) for m in fp32[0].modules())
    assert all(m.weight().dtype == torch.qint8 for m in linears)
    assert not [m for m in quantized.modules() if type(m) is torch.nn.Linear]


def test_onnxruntime_artifact_holds_int8_weights(fp32, tmp_path):
    import onnx

    quantize(fp32[0], "onnxruntime", include_embeddings=True, out_dir=tmp_path / "int8")
    graph = onnx.load(tmp_path / "int8" / "model.onnx").graph
    int8 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    big_fp32 = [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2]
    # every weight matrix (linear layers, fused attention, embeddings) is INT8; the tiny model is too
    # small for the file size to show it (graph overhead), the benchmark measures that on MiniLM
    assert len(int8) >= sum(isinstance(m, torch.nn.Linear) for m in fp32[0].modules())
    assert big_fp32 == []


def test_load_rejects_other_folders(tmp_path):
    with pytest.raises(ValueError, match="not an INT8 model folder"):
        load_artifact(tmp_path)


def test_bad_backend_is_a_clear_error():
    with pytest.raises(ValueError, match=r"backend must be one of \['onnxruntime', 'torch', 'openvino'\], got 'tensorrt'"):
        Int8Quantization(backend="tensorrt")


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_callback_tests_the_int8_model(make_datamodule, tiny_model_dir, tiny_trainer, tmp_path, backend):
    dm = make_datamodule()
    model = EmotionClassifier(tiny_model_dir, dm.id2label)
    trainer = tiny_trainer(callbacks=[Int8Quantization(backend=backend), TestMetricsWriter()])
    logged = trainer.test(model, datamodule=dm)[0]
    assert isinstance(model.model, OrtClassifier) if backend == "onnxruntime" else \
        any(isinstance(m, DynamicInt8Linear) for m in model.model.modules())
    weights = tmp_path / "int8" / {"onnxruntime": ONNX_FILE, "torch": TORCH_WEIGHTS_FILE}[backend]
    assert logged["quant/size_mb"] == pytest.approx(weights.stat().st_size / 1e6, rel=1e-6)  # the file's MB
    assert (tmp_path / "int8" / "artifact.json").is_file()
    report = json.loads((tmp_path / "test_metrics.json").read_text())  # TestMetricsWriter: the INT8 model's report
    assert report["macro_f1"] == pytest.approx(logged["test/macro_f1"])
    assert report == model.test_report


def test_int8_model_inside_a_loop_on_another_device(fp32, tmp_path):
    # A GPU test loop hands the INT8 model batches on the GPU and computes the loss there: OnCpu runs the
    # CPU-only model on CPU copies and returns the logits on the loop's device ("meta" stands in for cuda).
    model, tokenizer = fp32
    int8 = quantize(model, "onnxruntime", out_dir=tmp_path / "int8", tokenizer=tokenizer)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    logits = OnCpu(int8, torch.device("meta"))(**batch).logits
    assert logits.device.type == "meta" and logits.shape == (3, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_int8_after_a_gpu_fit_tests_on_the_cpu_by_itself(emotion_dir, tiny_model_dir, tmp_path):
    dm = EmotionDataModule(str(emotion_dir), tokenizer=tiny_model_dir)
    model = EmotionClassifier(tiny_model_dir, dm.id2label)
    trainer = Trainer(accelerator="gpu", devices=1, logger=False, enable_progress_bar=False, max_epochs=1,
                      default_root_dir=tmp_path, callbacks=[Int8Quantization()])
    trainer.fit(model, datamodule=dm)
    on_gpu = trainer.test(model, datamodule=dm)[0]
    assert isinstance(model.model, OnCpu) and (tmp_path / "int8" / "artifact.json").is_file()
    model.model = model.model.model  # the same INT8 model, now in a CPU test loop
    cpu = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    assert cpu.test(model, datamodule=dm)[0]["test/macro_f1"] == pytest.approx(on_gpu["test/macro_f1"])


def test_test_metrics_writer_writes_rank_zero_report_only(tmp_path):
    from types import SimpleNamespace

    module = SimpleNamespace(test_report={"macro_f1": 0.5, "per_class": {"joy": {"f1": 0.5}}})
    for rank, folder in enumerate([tmp_path / "rank0", tmp_path / "rank1"]):
        trainer = SimpleNamespace(log_dir=str(folder), default_root_dir=str(folder), is_global_zero=rank == 0)
        TestMetricsWriter().on_test_end(trainer, module)
    assert json.loads((tmp_path / "rank0" / "test_metrics.json").read_text()) == module.test_report
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(ValueError, match="plain file name"):
        TestMetricsWriter(filename="a/b.json")


@pytest.mark.parametrize("model_type", ["roberta", "distilbert"])
def test_onnxruntime_backend_handles_other_architectures(model_type):
    # RoBERTa's tokenizer makes no token_type_ids; DistilBERT's forward takes none.
    config = AutoConfig.for_model(model_type, vocab_size=50, hidden_size=16, dim=16, num_hidden_layers=2,
                                  n_layers=2, num_attention_heads=2, n_heads=2, intermediate_size=32,
                                  hidden_dim=32, max_position_embeddings=64, num_labels=3)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    batch = {"input_ids": torch.randint(5, 50, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    with torch.no_grad():
        reference = model(**batch).logits
        logits = quantize(model, "onnxruntime")(**batch).logits
    assert logits.shape == (2, 3)
    assert (logits - reference).abs().max() < 0.1


def test_planted_pickle_in_an_int8_folder_is_refused(fp32, tmp_path, malicious_checkpoint):
    path, marker = malicious_checkpoint
    quantize(fp32[0], "torch", out_dir=tmp_path / "int8")
    (tmp_path / "int8" / "int8_state_dict.pt").write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="refused or unreadable as INT8 weights"):
        load_artifact(tmp_path / "int8")
    assert not marker.exists()
