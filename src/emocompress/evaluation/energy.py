"""Energy of a stretch of computation, with codecarbon's offline tracker, labelled *measured* or *estimated*.

codecarbon reads the CPU's energy counters where it can (RAPL on Linux, Power Gadget, EMI, powermetrics); on a
machine without them (most VMs: no ``/sys/class/powercap``) it falls back to an *estimate*: the CPU's TDP times
this process's CPU load (``cpu_load`` mode), or a constant share of the TDP. Which one it used is the ``_mode`` of
its CPU hardware object (``codecarbon.external.hardware.CPU``), read here after the first measurement, so a number
is never reported without its kind. RAM energy is always codecarbon's model (a power per GB), never measured.

The tracker is offline (``OfflineEmissionsTracker``: no network, the carbon intensity of ``country_iso_code`` from
its packaged tables), in ``process`` tracking mode (only this process's CPU load: the machine may be shared), writes
no file (``save_to_file=False``) and its log is silenced below errors.
"""

import logging
from contextlib import contextmanager

# codecarbon CPU modes that read an energy counter; every other mode ("cpu_load", "constant") is a TDP estimate.
_MEASURED_MODES = ("intel_rapl", "windows_emi", "intel_power_gadget", "apple_powermetrics")


def _quiet() -> None:
    # codecarbon sets its own logger to INFO on import and logs its setup (and a warning about parallel instances).
    logging.getLogger("codecarbon").setLevel(logging.ERROR)


def method(tracker) -> str:
    """``measured`` if ``tracker`` read the CPU's energy counters, else ``estimated`` (also for a tracker that has not
    set up its hardware yet)."""
    for hardware in getattr(tracker, "_hardware", []):
        if getattr(hardware, "_mode", None) in _MEASURED_MODES or \
                type(hardware).__name__ in ("AppleSiliconChip", "Raspberry"):  # read from the chip's own sensors
            return "measured"
    return "estimated"


def cpu_tracker(tracker) -> str | None:
    """codecarbon's name of how it tracks the CPU (``cpu_load``, ``intel_rapl``, ``constant``, ...)."""
    return next((getattr(h, "_mode", None) for h in getattr(tracker, "_hardware", []) if hasattr(h, "_mode")), None)


def check_country(country_iso_code: str, key: str) -> None:
    """Refuse a country codecarbon has no carbon intensity for (it would log an error and use the world average).

    Raises:
        ValueError: naming ``key``, the code and the fix.
    """
    from codecarbon.input import DataSource

    if country_iso_code not in DataSource().get_global_energy_mix_data():
        raise ValueError(f"{key}: {country_iso_code!r} is not a country codecarbon knows; give an ISO 3166 alpha-3 "
                         "code in capitals, e.g. USA, DEU, FRA")


def new_tracker(country_iso_code: str = "USA", output_dir: str | None = None):
    """An ``OfflineEmissionsTracker`` as described in the module docstring; ``output_dir`` is where codecarbon
    would write (nothing, with these settings): the run folder, or the system's temporary folder."""
    import tempfile

    from codecarbon import OfflineEmissionsTracker

    _quiet()
    return OfflineEmissionsTracker(country_iso_code=country_iso_code, save_to_file=False, log_level="error",
                                   tracking_mode="process", measure_power_secs=1,
                                   output_dir=output_dir or tempfile.gettempdir())


def summary(data, tracker) -> dict:
    """The fields of one codecarbon ``EmissionsData`` we report, with the kind of the numbers."""
    return {"energy_kwh": data.energy_consumed, "cpu_energy_kwh": data.cpu_energy, "ram_energy_kwh": data.ram_energy,
            "emissions_kg": data.emissions, "duration_s": data.duration, "energy_method": method(tracker),
            "cpu_tracker": cpu_tracker(tracker), "country_iso_code": data.country_iso_code}


class TaskEnergy:
    """Energy summed over many short stretches per name (codecarbon tasks of one tracker), e.g. each model's timed
    calls in interleaved rounds: ``with meter.measure(name): ...`` any number of times, then ``meter.total(name)``.
    """

    def __init__(self, country_iso_code: str = "USA"):
        self.tracker = new_tracker(country_iso_code)
        self.kwh: dict[str, float] = {}

    @contextmanager
    def measure(self, name: str):
        self.tracker.start_task(name)
        try:
            yield
        finally:
            data = self.tracker.stop_task()
            self.kwh[name] = self.kwh.get(name, 0.0) + data.energy_consumed

    @property
    def method(self) -> str:
        return method(self.tracker)
