"""Never worse than not adapting: keep the unadapted, AdaBN-alone or adapted weights, whichever
scores best by a label-free criterion on the held-back slice of the local images.

The rule was written down before it was measured (benchmarks/results/adapt.md, "Keeping the
best of three"):

- with a **labeled deployed bank** (the clean replay images a bundle from ``compress`` or
  ``adapt-tune`` carries, with their labels, embedded by the deployed model: the index a device
  keeps), the score is the information of the soft kNN votes of the held-back images against
  that bank (k=20, T=0.07, as :func:`knn_top1`): ``(H(mean vote) - mean H(vote)) / log(classes)``,
  the information-maximization objective of SHOT (Liang et al. 2020). Confident votes alone
  are not enough: a model that has not adapted often maps every shifted image into one region
  of the space, voting confidently for a few classes (entropy of the votes alone picked it on
  the unit test's contrast shift at 14% kNN against 40% for AdaBN); the first term asks the
  votes to spread over the classes as the bank does. It assumes the local images are not all
  of one class;
- without one, the score is **view consistency**: how surely each held-back image's flipped
  view finds its shifted view among the held-back slice (softmax over cosines, T=0.1). It
  chooses between the unadapted weights and AdaBN alone only: the gradient steps train view
  agreement, so this score favours their weights whether or not kNN gained (on the
  `validation` corruptions by 0.015-0.020 over AdaBN alone, for a mean recovery gain of
  0.002), and the adapted weights are reported but not kept without a labeled bank.

A candidate whose embeddings fail the collapse/rank/agreement guard is never kept. The simplest
candidate wins ties (``unadapted``, then ``adabn``, then ``adapted``): a more complex one must
beat it by ``margin``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Simplest first: a tie keeps the earlier one.
CANDIDATES = ("unadapted", "adabn", "adapted")
KNN_K = 20
KNN_TEMPERATURE = 0.07
VIEW_TEMPERATURE = 0.1
SHIFT_FRACTION = 0.125  # the shifted view moves the image by 1/8 of its width (4 px at 32 px)
NO_BANK_REASON = ("not kept without a labeled bank: view consistency favours weights trained "
                  "on views (adapt-tune or compress ships a bank)")


@dataclass(frozen=True)
class DeployedBank:
    """The deployed model's embeddings of labeled clean images (what the device's index holds)."""

    embeddings: np.ndarray
    labels: np.ndarray


@dataclass
class Selection:
    """Which candidate was kept, by which criterion, and every candidate's score."""

    kept: str
    criterion: str
    scores: dict[str, float | None]
    excluded: dict[str, str] = field(default_factory=dict)
    margin: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "criterion": self.criterion,
                "scores": {k: None if v is None else round(v, 5) for k, v in self.scores.items()},
                "excluded": dict(self.excluded), "margin": self.margin}


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_votes(queries: np.ndarray, bank: DeployedBank, *, k: int = KNN_K,
              temperature: float = KNN_TEMPERATURE) -> np.ndarray:
    """(N, classes) soft kNN class votes of ``queries`` against ``bank``; rows sum to 1."""
    labels = np.asarray(bank.labels).astype(np.int64)
    classes = int(labels.max()) + 1
    sim = _unit(queries) @ _unit(bank.embeddings).T
    k = min(k, sim.shape[1])
    top = np.argpartition(sim, sim.shape[1] - k, axis=1)[:, sim.shape[1] - k:]
    top_sim = np.take_along_axis(sim, top, axis=1).astype(np.float64)
    weights = np.exp((top_sim - top_sim.max(axis=1, keepdims=True)) / temperature)
    rows = np.arange(len(queries))[:, None]
    votes = np.zeros((len(queries), classes))
    np.add.at(votes, (np.broadcast_to(rows, top.shape), labels[top]), weights)
    return votes / votes.sum(axis=1, keepdims=True)


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1)


def knn_information(queries: np.ndarray, bank: DeployedBank, *, k: int = KNN_K,
                    temperature: float = KNN_TEMPERATURE) -> float:
    """``(H(mean vote) - mean H(vote)) / log(C)`` of the queries' soft kNN votes, in [0, 1]."""
    votes = knn_votes(queries, bank, k=k, temperature=temperature)
    classes = max(votes.shape[1], 2)
    return float((_entropy(votes.mean(axis=0)) - _entropy(votes).mean()) / np.log(classes))


def paired_views(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(horizontally flipped, shifted right with edge padding) copies of uint8 (N, H, W, 3) images."""
    shift = max(1, int(round(SHIFT_FRACTION * images.shape[2])))
    shifted = np.concatenate([np.repeat(images[:, :, :1], shift, axis=2), images[:, :, :-shift]], axis=2)
    return np.ascontiguousarray(images[:, :, ::-1]), np.ascontiguousarray(shifted)


def view_consistency(first: np.ndarray, second: np.ndarray,
                     temperature: float = VIEW_TEMPERATURE) -> float:
    """Mean probability that row i of ``first`` retrieves row i of ``second`` (softmax over cosines)."""
    logits = (_unit(first) @ _unit(second).T).astype(np.float64) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return float((np.diag(p) / p.sum(axis=1)).mean())


def choose_candidate(scores: dict[str, float | None], excluded: dict[str, str], criterion: str,
                     margin: float = 0.0) -> Selection:
    """The best-scoring candidate not excluded; a later (more complex) one must beat the kept
    one by more than ``margin``. ``unadapted`` is never excluded."""
    kept = "unadapted"
    for name in CANDIDATES[1:]:
        value = scores.get(name)
        if value is None or name in excluded:
            continue
        if value > scores[kept] + margin:
            kept = name
    return Selection(kept, criterion, dict(scores), dict(excluded), margin)


def score_candidates(embeddings: dict[str, np.ndarray], bank: DeployedBank | None,
                     views: dict[str, tuple[np.ndarray, np.ndarray]] | None) -> tuple[str, dict[str, float]]:
    """(criterion, {candidate: score}): :func:`knn_information` of each candidate's held-back
    ``embeddings`` against ``bank``, else :func:`view_consistency` of its two ``views``."""
    if bank is not None:
        return "knn_information", {n: knn_information(e, bank) for n, e in embeddings.items()}
    return "view_consistency", {n: view_consistency(*views[n]) for n in embeddings}


def _adabn(unadapted: Any, config: Any, images: np.ndarray, device: Any) -> Any:
    import copy

    import torch

    from edge_ssl.adapt.bn import bn_statistics, reestimate_bn_stats
    from edge_ssl.adapt.step import iterate_batches

    adabn = copy.deepcopy(unadapted)
    with torch.no_grad():
        reestimate_bn_stats(adabn, iterate_batches(images, 64, device, adabn.spec.input),
                            prior=config.bn_prior, source=bn_statistics(unadapted), depth=config.bn_depth)
    return adabn


def keep_best(adapted: Any, unadapted: Any, config: Any, train_images: np.ndarray,
              hold_images: np.ndarray, bank: tuple[np.ndarray, np.ndarray] | None,
              device: Any) -> tuple[dict[str, Any], Selection]:
    """Score the unadapted weights, AdaBN alone (``config``'s BN settings, on ``train_images``)
    and ``adapted`` on ``hold_images``; ({candidate: encoder}, the selection). A candidate with
    non-finite embeddings, or failing the guard against the unadapted ones, is excluded."""
    from edge_ssl.adapt.guard import GuardConfig, check_embeddings
    from edge_ssl.evaluate import embed, embedding_health

    def run(model: Any, x: np.ndarray) -> np.ndarray:
        return embed(model, x, batch_size=128, device=str(device))

    encoders = {"unadapted": unadapted.to(device).eval()}
    if config.bn_stats:
        encoders["adabn"] = _adabn(unadapted, config, train_images, device)
    encoders["adapted"] = adapted
    base = run(unadapted, hold_images)
    health, guard = embedding_health(base), GuardConfig(config.min_agreement, config.min_rank_ratio)
    embeddings, excluded = {"unadapted": base}, {}
    for name in list(encoders)[1:]:
        emb = run(encoders[name], hold_images)
        if not np.isfinite(emb).all():
            excluded[name] = "non-finite embeddings"
            continue
        report = check_embeddings(0, emb, base, health, guard)
        if not report.ok:
            excluded[name] = report.reason
            continue
        embeddings[name] = emb
    deployed_bank = None if bank is None else DeployedBank(run(unadapted, bank[0]), np.asarray(bank[1]))
    views = None
    if deployed_bank is None:
        pair = paired_views(hold_images)
        views = {n: (run(encoders[n], pair[0]), run(encoders[n], pair[1])) for n in embeddings}
    if deployed_bank is None and "adapted" in embeddings:
        excluded["adapted"] = NO_BANK_REASON
    criterion, scores = score_candidates(embeddings, deployed_bank, views)
    scores = {n: scores.get(n) for n in encoders}
    return encoders, choose_candidate(scores, excluded, criterion, config.keep_margin)
