"""Write ``predict`` results as JSON lines."""

import json
import logging
from pathlib import Path

import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from emocompress.io import atomic_file, run_dir

log = logging.getLogger(__name__)


class JsonlPredictionWriter(BasePredictionWriter):
    """Collects the records returned by ``predict_step`` (dicts with a ``line`` key) from all ranks
    and writes them, in input order, one JSON object per line.

    Args:
        output_path: file to write; default ``<log_dir>/predictions.jsonl``.
    """

    def __init__(self, output_path: str | None = None):
        super().__init__(write_interval="epoch")
        self.output_path = output_path

    @override
    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions, batch_indices) -> None:
        default_path = run_dir(trainer) / "predictions.jsonl"  # a collective under DDP: every rank asks
        records = [record for batch in predictions for record in batch]
        if trainer.world_size > 1:
            # Each rank predicted its own shard; gather them so one file holds every input once.
            gathered = [None] * trainer.world_size
            dist.all_gather_object(gathered, records)
            records = [record for shard in gathered for record in shard]
        if not trainer.is_global_zero:
            return
        path = Path(self.output_path) if self.output_path else default_path
        with atomic_file(path) as f:  # a reader never sees half a file, and a crash keeps the old one
            for record in sorted(records, key=lambda r: r["line"]):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        log.info("wrote %d predictions to %s", len(records), path)
