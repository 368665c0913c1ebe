"""Parse `tegrastats` lines (JetPack 4/5/6 formats) into power, load and temperatures."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from edge_ssl.errors import EdgeSSLError

# A rail is "NAME cur/avg" with optional mW units: "VDD_IN 3140/3208" (JetPack 4),
# "VDD_IN 5079mW/5079mW" (JetPack 5/6). The lookahead keeps "RAM 2020/7852MB" and
# "IRAM 0/252kB" out.
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_GPU = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?([\d,]+)\]?)?")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
_TEMP = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?[\d.]+)C\b")
#: Rails that measure the whole module input, in order of preference. Boards without one
#: (AGX Xavier, AGX Orin) report sub-rails whose sum is the module power, as jtop does.
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")
#: Sensors that read -256 C when a cluster is powered off (Orin CV/GPU zones).
_OFFLINE_C = -256.0
_RAIL_NAMES_NOT_POWER = {"RAM", "SWAP", "IRAM"}


class PowerError(EdgeSSLError, ValueError):
    """tegrastats output could not be turned into a power figure."""


@dataclass(frozen=True)
class TegraSample:
    """One tegrastats line: instantaneous rail power (mW), loads, clocks, temperatures."""

    rails_mw: dict[str, float] = field(default_factory=dict)
    total_mw: float | None = None
    total_rail: str | None = None  # "VDD_IN", "POM_5V_IN" or "sum"
    gpu_load_pct: float | None = None
    gpu_mhz: float | None = None
    emc_load_pct: float | None = None
    emc_mhz: float | None = None
    cpu_load_pct: tuple[float | None, ...] = ()  # None for an offline core
    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    temperatures_c: dict[str, float] = field(default_factory=dict)


def _cpu_loads(text: str) -> tuple[float | None, ...]:
    loads: list[float | None] = []
    for core in text.split(","):
        core = core.strip()
        match = re.match(r"(\d+)%", core)
        loads.append(float(match.group(1)) if match else None)
    return tuple(loads)


def _gpu(line: str) -> tuple[float | None, float | None]:
    match = _GPU.search(line)
    if not match:
        return None, None
    clocks = [float(c) for c in (match.group(2) or "").split(",") if c]
    return float(match.group(1)), (max(clocks) if clocks else None)


def parse_tegrastats_line(line: str) -> TegraSample:
    """Parse one line of `tegrastats` output from any JetPack generation."""
    rails = {
        name: float(current)
        for name, current, _avg in _RAIL.findall(line)
        if name not in _RAIL_NAMES_NOT_POWER
    }
    total_rail = next((r for r in TOTAL_RAILS if r in rails), None)
    total = rails[total_rail] if total_rail else (sum(rails.values()) if rails else None)
    ram, cpu, emc = _RAM.search(line), _CPU.search(line), _EMC.search(line)
    gpu_load, gpu_mhz = _gpu(line)
    temps = {name: float(value) for name, value in _TEMP.findall(line) if float(value) > _OFFLINE_C}
    return TegraSample(
        rails_mw=rails,
        total_mw=total,
        total_rail=total_rail or ("sum" if rails else None),
        gpu_load_pct=gpu_load,
        gpu_mhz=gpu_mhz,
        emc_load_pct=float(emc.group(1)) if emc else None,
        emc_mhz=float(emc.group(2)) if emc and emc.group(2) else None,
        cpu_load_pct=_cpu_loads(cpu.group(1)) if cpu else (),
        ram_used_mb=int(ram.group(1)) if ram else None,
        ram_total_mb=int(ram.group(2)) if ram else None,
        temperatures_c=temps,
    )


@dataclass(frozen=True)
class PowerSummary:
    """Average power over a run and what one inference cost in energy."""

    samples: int
    total_rail: str
    avg_power_w: float
    max_power_w: float
    avg_gpu_load_pct: float | None
    max_temperature_c: float | None
    energy_per_inference_mj: dict[str, float]  # batch size -> mJ per image

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def summarize_power(lines: Iterable[str], latency_ms_by_batch: dict[str, float]) -> PowerSummary:
    """Average module power of a run; energy per image = P [W] x latency [ms] / batch (mJ).

    ``latency_ms_by_batch`` maps batch size (str) to the mean latency measured in the run
    the lines were sampled during.
    """
    samples = [parse_tegrastats_line(line) for line in lines if line.strip()]
    powered = [s for s in samples if s.total_mw is not None]
    if not powered:
        raise PowerError(
            f"none of the {len(samples)} tegrastats lines carries power rails (VDD_IN, POM_5V_IN, "
            "VDD_*). tegrastats needs root on some JetPacks to read the INA3221 monitors: run "
            "the bench as a user with passwordless sudo for tegrastats, or as root."
        )
    watts = [s.total_mw / 1000.0 for s in powered if s.total_mw is not None]
    avg = sum(watts) / len(watts)
    loads = [s.gpu_load_pct for s in powered if s.gpu_load_pct is not None]
    temps = [t for s in powered for t in s.temperatures_c.values()]
    energy = {
        batch: avg * latency / int(batch) for batch, latency in latency_ms_by_batch.items()
    }
    return PowerSummary(
        samples=len(powered),
        total_rail=powered[0].total_rail or "unknown",
        avg_power_w=avg,
        max_power_w=max(watts),
        avg_gpu_load_pct=sum(loads) / len(loads) if loads else None,
        max_temperature_c=max(temps) if temps else None,
        energy_per_inference_mj=energy,
    )
