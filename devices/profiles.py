"""Jetson device profiles loaded from profiles.toml (data, not code)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from edge_ssl.errors import ConfigError
from edge_ssl.registry import did_you_mean

PROFILES_FILE = Path(__file__).with_name("profiles.toml")


@dataclass(frozen=True)
class PowerMode:
    """One nvpmodel mode; fields missing from the data are None (unknown)."""

    mode_id: int
    name: str
    watts: float | None = None
    gpu_max_mhz: float | None = None


@dataclass(frozen=True)
class DeviceProfile:
    """A Jetson SKU: what the silicon offers, with unknown figures left as None."""

    key: str
    name: str
    soc: str
    arch: str
    compute_capability: str
    cuda_cores: int | None
    tensor_cores: int | None
    gpu_max_mhz: float | None
    dla_cores: int | None
    memory_gb: float | None
    memory_bandwidth_gbs: float | None
    peak_fp16_tflops_dense: float | None
    peak_int8_tops_dense: float | None
    precisions: tuple[str, ...]
    jetpacks: tuple[str, ...]
    module_ai_tops: float | None
    module_ai_tops_kind: str | None
    power_modes: dict[int, PowerMode] = field(default_factory=dict)
    match: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.precisions:
            raise ConfigError(f"profile {self.key!r} lists no precisions in {PROFILES_FILE}.")

    def power_mode(self, mode_id: int | None) -> PowerMode | None:
        """The nvpmodel mode ``mode_id`` (None -> None); ConfigError listing the known modes."""
        if mode_id is None:
            return None
        if mode_id not in self.power_modes:
            known = ", ".join(f"{i} ({m.name})" for i, m in sorted(self.power_modes.items()))
            raise ConfigError(
                f"{self.name} has no nvpmodel mode {mode_id}; known modes: {known or 'none recorded'}. "
                "Run `nvpmodel -q` on the device to see its current mode."
            )
        return self.power_modes[mode_id]

    def tensorrt_versions(self) -> dict[str, str]:
        """JetPack -> TensorRT version for the JetPacks this board supports."""
        table = jetpack_table()
        return {jp: table[jp]["tensorrt"] for jp in self.jetpacks if jp in table}

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k not in ("power_modes", "match")}
        data["precisions"] = list(self.precisions)
        data["jetpacks"] = {jp: jetpack_table().get(jp, {}) for jp in self.jetpacks}
        data["power_modes"] = {str(i): m.__dict__ for i, m in sorted(self.power_modes.items())}
        return data


def load_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        from edge_ssl.lazy import require

        tomllib = require("tomli", "reading device profiles on Python 3.10")
    with open(path, "rb") as f:
        return tomllib.load(f)


@lru_cache(maxsize=4)
def _raw(path: str = str(PROFILES_FILE)) -> dict[str, Any]:
    try:
        return load_toml(Path(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"device profiles {path} cannot be read: {exc}.") from exc


def jetpack_table() -> dict[str, dict[str, str]]:
    """JetPack version -> {l4t, cuda, tensorrt, python, ubuntu}."""
    return dict(_raw()["jetpack"])


def architecture(arch: str) -> dict[str, float]:
    """Per-clock throughput constants of a GPU architecture (may be empty: unknown)."""
    return dict(_raw()["architectures"].get(arch, {}))


def _profile(key: str, data: dict[str, Any]) -> DeviceProfile:
    modes = {
        int(mode_id): PowerMode(mode_id=int(mode_id), **fields)
        for mode_id, fields in data.get("power_modes", {}).items()
    }
    fields = {name: data.get(name) for name in DeviceProfile.__dataclass_fields__}
    fields.update(
        key=key,
        precisions=tuple(data.get("precisions", ())),
        jetpacks=tuple(data.get("jetpacks", ())),
        match=tuple(data.get("match", ())),
        power_modes=modes,
    )
    try:
        return DeviceProfile(**fields)
    except TypeError as exc:
        raise ConfigError(f"profile {key!r} in {PROFILES_FILE} is malformed: {exc}.") from exc


@lru_cache(maxsize=1)
def load_profiles() -> dict[str, DeviceProfile]:
    """Every profile in profiles.toml, keyed by its short name (e.g. 'orin-nx-16gb')."""
    return {key: _profile(key, data) for key, data in _raw()["devices"].items()}


def profile_names() -> list[str]:
    return sorted(load_profiles())


def get_profile(name: str) -> DeviceProfile:
    """The profile called ``name``; ConfigError with the valid names and the nearest one."""
    profiles = load_profiles()
    if name in profiles:
        return profiles[name]
    names = sorted(profiles)
    raise ConfigError(
        f"unknown device profile {name!r}.{did_you_mean(name, names)} Valid names: "
        f"{', '.join(names)}. See `edge-ssl devices`."
    )


def match_profile(model: str, memory_gb: float | None = None) -> DeviceProfile | None:
    """The profile a device-tree model string (and total memory) points to, or None.

    Several SKUs share a model string (Orin NX 8/16 GB); total memory picks between them
    (the kernel reports a little less than the module's size).
    """
    candidates = [
        p for p in load_profiles().values() if any(m.lower() in model.lower() for m in p.match)
    ]
    if not candidates:
        return None
    if memory_gb is None or len(candidates) == 1:
        return candidates[0] if len(candidates) == 1 else None
    sized = [p for p in candidates if p.memory_gb and memory_gb <= p.memory_gb * 1.02]
    return min(sized, key=lambda p: p.memory_gb or 0) if sized else None
