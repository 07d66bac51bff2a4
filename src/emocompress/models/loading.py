"""Where a model comes from: every folder, file or name a model is loaded from, for every caller."""

import contextlib
import dataclasses
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from emocompress.deploy.format import (
    ONNX_FILE,
    OPENVINO_FILE,
    TORCH_WEIGHTS_FILE,
    metadata_file,
    read_metadata,
)
from emocompress.deploy.runtime import INPUT_NAMES, open_runtime
from emocompress.models import (
    pretrained,
    structure,
    students,  # noqa: F401  (registers SmallEncoderClassifier with the Auto classes)
)
from emocompress.models.checkpoints import checkpoint_max_length, load_network, read_checkpoint


def trained_max_length(path: str | Path) -> int | None:
    """Tokens per text the model at ``path`` was trained with (a checkpoint's datamodule hyper-parameters, an
    ``hf_model`` export's tokenizer) or is served with (an artifact folder's metadata); None where nothing records
    it (an ``hf_model`` export older than the record, a hub model)."""
    path = Path(path)
    if path.suffix == ".ckpt":
        return checkpoint_max_length(str(path))
    return read_metadata(path).max_length if metadata_file(path).is_file() else pretrained.exported_max_length(path)


@contextlib.contextmanager
def quiet_deprecations():
    # torch.ao.quantization and the TorchScript ONNX exporter warn that they are deprecated on every call.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def torch_int8(model: nn.Module, include_embeddings: bool) -> nn.Module:
    """A copy of ``model`` with INT8 ``nn.Linear`` weights (and ``nn.Embedding`` tables, if asked);
    activations are quantized on the fly per batch."""
    from torch.ao.quantization import default_dynamic_qconfig, float_qparams_weight_only_qconfig, quantize_dynamic

    # Not nn.LSTM: its quantized weights save as TorchScript objects, which weights_only loading refuses.
    spec = {nn.Linear: default_dynamic_qconfig}
    if include_embeddings:
        spec[nn.Embedding] = float_qparams_weight_only_qconfig
    with quiet_deprecations():
        return quantize_dynamic(model, spec, dtype=torch.qint8)


@dataclasses.dataclass(slots=True)
class LogitsOutput:
    """What a runtime-backed classifier returns: ``.logits`` (B, C), as a ``SequenceClassifierOutput`` has them.
    A plain dataclass: building a ``transformers`` ``ModelOutput`` costs a sizeable share of a batch-1 INT8 call."""

    logits: torch.Tensor


class OrtClassifier(nn.Module):
    """An ONNX Runtime session (``model.onnx``) or an OpenVINO compiled model (``model.xml``) behind the
    ``AutoModelForSequenceClassification`` call signature: ``model(input_ids=..., attention_mask=...).logits`` is a
    (B, C) float tensor on the CPU.

    Args:
        path: the graph file of an artifact folder.
        config: the model's ``transformers`` config (its labels are checked against the graph's outputs).
        num_threads: runtime threads (default: all cores).
        hint: OpenVINO's performance hint, ``latency`` or ``throughput``.
        inference_precision: OpenVINO's float precision, ``f32`` (default: the same logits on every CPU), ``bf16``,
            or None (OpenVINO's choice); see ``emocompress.deploy.runtime.OpenVinoRuntime``.
    """

    def __init__(self, path: str | Path, config, num_threads: int | None = None, hint: str = "latency",
                 inference_precision: str | None = "f32"):
        super().__init__()
        self.path = str(path)
        self.runtime = open_runtime(path, [config.id2label[i] for i in range(config.num_labels)], num_threads, hint,
                                    inference_precision)
        self.session = getattr(self.runtime, "session", None)  # ONNX Runtime's, None for OpenVINO
        self.config = config

    def forward(self, **inputs) -> LogitsOutput:
        # CPU tensors share their memory with numpy both ways: no copy in, none out.
        feeds = {name: value.numpy(force=True) for name, value in inputs.items()
                 if name in INPUT_NAMES}
        return LogitsOutput(torch.from_numpy(self.runtime.logits(feeds)))


def attention_kwargs(config, implementation: str) -> dict:
    """``attn_implementation`` for models with attention; small-encoder students have none to choose."""
    return {"attn_implementation": implementation} if hasattr(config, "num_attention_heads") else {}


def load_artifact(path: str | Path, num_threads: int | None = None,
                  inference_precision: str | None = "f32") -> nn.Module:
    """Load an INT8 model saved by ``quantize``/``Int8Quantization``, or an fp32 ONNX folder written by
    ``export_onnx``/``OnnxExport``, or an OpenVINO folder written by ``export_openvino``, in a fresh process. ONNX
    and OpenVINO folders load as an ``OrtClassifier``.

    Nothing executes code from the folder: the torch backend's weights load with
    ``torch.load(weights_only=True)`` into a freshly quantized skeleton built from ``config.json``.

    Args:
        path: the artifact folder.
        num_threads: ONNX Runtime or OpenVINO threads (default: all cores).
        inference_precision: OpenVINO folders: ``OrtClassifier``'s ``inference_precision``.

    Returns:
        The model, CPU-only, called like a ``transformers`` classifier: ``model(**batch).logits``.

    Raises:
        ValueError: ``path`` is not such a folder, its metadata is refused (see
            ``emocompress.deploy.format.read_metadata``), its labels are not as many as its graph's outputs
            (``check_output_width``) or its weights are unreadable.
    """
    path = Path(path)
    meta = read_metadata(path)
    config = pretrained.load_config(str(path))
    if meta.backend in ("onnxruntime", "openvino"):
        return OrtClassifier(path / (ONNX_FILE if meta.backend == "onnxruntime" else OPENVINO_FILE), config,
                             num_threads, inference_precision=inference_precision)
    skeleton = structure.build(config, **attention_kwargs(config, "sdpa")).eval()
    model = torch_int8(skeleton, meta.include_embeddings)
    try:
        state = torch.load(path / TORCH_WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # a planted pickle is refused by weights_only; a truncated file fails in many ways
        raise ValueError(f"{path / TORCH_WEIGHTS_FILE}: refused or unreadable as INT8 weights ({type(err).__name__}); "
                         "re-create the folder with Int8Quantization") from err
    model.load_state_dict(state)
    return model


def is_distiller_checkpoint(hparams: dict) -> bool:
    """Whether a Lightning checkpoint's ``hyper_parameters`` are a ``Distiller``'s: it names a teacher. Its student
    may be cut from that teacher, so only the ``Distiller`` can rebuild it; an ``EmotionClassifier``'s network
    rebuilds from ``model_name`` and ``id2label`` alone (``load_classifier``)."""
    return "teacher" in hparams


def load_folder(path: str | Path, trust_remote_code: bool = False, num_threads: int | None = None,
                inference_precision: str | None = "f32") -> nn.Module:
    """The model in a folder, in eval mode: an ONNX/INT8 artifact (``load_artifact``) or an ``hf_model`` export
    (``pretrained.load_model``)."""
    if metadata_file(path).is_file():
        return load_artifact(path, num_threads, inference_precision)
    return pretrained.load_model(str(path), trust_remote_code=trust_remote_code).eval()


def load_classifier(source: str, trust_remote_code: bool = False) -> tuple[PreTrainedModel, object]:
    """The teacher network and its tokenizer from an ``hf_model`` export folder, a hub name, or an
    ``EmotionClassifier`` Lightning checkpoint (``.ckpt``, read with ``weights_only=True``).

    Raises:
        ValueError: the checkpoint cannot be read or is not an ``EmotionClassifier``'s.
    """
    if not source.endswith(".ckpt"):
        path = pretrained.resolve(source)
        return (pretrained.load_model(path, trust_remote_code=trust_remote_code),
                pretrained.load_tokenizer(path, trust_remote_code=trust_remote_code))
    try:
        hparams = read_checkpoint(source).get("hyper_parameters", {})
    except ValueError as err:
        raise ValueError(f"model.teacher: {err}") from err
    if is_distiller_checkpoint(hparams) or "model_name" not in hparams or "id2label" not in hparams:
        raise ValueError(f"model.teacher: {source} is not an EmotionClassifier checkpoint; give the hf_model folder "
                         "that its run exported instead")
    id2label = {int(i): name for i, name in hparams["id2label"].items()}
    base = pretrained.resolve(hparams["model_name"])
    model = pretrained.load_model(
        base, num_labels=len(id2label), id2label=id2label, label2id={n: i for i, n in id2label.items()},
        ignore_mismatched_sizes=True, trust_remote_code=trust_remote_code)
    try:
        load_network(model, source)
    except ValueError as err:
        raise ValueError(f"model.teacher: {err}") from err
    return model, pretrained.load_tokenizer(base, trust_remote_code=trust_remote_code)
