"""Does SSL pretraining pay? kNN top-1 of a pretrained encoder vs its random-init twin, one run.

    python benchmarks/pretrain_knn.py --method simclr --epochs 15 --json-out runs/pretrain_knn.json

Pretrains on the CIFAR-10 train files in ../shared/data/cifar10 (labels unused), then
evaluates both encoders on cifar10_test.npz with the train images as the kNN bank.
Prints JSON with both accuracies and their ratio; numbers are only compared within a run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from report import emit

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--arch", default="resnet18_cifar")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--train-files", type=int, default=4, help="how many of the 4 train files to use")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "pretrain_knn.edge")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    train_files = [args.data_dir / f"cifar10_train_{i}.npz" for i in range(args.train_files)]
    test_file = args.data_dir / "cifar10_test.npz"
    missing = [str(p) for p in [*train_files, test_file] if not p.is_file()]
    if missing:
        print(f"CIFAR-10 subset not found ({missing[0]}); see ../shared/data/README.md", file=sys.stderr)
        return 2

    import torch

    from edge_ssl.data.sources import load_images
    from edge_ssl.environment import describe_environment
    from edge_ssl.evaluate import EvalConfig, evaluate_encoder
    from edge_ssl.models import create_encoder
    from edge_ssl.train.pretrain import PretrainConfig, pretrain

    train = load_images([str(p) for p in train_files])
    test = load_images(str(test_file))
    config = PretrainConfig(
        method=args.method,
        arch=args.arch,
        arch_kwargs={"width": args.width},
        epochs=args.epochs,
        batch_size=args.batch_size,
        warmup_epochs=max(1.0, args.epochs / 10),
        device=args.device,
    )
    eval_config = EvalConfig(knn_k=(20, 200), probe=True, device=args.device)

    torch.manual_seed(config.seed)
    random_encoder = create_encoder(config.arch, **config.arch_kwargs)
    baseline = evaluate_encoder(random_encoder, train, test, eval_config)

    start = time.perf_counter()
    result = pretrain(config, train, args.out, overwrite=True)
    seconds = time.perf_counter() - start
    trained = evaluate_encoder(result.encoder, train, test, eval_config)

    report = {
        "benchmark": "pretrain_knn",
        "method": config.method,
        "arch": config.arch,
        "arch_kwargs": dict(config.arch_kwargs),
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "train_images": len(train),
        "test_images": len(test),
        "pretrain_seconds": round(seconds, 1),
        "images_per_second": round(result.images_per_second, 1),
        "final_loss": result.final_loss,
        "random_init": baseline.to_dict(),
        "pretrained": trained.to_dict(),
        "knn20_ratio_pretrained_over_random": trained.knn_top1[20] / baseline.knn_top1[20],
        "knn200_ratio_pretrained_over_random": trained.knn_top1[200] / baseline.knn_top1[200],
        "bundle": str(result.bundle.path) if result.bundle else None,
        "environment": describe_environment(),
        "command": " ".join(["python", "benchmarks/pretrain_knn.py", *(argv or sys.argv[1:])]),
    }
    emit(report, args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
