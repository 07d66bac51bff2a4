"""ONNX Runtime sessions: the one place that opens an artifact's ``model.onnx``, for the torch-free server and for
``emocompress.models.loading.OrtClassifier`` alike. Torch-free (numpy and onnxruntime)."""

from pathlib import Path

import numpy as np

from emocompress.deploy.format import FIX, ONNX_FILE, is_int, metadata_file

# The inputs a sequence classifier's graph may declare, all (B, T) int64; DistilBERT and the small-encoder students
# take no token_type_ids.
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def open_session(onnx_file: str | Path, labels: list[str], num_threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` of an artifact's ``model.onnx`` on the CPU, checked against its labels.

    Args:
        onnx_file: the graph (``model.onnx`` in an artifact folder).
        labels: the folder's labels (``read_metadata(folder).labels``): the graph must have one output per label.
        num_threads: intra-op threads (default: all cores).

    Raises:
        ValueError: onnxruntime cannot load the file, the graph's output width is not the label count
            (``check_output_width``), or it takes inputs other than ``INPUT_NAMES``; the message names the file.
    """
    import onnxruntime as ort

    onnx_file = Path(onnx_file)
    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
    try:
        session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) share no public base class
        raise ValueError(f"{onnx_file}: onnxruntime cannot load it ({err}); {FIX}") from None
    check_output_width(session, labels, onnx_file.parent)
    unknown = {i.name for i in session.get_inputs()} - set(INPUT_NAMES)
    if unknown:
        raise ValueError(f"{onnx_file}: takes inputs {sorted(unknown)} a sequence classifier does not; {FIX}")
    return session


def run_logits(session, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """(B, C) float logits of ``session`` for (B, T) int64 ``inputs``; only the inputs the graph declares are fed,
    and a missing ``token_type_ids`` is all zeros (the models' own default)."""
    names = [i.name for i in session.get_inputs()]
    if "token_type_ids" in names and "token_type_ids" not in inputs:
        inputs = {**inputs, "token_type_ids": np.zeros_like(inputs["input_ids"])}
    return session.run(None, {name: inputs[name] for name in names})[0]


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
    width = shape[-1] if shape else None
    if is_int(width) and width != len(labels):
        raise ValueError(f"{metadata_file(folder)}: {len(labels)} labels {labels}, but its {ONNX_FILE} outputs "
                         f"{width} classes; {FIX} (the labels are those of the model exported)")
