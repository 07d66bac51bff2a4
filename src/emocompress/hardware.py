"""This machine's CPU: its instruction-set flags, whether it computes bf16 natively, and so whether a Trainer's bf16
precision would be emulated. Stdlib and torch only."""

import platform
from pathlib import Path

import torch


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX). Without it, torch emulates every bf16
    operation in software, and bf16 autocast trains many times slower than fp32 (measured in
    reports/training_speed/README.md). Unknown (an older torch without the probes) counts as native."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None) or all(probe is None for probe in probes)


def bf16_is_emulated(precision, accelerator) -> bool:
    """Whether a Trainer with this ``precision`` and ``accelerator`` would compute in bf16 on a CPU that has no native
    bf16 (``cpu_has_native_bf16``), many times slower than fp32 (reports/training_speed/README.md). ``16-mixed`` (and
    its old spelling ``16``) counts too: Lightning runs it on a CPU as bf16-mixed, fp16 autocast having no CPU
    kernels (``_AcceleratorConnector._check_and_init_precision``). The run is on the CPU when ``accelerator`` is
    ``cpu`` or no CUDA device is present."""
    precision = str(precision or "")
    on_cpu = accelerator == "cpu" or not torch.cuda.is_available()
    bf16_on_cpu = precision.startswith("bf16") or precision in ("16", "16-mixed")
    return bf16_on_cpu and on_cpu and not cpu_has_native_bf16()


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    """CPU vendor, model and the instruction sets INT8/BF16 kernels depend on, from /proc/cpuinfo."""
    info = {"cpu": platform.processor(), "cpu_vendor": None, "cpu_flags": []}
    if Path("/proc/cpuinfo").is_file():
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                      if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        flags = set(fields.get("flags", "").split())
        info = {"cpu": fields.get("model name", info["cpu"]), "cpu_vendor": fields.get("vendor_id"),
                "cpu_flags": [f for f in CPU_FLAGS if f in flags]}
    return info
