"""Does on-device adaptation recover accuracy under distribution shift, and at what memory cost?

    python benchmarks/adapt.py --bundle ../shared/teachers/simclr_resnet18_cifar.edge \
        --data ../shared/data/cifar10 [--quick] --out results.json

Shifted domains: CIFAR-10-C style corruptions (edge_ssl.data.corruptions) of cifar10_test.npz at
one severity. The first half of the test set (corrupted, labels unused) is what the device
sees and adapts on; the second, unseen half (corrupted, and clean) is scored with kNN top-1
against a labeled clean train bank embedded once by the deployed model (the index a device
keeps; adaptation must map shifted images back into that space). Keys: corruptions
{name: {clean, shifted, adapted, clean_after}}, recovery_frac = mean over corruptions of
(adapted - shifted) / (clean - shifted), clean_drop_pts = mean clean-test accuracy drop in
points after adapting, peak_mem_ratio = adaptation step peak / full fine-tuning step peak
at the same batch (same measure: CUDA max allocated on GPU, the byte model on CPU),
sec_per_step, trainable; bn_prior_tradeoff (AdaBN alone at --bn-priors) and
gradient_steps_gain (the run minus AdaBN alone at its bn_prior). Targets: recovery_frac >= 0.5, clean_drop_pts <= 1,
peak_mem_ratio <= 0.35. --quick: 500 + 500 test images, a 1,000-image bank, 10 steps.
--swap-halves also adapts on the second half and scores the first (every score still on images
the run never adapted on); each accuracy is then the mean over both folds, i.e. over twice the
scored images, and ``folds`` holds each fold's summary.
A bundle from ``edge-ssl adapt-tune`` brings its settings and replay images, which the run
applies as ``edge-ssl adapt`` does; ``--replay N`` instead draws N clean replay images from the
train bank (for ``--opt replay_weight=W``), never from the test images scored.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from report import emit

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10"
DEFAULT_BUNDLE = ROOT.parent / "shared" / "teachers" / "simclr_resnet18_cifar.edge"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from edge_ssl.data.corruptions import (
        BENCHMARK_CORRUPTIONS,
        CIFAR10C_CORRUPTIONS,
        CORRUPTIONS,
        VALIDATION_CORRUPTIONS,
    )

    sets = {"cifar10c": CIFAR10C_CORRUPTIONS, "validation": VALIDATION_CORRUPTIONS}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with the CIFAR-10 .npz files")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--quick", action="store_true", help="small sizes: < 10 minutes on 2 CPU cores")
    parser.add_argument("--corruptions", nargs="+", default=list(BENCHMARK_CORRUPTIONS),
                        choices=(*CORRUPTIONS, *sets),
                        help="default: the contract's five; 'cifar10c': the 12 CIFAR-10-C ones "
                             "implemented; 'validation': its held-out ones, for choosing settings")
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--trainable", default="auto")
    parser.add_argument("--steps", type=int, default=None, help="default: 10 quick, 50 full")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--budget-mb", type=float, default=None)
    parser.add_argument("--opt", action="append", default=[], help="AdaptConfig KEY=VALUE (repeatable)")
    parser.add_argument("--knn-k", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bn-priors", type=float, nargs="*", default=None,
                        help="also measure BN re-estimation alone at these priors (the trade-off "
                             "between recovery and clean accuracy); default: 0, 0.25, 0.5, 0.75 and "
                             "the run's bn_prior; none to skip")
    parser.add_argument("--replay", type=int, default=0,
                        help="clean replay images for --opt replay_weight=W, drawn from the train bank "
                             "(never the test images scored); default 0")
    parser.add_argument("--swap-halves", action="store_true",
                        help="also adapt on the second half and score on the first, then pool the "
                             "accuracies of both (twice the scored images and the time)")
    args = parser.parse_args(argv)
    bad_priors = [p for p in args.bn_priors or () if not 0.0 <= p <= 0.999]
    if bad_priors:
        parser.error(f"--bn-priors must be in [0, 0.999] (the share of the deployed statistics "
                     f"kept); got {', '.join(map(str, bad_priors))}")
    names = [n for arg in args.corruptions for n in sets.get(arg, (arg,))]
    args.corruptions = list(dict.fromkeys(names))
    return args


def priors_to_measure(asked: list[float] | None, run_prior: float) -> list[float]:
    """The AdaBN-alone priors: as asked, or by default a spread plus the run's own prior
    (``gradient_steps_gain`` compares the run with AdaBN alone at that prior)."""
    if asked is not None:
        return asked
    return sorted({0.0, 0.25, 0.5, 0.75, float(run_prior)})


def load_split(data: Path, quick: bool) -> dict[str, np.ndarray]:
    """Adapt half, eval half (both class-balanced: the files are round-robin over classes), bank."""
    test = np.load(data / "cifar10_test.npz")
    x, y = test["x"], test["y"].astype(np.int64)
    half = len(x) // 2
    size = 500 if quick else half
    bank_files = [data / "cifar10_train_3.npz"] if quick else sorted(data.glob("cifar10_train_*.npz"))
    banks = [np.load(f) for f in bank_files]
    bank_x = np.concatenate([b["x"] for b in banks])
    bank_y = np.concatenate([b["y"] for b in banks]).astype(np.int64)
    if quick:
        bank_x, bank_y = bank_x[:1000], bank_y[:1000]
    return {"adapt_x": x[:size], "adapt_y": y[:size], "eval_x": x[half : half + size],
            "eval_y": y[half : half + size], "bank_x": bank_x, "bank_y": bank_y}


def replay_from_bank(split: dict[str, np.ndarray], count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` clean replay images and their labels drawn at random from the train bank:
    never one of the test images the benchmark scores (the labels make them the guard's bank)."""
    if count > len(split["bank_x"]):
        raise SystemExit(f"--replay {count}: the bank has only {len(split['bank_x'])} images.")
    pick = np.sort(np.random.default_rng(seed).choice(len(split["bank_x"]), count, replace=False))
    return split["bank_x"][pick], split["bank_y"][pick]


def swap_halves(split: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same split with the adapt and eval halves exchanged."""
    return {**split, "adapt_x": split["eval_x"], "adapt_y": split["eval_y"],
            "eval_x": split["adapt_x"], "eval_y": split["adapt_y"]}


_ACCURACIES = ("clean", "shifted", "adapted", "clean_after")
_POOLED = (*_ACCURACIES, "sec_per_step", "adapt_seconds")


def pool(folds: list[dict[str, dict]]) -> dict[str, dict]:
    """Per corruption, each accuracy averaged over folds of equal size: the accuracy on their
    union. Other fields come from the first fold; ``by_fold`` keeps each fold's accuracies."""
    if len(folds) == 1:
        return folds[0]
    pooled = {}
    for name, first in folds[0].items():
        row = dict(first)
        for key in _POOLED:
            if first.get(key) is not None:
                row[key] = float(np.mean([fold[name][key] for fold in folds]))
        row["by_fold"] = [{k: fold[name][k] for k in _ACCURACIES if k in fold[name]} for fold in folds]
        pooled[name] = row
    return pooled


def embed_model(model, images, device) -> np.ndarray:
    """Embeddings of ``model``: a torch encoder, or a bundle as it is deployed (a quantized
    bundle's ONNX graph through onnxruntime, a float one's weights)."""
    from edge_ssl.bundle import Bundle
    from edge_ssl.evaluate import embed
    from edge_ssl.models import load_encoder

    if isinstance(model, Bundle):
        if model.manifest.precision in ("int8", "fp16") and model.has("model.onnx"):
            from edge_ssl.compress.quantize import onnx_embed

            return onnx_embed(model.path / "model.onnx", images, model.manifest.input)
        model = load_encoder(model)
    return embed(model, images, batch_size=256, device=device)


def knn(model, bank_emb, bank_y, images, labels, k, device) -> float:
    from edge_ssl.evaluate import knn_top1

    emb = embed_model(model, images, device)
    return float(knn_top1(bank_emb, bank_y, emb, labels, k=k, num_classes=10))


def memory_ratio(encoder, plan, images, config, replay=None) -> dict[str, float]:
    """Adaptation step peak / full fine-tuning step peak at the plan's batch (same measure).
    A step with replay images also runs a batch of them; the full fine-tuning step does not."""
    from edge_ssl.adapt.plan import measure_configuration

    batch = plan["batch_size"]
    targets = np.zeros((batch, encoder.spec.embed_dim), np.float32)
    full = measure_configuration(encoder, "full", images, targets, config, batch=batch)
    ours = measure_configuration(encoder, plan["trainable"], images, targets, config, batch=batch,
                                 checkpointing=plan["checkpointing"],
                                 block_bytes_per_image=full.largest_block / batch,
                                 replay=None if replay is None else (replay[:batch], targets[:len(replay[:batch])]))
    return {"adapt_step_mb": ours.peak_mb, "full_step_mb": full.peak_mb,
            "ratio": ours.peak_bytes / full.peak_bytes}


def run_corruption(name, split, deployed, bank, args, config, workdir) -> dict[str, object]:
    from edge_ssl.adapt.api import adapt
    from edge_ssl.data.corruptions import corrupt
    from edge_ssl.data.sources import ImageDataset

    adapt_x = corrupt(split["adapt_x"], name, args.severity, seed=args.seed)
    eval_x = corrupt(split["eval_x"], name, args.severity, seed=args.seed + 1)
    shifted = knn(deployed, *bank, eval_x, split["eval_y"], args.knn_k, args.device)
    started = time.perf_counter()
    result = adapt(args.bundle, ImageDataset(adapt_x, None, None, f"{name}-{args.severity}"),
                   workdir / f"{name}.edge", config, export="never", replay=split.get("replay_x"),
                   replay_labels=split.get("replay_y"))
    seconds = time.perf_counter() - started
    # what each of the guard's choices scores (float weights: an INT8 result is quantized after the choice)
    candidates = {n: knn(m, *bank, eval_x, split["eval_y"], args.knn_k, args.device)
                  for n, m in result.candidates.items()}
    return {
        "kept": None if result.selection is None else result.selection["kept"],
        "selection": result.selection, "candidates_knn": candidates,
        "best_candidate": max(candidates, key=candidates.get) if candidates else None,
        "shifted": shifted,
        "adapted": knn(result.bundle, *bank, eval_x, split["eval_y"], args.knn_k, args.device),
        "clean_after": knn(result.bundle, *bank, split["eval_x"], split["eval_y"], args.knn_k,
                           args.device),
        "steps": result.steps_done, "stopped": result.stopped, "plan": result.plan,
        "agreement_after": result.agreement_after, "sec_per_step": result.seconds_per_step,
        "adapt_seconds": seconds, "_images": adapt_x,
    }


def bn_prior_rows(split, deployed, bank, args, clean: float,
                  depth: float) -> dict[float, dict[str, dict]]:
    """AdaBN alone at each prior (and the run's ``bn_depth``):
    {prior: {corruption: {clean, shifted, adapted, clean_after}}}.

    No gradient steps, so this isolates what the statistics prior trades: the share of
    deployed (source) statistics kept, against recovery on the shifted images.
    """
    import copy

    import torch

    from edge_ssl.adapt.bn import reestimate_bn_stats
    from edge_ssl.adapt.step import iterate_batches
    from edge_ssl.data.corruptions import corrupt
    from edge_ssl.device import resolve_device

    device = resolve_device(args.device)
    by_prior: dict[float, dict[str, dict]] = {prior: {} for prior in args.bn_priors}
    for name in args.corruptions:
        adapt_x = corrupt(split["adapt_x"], name, args.severity, seed=args.seed)
        eval_x = corrupt(split["eval_x"], name, args.severity, seed=args.seed + 1)
        shifted = knn(deployed, *bank, eval_x, split["eval_y"], args.knn_k, args.device)
        for prior in args.bn_priors:
            encoder = copy.deepcopy(deployed).to(device).eval()
            with torch.no_grad():
                reestimate_bn_stats(encoder, iterate_batches(adapt_x, 64, device, encoder.spec.input),
                                    prior=prior, depth=depth)
            by_prior[prior][name] = {
                "clean": clean, "shifted": shifted, "sec_per_step": None,
                "adapted": knn(encoder, *bank, eval_x, split["eval_y"], args.knn_k, args.device),
                "clean_after": knn(encoder, *bank, split["eval_x"], split["eval_y"], args.knn_k, args.device)}
    return by_prior


def tradeoff_table(by_prior: dict[float, dict[str, dict]], clean: float,
                   eval_images: int) -> dict[str, dict[str, float]]:
    """{prior: {recovery_frac, recovery_frac_significant, clean_drop_pts, corruptions}}."""
    table: dict[str, dict[str, float]] = {}
    for prior, rows in by_prior.items():
        stats = summarize(rows, clean, eval_images)
        table[str(prior)] = {k: stats[k] for k in ("recovery_frac", "recovery_frac_significant", "clean_drop_pts")}
        print(f"bn-stats prior {prior}: {table[str(prior)]}", file=sys.stderr)
        table[str(prior)]["corruptions"] = {n: {"adapted": r["adapted"], "clean_after": r["clean_after"]}
                                            for n, r in rows.items()}
    return table


def summarize(rows: dict[str, dict], clean: float, eval_images: int) -> dict[str, float | None]:
    """Means over corruptions; ``recovery_frac_significant`` only over shifts larger than two
    standard errors of the accuracy (a 1-2 point gap makes the ratio mostly noise)."""
    from edge_ssl.adapt.tune import gap_floor

    floor = gap_floor(clean, eval_images)
    ratios = {n: (r["adapted"] - r["shifted"]) / (clean - r["shifted"])
              for n, r in rows.items() if clean - r["shifted"] > 0.005}
    significant = [v for n, v in ratios.items() if clean - rows[n]["shifted"] > floor]
    drops = [100 * (clean - r["clean_after"]) for r in rows.values()]
    steps = [r["sec_per_step"] for r in rows.values() if r["sec_per_step"]]
    kept = [r.get("kept") for r in rows.values() if r.get("kept")]
    return {"recovery_frac": float(np.mean(list(ratios.values()))) if ratios else None,
            "worst_vs_unadapted_pts": float(min(100 * (r["adapted"] - r["shifted"]) for r in rows.values())),
            "guard_kept": {name: kept.count(name) for name in ("unadapted", "adabn", "adapted")} if kept else None,
            "guard_kept_best": (sum(r.get("kept") == r.get("best_candidate") for r in rows.values())
                                if kept else None),
            "recovery_frac_significant": float(np.mean(significant)) if significant else None,
            "significant_gap_floor": float(floor),
            "clean_drop_pts": float(np.mean(drops)),
            "sec_per_step": float(np.mean(steps)) if steps else None}


def steps_gain(report: dict, prior: float) -> dict[str, float] | None:
    """What the gradient steps add over AdaBN alone at the run's prior (same images, same run)."""
    alone = (report.get("bn_prior_tradeoff") or {}).get(str(float(prior)))
    if alone is None or report["trainable"] == "bn-stats":
        return None
    return {key: report[key] - alone[key] for key in ("recovery_frac", "recovery_frac_significant",
                                                     "clean_drop_pts")
            if report.get(key) is not None and alone.get(key) is not None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.data / "cifar10_test.npz").is_file() or not (args.bundle / "manifest.json").is_file():
        print(f"data ({args.data}) or bundle ({args.bundle}) not found; see ../shared/*/README.md",
              file=sys.stderr)
        return 2
    from edge_ssl.adapt.tune import adapt_config_for, bundle_adapt_settings
    from edge_ssl.bundle import Bundle
    from edge_ssl.commands.common import parse_key_values
    from edge_ssl.environment import describe_environment
    from edge_ssl.evaluate import embed
    from edge_ssl.lineage import require_float_weights
    from edge_ssl.models import load_encoder

    started = time.perf_counter()
    steps = args.steps or (10 if args.quick else 50)
    bundle = Bundle.open(args.bundle, verify=True)
    tuned = bundle_adapt_settings(bundle)  # what `edge-ssl adapt-tune` recorded, as the CLI applies it
    config = adapt_config_for(bundle, {
        "trainable": args.trainable, "steps": steps, "batch_size": args.batch_size,
        "budget_mb": args.budget_mb, "device": args.device, "seed": args.seed,
        **parse_key_values(args.opt, "--opt")})
    args.bn_priors = priors_to_measure(args.bn_priors, config.bn_prior)
    split = load_split(args.data, args.quick)
    if args.replay:
        split["replay_x"], split["replay_y"] = replay_from_bank(split, args.replay, args.seed)
    # the deployed model is the bundle as it runs (INT8 through onnxruntime); AdaBN alone and
    # the memory ratio work on its float weights
    weights = load_encoder(require_float_weights(bundle, "the adapt benchmark"))
    deployed = bundle if bundle.manifest.precision in ("int8", "fp16") else weights
    bank = (embed_model(deployed, split["bank_x"], args.device), split["bank_y"])
    float_bank = bank if deployed is weights else (embed(weights, split["bank_x"], batch_size=256,
                                                         device=args.device), split["bank_y"])
    parts = [split, swap_halves(split)] if args.swap_halves else [split]
    folds, prior_folds, cleans = [], [], []
    with tempfile.TemporaryDirectory(prefix="adapt-bench-") as tmp:
        for fold, part in enumerate(parts):
            workdir = Path(tmp) / f"fold{fold}"
            workdir.mkdir()
            clean = knn(deployed, *bank, part["eval_x"], part["eval_y"], args.knn_k, args.device)
            rows: dict[str, dict] = {}
            for name in args.corruptions:
                rows[name] = {"clean": clean, **run_corruption(name, part, deployed, bank, args, config,
                                                               workdir)}
                print(f"fold {fold} {name}: clean {clean:.3f} shifted {rows[name]['shifted']:.3f} "
                      f"adapted {rows[name]['adapted']:.3f} clean_after {rows[name]['clean_after']:.3f}",
                      file=sys.stderr)
            folds.append(rows)
            cleans.append(clean)
            if args.bn_priors:
                float_clean = clean if deployed is weights else knn(weights, *float_bank, part["eval_x"],
                                                                    part["eval_y"], args.knn_k, args.device)
                prior_folds.append(bn_prior_rows(part, weights, float_bank, args, float_clean, config.bn_depth))
    clean = float(np.mean(cleans))
    eval_images = len(split["eval_x"]) * len(parts)
    rows = pool(folds)
    first = folds[0][args.corruptions[0]]
    replay = None
    if config.replay_weight > 0:  # --replay, else the bundle's own images (adapt() used them)
        from edge_ssl.adapt.replay import load_replay

        replay = split["replay_x"] if "replay_x" in split else load_replay(bundle)
    memory = memory_ratio(weights, first["plan"], first["_images"], config, replay)
    report = {
        "command": "python benchmarks/adapt.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "corruptions": {n: {k: v for k, v in r.items() if k != "_images"} for n, r in rows.items()},
        "bundle_manifest_sha256": bundle.manifest_sha256,
        **summarize(rows, clean, eval_images),
        "folds": ([summarize(f, c, len(split["eval_x"])) for f, c in zip(folds, cleans, strict=True)]
                  if len(folds) > 1 else None),
        "peak_mem_ratio": memory["ratio"], "memory": memory,
        "bn_prior_tradeoff": (tradeoff_table({prior: pool([f[prior] for f in prior_folds])
                                              for prior in args.bn_priors}, clean, eval_images)
                              if args.bn_priors else None),
        "trainable": first["plan"]["trainable"], "checkpointing": first["plan"]["checkpointing"],
        "settings": {"severity": args.severity, "quick": args.quick, "steps": steps,
                     "adapt_images": len(split["adapt_x"]), "eval_images": eval_images,
                     "swap_halves": args.swap_halves, "replay_images": 0 if replay is None else len(replay),
                     "bank_images": len(split["bank_x"]), "knn_k": args.knn_k,
                     "bank": "clean train images, embedded once by the deployed model",
                     "deployed": (f"{bundle.manifest.precision} graph through onnxruntime CPU (AdaBN-alone "
                                  "rows and candidates_knn: float weights)" if deployed is bundle
                                  else "float weights"),
                     "config": {k: v for k, v in vars(config).items()},
                     "bundle_settings": tuned or None},
        "targets": {"recovery_frac": ">= 0.5", "clean_drop_pts": "<= 1", "peak_mem_ratio": "<= 0.35"},
        "seconds": time.perf_counter() - started,
        "environment": describe_environment(),
    }
    report["gradient_steps_gain"] = steps_gain(report, config.bn_prior)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
