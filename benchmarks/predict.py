"""Fit `edge-ssl predict` on published Jetson latencies and report how well it generalizes.

    .venv/bin/python benchmarks/predict.py --out benchmarks/results/predict.json [--fit]

Builds each anchor network's ONNX graph locally (devices/anchors.toml; random weights exported
without parameters: only shapes matter), fits the latency model (op-kind efficiencies, one
scale and one per-kernel launch floor per GPU generation, an INT8/FP16 ratio, the memory
efficiency and the host overhead of end-to-end figures) by least squares on log(predicted /
published), and reports the in-sample fit, leave-one-board-out and leave-one-source-out
error. The cross-validated error of each calibration group (generation-precision) becomes
the interval `edge-ssl predict` prints. `--fit` rewrites devices/predict_calibration.toml.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MEMORY_EFFICIENCY = 0.7


# ---------------------------------------------------------------- graphs
def _mobilenet_v1(width: float, num_classes: int):
    """MobileNet v1 (Howard et al. 2017, Table 1) at a width multiplier."""
    import torch.nn as nn

    def block(cin, cout, stride, depthwise):
        groups = cin if depthwise else 1
        kernel = 3 if depthwise or cin == 3 else 1
        return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    plan = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
    channels = int(32 * width)
    layers = block(3, channels, 2, False)
    for out, stride in plan:
        out = int(out * width)
        layers += block(channels, channels, stride, True) + block(channels, out, 1, False)
        channels = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def build(model: str, num_classes: int):
    if model.startswith("mobilenet_v1_"):
        return _mobilenet_v1(float(model.rsplit("_", 1)[1]), num_classes)
    if model.startswith("timm:"):
        import timm

        return timm.create_model(model[5:], pretrained=False, num_classes=num_classes)
    import torchvision

    return getattr(torchvision.models, model)(weights=None, num_classes=num_classes)


def export_anchor(model: str, cache: Path, num_classes: int = 1000, size: int = 224) -> Path:
    """``model`` at 1x3xSIZExSIZE as ONNX (shapes only, no weights), cached."""
    path = cache / f"{model.replace(':', '_')}-{num_classes}-{size}.onnx"
    if path.is_file():
        return path
    import torch

    net = build(model, num_classes).eval()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with torch.no_grad():
        torch.onnx.export(net, torch.zeros(1, 3, size, size), str(tmp), export_params=False,
                          input_names=["images"], dynamic_axes={"images": {0: "batch"}},
                          opset_version=17, dynamo=False)
    tmp.replace(path)
    return path


def load_anchors() -> list[dict]:
    from edge_ssl.devices.profiles import load_toml

    return load_toml(ROOT / "devices" / "anchors.toml")["anchor"]


@dataclass
class Sample:
    """One anchor with the per-kernel terms the fitted constants act on."""

    anchor: dict
    arch: str
    group: str
    terms: object  # edge_ssl.devices.predict.KernelTerms
    end_to_end: bool
    published: float
    graphs: bool = False  # replayed as a CUDA graph: a smaller per-kernel floor


def samples(anchors: list[dict], cache: Path) -> list[Sample]:
    from edge_ssl.devices.predict import board_for, graph_costs, kernel_terms, tile_for
    from edge_ssl.devices.profiles import get_profile

    rows = []
    for anchor in anchors:
        profile = get_profile(anchor["device"])
        precision = anchor["precision"]
        onnx = export_anchor(anchor["model"], cache, anchor.get("num_classes", 1000), anchor.get("input_size", 224))
        costs = graph_costs(onnx, anchor.get("batch", 1), precision, tile_for(profile.arch, precision))
        terms = kernel_terms(costs, board_for(profile, precision))
        rows.append(Sample(anchor, profile.arch, f"{profile.arch}-{precision}", terms,
                           anchor["timing"] == "end_to_end", anchor["published_ms"],
                           bool(anchor.get("cuda_graphs", False))))
    return rows


# ---------------------------------------------------------------- the fit
class Parameters:
    """Log-space parameter vector <-> LatencyModel, over what the training anchors can identify."""

    def __init__(self, train: list[Sample]):
        from edge_ssl.devices.predict import DEFAULT_MODEL, OP_KINDS

        self.default = DEFAULT_MODEL
        used = {int(k) for s in train for k in s.terms.kinds}
        self.kinds = [k for i, k in enumerate(OP_KINDS) if i and i in used]
        self.gens = sorted({s.arch for s in train})
        self.int8 = sorted({s.arch for s in train if s.group.endswith("int8")})
        # end-to-end figures differ by harness (Python vs C++, copies or not): one host
        # overhead per publication, pulled toward their common mean
        self.hosts = sorted({s.anchor["source_id"] for s in train if s.end_to_end})
        self.graphs = ["graph"] if any(s.graphs for s in train) else []
        self.names = ([f"eff:{k}" for k in self.kinds] + [f"scale:{g}" for g in self.gens]
                      + [f"launch:{g}" for g in self.gens] + ["memory"] + [f"int8:{g}" for g in self.int8]
                      + [f"host:{h}" for h in self.hosts] + self.graphs)

    def start_and_bounds(self):
        start, low, high = [], [], []
        for name in self.names:
            kind, _, key = name.partition(":")
            value, lo, hi = {"eff": (self.default.op_efficiency.get(key, 0.5), 0.003, 3.0),
                             "scale": (0.5, 0.02, 1.5), "launch": (10.0, 0.5, 300.0),
                             "memory": (DEFAULT_MEMORY_EFFICIENCY, 0.2, 1.0), "int8": (1.0, 0.2, 3.0),
                             "host": (0.05, 0.001, 5.0), "graph": (0.5, 0.05, 1.0)}[kind]
            start.append(math.log(value))
            low.append(math.log(lo))
            high.append(math.log(hi))
        return np.array(start), (np.array(low), np.array(high))

    def model(self, theta: np.ndarray):
        from edge_ssl.devices.predict import LatencyModel

        values = dict(zip(self.names, np.exp(theta), strict=False))
        scale = {g: float(values[f"scale:{g}"]) for g in self.gens}
        launch = {g: float(values[f"launch:{g}"]) for g in self.gens}
        hosts = [float(values[f"host:{h}"]) for h in self.hosts]
        model = LatencyModel(
            op_efficiency={**self.default.op_efficiency, **{k: float(values[f"eff:{k}"]) for k in self.kinds}},
            scale=scale, launch_kcycles=launch, int8_ratio={g: float(values[f"int8:{g}"]) for g in self.int8},
            memory_efficiency=float(values["memory"]),
            graph_launch_share=float(values.get("graph", 1.0)),
            host_overhead_ms=math.exp(np.mean(np.log(hosts))) if hosts else 0.0)
        model.__dict__["hosts"] = dict(zip(self.hosts, hosts, strict=False))  # per publication, for the fit only
        return model


def predict_sample(model, sample: Sample) -> tuple[float, float]:
    """(predicted ms as the anchor reports it, launch-floor ms)."""
    from edge_ssl.devices.predict import kernel_ms

    times, _, floor = kernel_ms(sample.terms, model)
    if sample.graphs:
        times, floor = times - floor * (1 - model.graph_launch_share), floor * model.graph_launch_share
    total = float(times.sum())
    return total + (host_overhead(model, sample) if sample.end_to_end else 0.0), floor * len(times)


def host_overhead(model, sample: Sample) -> float:
    """The fitted host overhead of the anchor's publication (the mean one for a held-out one)."""
    return model.__dict__.get("hosts", {}).get(sample.anchor["source_id"], model.host_overhead_ms)


def _priors(params: Parameters, theta: np.ndarray) -> list[float]:
    """Weak pulls that keep what few anchors identify near sensible values (and shared)."""
    from edge_ssl.devices.predict import FAMILY

    values = dict(zip(params.names, theta, strict=False))
    pulls = []
    for name, weight in (("scale", 0.5), ("launch", 0.3)):
        for gen in params.gens:
            family = [values[f"{name}:{g}"] for g in params.gens if FAMILY[g] == FAMILY[gen]]
            pulls.append(weight * (values[f"{name}:{gen}"] - np.mean(family)))
    hosts = [values[f"host:{h}"] for h in params.hosts]
    pulls += [0.3 * (v - np.mean(hosts)) for v in hosts]
    pulls += [0.1 * (values[f"eff:{k}"] - math.log(params.default.op_efficiency[k])) for k in params.kinds]
    pulls.append(0.5 * (values["memory"] - math.log(DEFAULT_MEMORY_EFFICIENCY)))
    ratios = [values[f"int8:{g}"] for g in params.int8]
    pulls += [0.3 * v for v in ratios] + [0.3 * (v - np.mean(ratios)) for v in ratios]
    return pulls


def fit(train: list[Sample]):
    """Least squares on log(predicted/published) + the priors; returns a LatencyModel."""
    from scipy.optimize import least_squares

    params = Parameters(train)

    def residuals(theta):
        model = params.model(theta)
        errors = [math.log(predict_sample(model, s)[0] / s.published) for s in train]
        return np.array(errors + _priors(params, theta))

    start, bounds = params.start_and_bounds()
    result = least_squares(residuals, start, bounds=bounds, method="trf", x_scale=1.0, max_nfev=4000)
    return params.model(result.x)


def cross_validate(rows: list[Sample], key: str) -> list[float]:
    """Log ratio of each anchor predicted by a fit without its board (or its source)."""
    errors = [0.0] * len(rows)
    for held in sorted({s.anchor[key] for s in rows}):
        model = fit([s for s in rows if s.anchor[key] != held])
        for i, s in enumerate(rows):
            if s.anchor[key] == held:
                errors[i] = math.log(predict_sample(model, s)[0] / s.published)
    return errors


# ---------------------------------------------------------------- report
def within(errors: list[float]) -> float:
    return round(sum(1 for e in errors if abs(math.exp(e) - 1) <= 0.25) / len(errors), 4)


def median_abs(errors: list[float]) -> float:
    return round(float(np.median(np.abs(errors))), 4)


def group_intervals(rows: list[Sample], loo_board: list[float]) -> dict[str, dict]:
    """Per calibration group: anchors, boards and the half-width (log) of its interval: the
    90th percentile of the group's leave-one-board-out |log ratio| (max with < 5 anchors),
    never narrower than the median over all anchors."""
    floor = median_abs(loo_board)
    by_group = defaultdict(list)
    for s, e in zip(rows, loo_board, strict=False):
        by_group[s.group].append((s, e))
    groups = {}
    for group, items in sorted(by_group.items()):
        signed = [e for _, e in items]
        errors = [abs(e) for e in signed]
        width = float(np.percentile(errors, 90)) if len(errors) >= 5 else max(errors)
        groups[group] = {"anchors": len(items), "boards": sorted({s.anchor["device"] for s, _ in items}),
                         "log_interval": round(max(width, floor), 4),
                         "loo_board_within_25pct": within(signed)}
    return groups


def write_calibration(model, groups: dict[str, dict]) -> Path:
    lines = ["# Written by benchmarks/predict.py --fit from devices/anchors.toml (published results).",
             "# op_efficiency: share of the generation's 3x3-conv efficiency each kernel kind reaches;",
             "# scale: share of the dense FP16 peak a 3x3 conv reaches; launch_kcycles: per-kernel floor",
             "# in 1000s of GPU clocks (the same at every precision); groups: anchors and the",
             "# cross-validated interval (half-width of log(predicted/published)).", "",
             "[model]", f"memory_efficiency = {model.memory_efficiency:.4f}",
             f"host_overhead_ms = {model.host_overhead_ms:.4f}", "", "[model.op_efficiency]"]
    lines += [f"{k} = {v:.4f}" for k, v in model.op_efficiency.items()]
    lines += ["", "[model.int8_ratio]"] + [f"{g} = {v:.4f}" for g, v in model.int8_ratio.items()]
    for gen in model.scale:
        lines += ["", f"[model.generations.{gen}]", f"scale = {model.scale[gen]:.4f}",
                  f"launch_kcycles = {model.launch_kcycles[gen]:.3f}"]
    for group, entry in groups.items():
        lines += ["", f'[groups."{group}"]', f"anchors = {entry['anchors']}",
                  f"boards = {json.dumps(entry['boards'])}", f"log_interval = {entry['log_interval']}",
                  f'source = "{entry["anchors"]} published results on {", ".join(entry["boards"])}"']
    path = ROOT / "devices" / "predict_calibration.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def report(rows: list[Sample], model, errors: dict[str, list[float]], groups: dict) -> dict:
    anchors = []
    for i, s in enumerate(rows):
        predicted, launch = predict_sample(model, s)
        anchors.append({
            "device": s.anchor["device"], "model": s.anchor["model"], "precision": s.anchor["precision"],
            "batch": s.anchor.get("batch", 1), "timing": s.anchor["timing"], "group": s.group,
            "published_ms": s.published, "predicted_ms": round(predicted, 4),
            "ratio": round(predicted / s.published, 4),
            "loo_board_ratio": round(math.exp(errors["loo_board"][i]), 4),
            "loo_source_ratio": round(math.exp(errors["loo_source"][i]), 4),
            "launch_bound_share": round(launch / (predicted - (host_overhead(model, s) if s.end_to_end else 0)), 4),
            "source_id": s.anchor["source_id"], "source": s.anchor["source"], "kind": "predicted"})
    return {
        "count": len(rows), "boards": sorted({s.anchor["device"] for s in rows}),
        "sources": sorted({s.anchor["source_id"] for s in rows}),
        "in_sample_within_25pct": within(errors["in_sample"]),
        "loo_board_within_25pct": within(errors["loo_board"]),
        "loo_source_within_25pct": within(errors["loo_source"]),
        "median_abs_log_ratio": {k: median_abs(v) for k, v in errors.items()},
        "calibration_groups": groups,
        "model": {"op_efficiency": model.op_efficiency, "scale": model.scale,
                  "launch_kcycles": model.launch_kcycles, "int8_ratio": model.int8_ratio,
                  "memory_efficiency": model.memory_efficiency,
                  "graph_launch_share": model.graph_launch_share,
                  "host_overhead_ms_by_source": model.__dict__.get("hosts", {})},
        "anchors": anchors,
        "note": "loo_board: each board's anchors predicted by a fit without that board; loo_source: "
                "each publication's anchors predicted by a fit without it (the headline figures). "
                "in_sample is the fit's own data. Ratios are predicted/published.",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "predict.json")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "edge-ssl-anchors",
                        help="Where the anchor ONNX graphs are cached (outside the repository).")
    parser.add_argument("--fit", action="store_true", help="Rewrite devices/predict_calibration.toml.")
    args = parser.parse_args(argv)

    rows = samples(load_anchors(), args.cache)
    model = fit(rows)
    errors = {"in_sample": [math.log(predict_sample(model, s)[0] / s.published) for s in rows],
              "loo_board": cross_validate(rows, "device"), "loo_source": cross_validate(rows, "source_id")}
    groups = group_intervals(rows, errors["loo_board"])
    if args.fit:
        print(f"wrote {write_calibration(model, groups)}")
    result = report(rows, model, errors, groups)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for a in result["anchors"]:
        print(f"{a['device']:>13} {a['model'][:18]:>18} {a['precision']} b{a['batch']} "
              f"pub {a['published_ms']:7.3f} pred {a['predicted_ms']:7.3f} "
              f"in {a['ratio']:.2f} lobo {a['loo_board_ratio']:.2f} loso {a['loo_source_ratio']:.2f}")
    print(f"{result['count']} anchors, {len(result['boards'])} boards; within +-25%: in-sample "
          f"{result['in_sample_within_25pct']:.0%}, leave-one-board-out {result['loo_board_within_25pct']:.0%}, "
          f"leave-one-source-out {result['loo_source_within_25pct']:.0%}; median |log ratio| "
          f"{result['median_abs_log_ratio']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
