"""The runtimes of an artifact folder: the one place that opens its ``model.onnx`` (ONNX Runtime) or ``model.xml``
(OpenVINO), for the torch-free server and for ``emocompress.models.loading.OrtClassifier`` alike, behind one call:
``open_runtime(file, labels).logits(inputs)``. Torch-free (numpy, onnxruntime, openvino)."""

import importlib
import threading
from pathlib import Path

import numpy as np

from emocompress.deploy.format import FIX, ONNX_FILE, OPENVINO_FILE, is_int, metadata_file

# The inputs a sequence classifier's graph may declare, all (B, T) int64; DistilBERT and the small-encoder students
# take no token_type_ids.
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# OpenVINO's performance hints: ``latency`` runs one call on all threads, ``throughput`` splits the cores into
# streams for concurrent calls (which a single caller does not make).
HINTS = ("latency", "throughput")
# The choices of ``--inference_precision`` (servers, benchmark): OpenVINO's ``INFERENCE_PRECISION_HINT``, or ``auto``
# for OpenVINO's own choice (bf16 on CPUs with AVX512-BF16 or AMX).
PRECISION_CHOICES = ("f32", "bf16", "auto")


def precision_hint(choice: str) -> str | None:
    """The ``inference_precision`` of ``open_runtime`` for a ``PRECISION_CHOICES`` entry (``auto``: None)."""
    if choice not in PRECISION_CHOICES:
        raise ValueError(f"inference precision must be one of {list(PRECISION_CHOICES)}, got {choice!r}")
    return None if choice == "auto" else choice


def _import_runtime(name: str, model_file: str | Path):
    """The runtime package ``name`` (``onnxruntime``, ``openvino``): a server installs only the one its folders need
    (docs/deployment.md), so a folder of the other kind gets one line naming its graph and the install, not a
    traceback."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ValueError(f"{model_file}: running it needs the {name} package, which is not installed; "
                         f"pip install {name}") from None


def open_session(onnx_file: str | Path, labels: list[str], num_threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` of an artifact's ``model.onnx`` on the CPU, checked against its labels.

    Args:
        onnx_file: the graph (``model.onnx`` in an artifact folder).
        labels: the folder's labels (``read_metadata(folder).labels``): the graph must have one output per label.
        num_threads: intra-op threads (default: all cores).

    Raises:
        ValueError: onnxruntime is not installed or cannot load the file, the graph's output width is not the label
            count (``check_output_width``), or it takes inputs other than ``INPUT_NAMES``; the message names the file.
    """
    onnx_file = Path(onnx_file)
    ort = _import_runtime("onnxruntime", onnx_file)
    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
    try:
        session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) share no public base class
        raise ValueError(f"{onnx_file}: onnxruntime cannot load it ({err}); {FIX}") from None
    check_output_width(session, labels, onnx_file.parent)
    _check_inputs([i.name for i in session.get_inputs()], onnx_file)
    return session


def _check_inputs(names: list[str], model_file: Path) -> None:
    unknown = set(names) - set(INPUT_NAMES)
    if unknown:
        raise ValueError(f"{model_file}: takes inputs {sorted(unknown)} a sequence classifier does not; {FIX}")


def _feeds(names: list[str], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Only the inputs the graph declares; a missing ``token_type_ids`` is all zeros (the models' own default)."""
    if "token_type_ids" in names and "token_type_ids" not in inputs:
        inputs = {**inputs, "token_type_ids": np.zeros_like(inputs["input_ids"])}
    return {name: inputs[name] for name in names}


class OrtRuntime:
    """An ONNX Runtime session with its input names read once (``session.get_inputs`` costs per call)."""

    def __init__(self, session):
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]

    def logits(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """(B, C) float logits for (B, T) int64 ``inputs``."""
        return self.session.run(None, _feeds(self.input_names, inputs))[0]


class OpenVinoRuntime:
    """An OpenVINO model compiled for the CPU, called through one reused inference request (a lock keeps
    concurrent callers, e.g. a threaded server, from sharing it mid-call).

    Args:
        xml_file: the IR (``model.xml``, its weights in ``model.bin`` beside it).
        labels: the folder's labels: the model must have one output per label.
        num_threads: inference threads (default: all cores).
        hint: ``latency`` or ``throughput`` (OpenVINO's ``PERFORMANCE_HINT``).
        inference_precision: OpenVINO's ``INFERENCE_PRECISION_HINT``; ``f32`` (default) computes the float
            parts in fp32 on every CPU, None leaves OpenVINO's choice (bf16 on CPUs with AVX512-BF16 or AMX,
            which changes the logits from one CPU to another).

    Raises:
        ValueError: OpenVINO is not installed or cannot read or compile the file, its output width is not the label
            count, or it takes inputs other than ``INPUT_NAMES``; the message names the file.
    """

    def __init__(self, xml_file: str | Path, labels: list[str], num_threads: int | None = None,
                 hint: str = "latency", inference_precision: str | None = "f32"):
        if hint not in HINTS:
            raise ValueError(f"OpenVINO hint must be one of {list(HINTS)}, got {hint!r}")
        self.path = str(xml_file)
        ov = _import_runtime("openvino", xml_file)
        config = {"PERFORMANCE_HINT": hint.upper()}
        if num_threads:
            config["INFERENCE_NUM_THREADS"] = num_threads
        if inference_precision:
            config["INFERENCE_PRECISION_HINT"] = inference_precision
        try:
            self.compiled = ov.Core().compile_model(self.path, "CPU", config)
        except RuntimeError as err:  # OpenVINO reports unreadable, truncated and unsupported files alike
            raise ValueError(f"{xml_file}: OpenVINO cannot load it ({str(err).strip().splitlines()[-1]}); "
                             f"{FIX}") from None
        width = self.compiled.output(0).get_partial_shape()[-1]
        _check_width(width.get_length() if width.is_static else None, labels, Path(xml_file).parent, OPENVINO_FILE)
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        _check_inputs(self.input_names, Path(xml_file))
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()

    def logits(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """(B, C) float logits for (B, T) int64 ``inputs``."""
        with self._lock:
            self._request.infer(_feeds(self.input_names, inputs), share_inputs=True)
            # the request reuses its output buffer on the next call
            return self._request.get_output_tensor(0).data.copy()


def open_runtime(model_file: str | Path, labels: list[str], num_threads: int | None = None,
                 hint: str = "latency", inference_precision: str | None = "f32") -> OrtRuntime | OpenVinoRuntime:
    """The runtime of an artifact's graph: ONNX Runtime for ``model.onnx``, OpenVINO for ``model.xml``
    (``hint`` and ``inference_precision`` are OpenVINO's alone); either is called as ``.logits(inputs)``. Raises
    as ``open_session`` and ``OpenVinoRuntime``."""
    if Path(model_file).suffix == ".xml":
        return OpenVinoRuntime(model_file, labels, num_threads, hint, inference_precision)
    return OrtRuntime(open_session(model_file, labels, num_threads))


def check_output_width(session, labels: list[str], folder: str | Path) -> None:
    """Refuse an ONNX folder whose metadata names another number of labels than its graph has outputs: more
    labels would crash at the first prediction, fewer would silently drop classes.

    Args:
        session: the ``onnxruntime.InferenceSession`` of the folder's ``model.onnx``.
        labels: the labels of its metadata (``ArtifactMeta.labels``).

    Raises:
        ValueError: naming the metadata file, both counts and the fix.
    """
    shape = session.get_outputs()[0].shape  # e.g. ["batch", 6]; a symbolic width (a str) cannot be checked
    _check_width(shape[-1] if shape else None, labels, folder, ONNX_FILE)


def _check_width(width, labels: list[str], folder: str | Path, model_name: str) -> None:
    if is_int(width) and width != len(labels):
        raise ValueError(f"{metadata_file(folder)}: {len(labels)} labels {labels}, but its {model_name} outputs "
                         f"{width} classes; {FIX} (the labels are those of the model exported)")
