"""`compress --on TARGET`: every stage's graph measured on a reachable device, through the agent.

The same path as `edge-ssl bench B --on TARGET`: the stage bundle is deployed under its own
name and the agent times it there with onnxruntime (whatever providers the device's
onnxruntime has). The numbers are ``measured-on-board`` for that target and are the ones a
latency budget is checked on; a prediction for the --for profile stays beside them.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_ssl.bundle import Bundle

#: The agent's backend for compress rows (trtexec needs an engine deployed with the bundle).
DEVICE_BACKEND = "onnxruntime"


@dataclass
class DeviceMeasure:
    """One stage's latency on the device: p50 at the recipe's batch, the agent's backend and
    the onnxruntime providers it ran with (a CPU-only onnxruntime there is visible)."""

    target: str
    ms: float
    backend: str
    providers: list[str] | None


class DeviceMeter:
    """An open connection to one device that measures stage bundles there."""

    def __init__(self, spec: str, settings: Any, *, batch: int, seconds: float, run: str) -> None:
        from edge_ssl.devices.target import parse_target

        self.spec, self.batch, self.seconds, self.run = spec, batch, seconds, run
        self.target = parse_target(spec, settings)

    def __enter__(self) -> DeviceMeter:
        """Connects and asks the agent who it is: an unreachable device fails here, before training."""
        self.target.__enter__()
        try:
            self.target.agent("info", "--root", self.target.root, "--light")
        except BaseException:
            self.target.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.target.__exit__(*exc)

    def measure(self, name: str, bundle: Bundle, *, record: bool) -> DeviceMeasure:
        """p50 of ``bundle``'s graph on the device (a float bundle without one is exported
        first, into a temporary bundle); ``record`` keeps the result beside the bundle."""
        with tempfile.TemporaryDirectory(prefix="edge-ssl-on-device-") as tmp:
            path = bundle.path if bundle.has("model.onnx") else _exported(bundle, Path(tmp))
            report = self._bench(path, name, record=record and path == bundle.path)
        result = report["batches"][str(self.batch)]
        return DeviceMeasure(self.target.label, float(result["p50"]),
                             report.get("backend", DEVICE_BACKEND), report.get("providers"))

    def _bench(self, path: Path, name: str, *, record: bool) -> dict[str, Any]:
        from edge_ssl.devices.remote import remote_bench

        return remote_bench(path, self.target, name=f"{self.run}-{name}", backend=DEVICE_BACKEND,
                            batch_sizes=(self.batch,), duration_s=self.seconds,
                            warmup_s=min(1.0, self.seconds), record=record)


def _exported(bundle: Bundle, folder: Path) -> Path:
    from edge_ssl.runtime.export import export_bundle

    return export_bundle(bundle, folder / f"{bundle.manifest.name}.edge").bundle.path
