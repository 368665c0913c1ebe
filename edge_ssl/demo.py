"""`edge-ssl demo`: the whole pipeline on the embedded digits, every number measured (or labelled predicted)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edge_ssl.errors import ConfigError, EdgeSSLError, MissingDependencyError
from edge_ssl.train.pretrain import PretrainConfig

#: Backends benchmarked when this machine has them, in table order.
BENCH_BACKENDS = ("torch", "ort", "torch-cuda", "ort-cuda", "ort-tensorrt", "tensorrt")
#: Stages in order; the progress lines count them.
STAGES = ("teacher", "distill", "prune", "export", "quantize", "adapt", "evaluate", "benchmark",
          "predict", "report")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and budgets of one demo run (DEMO_FULL: a few minutes on 2 CPU cores; DEMO_QUICK: tests)."""

    teacher: PretrainConfig = PretrainConfig(
        method="simclr", arch="resnet18_cifar", arch_kwargs={"width": 0.25}, epochs=10,
        batch_size=128, warmup_epochs=1.0, seed=0,
    )
    student_arch: str = "resnet18_cifar"
    student_width: float = 0.125
    distill_epochs: int = 8
    prune_ratio: float = 0.5
    recovery_epochs: int = 1
    steps_per_epoch: int | None = None
    batch_size: int = 128
    cache_views: int | None = None  # teacher views cached for distillation (None: the stage's default)
    calibration_images: int = 256
    bench_seconds: float = 1.5
    bench_threads: int | None = 1  # the same for every backend: comparable, and steady on a busy machine
    warmup_seconds: float = 0.3
    adapt_steps: int = 20
    corruption: str = "gaussian_noise"
    severity: int = 5
    predict_devices: tuple[str, ...] = ("orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb")
    knn_k: int = 20
    train_limit: int | None = None
    test_limit: int | None = None
    seed: int = 0


DEMO_FULL = DemoConfig()
DEMO_QUICK = DemoConfig(
    teacher=replace(DEMO_FULL.teacher, epochs=2, batch_size=32, warmup_epochs=0.0, steps_per_epoch=2),
    distill_epochs=1, recovery_epochs=0, steps_per_epoch=2, calibration_images=32, cache_views=0,
    bench_seconds=0.2, warmup_seconds=0.1, adapt_steps=2, predict_devices=("orin-nano-8gb",),
    train_limit=256, test_limit=100, batch_size=32,
)


class StageSkipped(Exception):
    """A stage cannot run here (its code or a dependency is missing); the demo goes on without it."""


@dataclass
class DemoRun:
    """The state of one run: data, the bundle of each stage, and what was skipped and why."""

    out: Path
    config: DemoConfig
    train: Any
    test: Any
    device: str
    log: Callable[[str], Any]
    progress: Callable[[str, Any], None] | None
    bundles: dict[str, Any] = field(default_factory=dict)  # stage -> float bundle
    rows: dict[str, Any] = field(default_factory=dict)  # stage -> bundle shown in the table
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    shifted: dict[str, Any] = field(default_factory=dict)

    def stage_progress(self, stage: str) -> Callable[[Any], None] | None:
        if self.progress is None:
            return None
        return lambda event: self.progress(stage, event)


def run_demo(
    out_dir: str | Path,
    *,
    quick: bool = False,
    data: list[str] | None = None,
    teacher: str | Path | None = None,
    epochs: int | None = None,
    device: str = "auto",
    progress: Callable[[str, Any], None] | None = None,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Run every stage that exists here; return the table rows, the report path and what was skipped."""
    config = DEMO_QUICK if quick else DEMO_FULL
    if epochs is not None:
        if epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {epochs}.")
        config = replace(config, teacher=replace(config.teacher, epochs=epochs,
                                                 warmup_epochs=min(config.teacher.warmup_epochs, epochs)))
    out = _check_out(Path(out_dir))
    teacher_bundle = _open_teacher(teacher)
    train, test = demo_data(data, config)
    run = DemoRun(out, config, train, test, device, log, progress)
    if teacher_bundle is not None:
        run.bundles["teacher"] = teacher_bundle
    started = time.perf_counter()
    for number, stage in enumerate(STAGES, 1):
        _run_stage(run, number, stage)
    return summary(run, time.perf_counter() - started)


def _check_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder; choose a folder for the demo's bundles.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the demo folder {out}: {exc.strerror or exc}.") from None
    return out


def _open_teacher(teacher: str | Path | None) -> Any:
    if teacher is None:
        return None
    from edge_ssl.bundle import Bundle
    from edge_ssl.lineage import require_float_weights

    return require_float_weights(Bundle.open(teacher, verify=True), "the demo (distillation)")


def demo_data(data: list[str] | None, config: DemoConfig) -> tuple[Any, Any]:
    """(train, test): the embedded digits' fixed split, or the user's data split 80/20."""
    from edge_ssl.evaluate import load_eval_data

    train, test = load_eval_data(data, None, seed=config.seed)
    if config.train_limit and len(train) > config.train_limit:
        train = train.subset(range(config.train_limit))
    if config.test_limit and len(test) > config.test_limit:
        test = test.subset(range(config.test_limit))
    return train, test


def _run_stage(run: DemoRun, number: int, stage: str) -> None:
    run.log(f"[{number}/{len(STAGES)}] {stage}")
    start = time.perf_counter()
    try:
        STAGE_FUNCTIONS[stage](run)
    except (StageSkipped, MissingDependencyError, ImportError) as exc:
        run.skipped[stage] = str(exc) or type(exc).__name__
        run.log(f"      skipped {stage}: {run.skipped[stage]}")
        return
    run.seconds[stage] = time.perf_counter() - start
    run.log(f"      {stage} done in {run.seconds[stage]:.1f} s")


# ------------------------------------------------------------------ stages


def stage_teacher(run: DemoRun) -> None:
    """SSL-pretrain the teacher (or use --teacher)."""
    if "teacher" in run.bundles:
        run.log(f"      using --teacher {run.bundles['teacher'].path}")
        return
    from edge_ssl.train.pretrain import pretrain

    config = replace(run.config.teacher, device=run.device)
    run.log(f"      {config.method} on {config.arch} x{config.arch_kwargs.get('width', 1)}, "
            f"{len(run.train)} images, {config.epochs} epochs")
    result = pretrain(config, run.train, run.out / "teacher.edge", overwrite=True,
                      progress=run.stage_progress("pretrain"))
    run.bundles["teacher"] = result.bundle


def stage_distill(run: DemoRun) -> None:
    """Distill the teacher into a narrower student on the unlabeled train images."""
    _need("edge_ssl.compress.distill", "distillation")
    from edge_ssl.compress.distill import DistillConfig, distill

    teacher = run.bundles["teacher"]
    size = teacher.manifest.input.shape[1]
    config = DistillConfig(
        student=run.config.student_arch,
        student_kwargs={"width": run.config.student_width, "image_size": size},
        epochs=run.config.distill_epochs, batch_size=min(run.config.batch_size, len(run.train)),
        warmup_epochs=min(1.0, run.config.distill_epochs), device=run.device,
        steps_per_epoch=run.config.steps_per_epoch, seed=run.config.seed,
        cache_views=run.config.cache_views,
        # A narrower copy of the teacher starts from the teacher's channels (weight selection).
        init="teacher" if run.config.student_arch == teacher.manifest.encoder.arch else "random",
    )
    run.log(f"      student {config.student} x{run.config.student_width}, {config.epochs} epochs, "
            f"{config.init} init")
    result = distill(teacher, config, run.train, run.out / "student.edge", overwrite=True,
                     progress=run.stage_progress("distill"))
    run.bundles["student"] = result.bundle


def stage_prune(run: DemoRun) -> None:
    """Remove a fraction of the student's channels (round_to 8), with a short recovery distillation."""
    _need("edge_ssl.compress.prune", "pruning")
    if "student" not in run.bundles:
        raise StageSkipped("no student to prune (distillation was skipped)")
    from edge_ssl.compress.prune import PruneConfig, prune

    recovery = {"batch_size": min(run.config.batch_size, len(run.train)), "device": run.device,
                "steps_per_epoch": run.config.steps_per_epoch}
    config = PruneConfig(ratio=run.config.prune_ratio, importance="l2",
                         recovery_epochs=run.config.recovery_epochs, recovery=recovery,
                         batch_size=min(64, len(run.train)), seed=run.config.seed)
    result = prune(run.bundles["student"], config, run.train, run.out / "pruned.edge", overwrite=True)
    run.bundles["pruned"] = result.bundle


def stage_export(run: DemoRun) -> None:
    """ONNX export (parity-checked) of every float stage, so each runs on onnxruntime too."""
    _need("edge_ssl.runtime.export", "ONNX export")
    from edge_ssl.runtime.export import export_bundle

    for stage in ("teacher", "student", "pruned"):
        if stage in run.bundles:
            run.rows[stage] = export_bundle(run.bundles[stage], run.out / f"{stage}-onnx.edge",
                                            parity_images=run.test.images[:16], overwrite=True).bundle
            parity = run.rows[stage].manifest.metrics["export"]["parity"]
            run.log(f"      {stage}: parity min cosine {parity.get('min_cosine', float('nan')):.6f}")


def stage_quantize(run: DemoRun) -> None:
    """INT8 post-training static quantization (QDQ for onnxruntime CPU) of the smallest float model."""
    _need("edge_ssl.compress.quantize", "quantization")
    from edge_ssl.compress.quantize import QuantizeConfig, quantize

    source = next((s for s in ("pruned", "student", "teacher") if s in run.bundles), None)
    config = QuantizeConfig(precision="int8", target="ort-cpu",
                            calibration_images=min(run.config.calibration_images, len(run.train)))
    quantized = quantize(run.bundles[source], config, run.train.images, run.out / "int8.edge",
                         overwrite=True)
    run.rows["int8"] = quantized.bundle
    run.log(f"      INT8 of the {source} model ({config.calibration_images} calibration images)")


def stage_evaluate(run: DemoRun) -> None:
    """kNN top-1 of every stage (labeled train bank, held-out test), and params/MACs of float ones."""
    if run.train.labels is None or run.test.labels is None:
        raise StageSkipped("the data has no labels, so there is no kNN accuracy to measure")
    for stage, bundle in _table_bundles(run).items():
        accuracy, backend = measure_knn(bundle, run.train, run.test, run.config.knn_k)
        from edge_ssl.bundle import record_results

        record_results(bundle, "eval", {"knn_top1": {str(run.config.knn_k): accuracy},
                                        "backend": backend, "train_images": len(run.train),
                                        "test_images": len(run.test), "data": run.test.source})
        _record_model_counts(bundle)
        run.log(f"      {stage}: kNN top-1 {100 * accuracy:.1f}% ({backend})")


def stage_benchmark(run: DemoRun) -> None:
    """Latency (batch 1) of every stage on every backend available here."""
    _need("edge_ssl.runtime.bench", "latency measurement")
    from edge_ssl.runtime.backends import available_backends
    from edge_ssl.runtime.bench import bench_bundle

    backends = [b for b, reason in available_backends().items() if reason is None and b in BENCH_BACKENDS]
    run.log(f"      backends here: {', '.join(backends)}")
    for stage, bundle in _table_bundles(run).items():
        for backend in sorted(backends, key=BENCH_BACKENDS.index):
            if backend.startswith("torch") and not bundle.has("model.pt"):
                continue  # an INT8 graph has no torch weights
            try:
                report = bench_bundle(bundle, backend, duration_s=run.config.bench_seconds,
                                      warmup_s=run.config.warmup_seconds, threads=run.config.bench_threads)
            except EdgeSSLError as exc:
                run.log(f"      {stage} on {backend}: not measured ({exc})")
                continue
            latency = report.batches[0].latency_ms
            run.log(f"      {stage} on {backend}: p50 {latency['p50']:.2f} ms, p90 {latency['p90']:.2f} ms")


def stage_predict(run: DemoRun) -> None:
    """PREDICTED latency on a few Jetson profiles (a roofline model, never mixed with measured)."""
    _need("edge_ssl.devices.predict", "latency prediction")
    from edge_ssl.bundle import record_results
    from edge_ssl.devices.predict import predict_bundle

    for stage, bundle in _table_bundles(run).items():
        if not bundle.has("model.onnx"):
            continue
        precision = "int8" if bundle.manifest.precision == "int8" else "fp16"
        predictions = {}
        for device in run.config.predict_devices:
            prediction = predict_bundle(bundle.path, device, precision=precision)
            predictions[f"{device} {precision}"] = prediction.to_dict()
            run.log(f"      {stage} on {device} ({precision}): {prediction.predicted_ms:.3f} ms PREDICTED")
        record_results(bundle, "predict", predictions)


def stage_adapt(run: DemoRun) -> None:
    """Adapt the deployed student to a shifted (corrupted) copy of the images, without labels;
    kNN on shifted and clean test images before and after, and what adapting cost, in words."""
    _need("edge_ssl.adapt.api", "on-device adaptation")
    _need("edge_ssl.data.corruptions", "corruptions")
    from edge_ssl.adapt.api import AdaptConfig, adapt
    from edge_ssl.bundle import record_results
    from edge_ssl.report.rows import adaptation_outcome

    # What ships is adapted: the INT8 student (re-quantized after adapting its float parent).
    deployed = next((run.rows[s] for s in ("int8", "pruned", "student", "teacher") if s in run.rows), None)
    if deployed is None:
        raise StageSkipped("no exported model to adapt")
    local, shifted_test = shifted_copies(run)
    config = AdaptConfig(steps=run.config.adapt_steps, batch_size=min(32, run.config.batch_size),
                         device=run.device, seed=run.config.seed, guard_every=max(1, run.config.adapt_steps // 4))
    before = _knn_pair(deployed, run, shifted_test)
    result = adapt(deployed, local, run.out / "adapted.edge", config, overwrite=True,
                   progress=run.stage_progress("adapt"))
    run.rows["adapted"] = result.bundle
    after = _knn_pair(result.bundle, run, shifted_test)
    record = {"history": result.history, "guard": result.guard, "corruption": run.config.corruption,
              "severity": run.config.severity, "steps_done": result.steps_done, "stopped": result.stopped,
              "selection": result.selection,
              "knn_top1_shifted_before": before[0], "knn_top1_shifted_after": after[0],
              "knn_top1_clean_before": before[1], "knn_top1_clean_after": after[1]}
    record_results(result.bundle, "adapt", record)
    outcome = adaptation_outcome(record)
    run.shifted = {"before": before[0], "after": after[0], "stopped": result.stopped,
                   "clean_before": before[1], "clean_after": after[1],
                   "words": None if outcome is None else outcome["words"]}
    if outcome is not None:
        run.log(f"      {outcome['words']}")


def stage_report(run: DemoRun) -> None:
    from edge_ssl.report.write import write_report

    paths = [bundle.path for bundle in _table_bundles(run).values()]
    if not paths:
        raise StageSkipped("no bundles to report on")
    written = write_report(paths, run.out / "report.html", title="edge-ssl demo: pretrain -> edge",
                           overwrite=True)
    run.rows["__report__"] = written[0]
    run.log(f"      wrote {written[0]}")


STAGE_FUNCTIONS: dict[str, Callable[[DemoRun], None]] = {
    "teacher": stage_teacher, "distill": stage_distill, "prune": stage_prune, "export": stage_export,
    "quantize": stage_quantize, "evaluate": stage_evaluate, "benchmark": stage_benchmark,
    "predict": stage_predict, "adapt": stage_adapt, "report": stage_report,
}


# ------------------------------------------------------------------ helpers


def _need(module: str, what: str) -> None:
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise StageSkipped(f"{what} is not part of this installation ({module} not found)")


def _table_bundles(run: DemoRun) -> dict[str, Any]:
    """The bundle each stage shows in the table: the exported one when there is one."""
    order = ("teacher", "student", "pruned", "int8", "adapted")
    return {s: run.rows.get(s) or run.bundles.get(s) for s in order if run.rows.get(s) or run.bundles.get(s)}


def open_eval_runner(bundle: Any) -> tuple[Any, str]:
    """onnxruntime when the bundle has an ONNX graph (fast on CPU, and the only way for INT8), else torch."""
    from edge_ssl.runtime.backends import open_runner

    backend = "ort" if bundle.has("model.onnx") else "torch"
    return open_runner(bundle, backend), backend


def measure_knn(bundle: Any, train: Any, test: Any, k: int) -> tuple[float, str]:
    """Weighted kNN top-1 of ``bundle``'s embeddings (bank: labeled ``train``)."""
    scores, backend = measure_knn_on(bundle, train, [test], k)
    return scores[0], backend


def measure_knn_on(bundle: Any, train: Any, tests: list[Any], k: int) -> tuple[list[float], str]:
    """kNN top-1 on each of ``tests`` against one embedding of the labeled ``train`` bank."""
    from edge_ssl.evaluate import knn_top1
    from edge_ssl.runtime.embed import embed_with_runner

    runner, backend = open_eval_runner(bundle)
    spec = bundle.manifest.input
    classes = len(train.class_names) if train.class_names else None
    with runner:
        bank = embed_with_runner(runner, train.images, spec, batch_size=128)
        queries = [embed_with_runner(runner, test.images, spec, batch_size=128) for test in tests]
    return [float(knn_top1(bank, train.labels, q, test.labels, k=k, num_classes=classes))
            for q, test in zip(queries, tests, strict=True)], backend


def _record_model_counts(bundle: Any) -> None:
    """Params and MACs (counted now, from the float weights) beside bundles whose manifest lacks MACs."""
    from edge_ssl.bundle import record_results
    from edge_ssl.lineage import find_float_ancestor

    if "macs" in bundle.manifest.metrics:
        return
    source = find_float_ancestor(bundle)
    if source is None:
        return
    from edge_ssl.compress.measure import model_metrics
    from edge_ssl.models import load_encoder

    record_results(bundle, "model", model_metrics(load_encoder(source)))


def shifted_copies(run: DemoRun) -> tuple[Any, Any]:
    """(unlabeled corrupted train images for adaptation, labeled corrupted test images)."""
    from edge_ssl.data.corruptions import corrupt
    from edge_ssl.data.sources import ImageDataset

    name, severity, seed = run.config.corruption, run.config.severity, run.config.seed
    local = ImageDataset(corrupt(run.train.images, name, severity, seed=seed), None,
                         run.train.class_names, f"{run.train.source} + {name} {severity}")
    test = ImageDataset(corrupt(run.test.images, name, severity, seed=seed + 1), run.test.labels,
                        run.test.class_names, f"{run.test.source} + {name} {severity}")
    return local, test


def _knn_pair(bundle: Any, run: DemoRun, shifted_test: Any) -> tuple[float | None, float | None]:
    """kNN top-1 on the shifted and on the clean test images (None, None without labels)."""
    if run.train.labels is None:
        return None, None
    (shifted, clean), _ = measure_knn_on(bundle, run.train, [shifted_test, run.test], run.config.knn_k)
    return shifted, clean


def demo_table(data: Any, stages: list[str]) -> dict[str, Any]:
    """The printed table: one row per stage, latency and speed-up columns per backend (measured only)."""
    from edge_ssl.report.rows import human_bytes, human_count, latency_text, percent

    keys = data.latency_keys()
    columns = ["stage", "params", "MACs", "size", "kNN top-1"]
    for key in keys:
        columns += [f"{data.key_label(key)} p50/p90 ms", "speed-up"]
    rows = []
    for stage, row in zip(stages, data.rows, strict=True):
        cells = [stage, human_count(row.params), human_count(row.macs),
                 human_bytes(row.bytes), percent(row.knn_top1)]
        for key in keys:
            speed = data.speedup(row, key)
            cells += [latency_text(row.headline(key)), "—" if speed is None else f"{speed:.2f}x"]
        rows.append(cells)
    return {"columns": columns, "rows": rows}


def _short_source(source: str) -> str:
    return source.split(" (")[0] if source.startswith("embedded") else source


def summary(run: DemoRun, seconds: float) -> dict[str, Any]:
    """What the CLI prints: the report's stage table (same numbers as the HTML), skips, paths."""
    report = run.rows.get("__report__")
    table: dict[str, Any] = {"columns": [], "rows": []}
    paths = [bundle.path for bundle in _table_bundles(run).values()]
    if paths:
        from edge_ssl.report.collect import collect_report

        data = collect_report(paths)
        table = demo_table(data, list(_table_bundles(run)))
        table["predicted"] = [
            {"bundle": stage, "device": rec.device, "precision": rec.backend, "predicted_ms": rec.p50}
            for stage, row in zip(_table_bundles(run), data.rows, strict=True) for rec in row.predicted()
        ]
    return {
        "out": str(run.out),
        "report": None if report is None else str(report),
        "data": f"{_short_source(run.train.source)} ({len(run.train)} train / {len(run.test)} test images)",
        "table": table,
        "shifted": run.shifted,
        "corruption": f"{run.config.corruption} (severity {run.config.severity})",
        "skipped": run.skipped,
        "stage_seconds": run.seconds,
        "bench_threads": run.config.bench_threads,
        "seconds": seconds,
        "bundles": {stage: str(b.path) for stage, b in _table_bundles(run).items()},
    }


# ------------------------------------------------------------------ command-line view


class DemoProgress:
    """One rich progress bar per training stage (pretrain, distill, adapt) fed by their events."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description:>9}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[stats]}"),
                                 TimeElapsedColumn(), console=console, transient=False)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> DemoProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def update(self, stage: str, event: Any) -> None:
        if hasattr(event, "steps_per_epoch"):
            total = event.epochs * event.steps_per_epoch
            done = (event.epoch - 1) * event.steps_per_epoch + event.step
        else:
            total, done = max(1, getattr(event, "steps", 1)), getattr(event, "step", 0)
        loss = getattr(event, "loss", None)
        stats = "" if loss is None else f"loss {loss:.4f}"
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total, stats=stats)
        self.progress.update(self.tasks[stage], total=total, completed=done, stats=stats)


def print_demo(report: dict[str, Any]) -> None:
    """The final table (same numbers as the HTML report), skipped stages and where things are."""
    from rich.console import Console

    console = Console()
    columns, rows = report["table"]["columns"], report["table"]["rows"]
    # Two tables of at most 80 columns: sizes and accuracy, then latency per backend.
    console.print(_table(f"edge-ssl demo on {report['data']} (measured in this run)",
                         columns[:SIZE_COLUMNS], [r[:SIZE_COLUMNS] for r in rows]))
    if len(columns) > SIZE_COLUMNS:
        console.print(_table("latency, measured here", [columns[0], *columns[SIZE_COLUMNS:]],
                             [[r[0], *r[SIZE_COLUMNS:]] for r in rows]))
    console.print(f"latency: p50 / p90 ms at batch 1, {report.get('bench_threads') or 'default'} thread(s); "
                  "speed-up = teacher p50 / stage p50 on the same backend. Measured on this machine in "
                  "this run; other load on it makes them noisy.")
    predicted = report["table"].get("predicted", [])
    if predicted:
        console.print(_predicted_table(predicted))
    shifted = report.get("shifted") or {}
    if shifted.get("words"):
        console.print(shifted["words"])
    for stage, reason in report["skipped"].items():
        console.print(f"skipped {stage}: {reason}")
    if report["report"]:
        console.print(f"report: {report['report']}  (open it in a browser)")
    console.print(f"total {report['seconds']:.0f} s; bundles in {report['out']}/")


#: stage, params, MACs, size, kNN top-1: the first table; latency columns follow in a second.
SIZE_COLUMNS = 5


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Any:
    """A table whose cells never wrap (numbers stay whole); the title wraps between words."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def _predicted_table(predicted: list[dict[str, Any]]) -> Any:
    """Predicted ms per bundle (rows) and device profile + precision (columns), apart from measured."""

    columns = list(dict.fromkeys(p["device"] for p in predicted))
    bundles = list(dict.fromkeys(p["bundle"] for p in predicted))
    cells = {(p["bundle"], p["device"]): f"{p['predicted_ms']:.3f} ({p['precision']})" for p in predicted}
    return _table("PREDICTED latency, ms at batch 1 (roofline model from device profiles, NOT measured)",
                  ["stage", *columns], [[b, *(cells.get((b, c), "—") for c in columns)] for b in bundles])
