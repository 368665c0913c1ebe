"""`edge-ssl demo`: pretrain a small SSL encoder on the embedded digits and evaluate it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_ssl.errors import TrainingError
from edge_ssl.pretrain import PretrainConfig, ProgressEvent

#: The demo's run: a quarter-width CIFAR ResNet-18 with SimCLR, about a minute on 2 CPU cores.
DEMO_CONFIG = PretrainConfig(
    method="simclr",
    arch="resnet18_cifar",
    arch_kwargs={"width": 0.25},
    epochs=12,
    batch_size=128,
    warmup_epochs=1.0,
    seed=0,
)


def run_demo(
    out_dir: str | Path,
    *,
    epochs: int | None = None,
    device: str = "auto",
    progress: Callable[[ProgressEvent], None] | None = None,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Pretrain on the digits train split, evaluate against a random-init twin, write the bundle."""
    from dataclasses import replace

    import torch

    from edge_ssl.bundle import record_results
    from edge_ssl.data import EMBEDDED_DEFAULT_NAME, embedded_default
    from edge_ssl.evaluate import EvalConfig, evaluate_encoder
    from edge_ssl.models import create_encoder
    from edge_ssl.pretrain import pretrain

    config = replace(DEMO_CONFIG, device=device, epochs=epochs or DEMO_CONFIG.epochs)
    config = replace(config, warmup_epochs=min(config.warmup_epochs, config.epochs))
    train, test = embedded_default("train"), embedded_default("test")
    out_dir = Path(out_dir)
    log(
        f"pretraining {config.arch} (width {config.arch_kwargs['width']}) with {config.method} "
        f"on {len(train)} {EMBEDDED_DEFAULT_NAME} images for {config.epochs} epochs"
    )
    start = time.perf_counter()
    result = pretrain(config, train, out_dir / "demo.edge", overwrite=True, progress=progress)
    seconds = time.perf_counter() - start

    eval_config = EvalConfig(knn_k=(20,), device=device)
    trained = evaluate_encoder(result.encoder, train, test, eval_config)
    torch.manual_seed(config.seed)
    baseline = evaluate_encoder(
        create_encoder(config.arch, **config.arch_kwargs), train, test, eval_config
    )
    if result.bundle is None:
        raise TrainingError("the demo runs in one process; do not start it under torchrun.")
    record_results(result.bundle, "eval", trained.to_dict() | {"data": EMBEDDED_DEFAULT_NAME})

    def row(name: str, res: Any) -> dict[str, Any]:
        return {
            "name": name,
            "knn_top1": res.knn_top1[20],
            "linear_probe_top1": res.linear_probe_top1,
            "effective_rank": res.health.effective_rank,
            "collapsed": res.health.collapsed,
        }

    return {
        "method": config.method,
        "data": f"{EMBEDDED_DEFAULT_NAME} ({len(train)} train / {len(test)} test)",
        "bundle": str(result.bundle.path),
        "manifest_sha256": result.bundle.manifest_sha256,
        "pretrain_seconds": seconds,
        "images_per_second": result.images_per_second,
        "rows": [row("random init", baseline), row(f"{config.method} pretrained", trained)],
    }
