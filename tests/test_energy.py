import json
import logging
import os
import socket

import pytest

from emocompress.callbacks.energy import EnergyTracking
from emocompress.callbacks.metrics import TestMetricsWriter
from emocompress.evaluation.energy import TaskEnergy

# codecarbon measures (RAPL) only where the powercap counters are readable; on VMs without them it estimates.
EXPECTED_METHOD = "measured" if os.access("/sys/class/powercap/intel-rapl/subsystem", os.R_OK) else "estimated"


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"the energy tracker opened a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_task_energy_is_offline_labelled_and_writes_no_file(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    meter = TaskEnergy()
    for _ in range(2):
        with meter.measure("busy"):
            sum(i * i for i in range(300_000))
    assert meter.kwh["busy"] > 0
    assert meter.method == EXPECTED_METHOD
    assert list(tmp_path.iterdir()) == []  # save_to_file=False: no emissions.csv in the working directory


def test_fit_energy_goes_to_the_run_folder_test_metrics_and_summary(offline, make_datamodule, tiny_model_dir,
                                                                     tiny_trainer, tmp_path, caplog):
    from emocompress.models.classifier import EmotionClassifier
    from emocompress.runs import log_summary

    dm = make_datamodule(batch_size=4)
    model = EmotionClassifier(tiny_model_dir, dm.id2label)
    trainer = tiny_trainer(max_steps=2, callbacks=[EnergyTracking(), TestMetricsWriter()], enable_checkpointing=False)
    trainer.fit(model, datamodule=dm)
    energy = json.loads((tmp_path / "energy.json").read_text())["fit"]
    assert energy["energy_kwh"] > 0 and energy["duration_s"] > 0
    assert energy["energy_method"] == EXPECTED_METHOD and energy["cpu_tracker"]
    trainer.test(model, datamodule=dm)
    assert json.loads((tmp_path / "test_metrics.json").read_text())["energy"]["fit"] == energy
    with caplog.at_level(logging.INFO, logger="emocompress.runs"):
        log_summary(trainer, model, "fit")
    assert f"energy: {energy['energy_kwh']:.6f} kWh ({EXPECTED_METHOD}" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".csv", ".log")) == []


def test_an_unknown_country_is_refused_in_one_line():
    with pytest.raises(ValueError, match="EnergyTracking.country_iso_code: 'XX' is not a country codecarbon knows") \
            as err:
        EnergyTracking(country_iso_code="XX")
    assert "\n" not in str(err.value)
