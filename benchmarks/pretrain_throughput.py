"""Pretraining throughput and MFU of the old default vs the new GPU path, side by side, in one run.

    python benchmarks/pretrain_throughput.py --batch-size 512 --width 1.0 --steps 200 --json-out runs/tp.json
    python benchmarks/pretrain_throughput.py --steps 6 --batch-size 16 --width 0.25   # CPU smoke run

Each setting runs the real ``pretrain()`` loop on the same random images with the same
seed. ``old-default`` is the loop as it was before issue 5 (per-step loss read-out, no
channels_last, per-tensor LARS, kornia views from benchmarks/legacy_views.py);
``kornia-views`` is today's loop with those old views; ``new-default`` is today's default; ``+compile`` and
``+cuda-graphs`` add the optional flags. Reported per setting: images/s after warm-up,
the ratio to old-default, and the model FLOPs utilization (MFU = images/s x FLOPs per
image / the GPU's bf16 dense peak from PEAK_TFLOPS below, labelled; FLOPs per image of one
training step, 2 views x forward + backward, counted with torch.utils.flop_counter).
``views_ms_per_batch`` times the two view implementations alone on one batch (kornia:
null when it is not installed; the settings that need it are then refused before any work).
The loss curves of every setting are compared with old-default's over the same steps.
Numbers are never compared across machines; only the ratios inside one JSON mean anything.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from report import emit

#: bf16 dense tensor-core peak (TFLOP/s) from NVIDIA datasheets, matched in order on the name.
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("V100", 125.0),  # fp16: V100 has no bf16
)


def gpu_peak_tflops(name: str) -> tuple[float | None, str]:
    """(peak TFLOP/s, label) for a GPU name; (None, reason) when it is not in the table."""
    for key, peak in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peak, f"{key} bf16 dense datasheet peak {peak:g} TFLOP/s"
    return None, f"{name!r} is not in PEAK_TFLOPS; MFU not reported"


SETTINGS: dict[str, dict[str, Any]] = {
    "old-default": {"channels_last": False, "log_every": 1, "legacy_lars": True, "legacy_views": True},
    "kornia-views": {"legacy_views": True},  # today's loop with the old views: what the views add
    "new-default": {},
    "+compile": {"compile": True},
    "+cuda-graphs": {"cuda_graphs": True},
}


class TimedSource:
    """InMemoryBatches that stamps the clock (after a device sync) when step ``warmup`` starts."""

    def __init__(self, inner: Any, warmup: int) -> None:
        self.inner, self.warmup, self.start = inner, warmup, None
        self.source, self.num_images = inner.source, inner.num_images

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def steps_per_epoch(self, batch_size: int, world_size: int) -> int:
        return self.inner.steps_per_epoch(batch_size, world_size)

    def epoch_batches(self, epoch: int, batch_size: int, **kwargs: Any) -> Any:
        import torch

        for index, batch in enumerate(self.inner.epoch_batches(epoch, batch_size, **kwargs)):
            if index == self.warmup:
                if batch.is_cuda:
                    torch.cuda.synchronize(batch.device)
                self.start = time.perf_counter()
            yield batch


@contextlib.contextmanager
def patched(module: Any, name: str, value: Any) -> Any:
    """``module.name = value`` inside the block, restored after it."""
    real = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, real)


def legacy_views(enabled: bool) -> Any:
    """The kornia views of the old default (benchmarks/legacy_views.py; needs kornia)."""
    if not enabled:
        return contextlib.nullcontext()
    from legacy_views import KorniaViewAugment

    import edge_ssl.data.views as views

    return patched(views, "ViewAugment", KorniaViewAugment)


def legacy_lars(enabled: bool) -> Any:
    """The per-tensor LARS loop of the old default."""
    if not enabled:
        return contextlib.nullcontext()
    import edge_ssl.train.optim as optim

    class PerTensorLARS(optim.LARS):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs, foreach=False)

    return patched(optim, "LARS", PerTensorLARS)


def warmup_steps(name: str, args: argparse.Namespace) -> int:
    compiled = SETTINGS[name].get("compile") or SETTINGS[name].get("cuda_graphs")
    return args.compile_warmup if compiled else args.warmup


@contextlib.contextmanager
def old_parts(name: str) -> Any:
    """The old LARS and views, where the setting asks for them."""
    with legacy_lars(SETTINGS[name].get("legacy_lars", False)), \
            legacy_views(SETTINGS[name].get("legacy_views", False)):
        yield


def setting_config(name: str, args: argparse.Namespace, device: str, steps: int) -> Any:
    """The PretrainConfig of ``steps`` steps of one setting."""
    import edge_ssl.train.pretrain as pretrain_module

    knobs = {k: v for k, v in SETTINGS[name].items() if k not in ("legacy_lars", "legacy_views")}
    return pretrain_module.PretrainConfig(
        method=args.method, arch=args.arch, arch_kwargs={"width": args.width}, epochs=1,
        batch_size=args.batch_size, steps_per_epoch=steps, warmup_epochs=0.0, amp=args.amp,
        device=device, **knobs,
    )


def measure(name: str, args: argparse.Namespace, data: Any, device: str, total: int) -> dict[str, Any]:
    """Images/s after warm-up and the read-out losses of one setting over ``total`` steps
    (the same steps for every setting)."""
    import edge_ssl.train.pretrain as pretrain_module
    from edge_ssl.data.batches import InMemoryBatches

    config, warmup = setting_config(name, args, device, total), warmup_steps(name, args)
    source = TimedSource(InMemoryBatches(data), warmup)
    events: list[Any] = []
    stamps: dict[int, float] = {}
    real = pretrain_module._read_loss

    def stamped(run: Any, *a: Any) -> float:
        value = real(run, *a)  # the read-out syncs the device: the clock is honest here
        stamps[a[-1]] = time.perf_counter()
        return value

    pretrain_module._read_loss = stamped
    try:
        with old_parts(name), tempfile.TemporaryDirectory() as tmp:
            pretrain_module.pretrain(config, source, Path(tmp) / "t.edge", progress=events.append)
    finally:
        pretrain_module._read_loss = real
    return {
        "images_per_second": (total - warmup) * args.batch_size / (stamps[total] - source.start),
        "losses": [(e.step, e.loss) for e in events],
    }


def profile_setting(name: str, args: argparse.Namespace, data: Any, device: Any, active: int = 10) -> dict[str, Any]:
    """Where one setting's step time goes: torch.profiler over ``active`` steps after warm-up.

    ``device_busy_frac`` is the share of the profiled window in which a GPU kernel ran (the
    union of kernel intervals over first start to last end; below ~0.9 the step waits on the
    host: launches, syncs, Python). ``top_ops``: the ops with the most self time (device time
    on a GPU, CPU time otherwise) per step, with their share of the total.
    """
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, schedule

    import edge_ssl.train.pretrain as pretrain_module
    from edge_ssl.data.batches import InMemoryBatches

    warmup = warmup_steps(name, args)
    config = setting_config(name, args, str(device), warmup + 2 + active)
    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    profiler = torch.profiler.profile(
        activities=activities, schedule=schedule(wait=warmup, warmup=2, active=active, repeat=1)
    )
    real = pretrain_module._train_step

    def stepped(*a: Any) -> Any:
        out = real(*a)
        profiler.step()
        return out

    with patched(pretrain_module, "_train_step", stepped), old_parts(name), \
            tempfile.TemporaryDirectory() as tmp, profiler:
        pretrain_module.pretrain(config, InMemoryBatches(data), Path(tmp) / "p.edge")
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    ops = sorted(profiler.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in ops) or 1.0
    kernels = sorted((e.time_range.start, e.time_range.end) for e in profiler.events()
                     if e.device_type == DeviceType.CUDA)
    return {
        "steps": active,
        "device_busy_frac": round(_covered(kernels) / (kernels[-1][1] - kernels[0][0]), 3) if kernels else None,
        "time": "GPU self time" if gpu else "CPU self time",
        "top_ops": [
            {"op": e.key, "ms_per_step": round(getattr(e, key) / 1000 / active, 3),
             "share": round(getattr(e, key) / total, 3)}
            for e in ops[:15]
        ],
    }


def _covered(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of sorted (start, end) intervals."""
    covered, reach = 0.0, float("-inf")
    for start, end in intervals:
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


def window_means(per_step: dict[int, float], windows: list[tuple[int, float]]) -> list[tuple[float, float]]:
    """(reference mean over each window, the window's own mean) for every read-out window."""
    pairs, previous = [], 0
    for step, value in windows:
        ref = [per_step[s] for s in range(previous + 1, step + 1) if s in per_step]
        if len(ref) != step - previous:
            raise SystemExit("the first setting must read the loss every step (use old-default first)")
        pairs.append((sum(ref) / len(ref), value))
        previous = step
    return pairs


def flops_per_image(args: argparse.Namespace) -> float:
    """FLOPs of one training step (all views, forward + backward) per image, counted on CPU."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from edge_ssl.data.views import ViewAugment, view_preset
    from edge_ssl.models import create_encoder
    from edge_ssl.train.methods import create_method

    torch.manual_seed(0)
    method = create_method(args.method, create_encoder(args.arch, width=args.width))
    spec = method.encoder.spec
    views = ViewAugment(view_preset(method.view_preset, spec.input.image_size, local_crops=method.num_local_views), spec.input)
    batch = 4
    images = views(torch.rand(batch, 3, *spec.input.shape[1:]))
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = method(images)
        loss.backward()
    return counter.get_total_flops() / batch


def views_milliseconds(args: argparse.Namespace, device: Any, repeats: int = 20) -> dict[str, float | None]:
    """Milliseconds per call of the method's views on one batch: kornia (old, None when kornia
    is not installed) vs edge_ssl.data.views."""
    import torch

    from edge_ssl.data.views import ViewAugment, view_preset
    from edge_ssl.models import create_encoder
    from edge_ssl.train.methods import create_method

    method = create_method(args.method, create_encoder(args.arch, width=args.width))
    spec = method.encoder.spec.input
    config = view_preset(method.view_preset, spec.image_size, local_crops=method.num_local_views)
    images = torch.rand(args.batch_size, 3, *spec.shape[1:], device=device)
    kinds: dict[str, Any] = {"edge_ssl": ViewAugment}
    if has_kornia():
        from legacy_views import KorniaViewAugment

        kinds["kornia"] = KorniaViewAugment
    timings: dict[str, float | None] = {"kornia": None}
    for name, kind in kinds.items():
        augment = kind(config, spec).to(device)
        for _ in range(3):
            augment(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            augment(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings[name] = round(1000 * (time.perf_counter() - started) / repeats, 3)
    return timings


def has_kornia() -> bool:
    import importlib.util

    return importlib.util.find_spec("kornia") is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--arch", default="resnet18_cifar")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=200, help="timed steps (and loss-curve steps)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile-warmup", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=1, help="alternate the settings N times; median")
    parser.add_argument("--amp", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--settings", default=None, help="comma list; default: all on CUDA, old/new on CPU")
    parser.add_argument("--loss-rtol", type=float, default=0.03, help="loss-curve tolerance vs old-default")
    parser.add_argument("--profile", default="", help="comma list of settings to profile afterwards "
                        "(torch.profiler, 10 steps each): top ops and how busy the GPU was")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from edge_ssl.data.sources import ImageDataset
    from edge_ssl.device import resolve_device
    from edge_ssl.environment import describe_environment

    device = resolve_device(args.device)
    default = list(SETTINGS) if device.type == "cuda" else ["old-default", "kornia-views", "new-default"]
    names = args.settings.split(",") if args.settings else default
    profiled = [name for name in args.profile.split(",") if name]
    unknown = [name for name in names + profiled if name not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting in --settings or --profile: {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    legacy = [name for name in names + profiled if SETTINGS[name].get("legacy_views")]
    if legacy and not has_kornia():
        parser.error(f"{', '.join(legacy)} use the old kornia views: pip install kornia (it is in the "
                     "[dev] extra), or leave them out of --settings")
    warmup = max(args.warmup, args.compile_warmup) if set(names + profiled) & {"+compile", "+cuda-graphs"} \
        else args.warmup
    most = (warmup + max(args.steps, 12)) * args.batch_size  # 12: profile_setting's 2 + 10 steps
    images = np.random.default_rng(0).integers(0, 256, (most, 32, 32, 3), dtype=np.uint8)
    data = ImageDataset(images=images, labels=None, class_names=None, source="random")

    flops = flops_per_image(args)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak, peak_label = gpu_peak_tflops(gpu) if gpu else (None, "CPU: no peak table, MFU not reported")
    # Settings alternate, repeat by repeat, so a neighbour's load hits all of them alike.
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            runs[name].append(measure(name, args, data, str(device), warmup + args.steps))
            print(f"{name}: {runs[name][-1]['images_per_second']:.1f} images/s", file=sys.stderr)
    results = {
        name: {
            "images_per_second": statistics.median(r["images_per_second"] for r in found),
            "losses": found[0]["losses"],
        }
        for name, found in runs.items()
    }
    reference = results[names[0]]
    ref_losses = dict(reference["losses"])
    rows = []
    for name in names:
        r = results[name]
        pairs = window_means(ref_losses, r["losses"])
        worst = max((abs(a - b) / max(abs(a), 1e-8) for a, b in pairs), default=0.0)
        ips = r["images_per_second"]
        rows.append({
            "setting": name,
            "images_per_second": round(ips, 1),
            "ratio_to_" + names[0]: round(ips / reference["images_per_second"], 3),
            "tflops": round(ips * flops / 1e12, 3),
            "mfu": round(ips * flops / (peak * 1e12), 4) if peak else None,
            "loss_max_rel_diff_vs_" + names[0]: round(worst, 5),
            "loss_within_tolerance": worst <= args.loss_rtol,
        })
    report = {
        "benchmark": "pretrain_throughput",
        "device": str(device),
        "gpu": gpu,
        "peak": peak_label,
        "method": args.method,
        "arch": args.arch,
        "width": args.width,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "flops_per_image": flops,
        "views_ms_per_batch": views_milliseconds(args, device),
        "loss_rtol": args.loss_rtol,
        "rows": rows,
        "profile": {name: profile_setting(name, args, data, device) for name in profiled},
        "environment": describe_environment(),
        "command": " ".join(["python", "benchmarks/pretrain_throughput.py", *(argv or sys.argv[1:])]),
    }
    emit(report, args.json_out)
    return 0 if all(row["loss_within_tolerance"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
