"""Post-training INT8 quantization of ``pl_module.model`` when ``test`` starts (``Int8Quantization``): dynamic (ONNX
Runtime, torch) or static and accuracy-controlled (OpenVINO through NNCF).

Writing the artifact is ``emocompress.compression.export``'s (and ``.openvino``'s) job; reading it back,
``emocompress.models.loading``'s.
"""

import logging
import tempfile
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from typing_extensions import override

from emocompress.compression.export import datamodule_max_length, quantize
from emocompress.compression.openvino import export_openvino
from emocompress.deploy.format import BACKENDS, ONNX_FILE, OPENVINO_FILE, OPENVINO_WEIGHTS_FILE, TORCH_WEIGHTS_FILE
from emocompress.io import check_folder_name, run_dir
from emocompress.models.loading import OrtClassifier

log = logging.getLogger(__name__)


class OnCpu(nn.Module):
    """A CPU-only (INT8) model inside a loop on another device: each batch goes to the CPU, and the
    logits come back to ``device``, where the loss and the metrics are."""

    def __init__(self, model: nn.Module, device: torch.device):
        super().__init__()
        self.model = model
        self.output_device = torch.device(device)
        self.config = getattr(model, "config", None)

    def forward(self, **inputs):
        output = self.model(**{name: value.cpu() for name, value in inputs.items()})
        output.logits = output.logits.to(self.output_device)
        return output


class Int8Quantization(Callback):
    """Replaces ``pl_module.model`` with its INT8 version when ``test`` starts, so the test metrics are
    the INT8 model's, and saves it to ``<log_dir>/<dirname>`` (reload with ``emocompress.models.loading.load_artifact``).
    After ``fit`` (with the CLI's test of the best checkpoint) it quantizes the fine-tuned, pruned or distilled model;
    with ``emocompress test --ckpt_path`` it quantizes a saved model. Logs ``quant/size_mb`` (the
    weights file's bytes / 1e6). INT8 inference is CPU-only: when the test runs on a GPU (a fit on a GPU with
    this callback stacked), the INT8 model still runs on the CPU, each batch moved there and its logits back.

    Args:
        backend: ``onnxruntime`` (default: dynamic INT8, reloads exactly), ``torch`` (dynamic INT8) or
            ``openvino`` (static INT8 through NNCF with the ``TRANSFORMER`` model type, calibrated on train texts;
            ``emocompress.compression.openvino``).
        include_embeddings: also quantize the embedding tables (about half of MiniLM's bytes); ``onnxruntime``
            and ``torch`` (NNCF chooses for itself).
        dirname: name of the artifact folder inside the run's log directory.
        num_threads: ONNX Runtime or OpenVINO threads (default: all cores).
        calibration_samples: ``openvino``: the first N train texts set the quantization ranges.
        max_drop: ``openvino``: the largest macro-F1 drop (absolute) on the val split; layers that cost more are
            reverted to float (``nncf.quantize_with_accuracy_control``). None: no check, every layer NNCF picks.
    """

    def __init__(self, backend: Literal["onnxruntime", "torch", "openvino"] = "onnxruntime",
                 include_embeddings: bool = False, dirname: str = "int8", num_threads: int | None = None,
                 calibration_samples: int = 300, max_drop: float | None = 0.01):
        if backend not in BACKENDS:
            raise ValueError(f"Int8Quantization.backend must be one of {list(BACKENDS)}, got {backend!r}")
        if calibration_samples < 1 or (max_drop is not None and max_drop < 0):
            raise ValueError(f"Int8Quantization: calibration_samples must be at least 1 and max_drop at least 0 (or "
                             f"null), got {calibration_samples} and {max_drop}")
        check_folder_name(dirname, "Int8Quantization.dirname")
        self.backend = backend
        self.include_embeddings = include_embeddings
        self.dirname = dirname
        self.num_threads = num_threads
        self.calibration_samples = calibration_samples
        self.max_drop = max_drop

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out_dir = run_dir(trainer) / self.dirname  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:  # each rank quantizes for itself; only rank 0 writes the artifact
            out_dir = Path(tempfile.mkdtemp(prefix="emocompress-int8-"))
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if self.backend == "openvino":
            quantized = self._openvino(pl_module.model, out_dir, trainer.datamodule)
        else:
            quantized = quantize(pl_module.model, self.backend, self.include_embeddings, out_dir, self.num_threads,
                                 tokenizer, datamodule_max_length(trainer.datamodule))
        pl_module.model = quantized if pl_module.device.type == "cpu" else OnCpu(quantized, pl_module.device)
        weights = out_dir / {"onnxruntime": ONNX_FILE, "openvino": OPENVINO_WEIGHTS_FILE}.get(self.backend,
                                                                                               TORCH_WEIGHTS_FILE)
        size_mb = weights.stat().st_size / 1e6
        log.info("INT8 (%s) model saved to %s: %.1f MB", self.backend, out_dir, size_mb)
        self.size_mb = size_mb

    def _openvino(self, model: nn.Module, out_dir: Path, datamodule) -> nn.Module:
        """NNCF INT8 of ``model`` calibrated on the datamodule's train texts, its macro-F1 drop on val checked."""
        validation = None
        if self.max_drop is not None:
            val = datamodule.raw_split("val")
            validation = (list(val["text"]), [datamodule.label2id[label] for label in val["label"]])
        export_openvino(model, out_dir, datamodule.tokenizer, datamodule_max_length(datamodule), "int8",
                        datamodule.texts("train")[:self.calibration_samples], validation,
                        self.max_drop if self.max_drop is not None else 0.0, self.calibration_samples)
        return OrtClassifier(out_dir / OPENVINO_FILE, model.config, self.num_threads)

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.log("quant/size_mb", self.size_mb, sync_dist=True)
