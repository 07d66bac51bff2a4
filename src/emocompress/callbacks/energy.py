"""The energy of a fit, with codecarbon's offline tracker (``emocompress.evaluation.energy``)."""

import json
import logging
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from emocompress.evaluation.energy import check_country, new_tracker, summary
from emocompress.io import atomic_write_text, json_text, run_dir

log = logging.getLogger(__name__)

ENERGY_FILE = "energy.json"
"""The run folder's record of a fit's energy, which ``TestMetricsWriter`` and the end-of-run summary repeat."""


def read_energy(folder: str | Path) -> dict | None:
    """The energy a run folder records (``ENERGY_FILE``), or None."""
    file = Path(folder) / ENERGY_FILE
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None


class EnergyTracking(Callback):
    """Measures the energy of ``fit`` (from its start to its end: training, validation and the fit-end exports) with
    codecarbon's offline tracker in process mode, and writes it to ``<log_dir>/energy.json`` as ``{"fit": {...}}``:
    ``energy_kwh`` (CPU, RAM and any GPU), ``cpu_energy_kwh``, ``ram_energy_kwh``, ``emissions_kg``, ``duration_s``,
    and ``energy_method``: ``measured`` (the CPU's energy counters, RAPL) or ``estimated`` (TDP times this
    process's load, as on VMs without ``/sys/class/powercap``). ``test_metrics.json`` and the end-of-run summary
    repeat it. Under DDP, rank 0 measures its own process; a fit resumed from a checkpoint records the energy of
    the resumed part only.

    Args:
        country_iso_code: the country whose carbon intensity turns kWh into ``emissions_kg`` (ISO 3166 alpha-3);
            the kWh do not depend on it.
    """

    def __init__(self, country_iso_code: str = "USA"):
        check_country(country_iso_code, "EnergyTracking.country_iso_code")
        self.country_iso_code = country_iso_code
        self._tracker = None

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out = run_dir(trainer)  # a collective under DDP: every rank asks
        if trainer.is_global_zero:
            self._tracker = new_tracker(self.country_iso_code, str(out))
            self._tracker.start()

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out = run_dir(trainer)
        if self._tracker is None:
            return
        self._tracker.stop()
        energy = summary(self._tracker.final_emissions_data, self._tracker)
        self._tracker = None
        record = {**(read_energy(out) or {}), "fit": energy}
        atomic_write_text(out / ENERGY_FILE, json_text(record))
        log.info("fit used %.6f kWh (%s, codecarbon %s)", energy["energy_kwh"], energy["energy_method"],
                 energy["cpu_tracker"])

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._tracker is not None:  # an interrupted fit records nothing, but its sampling thread must stop
            self._tracker.stop()
            self._tracker = None
