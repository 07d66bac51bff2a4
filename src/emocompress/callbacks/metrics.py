"""Write the test report of a run to ``test_metrics.json``."""

import logging
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from emocompress.callbacks.energy import read_energy
from emocompress.io import atomic_write_text, json_text, run_dir

log = logging.getLogger(__name__)


class TestMetricsWriter(Callback):
    """When ``test`` ends, rank 0 writes the module's last test report (``pl_module.test_report``: accuracy,
    macro F1, balanced accuracy, Cohen's kappa, per-class values, confusion matrix; computed on every
    rank by ``EmotionClassifier``), with the fit's energy if ``EnergyTracking`` recorded it (``energy``), to
    ``<log_dir>/<filename>``, in one step: a reader never sees half a file. An undefined value (NaN, e.g. Cohen's
    kappa when a model predicts one class) is written ``null``, so strict JSON parsers read the file.

    ``on_test_end``, not ``on_test_epoch_end``: Lightning runs callbacks' epoch-end hooks before the
    module's, which is where the report is computed.

    Args:
        filename: name of the report file inside the run's log directory.
    """

    __test__ = False  # a callback, not a pytest test class

    def __init__(self, filename: str = "test_metrics.json"):
        if not filename or Path(filename).name != filename:
            raise ValueError(f"TestMetricsWriter.filename must be a plain file name, got {filename!r}")
        self.filename = filename

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = run_dir(trainer) / self.filename  # a collective under DDP: every rank asks
        report = getattr(pl_module, "test_report", None)
        if not trainer.is_global_zero:
            return
        if report is None:
            log.warning("TestMetricsWriter: %s keeps no test_report; %s not written", type(pl_module).__name__, path)
            return
        energy = read_energy(path.parent)  # the fit's, when EnergyTracking measured it
        atomic_write_text(path, json_text(report if energy is None else {**report, "energy": energy}))
        log.info("test metrics written to %s", path)
