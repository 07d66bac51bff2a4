"""OpenVINO artifacts of a ``transformers`` sequence classifier: an fp32 IR, or INT8 through NNCF, accuracy-controlled.

    folder = export_openvino(model, "deploy/openvino", tokenizer)                       # fp32 IR
    folder = export_openvino(model, "deploy/openvino_int8", tokenizer, precision="int8",
                             calibration_texts=train_texts, validation=(val_texts, val_label_ids), max_drop=0.01)

The IR is converted from the torch model itself (``openvino.convert_model`` with an example input and sdpa
attention, which OpenVINO maps to its own attention op). INT8 is NNCF's post-training quantization with the
``TRANSFORMER`` model type (NNCF's default preset loses several points of macro F1 on these models), calibrated
on train texts; given validation texts it is ``nncf.quantize_with_accuracy_control``: quantize, compare macro F1
on the validation texts with the float model's (``emocompress.evaluation``'s definition), and revert the most
harmful quantized layers to float until the drop is at most ``max_drop``; where reverting every layer it can does
not get there, NNCF returns its best model anyway, and this module refuses it (``ValueError``) instead of shipping it.

The folder follows the ONNX folders' contract (``emocompress.deploy.format``: ``model.xml`` and ``model.bin``,
``config.json``, the tokenizer and ``artifact.json`` with ``"backend": "openvino"``), so ``load_artifact``, the
benchmark and the torch-free ``emocompress.deploy.serve`` run it with the ``openvino`` package alone.
"""

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from emocompress.compression.export import _fp32_copy, _input_names, _onnx_meta, _save
from emocompress.deploy.format import DEFAULT_MAX_LENGTH, OPENVINO_FILE
from emocompress.evaluation.significance import confusion_matrices
from emocompress.models.loading import quiet_deprecations

log = logging.getLogger(__name__)


def export_openvino(model: nn.Module, out_dir: str | Path, tokenizer=None, max_length: int = DEFAULT_MAX_LENGTH,
                    precision: Literal["fp32", "int8"] = "fp32", calibration_texts: list[str] | None = None,
                    validation: tuple[list[str], list[int]] | None = None, max_drop: float = 0.01,
                    calibration_samples: int = 300) -> Path:
    """Write an OpenVINO copy of a ``transformers`` sequence classifier to a self-contained artifact folder.

    Args:
        model: an ``AutoModelForSequenceClassification`` model (any dtype and device; it is not changed).
        out_dir: the folder to write (replaced if it is an earlier artifact; written under a temporary name).
        tokenizer: a fast ``transformers`` tokenizer, saved beside the model; INT8 tokenizes its texts with it.
        max_length: tokens per text the server keeps (and calibration and validation use).
        precision: ``fp32``, or ``int8`` (NNCF, ``TRANSFORMER`` model type).
        calibration_texts: INT8: the texts whose activations set the quantization ranges (train texts).
        validation: INT8: (texts, true class ids) on which macro F1 may drop by at most ``max_drop``
            (``nncf.quantize_with_accuracy_control``); None quantizes every layer NNCF chooses, unchecked.
        max_drop: the largest macro-F1 drop (absolute, 0.01 = one point) INT8 may cost on ``validation``.
        calibration_samples: calibration texts used (the first ones).

    Returns:
        ``out_dir``, holding ``model.xml``, ``model.bin``, ``config.json``, the tokenizer and ``artifact.json``.

    Raises:
        ValueError: an unknown precision, INT8 without a tokenizer or calibration texts, a negative max_drop, or an
            INT8 model whose validation macro F1 is still more than ``max_drop`` below the float model's.
    """
    import openvino as ov

    if precision not in ("fp32", "int8"):
        raise ValueError(f"export_openvino: precision must be 'fp32' or 'int8', got {precision!r}")
    if precision == "int8" and (tokenizer is None or not calibration_texts):
        raise ValueError("export_openvino: INT8 needs the tokenizer and calibration texts (train texts)")
    if max_drop < 0:
        raise ValueError(f"export_openvino: max_drop must be at least 0, got {max_drop}")
    model = _fp32_copy(model, attn_implementation="sdpa")
    ov_model = convert(model)
    if precision == "int8":
        encode = _encoder(tokenizer, max_length, _input_names(model))
        ov_model = quantize_ir(ov_model, [encode(t) for t in calibration_texts[:calibration_samples]],
                               None if validation is None else ([encode(t) for t in validation[0]], validation[1]),
                               len(model.config.id2label), max_drop)
    meta = _onnx_meta(model, tokenizer, max_length, backend="openvino", precision=precision)
    out_dir = Path(out_dir)
    # compress_to_fp16=False: the float weights stay fp32, as the folder's precision says
    _save(out_dir, meta, model.config, tokenizer,
          lambda tmp: ov.save_model(ov_model, tmp / OPENVINO_FILE, compress_to_fp16=False))
    return out_dir


def convert(model: nn.Module):
    """The ``openvino.Model`` of an fp32 eval-mode classifier, with dynamic (batch, sequence) inputs named as the
    model's arguments."""
    import openvino as ov

    names = _input_names(model)
    # two rows of different lengths, so no shape is traced as a constant
    example = {n: torch.ones(2, 8, dtype=torch.long) for n in names}
    example["attention_mask"][1, 5:] = 0
    if "token_type_ids" in example:
        example["token_type_ids"].zero_()
    with quiet_deprecations(), torch.no_grad():
        return ov.convert_model(model, example_input=example)


def _encoder(tokenizer, max_length: int, names: list[str]):
    """text -> (1, T) int64 inputs of the graph."""
    def encode(text: str) -> dict[str, np.ndarray]:
        encoded = tokenizer(text, truncation=True, max_length=max_length, return_tensors="np")
        return {n: encoded[n].astype(np.int64) if n in encoded else np.zeros_like(encoded["input_ids"])
                for n in names}
    return encode


def macro_f1(target, preds, num_classes: int) -> float:
    """Macro F1 as every report of the project computes it (``emocompress.evaluation``)."""
    from emocompress.evaluation.metrics import metrics_from_confusion

    confusion = confusion_matrices(np.asarray(target), np.asarray(preds), num_classes)
    return metrics_from_confusion(torch.from_numpy(confusion))["macro_f1"][0].item()


def quantize_ir(ov_model, calibration: list[dict], validation: tuple[list[dict], list[int]] | None,
                num_classes: int, max_drop: float = 0.01):
    """INT8 ``openvino.Model`` of an fp32 one through NNCF (``TRANSFORMER`` model type).

    Args:
        calibration: inputs (name -> (1, T) int64), one per text.
        validation: (inputs, true class ids) for ``nncf.quantize_with_accuracy_control``; None: ``nncf.quantize``.
        num_classes: C, for macro F1.
        max_drop: the largest absolute macro-F1 drop on ``validation``.
    """
    import nncf

    calibration_set = nncf.Dataset(calibration)
    # Recurrent layers stay float: OpenVINO's CPU plugin compiles an LSTMSequence only with constant weights, and
    # NNCF's quantized ones are not ("expects Constant for port 4": a BiLSTM student's INT8 IR did not load).
    recurrent = nncf.IgnoredScope(types=["LSTMSequence", "GRUSequence", "RNNSequence"], validate=False)
    if validation is None:
        return nncf.quantize(ov_model, calibration_set, model_type=nncf.ModelType.TRANSFORMER,
                             subset_size=len(calibration), ignored_scope=recurrent)
    inputs, target = validation

    def validate(compiled, items) -> float:
        # items: (inputs, class id) pairs, all of validation or the subsets NNCF ranks layers on
        items = list(items)
        preds = [int(compiled(feeds)[0].argmax()) for feeds, _ in items]
        return macro_f1([label for _, label in items], preds, num_classes)

    validation_set = nncf.Dataset(list(zip(inputs, target)), lambda item: item[0])
    quantized = nncf.quantize_with_accuracy_control(
        ov_model, calibration_set, validation_set, validate, max_drop=max_drop,
        model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration), ignored_scope=recurrent)
    # NNCF returns its best model with an INFO line when reverting every layer it can does not reach max_drop
    # (the quantizers it leaves, e.g. on embeddings, can cost more); that model must not ship as "controlled".
    # Measured as it is served: fp32 for the float parts (deploy.runtime's default, and NNCF's own validation).
    import openvino as ov

    def val_f1(model) -> float:
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return validate(compiled, zip(inputs, target))

    drop = val_f1(ov_model) - val_f1(quantized)
    if drop > max_drop + 1e-9:
        raise ValueError(f"OpenVINO INT8: NNCF could not keep the validation macro-F1 drop within max_drop {max_drop} "
                         f"(it is {drop:.4f} with every layer it could revert back in float); allow a larger max_drop, "
                         f"calibrate on more texts, or quantize with the onnxruntime backend")
    return quantized
