"""ONNX and INT8 artifacts of a ``transformers`` sequence classifier: write them, read them back.

Two INT8 backends behind one option, both CPU-only:
  * ``onnxruntime``: export with the TorchScript-based ONNX exporter (with eager attention, which
    onnxruntime's BERT optimizer fuses into ``Attention`` nodes), optimize, then
    ``onnxruntime.quantization.quantize_dynamic``. The deployment standard on CPU, and the fastest here.
  * ``torch``: ``torch.ao.quantization.quantize_dynamic`` of the ``nn.Linear`` layers (deprecated in
    recent torch, still working). Saved as a state_dict that reloads into a re-quantized skeleton with
    ``torch.load(weights_only=True)``.

``export_onnx`` writes the same kind of folder in fp32 (for any trained, pruned or distilled model).
Every ONNX folder holds ``model.onnx``, ``config.json``, the tokenizer and a metadata file (input
names, ``max_length``, ``id2label``, padding token; format in ``emocompress.deploy.format``), so
``emocompress.deploy.serve`` can run it with only onnxruntime and tokenizers installed. ``load_artifact``
reads any of these folders back. The ``Int8Quantization`` and ``OnnxExport`` callbacks call this module.
"""

import inspect
import logging
import tempfile
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from emocompress.deploy.format import (
    DEFAULT_MAX_LENGTH,
    META_FILE,
    ONNX_FILE,
    TORCH_WEIGHTS_FILE,
    ArtifactMeta,
    metadata_file,
)
from emocompress.deploy.runtime import INPUT_NAMES
from emocompress.io import atomic_dir, check_replaceable
from emocompress.models import (
    pretrained,
    structure,
    students,  # noqa: F401  (registers SmallEncoderClassifier with the Auto classes)
)
from emocompress.models.loading import OrtClassifier, attention_kwargs, quiet_deprecations, torch_int8

log = logging.getLogger(__name__)

Backend = Literal["onnxruntime", "torch"]


def quantize(model: nn.Module, backend: Backend = "onnxruntime", include_embeddings: bool = False,
             out_dir: str | Path | None = None, num_threads: int | None = None, tokenizer=None,
             max_length: int = DEFAULT_MAX_LENGTH) -> nn.Module:
    """INT8 copy of a ``transformers`` sequence classifier, optionally saved to ``out_dir``.

    Args:
        model: an ``AutoModelForSequenceClassification`` model (fp32, any device; it is not changed).
        backend: ``onnxruntime`` or ``torch`` (see the module docstring).
        include_embeddings: quantize the embedding tables too (about half of a MiniLM's bytes).
        out_dir: folder to save the INT8 model in (``load_artifact`` reads it back); a temporary one if None
            with ``onnxruntime``, nothing saved with ``torch``.
        num_threads: ONNX Runtime intra-op threads (default: all cores).
        tokenizer: saved beside the model, so the folder is all a user needs.
        max_length: tokens per text that ``emocompress.deploy.serve`` keeps (recorded, ``onnxruntime`` only).

    Returns:
        The INT8 model, CPU-only, called like the original: ``model(**batch).logits``.
    """
    model = _fp32_copy(model, attn_implementation="sdpa" if backend == "torch" else "eager")
    meta = {"backend": backend, "precision": "int8", "include_embeddings": include_embeddings}
    if backend == "torch":
        quantized = torch_int8(model, include_embeddings)
        if out_dir is not None:
            _save(out_dir, ArtifactMeta(**meta, id2label=_id2label(model.config)), model.config, tokenizer,
                  lambda tmp: torch.save(quantized.state_dict(), tmp / TORCH_WEIGHTS_FILE))
        return quantized
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="emocompress-int8-"))
    _save(out_dir, _onnx_meta(model, tokenizer, max_length, **meta), model.config, tokenizer,
          lambda tmp: _write_onnx_int8(model, tmp / ONNX_FILE, include_embeddings, _pads_left(tokenizer)))
    return OrtClassifier(out_dir / ONNX_FILE, model.config, num_threads)


def export_onnx(model: nn.Module, out_dir: str | Path, tokenizer=None, optimize: bool = True,
                max_length: int = DEFAULT_MAX_LENGTH) -> Path:
    """Write an fp32 ONNX copy of a ``transformers`` sequence classifier to a self-contained folder.

    Works for fine-tuned, pruned (zeros stay zeros; ONNX stores them densely) and distilled models,
    including ``SmallEncoderClassifier`` students. ``load_artifact`` reads the folder back as an
    ``OrtClassifier``; ``python -m emocompress.deploy.serve`` serves it with only onnxruntime and tokenizers.

    Args:
        model: an ``AutoModelForSequenceClassification`` model (any dtype and device; it is not changed).
        out_dir: the folder to write (replaced if it exists; written under a temporary name, then renamed).
        tokenizer: a fast ``transformers`` tokenizer, saved beside the model (its ``tokenizer.json`` is what
            the server reads).
        optimize: fuse attention and layer norms with onnxruntime's BERT optimizer (transformers only;
            small-encoder students have no attention to fuse).
        max_length: tokens per text the server keeps, lowered to the model's position limit if above it.

    Returns:
        ``out_dir``, holding ``model.onnx``, ``config.json``, the tokenizer files and ``artifact.json``
        (metadata, ``"precision": "fp32"``).
    """
    model = _fp32_copy(model, attn_implementation="eager")
    out_dir = Path(out_dir)
    meta = _onnx_meta(model, tokenizer, max_length, backend="onnxruntime", precision="fp32")
    _save(out_dir, meta, model.config, tokenizer,
          lambda tmp: _write_onnx_fp32(model, tmp / ONNX_FILE, optimize, _pads_left(tokenizer)))
    return out_dir


def _fp32_copy(model: nn.Module, attn_implementation: str) -> nn.Module:
    """A plain CPU fp32 eval-mode copy of ``model``. Eager attention exports as plain MatMul/Softmax,
    which onnxruntime's BERT optimizer fuses into one Attention op; torch runs faster with sdpa."""
    copy = structure.build(model.config, **attention_kwargs(model.config, attn_implementation))
    copy.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    return copy.eval()


def _input_names(model: nn.Module) -> list[str]:
    # DistilBERT takes no token_type_ids; RoBERTa takes them but its tokenizer makes none (OrtClassifier
    # and the server then feed zeros, the model's own default).
    return [n for n in INPUT_NAMES if n in inspect.signature(model.forward).parameters]


def datamodule_max_length(datamodule) -> int:
    """Tokens per text the data kept in training (``EmotionDataModule.max_length``), which a server must
    truncate to; ``DEFAULT_MAX_LENGTH`` for a datamodule without one (or none at all)."""
    return getattr(datamodule, "max_length", DEFAULT_MAX_LENGTH)


def _id2label(config) -> dict[str, str]:
    return {str(i): label for i, label in config.id2label.items()}


def _onnx_meta(model: nn.Module, tokenizer, max_length: int, **meta) -> ArtifactMeta:
    """``meta`` plus what a server needs beyond the graph: inputs, label names, truncation length and
    padding token."""
    # Longer inputs would index past the position table.
    limit = pretrained.position_limit(model.config, tokenizer) or max_length
    if max_length > limit:
        log.warning("ONNX export: max_length %d is above the model's limit; the server truncates to %d",
                    max_length, limit)
    if tokenizer is not None and tokenizer.pad_token is not None:
        meta |= {"pad_token": tokenizer.pad_token, "pad_id": tokenizer.pad_token_id}
    return ArtifactMeta(**meta, input_names=_input_names(model), max_length=min(max_length, limit),
                        id2label=_id2label(model.config))


def _pads_left(tokenizer) -> bool:
    """Whether ``tokenizer`` pads on the left (``padding_side``), as the server then does too."""
    return getattr(tokenizer, "padding_side", "right") == "left"


def _write_onnx_fp32(model: nn.Module, out_file: Path, optimize: bool, pads_left: bool = False) -> None:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    config = model.config
    names = _input_names(model)
    example = {n: torch.ones(1, 8, dtype=torch.long) for n in names}
    if "token_type_ids" in example:
        example["token_type_ids"] = torch.zeros(1, 8, dtype=torch.long)
    with quiet_deprecations(), torch.no_grad():
        torch.onnx.export(model, (), str(out_file), kwargs=example, input_names=names, output_names=["logits"],
                          dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    if optimize and hasattr(config, "num_attention_heads"):  # fuse attention (small-encoder students have none)
        heads, hidden = _fusion_heads(config)
        options = FusionOptions("bert")
        # The fused Attention's default mask is each row's token count, which assumes padding on the right;
        # left-padded batches need the full (B, T) mask.
        options.use_raw_attention_mask(pads_left)
        optimized = optimize_model(str(out_file), model_type="bert", num_heads=heads, hidden_size=hidden,
                                   optimization_options=options)
        optimized.save_model_to_file(str(out_file))


def _fusion_heads(config) -> tuple[int, int]:
    """(heads, attention width) for onnxruntime's attention fusion, which takes one head count for all layers
    and cannot read it from transformers' graph (reshapes to -1 heads). After structured pruning that is each
    layer's kept heads if all layers kept as many; with uneven layers (0, 0), which skips attention fusion: one
    wrong count builds a model that fails to load ("hidden_size should be divisible by num_heads")."""
    if not structure.is_pruned(config):
        return config.num_attention_heads, config.hidden_size
    counts = {layer["heads"] for layer in config.layer_shapes}
    if len(counts) > 1:
        return 0, 0
    heads = counts.pop()
    return heads, heads * (config.hidden_size // config.num_attention_heads)


def _write_onnx_int8(model: nn.Module, out_file: Path, include_embeddings: bool, pads_left: bool) -> None:
    fp32_file = out_file.with_name("fp32.onnx")
    _write_onnx_fp32(model, fp32_file, optimize=True, pads_left=pads_left)
    # Without the embedding ops, only the matrix multiplications (and fused attention, LSTMs, convolutions)
    # become INT8.
    op_types = None if include_embeddings else ["MatMul", "Attention", "LSTM", "Conv"]
    quantize_onnx_file(fp32_file, out_file, op_types)
    fp32_file.unlink()


def quantize_onnx_file(fp32_file: str | Path, out_file: str | Path, op_types: list[str] | None = None,
                       per_channel: bool = True, reduce_range: bool = True) -> None:
    """Dynamic INT8 of an fp32 ONNX file written by this module (INT8 weights, activations quantized per batch).

    Args:
        op_types: the ONNX op types to quantize; None: every one ONNX Runtime can, embeddings (Gather) included.
        per_channel: one weight scale per output channel instead of one per tensor.
        reduce_range: 7-bit weights instead of 8-bit.

    The defaults are what ``quantize`` writes. On CPUs without VNNI (AVX2 only), ONNX Runtime's u8s8 kernels
    sum pairs of products in saturating int16: with 8-bit weights such a pair can overflow it (2 x 255 x 127 >
    32767), with 7-bit weights it cannot (2 x 255 x 63 < 32767). Per-channel scales give back most of the precision the lost bit costs, since each output
    channel's scale fits its own largest weight. A file may be served on another CPU than the one that made it,
    so ``quantize`` always uses them. Their effect on labels, macro F1 and latency is measured in
    docs/compression.md (INT8, ``benchmarks/int8_weights.py``).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_deprecations():
        quantize_dynamic(str(fp32_file), str(out_file), weight_type=QuantType.QInt8, op_types_to_quantize=op_types,
                         per_channel=per_channel, reduce_range=reduce_range,
                         # the optimizer's fused ops carry no inferred types; they are all float here
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def _save(out_dir: str | Path, meta: ArtifactMeta, config, tokenizer, write) -> None:
    """Write the folder under a temporary name and move it into place: never a half-written artifact. An
    existing ``out_dir`` is replaced only if it is an earlier artifact (it has the metadata file, ``int8.json`` in
    older ones): a folder of anything else is never removed; the new folder has only ``artifact.json``.

    Raises:
        ValueError: ``out_dir`` is a file, or a non-empty folder that is not an artifact folder.
    """
    check_replaceable(out_dir, metadata_file(out_dir).name, "an artifact folder")
    with atomic_dir(out_dir) as tmp:
        config.save_pretrained(tmp)
        pretrained.mark_saved_config(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write(tmp)
        (tmp / META_FILE).write_text(meta.to_json(), encoding="utf-8")


