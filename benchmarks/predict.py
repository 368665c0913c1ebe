"""Check `edge-ssl predict` against published Jetson latencies (devices/anchors.toml).

    .venv/bin/python benchmarks/predict.py --out benchmarks/results/predict.json [--fit]

Builds each anchor network's ONNX graph locally (torchvision architecture, random weights,
exported without parameters: only shapes matter for a roofline), predicts its latency on
the anchor's device profile, and reports predicted/published per anchor, how many fall
within +-25%, and leave-one-out ratios (each anchor predicted by a calibration fitted
without it) so the in-sample fit is not mistaken for accuracy on new models. `--fit`
rewrites devices/predict_calibration.toml from all anchors first.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def export_anchor(model: str, cache: Path) -> Path:
    """torchvision ``model`` at 1x3x224x224 as ONNX (shapes only, no weights), cached."""
    path = cache / f"{model}.onnx"
    if path.is_file():
        return path
    import torch
    import torchvision

    net = getattr(torchvision.models, model)(weights=None).eval()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with torch.no_grad():
        torch.onnx.export(net, torch.zeros(1, 3, 224, 224), str(tmp), export_params=False,
                          input_names=["images"], dynamic_axes={"images": {0: "batch"}},
                          opset_version=17, dynamo=False)
    tmp.replace(path)
    return path


def load_anchors() -> list[dict]:
    from edge_ssl.devices.profiles import load_toml

    return load_toml(ROOT / "devices" / "anchors.toml")["anchor"]


def anchor_inputs(anchors: list[dict], cache: Path) -> list[tuple[dict, str, tuple]]:
    from edge_ssl.devices.predict import graph_costs, peak_ops
    from edge_ssl.devices.profiles import get_profile

    rows = []
    for anchor in anchors:
        profile = get_profile(anchor["device"])
        costs = graph_costs(export_anchor(anchor["model"], cache), 1, anchor["precision"])
        group = f"{profile.arch}-{anchor['precision']}"
        rows.append((anchor, group, (costs, peak_ops(profile, anchor["precision"]),
                                     profile.memory_bandwidth_gbs, anchor["published_ms"])))
    return rows


def fit(rows: list[tuple[dict, str, tuple]], skip: int | None = None) -> dict[str, dict]:
    from edge_ssl.devices.predict import fit_calibration

    groups: dict[str, list] = defaultdict(list)
    for i, (_, group, data) in enumerate(rows):
        if i != skip:
            groups[group].append(data)
    return fit_calibration(groups)


def write_calibration(fitted: dict[str, dict]) -> Path:
    lines = ["# Fitted by benchmarks/predict.py --fit on devices/anchors.toml (published latencies).",
             "# efficiency: share of the dense peak TensorRT reaches on full-size convolutions;",
             "# overhead_ms: fixed cost per kernel (launch, tails, host-side time in the published figure).", ""]
    for group, values in sorted(fitted.items()):
        lines.append(f'[calibration."{group}"]')
        lines += [f"{key} = {value}" for key, value in values.items()]
        lines.append("")
    path = ROOT / "devices" / "predict_calibration.toml"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "predict.json")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "edge-ssl-anchors",
                        help="Where the anchor ONNX graphs are cached (outside the repository).")
    parser.add_argument("--fit", action="store_true", help="Refit devices/predict_calibration.toml first.")
    args = parser.parse_args(argv)

    from edge_ssl.devices import predict as P

    rows = anchor_inputs(load_anchors(), args.cache)
    if args.fit:
        print(f"wrote {write_calibration(fit(rows))}")
        P.calibration_table.cache_clear()
    table = P.calibration_table()
    results = []
    for i, (anchor, group, (costs, peak, bandwidth, published)) in enumerate(rows):
        calib = table.get(group)
        if calib is None:
            print(f"no calibration for {group}; run with --fit", file=sys.stderr)
            return 1
        predicted, _ = P.roofline_ms(costs, peak, bandwidth, calib["efficiency"], calib["overhead_ms"])
        held_out = fit(rows, skip=i).get(group)
        loo = (P.roofline_ms(costs, peak, bandwidth, held_out["efficiency"], held_out["overhead_ms"])[0]
               if held_out else None)
        results.append({
            "device": anchor["device"], "model": anchor["model"], "precision": anchor["precision"],
            "published_ms": published, "predicted_ms": round(predicted, 4),
            "ratio": round(predicted / published, 4),
            "leave_one_out_ratio": round(loo / published, 4) if loo else None,
            "metric": anchor["metric"], "source": anchor["source"], "kind": "predicted",
        })
    within = sum(1 for r in results if abs(r["ratio"] - 1) <= 0.25)
    loo_within = sum(1 for r in results if r["leave_one_out_ratio"] and abs(r["leave_one_out_ratio"] - 1) <= 0.25)
    report = {
        "anchors": results, "within_25pct": within, "count": len(results),
        "leave_one_out_within_25pct": loo_within,
        "skus": sorted({r["device"] for r in results}),
        "calibration": table,
        "note": "predicted = roofline fitted on these same anchors (in-sample); leave_one_out_ratio "
                "predicts each anchor from a fit without it. Groups with one anchor have no "
                "leave-one-out value.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        loo_text = f"{r['leave_one_out_ratio']:.2f}" if r["leave_one_out_ratio"] else "  - "
        print(f"{r['device']:>14} {r['model']:>10} {r['precision']:>5}  published {r['published_ms']:7.3f} ms  "
              f"predicted {r['predicted_ms']:7.3f} ms  ratio {r['ratio']:.2f}  loo {loo_text}")
    print(f"within +-25%: {within}/{len(results)} (leave-one-out: {loo_within}/{len(results)}); "
          f"geo-mean |log ratio| {math.exp(sum(abs(math.log(r['ratio'])) for r in results) / len(results)) - 1:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
