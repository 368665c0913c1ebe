"""Adaptation-ready by construction: the final bundle of ``compress`` ships adapt-tune's settings and replay images."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_ssl.bundle import Bundle, record_results
from edge_ssl.errors import ConfigError, DataError

#: At most this many labeled images go to tuning (its probe + bank); the rest add little.
MAX_TUNE_IMAGES = 12000
#: Replay images shipped (as edge-ssl adapt-tune's default).
REPLAY_IMAGES = 1000
HINT = ("run `edge-ssl adapt-tune` on the bundle with labeled images for tuned settings; "
        "`edge-ssl adapt` keeps the best of unadapted, AdaBN alone and adapted meanwhile")


def make_adapt_ready(result: Any, knn: Any | None, say: Callable[[str], None]) -> None:
    """Make ``result.bundle`` adaptation-ready (:func:`adapt_ready_bundle`) and point
    ``result.bundle`` at the ready bundle, which also records the compress result."""
    if result.bundle is None:
        return
    ready = adapt_ready_bundle(result.bundle, knn, say)
    if ready is not None:
        result.bundle = ready
        record_results(ready, "compress", result.to_dict())


def adapt_ready_bundle(bundle: Bundle, knn: Any | None, say: Callable[[str], None]) -> Bundle | None:
    """Tune adaptation for ``bundle`` on the labeled kNN images (bank first, then test; at most
    MAX_TUNE_IMAGES) and replace it, in place at its path, by the same bundle plus
    ``adapt_settings.json`` and ``adapt_replay.npz`` (an ``adapt-tune`` lineage entry); the
    ready bundle. Without labeled images ``bundle`` is left as it is, that is said once, and
    the answer is None."""
    if knn is None:
        say(f"adapt: no labeled --eval-data, so no adaptation settings shipped; {HINT}")
        return None
    from edge_ssl.data.sources import ImageDataset

    images = np.concatenate([knn.bank_images, knn.test_images])[:MAX_TUNE_IMAGES]
    labels = np.concatenate([knn.bank_labels, knn.test_labels]).astype(np.int64)[:MAX_TUNE_IMAGES]
    labeled = ImageDataset(images, labels, None, "compress kNN images (bank + test)")
    payload, replay, replay_labels, lineage = _tune_or_defaults(bundle, labeled, say)
    ready = _replace(bundle, payload, replay, replay_labels, lineage)
    say(f"adapt: {payload['note']}; shipped adapt_settings.json"
        + ("" if replay is None else f" and {len(replay)} replay images"))
    record_results(ready, "adapt_ready", {k: v for k, v in payload.items() if k != "grid"})
    return ready


def _tune_or_defaults(bundle: Bundle, data: Any, say: Callable[[str], None]
                      ) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray | None, dict[str, Any]]:
    """adapt-tune's record when the grid can be scored; else the package defaults, with replay."""
    from edge_ssl.adapt.tune import MIN_BANK, TuneConfig, tune_bn_settings
    from edge_ssl.config import config_to_dict
    from edge_ssl.lineage import require_float_weights
    from edge_ssl.models import load_encoder

    encoder = load_encoder(require_float_weights(bundle, "adapt-tune"))
    probe = min(2000, (len(data) - MIN_BANK) // 2 * 2)
    reason = f"{len(data)} labeled images, fewer than the {20 + MIN_BANK} tuning needs"
    if probe >= 20:
        config = TuneConfig(probe_images=probe, replay_images=REPLAY_IMAGES, device="cpu")
        try:
            tuned = tune_bn_settings(encoder, data, config)
        except (DataError, ConfigError) as exc:
            reason = str(exc).split(";")[0]
        else:
            payload = {"source": "edge-ssl compress (adapt-tune on the final student)",
                       **tuned.to_dict(), "note": _chosen_text(tuned)}
            lineage = {"settings": tuned.settings(), "config": config_to_dict(config),
                       "chosen": {k: v for k, v in tuned.choice.items() if k != "corruptions"}}
            return payload, tuned.replay, tuned.replay_labels, lineage
    return _defaults(encoder, data, reason)


def _chosen_text(tuned: Any) -> str:
    if not tuned.bn_stats:
        return "adapt-tune kept the deployed BN statistics"
    return f"adapt-tune chose bn_depth {tuned.bn_depth:g}, bn_prior {tuned.bn_prior:g}"


def _defaults(encoder: Any, data: Any, reason: str
              ) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray | None, dict[str, Any]]:
    """The package BN defaults and the replay step settings, with class-balanced replay images."""
    from edge_ssl.adapt.bn import batch_norms
    from edge_ssl.adapt.config import MIN_BATCH, AdaptConfig
    from edge_ssl.adapt.replay import REPLAY_STEP_SETTINGS, replay_indices

    base = AdaptConfig()
    settings: dict[str, Any] = {"bn_stats": True, "bn_depth": base.bn_depth, "bn_prior": base.bn_prior}
    replay = labels = None
    if len(data) >= MIN_BATCH:
        pick = replay_indices(len(data), data.labels, min(REPLAY_IMAGES, len(data)), 0)
        replay, labels = data.images[pick], np.asarray(data.labels)[pick]
        settings.update(REPLAY_STEP_SETTINGS)
        if not list(batch_norms(encoder)):
            settings["align_weight"] = 0.0  # alignment needs BN layers
    note = f"package defaults ({reason})"
    payload = {"source": "edge-ssl compress (package defaults)", "settings": settings, "note": note,
               "images": {"labeled": len(data), "replay": 0 if replay is None else len(replay)}}
    return payload, replay, labels, {"settings": settings, "note": note}


def _replace(bundle: Bundle, payload: dict[str, Any], replay: np.ndarray | None,
             labels: np.ndarray | None, lineage: dict[str, Any]) -> Bundle:
    """Write the ready bundle beside ``bundle`` and swap it in at ``bundle``'s path."""
    from edge_ssl.adapt.tune import write_with_settings

    path = bundle.path
    staged = path.with_name(f".{path.name}.ready-{uuid.uuid4().hex[:8]}")
    aside = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        write_with_settings(bundle, payload, replay, labels, lineage, staged,
                            name=bundle.manifest.name)
        os.replace(path, aside)
        os.replace(staged, path)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)
    return Bundle.open(Path(path), verify=True)
