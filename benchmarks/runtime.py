"""Runtime side by side in one run: export parity, ORT vs torch latency, harness overhead.

    python benchmarks/runtime.py --out results.json                       # the contract run
    python benchmarks/runtime.py --out /tmp/rt.json --duration 1 --warmup 0.3   # smoke run

Models: the real SSL teacher ``../shared/teachers/simclr_resnet18_cifar.edge`` (skipped with
a reason when absent) and a small student (resnet18_cifar width 0.25, random init, written
as a temp bundle). Both are exported (fp32 and fp16) with the parity check, then measured
with the one harness (``edge_ssl.runtime.bench.benchmark``) at batch 1 and 32 on every
available backend, with the same thread count for torch and onnxruntime.

Keys: ``harness_overhead_pct`` (our harness p50 vs a bare ``session.run`` loop on the SAME
onnxruntime session, teacher batch 1, median ratio over 10 alternating rounds; target <= 3;
``harness.per_call_cost`` adds the load-independent figure: what our timed region costs per
call beyond the bare loop's, with onnxruntime swapped for a no-op), ``ort_vs_torch_b1``
(torch eager p50 / ORT p50, teacher batch 1; target >= 1.5), ``parity`` (min cosine of the
fp32 and fp16 exports vs torch; targets >= 0.9999 / >= 0.999), ``models`` (p50/p90 per
backend and batch) and, with CUDA, ``gpu`` (torch FP32 eager vs FP16 + CUDA graphs for the
student at batch 1, target >= 3x; ORT-CUDA and TensorRT when importable). Numbers are
only comparable inside one JSON (same machine, same run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from report import emit

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT.parent / "shared" / "teachers" / "simclr_resnet18_cifar.edge"
BATCHES = (1, 32)


def make_student(root: Path) -> Path:
    import torch

    from edge_ssl.bundle import lineage_entry, write_encoder_bundle
    from edge_ssl.models import create_encoder

    torch.manual_seed(0)
    encoder = create_encoder("resnet18_cifar", width=0.25)
    out = root / "student_r18w025.edge"
    write_encoder_bundle(out, encoder, lineage=(lineage_entry("benchmark", {"random_init": True}),))
    return out


def export_both(bundle: Path, root: Path) -> dict[str, Any]:
    """fp32 and fp16 exports with their parity reports (64 real images)."""
    from edge_ssl.runtime.export import export_bundle

    out: dict[str, Any] = {}
    for precision in ("fp32", "fp16"):
        start = time.perf_counter()
        exported = export_bundle(bundle, root / f"{bundle.stem}_{precision}.edge", fp16=precision == "fp16").bundle
        out[precision] = {"bundle": exported, "seconds": time.perf_counter() - start,
                          "parity": exported.manifest.metrics["export"]["parity"]}
    return out


def latency(bundle: Any, backend: str, args: argparse.Namespace, **kwargs: Any) -> dict[str, Any]:
    from edge_ssl.runtime.backends import open_runner
    from edge_ssl.runtime.bench import benchmark

    runner = open_runner(bundle, backend, threads=args.threads, **kwargs)
    report = benchmark(runner, batch_sizes=BATCHES, duration_s=args.duration, warmup_s=args.warmup)
    print(f"  {report.runner['name']}: " + ", ".join(
        f"b{r.batch_size} p50 {r.latency_ms['p50']:.3f} ms" for r in report.batches), file=sys.stderr)
    return {
        "runner": report.runner["name"],
        **{f"b{r.batch_size}": {"p50_ms": r.latency_ms["p50"], "p90_ms": r.latency_ms["p90"],
                                 "p99_ms": r.latency_ms["p99"], "throughput_per_s": r.throughput_per_s,
                                 "iterations": r.iterations} for r in report.batches},
        "peak_rss_mb": report.peak_rss_mb,
    }


def harness_overhead(bundle: Any, args: argparse.Namespace, rounds: int = 10) -> dict[str, Any]:
    """Our harness vs a bare session.run loop on the same session, in alternating short rounds.

    Each round measures both back to back, so a round's pair shares the machine's load; the
    headline is the median over rounds of (harness p50 / bare p50 - 1).
    """
    from edge_ssl.runtime.bench import benchmark
    from edge_ssl.runtime.ort import OrtRunner

    runner = OrtRunner(bundle.file("model.onnx"), threads=args.threads)
    seconds, warmup = args.duration / rounds, args.warmup / rounds
    with runner:
        session = runner.session
        name, outputs = session.get_inputs()[0].name, [session.get_outputs()[0].name]
        batch = np.random.default_rng(0).standard_normal((1, *bundle.manifest.input.shape), dtype=np.float32)
        bare, ours = [], []
        for i in range(rounds):
            order = ("bare", "ours") if i % 2 == 0 else ("ours", "bare")  # no side always goes first
            for side in order:
                if side == "bare":
                    bare.append(_bare_loop(session, name, outputs, batch, seconds, warmup))
                else:
                    report = benchmark(runner, batch_sizes=(1,), duration_s=seconds, warmup_s=warmup)
                    ours.append(report.batches[0].latency_ms["p50"])
        per_call = _per_call_cost(runner, session, name, outputs, batch)
    ratios = [o / b for o, b in zip(ours, bare, strict=True)]
    per_call["extra_pct_of_bare_p50"] = 100.0 * per_call["extra_us_per_call"] / (1000.0 * statistics.median(bare))
    return {"bare_p50_ms": statistics.median(bare), "harness_p50_ms": statistics.median(ours),
            "rounds": rounds, "round_ratios": [round(r, 4) for r in ratios],
            "overhead_pct": 100.0 * (statistics.median(ratios) - 1.0), "per_call_cost": per_call}


def _per_call_cost(runner: Any, session: Any, name: str, outputs: list[str], batch: np.ndarray,
                       calls: int = 20000) -> dict[str, float]:
    """The harness's own cost per call, without onnxruntime's noise: ``runner.infer`` with
    its session.run swapped for a no-op vs the bare loop's ``run(outputs, {name: batch})``
    with the same no-op. Everything our timed region adds is in the difference."""
    result = [np.zeros((1, 4), np.float32)]

    def noop(out_names: Any, feeds: Any) -> list[np.ndarray]:
        return result

    clock, real = time.perf_counter, runner._run
    runner._run = noop
    try:
        t0 = clock()
        for _ in range(calls):
            runner.infer(batch)
        ours = clock() - t0
        t0 = clock()
        for _ in range(calls):
            noop(outputs, {name: batch})
        bare = clock() - t0
    finally:
        runner._run = real
    return {"calls": calls, "extra_us_per_call": (ours - bare) / calls * 1e6}


def _bare_loop(session: Any, name: str, outputs: list[str], batch: np.ndarray, duration: float,
               warmup: float) -> float:
    run, clock = session.run, time.perf_counter
    end = clock() + warmup
    while clock() < end:
        run(outputs, {name: batch})
    samples = []
    end = clock() + duration
    while True:
        t0 = clock()
        run(outputs, {name: batch})
        t1 = clock()
        samples.append(t1 - t0)
        if t1 >= end:
            break
    return float(np.percentile(samples, 50)) * 1000.0


def measure_model(label: str, bundle_path: Path, root: Path, args: argparse.Namespace,
                  backends: dict[str, str | None]) -> dict[str, Any]:
    print(f"{label}: export + parity", file=sys.stderr)
    exports = export_both(bundle_path, root)
    fp32 = exports["fp32"]["bundle"]
    result: dict[str, Any] = {
        "bundle": str(bundle_path), "parity": {p: e["parity"] for p, e in exports.items()},
        "export_seconds": {p: round(e["seconds"], 2) for p, e in exports.items()}, "latency": {},
    }
    for backend in ("ort", "torch", "ort-cuda", "ort-tensorrt"):
        if backends.get(backend) is None:
            result["latency"][backend] = latency(fp32, backend, args)
    return result


def gpu_section(student: Path, root: Path, args: argparse.Namespace, backends: dict[str, str | None]) -> dict[str, Any]:
    """torch CUDA FP32 eager vs FP16 + CUDA graphs (student, batch 1); TensorRT when importable."""
    if backends.get("torch-cuda") is not None:
        return {"skipped": backends.get("torch-cuda")}
    from edge_ssl.runtime.bench import benchmark
    from edge_ssl.runtime.torch_runner import TorchRunner

    rows = {}
    for label, precision, graphs in (("fp32_eager", "fp32", False), ("fp16_cuda_graphs", "fp16", True)):
        runner = TorchRunner(student, device="cuda", precision=precision, cuda_graphs=graphs)
        report = benchmark(runner, batch_sizes=(1,), duration_s=args.duration, warmup_s=args.warmup)
        rows[label] = {"p50_ms": report.batches[0].latency_ms["p50"], "p90_ms": report.batches[0].latency_ms["p90"]}
    section: dict[str, Any] = {"student_b1": rows,
                               "fp16_graphs_vs_fp32_eager_b1": rows["fp32_eager"]["p50_ms"] / rows["fp16_cuda_graphs"]["p50_ms"]}
    if backends.get("tensorrt") is None:
        section["tensorrt"] = _tensorrt_latency(student, root, args)
    return section


def _tensorrt_latency(student: Path, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from edge_ssl.runtime.build import build_bundle
    from edge_ssl.runtime.export import export_bundle

    exported = export_bundle(student, root / "student_trt_src.edge", fp16=True).bundle
    built = build_bundle(exported, root / "student_trt.edge", precision="fp16")
    return latency(built, "tensorrt", args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="Also write the JSON here.")
    parser.add_argument("--duration", type=float, default=10.0, help="Seconds per backend and batch size.")
    parser.add_argument("--warmup", type=float, default=2.0, help="Warm-up seconds per backend and batch size.")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="Threads for torch and onnxruntime.")
    parser.add_argument("--teacher", type=Path, default=TEACHER)
    args = parser.parse_args()

    from edge_ssl.runtime.backends import available_backends
    from edge_ssl.runtime.bench import bench_environment

    from edge_ssl.bundle import Bundle

    backends = available_backends()
    report: dict[str, Any] = {"settings": {"duration_s": args.duration, "warmup_s": args.warmup,
                                           "threads": args.threads, "batches": list(BATCHES)},
                              "backends": backends, "models": {}}
    with tempfile.TemporaryDirectory(prefix="edge-ssl-rt-") as tmp:
        root = Path(tmp)
        student = make_student(root)
        report["models"]["student_r18_w0.25"] = measure_model("student", student, root, args, backends)
        if (args.teacher / "manifest.json").is_file():
            report["models"]["teacher_simclr_r18"] = measure_model("teacher", args.teacher, root, args, backends)
            headline = Bundle.open(root / f"{args.teacher.stem}_fp32.edge")
            key = "teacher_simclr_r18"
        else:
            report["teacher_skipped"] = f"teacher bundle not found at {args.teacher}"
            headline = Bundle.open(root / f"{student.stem}_fp32.edge")
            key = "student_r18_w0.25"
        print("harness overhead (interleaved with a bare session.run loop)", file=sys.stderr)
        report["harness"] = harness_overhead(headline, args)
        report["harness"]["model"] = key
        report["harness_overhead_pct"] = report["harness"]["overhead_pct"]
        lat = report["models"][key]["latency"]
        report["ort_vs_torch_b1"] = lat["torch"]["b1"]["p50_ms"] / lat["ort"]["b1"]["p50_ms"]
        report["ort_vs_torch_b1_model"] = key
        report["parity"] = {
            f"{p}_min_cosine": min(m["parity"][p]["min_cosine"] for m in report["models"].values())
            for p in ("fp32", "fp16")
        }
        report["gpu"] = gpu_section(student, root, args, backends)
    report["environment"] = bench_environment({"threads": args.threads})
    emit(report, args.out)


if __name__ == "__main__":
    main()
