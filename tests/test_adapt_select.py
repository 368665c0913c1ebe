"""Never worse than not adapting: the kept weights are the best of unadapted, AdaBN alone and adapted."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edge_ssl.adapt.api import AdaptConfig, adapt
from edge_ssl.adapt.select import (
    NO_BANK_REASON,
    DeployedBank,
    choose_candidate,
    keep_best,
    knn_information,
)
from edge_ssl.bundle import write_encoder_bundle
from edge_ssl.data.sources import ImageDataset, embedded_default
from edge_ssl.models import create_encoder, load_encoder

FAST = {"steps": 2, "batch_size": 8, "head_dim": 32, "device": "cpu", "guard_every": 1}


def test_knn_information_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    bank = DeployedBank(rng.normal(size=(30, 8)).astype(np.float32), rng.integers(0, 3, 30))
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    sim = unit(queries) @ unit(bank.embeddings).T
    votes = []
    for row in sim:
        top = np.argsort(-row)[:4]
        w = np.exp((row[top] - row[top].max()) / 0.07)
        votes.append(np.bincount(bank.labels[top], weights=w, minlength=3) / w.sum())
    votes = np.array(votes)
    entropy = lambda p: -(p[p > 0] * np.log(p[p > 0])).sum()  # noqa: E731
    expected = (entropy(votes.mean(0)) - np.mean([entropy(v) for v in votes])) / np.log(3)
    assert knn_information(queries, bank, k=4) == pytest.approx(expected, rel=1e-5)
    # sure votes spread over both classes: full information; sure votes all for one class: none
    two = DeployedBank(np.eye(4, dtype=np.float32), np.array([0, 0, 1, 1]))
    spread = np.array([[1, 0.9, 0, 0], [0, 0, 1, 0.9]], np.float32)
    assert knn_information(spread, two, k=2) == pytest.approx(1.0)
    assert knn_information(spread[[0, 0]], two, k=2) == pytest.approx(0.0, abs=1e-9)


def test_a_more_complex_candidate_must_beat_the_simpler_one_and_pass_the_guard():
    scores = {"unadapted": 0.50, "adabn": 0.60, "adapted": 0.61}
    assert choose_candidate(scores, {}, "c").kept == "adapted"
    assert choose_candidate(scores, {}, "c", margin=0.02).kept == "adabn"
    assert choose_candidate(scores, {"adapted": "collapsed"}, "c").kept == "adabn"
    assert choose_candidate({**scores, "unadapted": 0.7}, {}, "c").kept == "unadapted"
    assert choose_candidate({**scores, "adabn": 0.5, "adapted": 0.5}, {}, "c").kept == "unadapted"


@pytest.fixture(scope="module")
def digits():
    data = embedded_default()
    return data.images, np.asarray(data.labels)


@pytest.fixture(scope="module")
def deployed(digits, tmp_path_factory):
    """A small encoder whose BN statistics were set on the clean digits (its training domain)."""
    from edge_ssl.adapt.bn import reestimate_bn_stats
    from edge_ssl.adapt.step import iterate_batches

    torch.manual_seed(0)
    encoder = create_encoder("resnet18_cifar", width=0.25).eval()
    with torch.no_grad():
        reestimate_bn_stats(encoder, iterate_batches(digits[0][:600], 64, torch.device("cpu"),
                                                     encoder.spec.input))
    return write_encoder_bundle(tmp_path_factory.mktemp("sel") / "d.edge", encoder, lineage=())


def _shift(images: np.ndarray) -> np.ndarray:
    """A strong contrast and brightness shift: what AdaBN is for."""
    return np.clip(images.astype(np.float32) * 0.25 + 150, 0, 255).astype(np.uint8)


def test_keeps_the_renormalized_model_when_it_helps_and_the_deployed_one_when_it_hurts(digits, deployed):
    from edge_ssl.adapt.bn import reestimate_bn_stats
    from edge_ssl.adapt.step import iterate_batches

    images, labels = digits
    local, hold = _shift(images[600:900]), _shift(images[900:1000])
    bank = (images[1000:1400], labels[1000:1400])
    cpu = torch.device("cpu")
    helped = load_encoder(deployed)
    with torch.no_grad():
        reestimate_bn_stats(helped, iterate_batches(local, 64, cpu, helped.spec.input))
    config = AdaptConfig(bn_stats=False, min_agreement=-1.0, min_rank_ratio=0.0, device="cpu")
    _, kept = keep_best(helped, load_encoder(deployed), config, local, hold, bank, cpu)
    assert kept.kept == "adapted" and kept.criterion == "knn_information"
    hurt = copy.deepcopy(helped)
    with torch.no_grad():  # what a diverged step leaves: weights far from anything trained
        for p in hurt.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    _, kept = keep_best(hurt, load_encoder(deployed), config, local, hold, bank, cpu)
    assert kept.kept == "unadapted", kept.scores
    with torch.no_grad():  # and one that diverged to NaN is never kept
        next(hurt.parameters()).fill_(float("nan"))
    _, kept = keep_best(hurt, load_encoder(deployed), config, local, hold, bank, cpu)
    assert kept.kept == "unadapted" and kept.excluded["adapted"] == "non-finite embeddings"


def test_a_run_with_a_huge_lr_writes_the_deployed_weights_and_says_so(digits, deployed, tmp_path):
    images, labels = digits
    config = AdaptConfig(trainable="full", lr=3.0, bn_stats=False, min_agreement=-1.0,
                         min_rank_ratio=0.0, **FAST)
    result = adapt(deployed, ImageDataset(images[:200], None, None, "digits"), tmp_path / "a.edge",
                   config, export="never", replay=images[1000:1400], replay_labels=labels[1000:1400])
    assert result.selection["kept"] == "unadapted", result.selection
    original, written = load_encoder(deployed).state_dict(), load_encoder(result.bundle).state_dict()
    assert all(torch.equal(original[k], written[k]) for k in original)
    entry = result.bundle.manifest.lineage[-1].settings
    assert entry["selection"]["kept"] == "unadapted"
    assert set(entry["selection"]["scores"]) == {"unadapted", "adapted"}
    assert result.bundle.manifest.metrics["adapt"]["selection"]["criterion"] == "knn_information"


def test_without_a_labeled_bank_the_criterion_is_view_consistency(digits, deployed, tmp_path):
    images, _ = digits
    result = adapt(deployed, ImageDataset(_shift(images[:200]), None, None, "digits"),
                   tmp_path / "a.edge", AdaptConfig(trainable="bn-stats", **FAST), export="never")
    selection = result.selection
    assert selection["criterion"] == "view_consistency"
    assert set(selection["scores"]) == {"unadapted", "adabn", "adapted"}
    # the steps train view agreement, so their weights are scored but never kept on this score
    assert selection["excluded"] == {"adapted": NO_BANK_REASON}
    assert selection["kept"] in ("unadapted", "adabn")


def test_the_step_cost_is_measured_here_and_predicted_for_the_board(digits, deployed, tmp_path):
    images, _ = digits
    result = adapt(deployed, ImageDataset(images[:200], None, None, "digits"), tmp_path / "a.edge",
                   AdaptConfig(trainable="lora", **FAST), export="never", profile="orin-nano-8gb")
    cost = result.bundle.manifest.metrics["adapt"]["device_cost"]
    assert cost["measured_host"]["sec_per_step"] > 0 and cost["measured_host"]["peak_step_mb"] > 0
    predicted = cost["predicted"]
    assert predicted["kind"] == "predicted" and "error" not in predicted, predicted
    assert predicted["sec_per_step"] > 0 and predicted["images_per_step"] == 16
