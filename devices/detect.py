"""Detect an NVIDIA Jetson from the files L4T writes (no torch, no jtop needed)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DEVICE_TREE_MODEL = "proc/device-tree/model"
TEGRA_RELEASE = "etc/nv_tegra_release"

#: L4T (Jetson Linux) release -> JetPack, from NVIDIA's JetPack archive.
L4T_TO_JETPACK = {
    "32.7": "4.6.x",
    "35.1": "5.0.2",
    "35.2": "5.1",
    "35.3": "5.1.1",
    "35.4": "5.1.2",
    "35.5": "5.1.3",
    "35.6": "5.1.4",
    "36.2": "6.0 DP",
    "36.3": "6.0",
    "36.4": "6.1/6.2",
    "38.2": "7.0",
}

_NVPMODEL_RE = re.compile(r"NV Power Mode:\s*(?P<name>\S+)\s*\n\s*(?P<id>\d+)")
_RELEASE_RE = re.compile(r"#\s*R(?P<major>\d+)\s*\(release\),\s*REVISION:\s*(?P<revision>[\d.]+)")


@dataclass(frozen=True)
class JetsonInfo:
    """What the device says about itself."""

    model: str  # e.g. "NVIDIA Jetson AGX Orin Developer Kit"
    l4t: str | None  # e.g. "36.3.0"
    jetpack: str | None  # e.g. "6.0", None when the L4T release is unknown

    def to_dict(self) -> dict[str, str | None]:
        return {"model": self.model, "l4t": self.l4t, "jetpack": self.jetpack}


def parse_tegra_release(text: str) -> str | None:
    """'# R36 (release), REVISION: 3.0, ...' -> '36.3.0'."""
    match = _RELEASE_RE.search(text)
    if not match:
        return None
    return f"{match['major']}.{match['revision']}"


def jetpack_for_l4t(l4t: str | None) -> str | None:
    if not l4t:
        return None
    major_minor = ".".join(l4t.split(".")[:2])
    return L4T_TO_JETPACK.get(major_minor)


def detect_jetson(root: str | Path = "/") -> JetsonInfo | None:
    """JetsonInfo when ``root`` is (the filesystem of) a Jetson, else None.

    A Jetson is recognised by its device-tree model naming Jetson/Tegra, or by an
    L4T release file (custom carrier boards often rename the model).
    """
    root = Path(root)
    try:
        model = (root / DEVICE_TREE_MODEL).read_bytes().decode("utf-8", "replace").strip("\x00\n ")
    except OSError:
        model = ""
    try:
        l4t = parse_tegra_release((root / TEGRA_RELEASE).read_text(encoding="utf-8", errors="replace"))
    except OSError:
        l4t = None
    named_jetson = any(word in model.lower() for word in ("jetson", "tegra"))
    if not named_jetson and l4t is None:
        return None
    return JetsonInfo(model=model or "unknown Jetson", l4t=l4t, jetpack=jetpack_for_l4t(l4t))


def parse_nvpmodel_query(text: str) -> dict[str, str | int] | None:
    """`nvpmodel -q` output -> {'name': 'MAXN', 'id': 0}; None when it is not recognised.

    The mode name line is followed by the mode id on its own line; newer JetPacks print
    an "NV Fan Mode" line first.
    """
    match = _NVPMODEL_RE.search(text or "")
    if not match:
        return None
    return {"name": match["name"], "id": int(match["id"])}


def memory_gb(root: str | Path = "/") -> float | None:
    """Total memory from /proc/meminfo in GiB (what module names call "GB"), None if unreadable."""
    try:
        text = (Path(root) / "proc/meminfo").read_text(encoding="utf-8")
    except OSError:
        return None
    match = re.search(r"MemTotal:\s*(\d+)\s*kB", text)
    return int(match.group(1)) * 1024 / 2**30 if match else None
