"""Per-bundle BN settings for adaptation: pick ``bn_depth`` and ``bn_prior`` for one encoder on
held-out synthetic shifts of labeled clean images, and record them in the bundle for ``adapt``.

The package defaults (depth 0.75, prior 0.5) were chosen for the SimCLR ResNet-18 teacher;
a pruned student tolerates less re-estimation (its clean accuracy falls faster). Tuning
runs on the server, where labels exist; the device then adapts with the bundle's settings.
The tuned bundle also carries clean replay images (``edge_ssl.adapt.replay``) and the step
settings that use them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_ssl.adapt.config import MIN_BATCH, AdaptConfig
from edge_ssl.bundle import Bundle, BundleWriter
from edge_ssl.config import check_int, check_number, config_from_dict, config_to_dict
from edge_ssl.data.corruptions import CORRUPTIONS, VALIDATION_CORRUPTIONS
from edge_ssl.data.sources import ImageDataset, split_mask
from edge_ssl.errors import BundleError, ConfigError, DataError
from edge_ssl.lineage import own_or_float_parent_file
from edge_ssl.outputs import check_bundle_out

#: The bundle file ``edge-ssl adapt`` reads its per-bundle BN settings from.
SETTINGS_FILE = "adapt_settings.json"
TUNED_FIELDS = ("bn_stats", "bn_depth", "bn_prior")
#: Step settings a record may hold (with replay images; see edge_ssl.adapt.replay).
STEP_FIELDS = ("align_weight", "replay_weight")
#: Fewest labeled images left for the kNN bank after the probe is taken out.
MIN_BANK = 100


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """How to tune the BN settings of one encoder.

    - ``corruptions`` at ``severity``: the shifts to tune on. The default is CIFAR-10-C's
      held-out validation set, so tuned settings never see the corruptions a benchmark scores.
    - ``depths`` x ``priors``: the grid of ``bn_depth`` and ``bn_prior`` tried (AdaBN alone),
      beside keeping the deployed statistics (``bn_stats`` false: no recovery, no clean cost),
      which wins when every re-estimation loses accuracy or costs too much.
    - ``max_clean_drop``: clean kNN points AdaBN alone may cost, averaged over corruptions.
      0.5 leaves the other half of a 1-point budget to the gradient steps, which added
      0.5 points to AdaBN's clean drop on the teacher (0.70 against 0.20, docs/adapt.md).
    - ``probe_images`` labeled images are held out of the kNN bank: one half is corrupted
      and adapted on (labels unused), the other half scored; at most ``bank_images`` of the
      rest form the bank.
    - ``replay_images``: clean images from outside the probe (class-balanced) shipped in the
      bundle as ``adapt_replay.npz``, with the replay step settings (``REPLAY_STEP_SETTINGS``);
      0 ships none and records BN settings only. At most ``replay_max_mb`` MiB of them, so large
      images do not bloat what a deploy uploads (1,000 CIFAR images are 3 MiB; at 224x224 the
      default cap keeps 222).
    """

    corruptions: tuple[str, ...] = VALIDATION_CORRUPTIONS
    severity: int = 5
    depths: tuple[float, ...] = (0.5, 0.75, 1.0)
    priors: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    max_clean_drop: float = 0.5
    probe_images: int = 2000
    bank_images: int = 10000
    replay_images: int = 1000
    replay_max_mb: float = 32.0
    knn_k: int = 20
    batch_size: int = 128
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "corruptions", tuple(self.corruptions))
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "priors", tuple(self.priors))
        unknown = [c for c in self.corruptions if c not in CORRUPTIONS]
        if not self.corruptions or unknown:
            raise ConfigError(f"TuneConfig.corruptions must name some of {', '.join(CORRUPTIONS)}; "
                              f"got {list(self.corruptions)!r}.")
        if not self.depths or not self.priors:
            raise ConfigError("TuneConfig.depths and .priors each need at least one value.")
        for depth in self.depths:
            for prior in self.priors:  # the same checks adapt applies to each pair
                try:
                    AdaptConfig(bn_depth=depth, bn_prior=prior)
                except ConfigError as exc:
                    raise ConfigError(f"TuneConfig.depths/priors: {exc}") from exc
        owner = "TuneConfig"
        check_int(owner, "severity", self.severity, 1, 5)
        for name, low in (("probe_images", 20), ("bank_images", MIN_BANK), ("knn_k", 1),
                          ("batch_size", 1), ("seed", 0), ("replay_images", 0)):
            check_int(owner, name, getattr(self, name), low)
        if 0 < self.replay_images < MIN_BATCH:
            raise ConfigError(f"TuneConfig.replay_images must be 0 (none) or >= {MIN_BATCH}; "
                              f"got {self.replay_images}.")
        check_number(owner, "replay_max_mb", self.replay_max_mb, 0, low_open=True)
        check_number(owner, "max_clean_drop", self.max_clean_drop, 0, 100, high_open=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TuneConfig:
        return config_from_dict(cls, values)


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """The chosen grid row and the whole grid it was chosen from (accuracies in [0, 1]);
    ``bn_depth``/``bn_prior`` are None when keeping the deployed statistics won."""

    choice: Mapping[str, Any]
    clean: float
    shifted: Mapping[str, float]
    significant: tuple[str, ...]
    gap_floor: float
    grid: tuple[Mapping[str, Any], ...]
    images: Mapping[str, int]
    config: TuneConfig
    replay: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    replay_labels: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def bn_stats(self) -> bool:
        return bool(self.choice["bn_stats"])

    @property
    def bn_depth(self) -> float | None:
        return self.choice["bn_depth"]

    @property
    def bn_prior(self) -> float | None:
        return self.choice["bn_prior"]

    def settings(self) -> dict[str, Any]:
        """What ``adapt`` takes from the bundle: the BN setting, and with replay images the
        replay step settings (alignment only where some BN layers keep the deployed statistics)."""
        from edge_ssl.adapt.replay import REPLAY_STEP_SETTINGS

        bn: dict[str, Any] = {"bn_stats": False} if not self.bn_stats else {
            "bn_stats": True, "bn_depth": self.bn_depth, "bn_prior": self.bn_prior}
        if self.replay is None:
            return bn
        steps = dict(REPLAY_STEP_SETTINGS)
        if self.bn_stats and self.bn_depth == 1:
            steps["align_weight"] = 0.0
        return {**bn, **steps}

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings(),
            "rule": (f"largest mean recovery over the significant shifts with a mean clean drop "
                     f"<= {self.config.max_clean_drop:g} points (AdaBN alone; keeping the deployed "
                     "statistics scores 0 at 0 points)"),
            "chosen": dict(self.choice), "clean": self.clean, "shifted": dict(self.shifted),
            "significant": list(self.significant), "gap_floor": self.gap_floor,
            "grid": [dict(row) for row in self.grid],
            "images": {**self.images, "replay": 0 if self.replay is None else len(self.replay)},
            "config": config_to_dict(self.config),
        }


def probe_split(data: ImageDataset, config: TuneConfig) -> dict[str, np.ndarray]:
    """Class-balanced probe halves (adapt, eval) and a bank from the rest of ``data``."""
    if data.labels is None:
        raise DataError(f"{data.source} has no labels; tuning scores kNN accuracy, so it needs "
                        "labeled clean images (class subfolders, an .npz with y, or CIFAR batches).")
    count = len(data)
    if count < config.probe_images + MIN_BANK:
        raise DataError(f"{data.source} has {count} labeled images; tuning needs probe_images "
                        f"({config.probe_images}) + {MIN_BANK} for the kNN bank. Use more images or "
                        "a smaller --probe-images.")
    labels = np.asarray(data.labels).astype(np.int64)
    in_probe = split_mask(count, labels, config.probe_images / count, config.seed)
    probe, rest = np.flatnonzero(in_probe), np.flatnonzero(~in_probe)
    bank = np.sort(np.random.default_rng(config.seed).permutation(rest)[: config.bank_images])
    evaluate = split_mask(len(probe), labels[probe], 0.5, config.seed + 1)
    adapt_idx, eval_idx = probe[~evaluate], probe[evaluate]
    return {"adapt_x": data.images[adapt_idx], "eval_x": data.images[eval_idx],
            "eval_y": labels[eval_idx], "bank_x": data.images[bank], "bank_y": labels[bank],
            "rest": rest, "rest_y": labels[rest]}


def gap_floor(clean: float, images: int) -> float:
    """Two standard errors of a kNN accuracy on ``images``: smaller gaps are mostly noise."""
    return float(2 * np.sqrt(clean * (1 - clean) / images))


def score(rows: Mapping[str, Mapping[str, float]], clean: float, significant: list[str]) -> dict[str, float]:
    """Mean recovery over the ``significant`` shifts and mean clean drop (points) of one setting."""
    recovery = [(rows[n]["adapted"] - rows[n]["shifted"]) / (clean - rows[n]["shifted"]) for n in significant]
    drops = [100 * (clean - r["clean_after"]) for r in rows.values()]
    return {"recovery_significant": float(np.mean(recovery)), "clean_drop_pts": float(np.mean(drops))}


def choose(grid: list[dict[str, Any]], max_clean_drop: float) -> dict[str, Any]:
    """The grid row with the largest recovery within the clean budget; fewer points lost
    breaks ties. The grid's keep-the-deployed-statistics row (0 at 0) always fits."""
    fits = [row for row in grid if row["clean_drop_pts"] <= max_clean_drop + 1e-9]
    return max(fits, key=lambda r: (r["recovery_significant"], -r["clean_drop_pts"]))


def tune_bn_settings(
    encoder: Any, data: ImageDataset, config: TuneConfig = TuneConfig(),
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Score AdaBN alone at every (depth, prior) of the grid on each corruption; choose by
    :func:`choose`. One statistics pass per corruption and depth: a prior only blends the
    measured statistics with the deployed ones, as :func:`reestimate_bn_stats` does."""
    from edge_ssl.adapt.bn import batch_norms
    from edge_ssl.adapt.replay import choose_replay_indices
    from edge_ssl.device import resolve_device

    say = progress or (lambda message: None)
    device = resolve_device(config.device)
    base = copy.deepcopy(encoder).to(device).eval()
    if not list(batch_norms(base)):
        raise ConfigError("this encoder has no BatchNorm layer with running statistics; there are "
                          "no BN settings to tune (adaptation runs its gradient steps alone).")
    split = probe_split(data, config)
    knn = _probe_knn(base, split, config, str(device))
    clean = knn(base, split["eval_x"])
    floor = gap_floor(clean, len(split["eval_x"]))
    say(f"clean kNN {clean:.3f} on {len(split['eval_x'])} probe images, bank {knn.bank_size}")
    cells: dict[tuple[float, float], dict[str, dict[str, float]]] = {}
    shifted: dict[str, float] = {}
    for name in config.corruptions:
        shifted[name] = _score_corruption(base, split, name, config, knn, cells, device, say)
    significant = [n for n in config.corruptions if clean - shifted[n] > floor]
    if not significant:
        raise DataError(
            f"none of {', '.join(config.corruptions)} lowers this encoder's kNN accuracy by more "
            f"than the noise floor ({100 * floor:.1f} points on {len(split['eval_x'])} probe images), "
            "so there is nothing to tune on; raise probe_images or keep the default settings.")
    grid = _grid(cells, shifted, clean, significant, config, say)
    # never the probe the grid was scored on
    picked = choose_replay_indices(data.images, split["rest"], split["rest_y"], config.replay_images,
                                   config.replay_max_mb, config.seed, say) if config.replay_images else None
    return TuneResult(
        choice=choose(grid, config.max_clean_drop), clean=clean,
        shifted=shifted, significant=tuple(significant), gap_floor=floor, grid=tuple(grid),
        images={"adapt": len(split["adapt_x"]), "eval": len(split["eval_x"]), "bank": knn.bank_size},
        config=config, replay=None if picked is None else data.images[picked],
        replay_labels=None if picked is None else np.asarray(data.labels)[picked].astype(np.int64))


class _ProbeKnn:
    """kNN top-1 of a model on probe images against the deployed model's bank."""

    def __init__(self, bank: np.ndarray, labels: np.ndarray, eval_y: np.ndarray, config: TuneConfig,
                 device: str) -> None:
        self.bank, self.labels, self.eval_y = bank, labels, eval_y
        self.config, self.device = config, device
        self.classes = int(max(labels.max(), eval_y.max())) + 1
        self.bank_size = len(bank)

    def __call__(self, model: Any, images: np.ndarray) -> float:
        from edge_ssl.evaluate import embed, knn_top1

        emb = embed(model, images, batch_size=self.config.batch_size, device=self.device)
        return float(knn_top1(self.bank, self.labels, emb, self.eval_y, k=self.config.knn_k,
                              num_classes=self.classes))


def _probe_knn(base: Any, split: dict[str, Any], config: TuneConfig, device: str) -> _ProbeKnn:
    from edge_ssl.evaluate import embed

    bank = embed(base, split["bank_x"], batch_size=config.batch_size, device=device)
    return _ProbeKnn(bank, split["bank_y"], split["eval_y"], config, device)


def _score_corruption(base: Any, split: dict[str, Any], name: str, config: TuneConfig,
                      knn: _ProbeKnn, cells: dict, device: Any, say: Callable[[str], None]) -> float:
    """Fill ``cells[(depth, prior)][name]`` for one corruption; returns its shifted kNN."""
    import torch

    from edge_ssl.adapt.bn import blend_bn_statistics, bn_statistics, reestimate_bn_stats
    from edge_ssl.adapt.step import iterate_batches
    from edge_ssl.data.corruptions import corrupt

    source = bn_statistics(base)
    adapt_x = corrupt(split["adapt_x"], name, config.severity, seed=config.seed)
    eval_x = corrupt(split["eval_x"], name, config.severity, seed=config.seed + 1)
    shifted = knn(base, eval_x)
    say(f"{name}: shifted {shifted:.3f}")
    for depth in config.depths:
        work = copy.deepcopy(base)
        with torch.no_grad():
            reestimate_bn_stats(work, iterate_batches(adapt_x, config.batch_size, device, work.spec.input),
                                prior=0.0, depth=depth)
        measured = bn_statistics(work)
        for prior in config.priors:
            blend_bn_statistics(work, measured, source, depth=depth, prior=prior)
            cell = cells.setdefault((depth, prior), {})[name] = {
                "shifted": shifted, "adapted": knn(work, eval_x),
                "clean_after": knn(work, split["eval_x"])}
            say(f"{name} depth {depth:g} prior {prior:g}: adapted {cell['adapted']:.3f}, "
                f"clean {cell['clean_after']:.3f}")
    return shifted


def _grid(cells: dict, shifted: dict[str, float], clean: float, significant: list[str],
          config: TuneConfig, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Keeping the deployed statistics first, then every (depth, prior) with its score."""
    grid = [{"bn_stats": False, "bn_depth": None, "bn_prior": None, "recovery_significant": 0.0,
             "clean_drop_pts": 0.0, "corruptions": {n: {"adapted": shifted[n], "clean_after": clean}
                                                    for n in config.corruptions}}]
    for (depth, prior), rows in cells.items():
        stats = score(rows, clean, significant)
        grid.append({"bn_stats": True, "bn_depth": depth, "bn_prior": prior, **stats,
                     "corruptions": {n: {"adapted": r["adapted"], "clean_after": r["clean_after"]}
                                     for n, r in rows.items()}})
        say(f"depth {depth:g} prior {prior:g}: recovery {stats['recovery_significant']:.3f}, "
            f"clean drop {stats['clean_drop_pts']:.2f} points")
    return grid


def write_tuned(bundle: Bundle, result: TuneResult, out: Any, *, overwrite: bool = False) -> Bundle:
    """A copy of ``bundle`` (every file, same manifest fields) with ``adapt_settings.json``,
    the replay images when the result has them (``adapt_replay.npz``) and an ``adapt-tune``
    lineage entry; written atomically, the input is never touched."""
    payload = {"source": "edge-ssl adapt-tune", **result.to_dict()}
    lineage = {"settings": result.settings(),
               "chosen": {k: v for k, v in result.choice.items() if k != "corruptions"},
               "config": config_to_dict(result.config), "images": dict(result.images)}
    return write_with_settings(bundle, payload, result.replay, result.replay_labels, lineage, out,
                               overwrite=overwrite)


def write_with_settings(bundle: Bundle, payload: Mapping[str, Any], replay: np.ndarray | None,
                        labels: np.ndarray | None, lineage_settings: Mapping[str, Any], out: Any, *,
                        overwrite: bool = False, name: str | None = None) -> Bundle:
    """``bundle``'s files and manifest plus ``adapt_settings.json`` (``payload``, whose
    ``settings`` adapt reads) and the replay images, under an ``adapt-tune`` lineage entry."""
    from edge_ssl.adapt.replay import REPLAY_FILE, replay_bytes

    out = Path(out)
    if out.resolve() == bundle.path.resolve():
        raise BundleError(f"--out {out} is the input bundle; tuning writes a new bundle.")
    check_bundle_out(out, overwrite=overwrite)
    manifest = bundle.manifest
    with BundleWriter(out, overwrite=overwrite) as writer:
        for name in manifest.files:
            if name not in (SETTINGS_FILE, REPLAY_FILE):  # both replaced by this tuning
                writer.copy_file(name, bundle.file(name))
        writer.write_json(SETTINGS_FILE, dict(payload))
        if replay is not None:
            writer.write_bytes(REPLAY_FILE, replay_bytes(replay, labels))
        lineage = bundle.child_lineage("adapt-tune", dict(lineage_settings))
        return writer.commit(name=name or out.name.removesuffix(".edge"), encoder=manifest.encoder,
                             lineage=lineage, precision=manifest.precision, metrics=manifest.metrics)


def settings_file(bundle: Bundle, weights: Bundle | None = None) -> Path | None:
    """``adapt_settings.json`` of ``bundle`` or, for a quantized bundle, of its float parent."""
    return own_or_float_parent_file(bundle, SETTINGS_FILE, weights)


def bundle_adapt_settings(bundle: Bundle) -> dict[str, Any]:
    """The settings recorded by ``adapt-tune`` in ``bundle`` or, for a quantized bundle,
    in the float parent adaptation trains (BN, and with replay images the step weights);
    {} when there are none."""
    path = settings_file(bundle)
    if path is None:
        return {}
    try:
        values = json.loads(path.read_text(encoding="utf-8"))["settings"]
        if values["bn_stats"] not in (True, False) or set(values) - {*TUNED_FIELDS, *STEP_FIELDS}:
            raise ValueError(f"expected bn_stats true/false and at most "
                             f"{', '.join((*TUNED_FIELDS, *STEP_FIELDS))}")
        settings = {"bn_stats": values["bn_stats"]}
        if values["bn_stats"]:
            settings.update({key: float(values[key]) for key in ("bn_depth", "bn_prior")})
        settings.update({key: float(values[key]) for key in STEP_FIELDS if key in values})
        AdaptConfig(**settings)
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
        raise BundleError(f"{path} is not a valid adapt-tune record ({type(exc).__name__}: {exc}); "
                          "re-run edge-ssl adapt-tune, or adapt the untuned parent.") from exc
    return settings


def adapt_config_for(bundle: Bundle, settings: Mapping[str, Any]) -> AdaptConfig:
    """The adaptation config of ``bundle``: its recorded settings, then ``settings`` on top.
    Setting any of ``bn_stats``, ``bn_depth``, ``bn_prior`` explicitly replaces the recorded BN
    setting whole (a ``bn_prior`` given for a record that says ``bn_stats`` false must not
    vanish); recorded step weights are replaced one by one."""
    tuned = bundle_adapt_settings(bundle)
    if any(key in settings for key in TUNED_FIELDS):
        tuned = {key: value for key, value in tuned.items() if key in STEP_FIELDS}
    return AdaptConfig.from_dict({**tuned, **settings})
