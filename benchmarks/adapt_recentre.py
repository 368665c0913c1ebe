"""Does aligning the final embedding with the source help kNN after AdaBN? (forward only)

TTT++-style feature alignment (Liu et al. 2021) pulls the target embedding distribution
towards the source's. Before building it into the gradient steps, this measures a version
without gradients: after AdaBN (the bundle's or the package's ``bn_depth``/``bn_prior``),
the embeddings of the eval images are moved by the difference between the mean embedding of
the (corrupted) adapt images and the mean of the clean bank (``mean``), half of it
(``mean_half``), or matched in mean and per-dimension std (``meanstd``). The same shift is
applied to the clean eval images, which gives the clean drop. Same split, bank and scores
as ``benchmarks/adapt.py``.

    python benchmarks/adapt_recentre.py --bundle ../shared/teachers/simclr_resnet18_cifar.edge \
        --data ../shared/data/cifar10 --corruptions validation --out results.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
from adapt import load_split, summarize
from report import emit

VARIANTS = ("none", "mean", "mean_half", "meanstd")


def shift(emb: np.ndarray, variant: str, target: tuple[np.ndarray, np.ndarray],
          source: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``emb`` moved from the target embedding statistics (mean, std) towards the source's."""
    (t_mean, t_std), (s_mean, s_std) = target, source
    if variant == "none":
        return emb
    if variant == "mean":
        return emb - t_mean + s_mean
    if variant == "mean_half":
        return emb - 0.5 * (t_mean - s_mean)
    return (emb - t_mean) / t_std * s_std + s_mean


def main(argv: list[str] | None = None) -> int:
    from edge_ssl.data.corruptions import CIFAR10C_CORRUPTIONS, VALIDATION_CORRUPTIONS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--corruptions", nargs="+", default=["validation"])
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--knn-k", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    sets = {"cifar10c": CIFAR10C_CORRUPTIONS, "validation": VALIDATION_CORRUPTIONS}
    names = list(dict.fromkeys(n for a in args.corruptions for n in sets.get(a, (a,))))
    if not (args.data / "cifar10_test.npz").is_file() or not (args.bundle / "manifest.json").is_file():
        print(f"data ({args.data}) or bundle ({args.bundle}) not found; see ../shared/*/README.md",
              file=sys.stderr)
        return 2
    import torch

    from edge_ssl.adapt.bn import reestimate_bn_stats
    from edge_ssl.adapt.step import iterate_batches
    from edge_ssl.adapt.tune import adapt_config_for
    from edge_ssl.bundle import Bundle
    from edge_ssl.data.corruptions import corrupt
    from edge_ssl.environment import describe_environment
    from edge_ssl.evaluate import embed, knn_top1
    from edge_ssl.models import load_encoder

    started = time.perf_counter()
    config = adapt_config_for(Bundle.open(args.bundle), {})
    split = load_split(args.data, quick=False)
    deployed = load_encoder(args.bundle).eval()
    bank = embed(deployed, split["bank_x"], batch_size=256, device="cpu")
    source = (bank.mean(0), bank.std(0) + 1e-6)
    labels = split["eval_y"]

    def score(emb: np.ndarray) -> float:
        return float(knn_top1(bank, split["bank_y"], emb, labels, k=args.knn_k, num_classes=10))

    clean = score(embed(deployed, split["eval_x"], batch_size=256, device="cpu"))
    rows: dict[str, dict[str, dict]] = {v: {} for v in VARIANTS}
    for name in names:
        adapt_x = corrupt(split["adapt_x"], name, args.severity, seed=0)
        eval_x = corrupt(split["eval_x"], name, args.severity, seed=1)
        shifted = score(embed(deployed, eval_x, batch_size=256, device="cpu"))
        encoder = copy.deepcopy(deployed)
        with torch.no_grad():
            reestimate_bn_stats(encoder, iterate_batches(adapt_x, 64, torch.device("cpu"), encoder.spec.input),
                                prior=config.bn_prior, depth=config.bn_depth)
        local = embed(encoder, adapt_x, batch_size=256, device="cpu")
        target = (local.mean(0), local.std(0) + 1e-6)
        on_shift = embed(encoder, eval_x, batch_size=256, device="cpu")
        on_clean = embed(encoder, split["eval_x"], batch_size=256, device="cpu")
        for variant in VARIANTS:
            rows[variant][name] = {
                "clean": clean, "shifted": shifted, "sec_per_step": None,
                "adapted": score(shift(on_shift, variant, target, source)),
                "clean_after": score(shift(on_clean, variant, target, source))}
            print(f"{name} {variant}: {rows[variant][name]}", file=sys.stderr)
    eval_images = len(split["eval_x"])
    report = {
        "command": "python benchmarks/adapt_recentre.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "bn_setting": {"bn_depth": config.bn_depth, "bn_prior": config.bn_prior},
        "variants": {v: {**{k: s for k, s in summarize(r, clean, eval_images).items() if k != "sec_per_step"},
                         "corruptions": {n: {"adapted": x["adapted"], "clean_after": x["clean_after"]}
                                         for n, x in r.items()}}
                     for v, r in rows.items()},
        "clean": clean, "shifted": {n: rows["none"][n]["shifted"] for n in names},
        "seconds": time.perf_counter() - started, "environment": describe_environment(),
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
