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
    """Images per second over ``steps`` optimizer steps after 2 warm-up steps."""
    import numpy as np
    import torch

    from edge_ssl.methods import create_method
    from edge_ssl.models import create_encoder
    from edge_ssl.optim import build_optimizer
    from edge_ssl.pretrain import amp_dtype
    from edge_ssl.tensors import images_to_tensor
    from edge_ssl.views import ViewAugment, view_preset

    torch.manual_seed(0)
    dev = torch.device(device)
    encoder = create_encoder(arch, width=width)
    model = create_method(method, encoder).to(dev)
    views = ViewAugment(view_preset(model.view_preset, encoder.spec.input.image_size), encoder.spec.input).to(dev)
    opt = build_optimizer(model.default_optimizer, model.parameter_groups(1e-6), 0.01, 1e-6)
    dtype = amp_dtype(amp, dev)
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)

    def step() -> None:
        batch_views = views(images_to_tensor(images, dev))
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = model(batch_views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.momentum_update(0.5)

    for _ in range(2):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


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
