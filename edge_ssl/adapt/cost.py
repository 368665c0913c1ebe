"""What one adaptation step costs: measured on this host, and PREDICTED for a board from its FLOPs."""

from __future__ import annotations

import platform
from typing import Any

#: Forward + backward of a step is about three forwards (backward ~2x forward): an upper bound
#: when only a subset of the layers trains, since activation gradients still flow down to it.
BACKWARD_FACTOR = 3.0


def step_cost(encoder: Any, *, seconds_per_step: float | None, peak_step_mb: float, batch: int,
              views: int, profile: str | None) -> dict[str, Any]:
    """{measured_host: sec_per_step and step memory here, predicted: the step on ``profile``}."""
    cost: dict[str, Any] = {
        "measured_host": {"sec_per_step": seconds_per_step, "peak_step_mb": round(peak_step_mb, 2),
                          "host": platform.processor() or platform.machine(),
                          "kind": "measured here"}}
    if profile is not None:
        cost["predicted"] = predicted_step(encoder, profile, batch * views)
    return cost


def predicted_step(encoder: Any, profile: str, images: int) -> dict[str, Any]:
    """The step's time on ``profile``: BACKWARD_FACTOR x the predicted forward of ``images``
    (every view of the batch), from the graph's FLOPs and the board's roofline. Labelled
    predicted; a missing exporter or profile figure is reported, never raised."""
    from edge_ssl.errors import EdgeSSLError

    try:
        from edge_ssl.devices.predict import predict_encoder

        shape = tuple(encoder.spec.input.shape)
        for precision in ("fp32", "fp16"):
            try:
                forward = predict_encoder(encoder, profile, precision, images, input_shape=shape)
                break
            except EdgeSSLError:
                if precision == "fp16":
                    raise
    except (EdgeSSLError, ImportError, RuntimeError) as exc:
        return {"kind": "predicted", "error": f"{type(exc).__name__}: {exc}"}
    return {"kind": "predicted", "board": forward.device, "precision": forward.precision,
            "sec_per_step": round(BACKWARD_FACTOR * forward.predicted_ms / 1000, 5),
            "interval_s": [round(BACKWARD_FACTOR * v / 1000, 5) for v in forward.interval_ms],
            "forward_gflops": round(forward.gflops, 3), "images_per_step": images,
            "model": f"{BACKWARD_FACTOR:g} x the predicted forward of every view (roofline over "
                     "the ONNX graph; an upper bound when only some layers train)",
            "calibration": str(forward.calibration)}
