"""Compress the real SSL teacher (distill -> prune -> INT8) and measure every stage side by side.

    python benchmarks/compress.py --teacher ../shared/teachers/simclr_resnet18_cifar.edge \
        --data ../shared/data/cifar10 [--quick] --out results.json

Distillation, pruning and calibration use the unlabeled train files; kNN top-1 (k=20) uses the
labeled train files as the bank and cifar10_test.npz as the test set, for every stage, through
the same onnxruntime CPU graph the latency is measured on. Latency: the runtime's harness
(`edge_ssl.runtime.bench.benchmark`), p50 at batch 1 and 32. The SSL-alone baseline trains the
same student with SimCLR for the same wall-clock time the distillation took. With the [inc]
extra, Intel Neural Compressor's PyTorch INT8 path is compared with the ORT QDQ path.
Numbers are only compared within one run (one machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"unlabeled": 2000, "bank_per_file": 500, "test": 500, "width": 0.25, "init": "teacher", "epochs": 3,
         "cache_views": 2, "batch_size": 128, "prune_importance": "l2", "recovery_epochs": 0,
         "calibration_images": 128, "bench_seconds": 2.0, "prune_ratio": 0.5, "prune_steps": 1}
FULL = {"unlabeled": None, "bank_per_file": None, "test": None, "width": 0.5, "init": "teacher", "epochs": 3,
        "cache_views": 2, "batch_size": 256, "prune_importance": "taylor", "recovery_epochs": 5,
        "calibration_images": 512, "bench_seconds": 5.0, "prune_ratio": 0.4, "prune_steps": 1}
#: --validation: the last N labeled images of each train file are the kNN queries (and are
#: left out of the bank and of the unlabeled training images); the test file is not read.
VALIDATION_PER_FILE = 500


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=ROOT.parent / "shared" / "teachers" / "simclr_resnet18_cifar.edge")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10")
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument("--quick", action="store_true", help="small data and few epochs (< 10 min on 2 cores)")
    parser.add_argument("--workdir", type=Path, default=None, help="where stage bundles go (default: a temp dir)")
    parser.add_argument("--device", default="auto", help="training device (auto, cpu, cuda)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    parser.add_argument("--skip-inc", action="store_true", help="do not run the neural-compressor comparison")
    parser.add_argument("--for", dest="profile", default=None, metavar="PROFILE",
                        help="device profile (e.g. orin-nano-8gb): every stage row gets the latency "
                             "PREDICTED for it with its interval, beside the host numbers")
    parser.add_argument("--precision", default="int8", choices=("int8", "fp16"),
                        help="the board precision of the final stage (with --for)")
    parser.add_argument("--max-latency-ms", type=float, default=None,
                        help="with --for: search the student width and prune ratio that fit this "
                             "predicted budget before training (candidates in the JSON)")
    parser.add_argument("--distill-cache-views", type=int, default=None, metavar="N",
                        help="fixed views per image the distillation caches (default: 2; pruning's "
                             "recovery keeps 2)")
    parser.add_argument("--validation", action="store_true",
                        help=f"choose settings: kNN queries are the last {VALIDATION_PER_FILE} images of each "
                             "train file (held out of training and the bank); the test file is not read")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting (epochs, width, prune_ratio, prune_steps, recovery_epochs, "
                             "prune_importance, ...); repeatable")
    parser.add_argument("--distilled", type=Path, default=None,
                        help="reuse this distilled bundle (of the same teacher and data) instead of distilling")
    parser.add_argument("--skip-ssl-alone", action="store_true",
                        help="do not train the SSL-alone baseline (variants of one setting)")
    return parser.parse_args(argv)


def apply_overrides(settings: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs over ``settings``, each value parsed as the type it replaces."""
    out = dict(settings)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or key not in out:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(out)}")
        old = out[key]
        if text == "none" or isinstance(old, str):
            out[key] = None if text == "none" else text
        elif old is None or (isinstance(old, int) and not isinstance(old, bool)):
            out[key] = int(text)  # None-valued keys are counts (unlabeled, bank_per_file, test)
        else:
            out[key] = float(text)
    return out


def load_data(data_dir: Path, settings: dict[str, Any], validation: bool = False) -> tuple[Any, Any, Any]:
    """(unlabeled train images, labeled bank, labeled test) from the CIFAR-10 subset; with
    ``validation`` the "test" set is held out of the train files instead."""
    import numpy as np

    from edge_ssl.data.sources import ImageDataset, load_images

    files = [data_dir / f"cifar10_train_{i}.npz" for i in range(4)]
    test_file = data_dir / "cifar10_test.npz"
    missing = [str(p) for p in [*files, test_file] if not p.is_file()]
    if missing:
        raise SystemExit(f"CIFAR-10 subset not found ({missing[0]}); see ../shared/data/README.md")
    if validation:
        return _validation_split(files, settings)
    per_file = settings["bank_per_file"]
    bank = load_images([str(f) for f in files]) if per_file is None else _concat(
        [load_images(str(f), limit=per_file) for f in files])
    test = load_images(str(test_file), limit=settings["test"])
    count = settings["unlabeled"] or len(bank)
    unlabeled = ImageDataset(np.ascontiguousarray(bank.images[:count]), None, None,
                             f"{data_dir} train files (labels unused, {count} images)")
    return unlabeled, bank, test


def _validation_split(files: list[Path], settings: dict[str, Any]) -> tuple[Any, Any, Any]:
    import numpy as np

    from edge_ssl.data.sources import ImageDataset, load_images

    loaded = [load_images(str(f)) for f in files]
    held = _concat([p.subset(np.arange(len(p) - VALIDATION_PER_FILE, len(p))) for p in loaded])
    kept = [p.subset(np.arange(len(p) - VALIDATION_PER_FILE)) for p in loaded]
    per_file = settings["bank_per_file"]
    bank = _concat([p if per_file is None else p.subset(np.arange(min(per_file, len(p)))) for p in kept])
    count = settings["unlabeled"] or len(bank)
    unlabeled = ImageDataset(np.ascontiguousarray(bank.images[:count]), None, None,
                             f"train files minus the validation images (labels unused, {count} images)")
    limit = settings["test"]
    return unlabeled, bank, held if limit is None else held.subset(np.arange(min(limit, len(held))))


def _concat(parts: list[Any]) -> Any:
    import numpy as np

    from edge_ssl.data.sources import ImageDataset

    return ImageDataset(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
                        parts[0].class_names, " + ".join(p.source for p in parts))


class Meter:
    """Every stage measured the same way: ONNX on onnxruntime CPU for kNN and latency."""

    def __init__(self, knn: Any, workdir: Path, seconds: float, threads: int | None) -> None:
        self.knn, self.workdir, self.seconds, self.threads = knn, workdir, seconds, threads

    def graph(self, bundle: Any, name: str) -> Path:
        if not bundle.has("model.pt"):
            return bundle.file("model.onnx")
        from edge_ssl.runtime.export import export_encoder_onnx

        from edge_ssl.models import load_encoder

        return export_encoder_onnx(load_encoder(bundle), self.workdir / f"{name}.onnx")

    def row(self, name: str, bundle: Any) -> dict[str, Any]:
        """Sizes and kNN now; latency later, for every stage in one block (``latencies``)."""
        from edge_ssl.compress.measure import model_metrics
        from edge_ssl.compress.quantize import onnx_embed

        from edge_ssl.models import load_encoder

        spec = bundle.manifest.input
        graph = self.graph(bundle, name)
        if bundle.has("model.pt"):
            sizes = model_metrics(load_encoder(bundle))
        else:
            sizes = {k: bundle.manifest.metrics.get(k) for k in ("params", "macs")}
        started = time.perf_counter()
        top1 = self.knn.top1(lambda images: onnx_embed(graph, images, spec))
        row = {"name": name, "params": sizes["params"], "macs": sizes["macs"],
               "bytes": graph.stat().st_size, "knn_top1": top1, "ort_cpu_ms_b1": None, "ort_cpu_ms_b32": None,
               "precision": bundle.manifest.precision, "bundle": str(bundle.path),
               "manifest_sha256": bundle.manifest_sha256, "_graph": graph, "_spec": spec}
        log(f"{name:10s} params {row['params']:>10,}  MACs {row['macs']:>13,}  bytes {row['bytes']:>10,}  "
            f"kNN {100 * top1:6.2f}%  (measure {time.perf_counter() - started:.0f} s)")
        return row

    def latencies(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """p50 at batch 1 and 32 for every row, back to back, so all stages see the same machine."""
        import os

        from edge_ssl.compress.measure import ort_latency_ms

        load_before = os.getloadavg()
        for row in rows:
            for batch in (1, 32):
                row[f"ort_cpu_ms_b{batch}"] = ort_latency_ms(row["_graph"], row["_spec"], batch,
                                                             seconds=self.seconds, threads=self.threads)
            log(f"{row['name']:10s} b1 {row['ort_cpu_ms_b1']:.3f} ms  b32 {row['ort_cpu_ms_b32']:.2f} ms")
        return {"load_average_before": load_before, "load_average_after": os.getloadavg()}


def add_board(rows: list[dict[str, Any]], profile: str | None) -> None:
    """Each row's latency PREDICTED for ``profile`` (float stages in FP16, a quantized one in its
    precision), labelled so, beside the host's measured ORT-CPU numbers."""
    if profile is None:
        return
    from edge_ssl.devices.predict import predict_onnx

    for row in rows:
        precision = row["precision"] if row["precision"] in ("int8", "fp16") else "fp16"
        predicted = predict_onnx(row["_graph"], profile, precision=precision, batch=1)
        row.update({"board": predicted.device, "board_kind": "predicted-for-board",
                    "board_precision": precision, "board_ms_b1": predicted.predicted_ms,
                    "board_interval_ms_b1": list(predicted.interval_ms),
                    "board_calibration": str(predicted.calibration),
                    "launch_bound_share": predicted.launch_bound_share,
                    "host_kind": "measured-host (onnxruntime CPU on this machine)"})
        log(f"{row['name']:10s} {profile} {precision}: {predicted.predicted_ms:.3f} ms "
            f"[{predicted.interval_ms[0]:.3f}-{predicted.interval_ms[1]:.3f}] (predicted)")


def board_search(args: argparse.Namespace, teacher: Any, width: float, ratio: float) -> tuple[float, float, Any]:
    """(width, prune ratio, search) chosen for the --for budget before training; the student
    stays resnet18_cifar (init=teacher needs the teacher's architecture)."""
    if args.profile is None or args.max_latency_ms is None:
        return width, ratio, None
    from edge_ssl.compress.prune import board_round_to
    from edge_ssl.compress.search import candidate_specs, candidates_table, search

    spec = teacher.manifest.encoder
    specs = candidate_specs(spec, "resnet18_cifar", {}, same_arch_only=True)
    found = search(spec, specs, args.profile, args.precision, args.max_latency_ms,
                   round_to=board_round_to(args.profile, args.precision), prune_ratios=(0.3, 0.5), log=log)
    for line in [*candidates_table(found), *found.notes]:
        log(line)
    if found.chosen is None:
        raise SystemExit(f"no candidate fits {args.max_latency_ms} ms on {args.profile}: {found.notes}")
    return float(found.chosen.spec.kwargs["width"]), found.chosen.spec.prune or 0.0, found


def reuse_distilled(path: Path, teacher: Any, width: float) -> Any:
    """A finished distillation of ``teacher`` (its lineage names the teacher's sha256) into a
    student of ``width`` (the setting, or what the --for search chose)."""
    from types import SimpleNamespace

    from edge_ssl.bundle import Bundle

    bundle = Bundle.open(path, verify=True)
    last = bundle.manifest.lineage[-1] if bundle.manifest.lineage else None
    if last is None or last.stage != "distill" or last.parent != teacher.manifest_sha256:
        raise SystemExit(f"--distilled {path}: not a distillation of {teacher.path}")
    found = bundle.manifest.encoder.kwargs.get("width")
    if found != width:
        raise SystemExit(f"--distilled {path}: its student has width {found}, this run needs {width}")
    log(f"distill: reused {path}")
    return SimpleNamespace(bundle=bundle)


def final_bundle(int8: dict[str, Any], ready: Any) -> dict[str, Any]:
    """The bundle the run ends with: the INT8 stage, made adaptation-ready (same model, adapt
    settings and replay images added) unless --validation."""
    if ready is None:
        return {"path": int8["bundle"], "manifest_sha256": int8["manifest_sha256"], "adapt_ready": None}
    record = ready.manifest.lineage[-1]
    return {"path": str(ready.path), "manifest_sha256": ready.manifest_sha256,
            "measured_as": int8["manifest_sha256"], "adapt_ready": record.settings}


def public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ssl_alone(student_kwargs: dict[str, Any], data: Any, seconds: float, settings: dict[str, Any],
              out: Path, device: str) -> tuple[Any, int]:
    """SimCLR on the same student for (at least) the same wall-clock time as distillation."""
    from edge_ssl.bundle import Bundle
    from edge_ssl.train.pretrain import PretrainConfig, pretrain

    started, epochs = time.perf_counter(), 0
    while epochs == 0 or time.perf_counter() - started < seconds:
        epochs += 1
        config = PretrainConfig(method="simclr", arch="resnet18_cifar", arch_kwargs=student_kwargs,
                                epochs=epochs, batch_size=settings["batch_size"], warmup_epochs=0.0,
                                device=device)
        pretrain(config, data, out, resume=epochs > 1, overwrite=epochs == 1)
    return Bundle.open(out), epochs


def inc_comparison(pruned: Any, images: Any, ort_row: dict[str, Any], knn: Any, seconds: float) -> dict[str, Any]:
    """INC 3.x PyTorch static INT8 (autotune) vs the ORT QDQ graph, on the same pruned model."""
    import numpy as np
    import torch
    from edge_ssl.compress.calibration import ImageCalibrationReader
    from edge_ssl.compress.inc import quantize_inc
    from edge_ssl.runtime.preprocess import preprocess_images

    from edge_ssl.models import load_encoder

    encoder = load_encoder(pruned)
    spec = encoder.spec.input
    started = time.perf_counter()
    result = quantize_inc(encoder, ImageCalibrationReader(images, spec))
    quantize_s = time.perf_counter() - started

    def embed(batch_images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([result.model(torch.from_numpy(preprocess_images(batch_images[i:i + 256], spec))).numpy()
                                   for i in range(0, len(batch_images), 256)])

    def latency(batch: int) -> float:
        x = torch.from_numpy(preprocess_images(images[:batch], spec))
        times, end = [], time.perf_counter() + seconds
        with torch.no_grad():
            result.model(x)
            while time.perf_counter() < end or len(times) < 5:
                t0 = time.perf_counter()
                result.model(x)
                times.append(1000 * (time.perf_counter() - t0))
        return float(np.median(times))

    top1 = knn.top1(embed)
    return {"inc_version": result.version, "inc_knn_top1": top1, "ort_knn_top1": ort_row["knn_top1"],
            "inc_mean_cosine_vs_fp32": result.mean_cosine, "inc_quantize_seconds": quantize_s,
            "inc_torch_ms_b1": latency(1), "inc_torch_ms_b32": latency(32),
            "ort_int8_ms_b1": ort_row["ort_cpu_ms_b1"], "ort_int8_ms_b32": ort_row["ort_cpu_ms_b32"],
            "knn_diff_pts_inc_minus_ort": 100 * (top1 - ort_row["knn_top1"]),
            "note": "INC's model is PyTorch PT2E Q/DQ in eager mode (torch.compile would be needed for "
                    "INT8 kernels); ORT runs its QDQ graph with INT8 kernels."}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.distill_cache_views is not None and args.distill_cache_views < 1:
        raise SystemExit(f"--distill-cache-views must be >= 1; got {args.distill_cache_views}")
    settings = {**settings, "distill_cache_views": args.distill_cache_views or settings["cache_views"]}
    settings = apply_overrides(settings, args.overrides)
    import torch
    from edge_ssl.compress.adapt_ready import adapt_ready_bundle
    from edge_ssl.compress.distill import DistillConfig, distill
    from edge_ssl.compress.inc import inc_available
    from edge_ssl.compress.measure import KnnData
    from edge_ssl.compress.prune import PruneConfig, board_round_to, prune
    from edge_ssl.compress.quantize import QuantizeConfig, quantize

    from edge_ssl.bundle import Bundle
    from edge_ssl.environment import describe_environment

    started = time.perf_counter()
    teacher = Bundle.open(args.teacher, verify=True)
    unlabeled, bank, test = load_data(args.data, settings, args.validation)
    knn = KnnData.from_datasets(bank, test)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edge-ssl-bench-compress-"))
    workdir.mkdir(parents=True, exist_ok=True)
    meter = Meter(knn, workdir, settings["bench_seconds"], args.threads)
    timings: dict[str, float] = {}
    log(f"data: {len(unlabeled)} unlabeled, bank {len(bank)}, test {len(test)}; work dir {workdir}")

    rows = [meter.row("teacher", teacher)]
    width, prune_ratio, found = board_search(args, teacher, settings["width"], settings["prune_ratio"])
    settings = {**settings, "width": width, "prune_ratio": prune_ratio}
    student_kwargs = {"width": settings["width"]}
    t0 = time.perf_counter()
    distilled = reuse_distilled(args.distilled, teacher, width) if args.distilled else distill(teacher, DistillConfig(
        student="resnet18_cifar", student_kwargs=student_kwargs, objectives=("feature", "seed"),
        epochs=settings["epochs"], batch_size=settings["batch_size"], cache_views=settings["distill_cache_views"],
        warmup_epochs=min(1.0, settings["epochs"] / 5), device=args.device, init=settings["init"],
    ), unlabeled, workdir / "1-distill.edge", overwrite=True)
    timings["distill_s"] = time.perf_counter() - t0
    rows.append(meter.row("distill", distilled.bundle))

    ssl_row, ssl_epochs = None, None
    if not args.skip_ssl_alone:
        t0 = time.perf_counter()
        baseline, ssl_epochs = ssl_alone(student_kwargs, unlabeled, timings["distill_s"], settings,
                                         workdir / "ssl-alone.edge", args.device)
        timings["ssl_alone_s"] = time.perf_counter() - t0
        ssl_row = meter.row("ssl_alone", baseline)

    t0 = time.perf_counter()
    round_to = 8 if args.profile is None else board_round_to(args.profile, args.precision)
    pruned = distilled.bundle if not prune_ratio else prune(distilled.bundle, PruneConfig(
        ratio=prune_ratio, importance=settings["prune_importance"], recovery_epochs=settings["recovery_epochs"],
        steps=settings["prune_steps"], round_to=round_to,
        batch_size=min(64, settings["batch_size"]), device=args.device,
        recovery={"cache_views": settings["cache_views"], "batch_size": settings["batch_size"]},
    ), unlabeled, workdir / "2-prune.edge", overwrite=True).bundle
    timings["prune_s"] = time.perf_counter() - t0
    rows.append(meter.row("prune", pruned))

    t0 = time.perf_counter()
    quantized = quantize(pruned, QuantizeConfig(
        target="ort-cpu" if args.profile is None else "tensorrt", precision=args.precision if args.profile else "int8",
        calibration="minmax", calibration_images=settings["calibration_images"],
        min_cosine=0.98, max_fallback=4,
    ), unlabeled.images, workdir / "3-int8.edge", overwrite=True, log=log)
    quantized, report = quantized.bundle, quantized.report
    timings["quantize_s"] = time.perf_counter() - t0
    rows.append(meter.row("int8", quantized))

    log("latency: every stage back to back")
    measured = [*rows, *([ssl_row] if ssl_row else [])]
    latency_conditions = meter.latencies(measured)
    add_board(measured, args.profile)
    fp32, int8, first = rows[2], rows[3], rows[0]
    summary: dict[str, Any] = {
        "speedup_b1": first["ort_cpu_ms_b1"] / int8["ort_cpu_ms_b1"],
        "speedup_b32": first["ort_cpu_ms_b32"] / int8["ort_cpu_ms_b32"],
        "knn_drop_pts": 100 * (first["knn_top1"] - int8["knn_top1"]),
        "distill_vs_ssl_alone_pts": None if ssl_row is None else 100 * (rows[1]["knn_top1"] - ssl_row["knn_top1"]),
        "int8_vs_fp32_speedup_b1": fp32["ort_cpu_ms_b1"] / int8["ort_cpu_ms_b1"],
        "int8_vs_fp32_speedup_b32": fp32["ort_cpu_ms_b32"] / int8["ort_cpu_ms_b32"],
        "int8_knn_drop_pts": 100 * (fp32["knn_top1"] - int8["knn_top1"]),
        "int8_fallback_layers": report.fallback_layers,
        "ssl_alone_epochs": ssl_epochs,
    }
    reason = None if not args.skip_inc else "--skip-inc"
    reason = reason or inc_available()
    if reason is None:
        t0 = time.perf_counter()
        summary["inc_vs_ort"] = inc_comparison(pruned, unlabeled.images[: settings["calibration_images"]],
                                               int8, knn, settings["bench_seconds"])
        timings["inc_s"] = time.perf_counter() - t0
    else:
        summary["inc_vs_ort"] = None
        summary["inc_skipped"] = reason
    ready = None
    if not args.validation:  # the final bundle ships adapt-tune's settings, as `edge-ssl compress`'s
        t0 = time.perf_counter()
        ready = adapt_ready_bundle(Bundle.open(Path(int8["bundle"])), knn, log)
        timings["adapt_ready_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started
    result = {
        "command": "python benchmarks/compress.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "mode": ("quick" if args.quick else "full") + (" (validation)" if args.validation else ""),
        "knn_queries": (f"validation: the last {VALIDATION_PER_FILE} images of each train file"
                        if args.validation else "cifar10_test.npz"),
        "teacher": {**public(rows[0]), "path": str(args.teacher)},
        "stages": [public(row) for row in rows[1:]],
        "ssl_alone": None if ssl_row is None else public(ssl_row),
        "board": None if args.profile is None else {
            "profile": args.profile, "precision": args.precision, "max_latency_ms": args.max_latency_ms,
            "chosen_fits": None if found is None else rows[-1]["board_ms_b1"] <= args.max_latency_ms,
            "search": None if found is None else found.to_dict()},
        "candidates": None if found is None else found.to_dict()["candidates"],
        "latency_conditions": latency_conditions,
        "summary": summary,
        "final_bundle": final_bundle(int8, ready),
        "settings": settings,
        "timings": timings,
        "environment": describe_environment(),
        "torch_threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
