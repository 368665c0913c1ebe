"""Pretraining throughput of every SSL method side by side, in one run, on one device.

    python benchmarks/pretrain_throughput.py --steps 10 --json-out runs/throughput.json

Reports images/s per method (and, on CUDA, with mixed precision off vs auto) and the
ratio of each to SimCLR fp32 measured in the same run. Numbers are never compared
across machines; only the ratios inside one JSON mean anything.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from report import emit


def measure(method: str, arch: str, width: float, batch: int, steps: int, amp: str, device: str) -> float:
    """Images per second of the real training loop (``pretrain``) after 2 warm-up steps."""
    import tempfile

    import numpy as np

    from edge_ssl.data import ImageDataset
    from edge_ssl.pretrain import PretrainConfig, pretrain

    warmup = 2
    images = np.random.default_rng(0).integers(0, 256, ((steps + warmup) * batch, 32, 32, 3), dtype=np.uint8)
    data = ImageDataset(images=images, labels=None, class_names=None, source="random")
    config = PretrainConfig(
        method=method, arch=arch, arch_kwargs={"width": width}, epochs=1, batch_size=batch,
        warmup_epochs=0.0, amp=amp, device=device,
    )
    stamps: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # The callback runs after each optimizer step; loss.item() inside the loop has
        # already synchronised the GPU, so wall-clock stamps are honest.
        pretrain(config, data, Path(tmp) / "t.edge", progress=lambda e: stamps.__setitem__(e.step, time.perf_counter()))
    return steps * batch / (stamps[warmup + steps] - stamps[warmup])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18_cifar")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default="simclr,byol,dino,simsiam,vicreg,barlow_twins")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from edge_ssl.environment import describe_environment

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    amp_modes = ["off", "auto"] if device.startswith("cuda") else ["off"]
    rows = []
    for method in args.methods.split(","):
        for amp in amp_modes:
            ips = measure(method, args.arch, args.width, args.batch_size, args.steps, amp, device)
            rows.append({"method": method, "amp": amp, "images_per_second": round(ips, 1)})
    reference = rows[0]["images_per_second"]
    for row in rows:
        row["ratio_to_first"] = round(row["images_per_second"] / reference, 3)
    report = {
        "benchmark": "pretrain_throughput",
        "device": device,
        "arch": args.arch,
        "width": args.width,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "reference": f"{rows[0]['method']} amp={rows[0]['amp']}",
        "rows": rows,
        "environment": describe_environment(),
    }
    emit(report, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
