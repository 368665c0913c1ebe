"""After adapting a quantized bundle's float parent: quantize the result again with the bundle's
own recorded settings, so the deployed precision stays what the user chose."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_ssl.bundle import WEIGHTS_NAME, Bundle

#: Settings of a quantize lineage entry that are not QuantizeConfig fields.
_RECORDED_ONLY = ("calibration_images_used", "reduce_range")


def quantize_entry(bundle: Bundle) -> dict[str, Any] | None:
    """The settings of the last ``quantize`` stage in ``bundle``'s lineage, when the bundle
    itself is the quantized one (it has no float weights of its own); else None."""
    if bundle.has(WEIGHTS_NAME) or bundle.manifest.precision not in ("int8", "fp16"):
        return None
    for entry in reversed(bundle.manifest.lineage):
        if entry.stage == "quantize":
            return dict(entry.settings)
    return None


def float_out(out: Path) -> Path:
    """Where the adapted float weights go when ``out`` is re-quantized: OUT.stages/adapt.edge
    (a stages folder beside a bundle is where its lineage parents are looked for)."""
    return out.with_name(out.name + ".stages") / "adapt.edge"


def engine_plan(deployed: Bundle, graph: Path, workdir: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """Refit the deployed bundle's TensorRT engines with the new graph where they were built
    refittable (and TensorRT is here); otherwise each is reported for a rebuild on the device."""
    from edge_ssl.adapt.export import parent_engines, refit_engines

    if not parent_engines(deployed):
        return {}, {}
    info: dict[str, Any] = {}
    files = refit_engines(deployed, graph, workdir, info)
    return {"engines": info["engines"], "engine_path": info["engine_path"]}, files


def requantize(deployed: Bundle, adapted: Bundle, images: np.ndarray, out: Path, *, overwrite: bool,
               bank: tuple[np.ndarray, np.ndarray] | None,
               device_cost: dict[str, Any] | None = None) -> tuple[Bundle, dict[str, Any]]:
    """Quantize ``adapted`` (float) like ``deployed`` was, calibrating on the local ``images``;
    (the new bundle, what was measured: seconds, cosine to float, INT8 kNN on the bank). The
    adaptation's ``device_cost`` (step time, memory, energy) goes into the new bundle's lineage."""
    from edge_ssl.compress.quantize import QuantizeConfig, quantize

    recorded = quantize_entry(deployed) or {}
    values = {k: v for k, v in recorded.items() if k not in _RECORDED_ONLY}
    values["max_knn_drop"] = None  # no labels on the device; min_cosine still guards
    config = QuantizeConfig.from_dict(values)
    started = time.perf_counter()
    measured: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edge-ssl-requant-") as tmp:
        def finish(graph: Path, report: Any) -> tuple[dict[str, Any], dict[str, Path]]:
            engines, files = engine_plan(deployed, graph, Path(tmp))
            measured.update({"from": "adapt", "calibration": "the local images",
                             "cosine_to_float": {"mean": report.mean_cosine,
                                                                  "min": report.min_cosine},
                             "knn_top1": _bank_knn(graph, adapted, bank), **engines,
                             "seconds": round(time.perf_counter() - started, 3)})
            return {"requantize": measured, "adapt_device_cost": device_cost}, files

        written = quantize(adapted, config, images, out, overwrite=overwrite, finish=finish).bundle
    return written, measured


def _bank_knn(graph: Path, adapted: Bundle, bank: tuple[np.ndarray, np.ndarray] | None) -> dict | None:
    """kNN top-1 of the quantized graph and of the float weights on the labeled replay bank
    (its first half the index, the second the queries); None without labels."""
    if bank is None or len(bank[0]) < 8:
        return None
    from edge_ssl.compress.quantize import onnx_embed
    from edge_ssl.evaluate import embed, knn_top1
    from edge_ssl.models import load_encoder

    images, labels = bank
    half = len(images) // 2
    encoder = load_encoder(adapted)

    def top1(emb: np.ndarray) -> float:
        return float(knn_top1(emb[:half], labels[:half], emb[half:], labels[half:], k=20))

    return {"int8": top1(onnx_embed(graph, images, encoder.spec.input)),
            "float": top1(embed(encoder, images, batch_size=128)),
            "images": len(images), "on": "the bundle's labeled replay images (half index, half queries)"}
