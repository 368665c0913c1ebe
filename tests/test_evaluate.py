"""Tests for edge_ssl.evaluate: kNN, linear probe, collapse health, embedding, end to end."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from edge_ssl import evaluate as ev
from edge_ssl.config import config_from_dict
from edge_ssl.data.sources import ImageDataset
from edge_ssl.errors import ConfigError, DataError
from edge_ssl.evaluate import (
    EvalConfig,
    EvalResult,
    embed,
    embedding_health,
    evaluate_encoder,
    knn_top1,
    linear_probe_top1,
)
from edge_ssl.spec import CIFAR_MEAN, CIFAR_STD, EncoderSpec, InputSpec
from edge_ssl.tensors import preprocess

# Tolerances, in one place.
EMBED_ATOL = 1e-5  # float32 conv results across batch sizes
RANK_ATOL = 1e-6  # effective rank of exactly low-rank matrices
STD_RTOL = 0.05  # per-dimension std of random Gaussian embeddings vs 1/sqrt(D)
CHANCE_MARGIN = 0.1  # random-label probe accuracy vs 1/C


# --------------------------------------------------------------------------- references / fixtures


def reference_knn_predictions(train, train_labels, test, k, temperature, num_classes):
    """Wu et al. 2018 weighted kNN written as a plain loop (float64, full sort, no chunks)."""
    predictions = []
    for query in test:
        sims = []
        for row in train:
            sims.append(float(query @ row) / (np.linalg.norm(query) * np.linalg.norm(row)))
        order = sorted(range(len(train)), key=lambda i: -sims[i])[: min(k, len(train))]
        scores = [0.0] * num_classes
        for i in order:
            scores[int(train_labels[i])] += math.exp(sims[i] / temperature)
        predictions.append(max(range(num_classes), key=lambda c: (scores[c], -c)))
    return np.array(predictions)


def knn_predictions(train, train_labels, test, num_classes, **kwargs):
    """Recover knn_top1's per-row prediction: the one label for which the row scores 1.0."""
    predictions = []
    for row in test:
        hits = [
            c
            for c in range(num_classes)
            if knn_top1(
                train, train_labels, row[None], np.array([c]), num_classes=num_classes, **kwargs
            )
            == 1.0
        ]
        assert len(hits) == 1
        predictions.append(hits[0])
    return np.array(predictions)


def clustered(rng, num, dim, num_classes, spread):
    """Gaussian blobs around random class centres; ``spread`` is the noise std."""
    centres = rng.normal(size=(num_classes, dim))
    labels = rng.integers(0, num_classes, size=num)
    return centres[labels] + spread * rng.normal(size=(num, dim)), labels


class TinyEncoder(nn.Module):
    """conv -> BN -> ReLU -> pool -> linear, with the spec an edge-ssl encoder carries."""

    def __init__(self, embed_dim: int = 6, image_size: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(8, embed_dim)
        self.spec = EncoderSpec(
            arch="tiny-test",
            input=InputSpec((3, image_size, image_size), CIFAR_MEAN, CIFAR_STD),
            embed_dim=embed_dim,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def tiny_encoder(seed: int = 0) -> TinyEncoder:
    torch.manual_seed(seed)
    encoder = TinyEncoder()
    # Non-trivial running stats, so eval mode (running stats) differs from train mode (batch stats).
    with torch.no_grad():
        encoder.features[1].running_mean.uniform_(-0.5, 0.5)
        encoder.features[1].running_var.uniform_(0.5, 2.0)
    return encoder


@dataclass
class DuckImages:
    """Only the surface evaluate_encoder reads, without ImageDataset's own checks."""

    images: np.ndarray
    labels: np.ndarray | None
    num_classes: int | None


def labeled(images, labels, class_names=("red", "green", "blue"), source="colours"):
    return ImageDataset(images=images, labels=labels, class_names=class_names, source=source)


def colour_images(rng, per_class: int, size: int = 32):
    """Three classes of noisy red, green and blue images: easy for any conv encoder."""
    images, labels = [], []
    for label in range(3):
        base = np.full((per_class, size, size, 3), 40.0)
        base[..., label] = 200.0
        noisy = base + rng.normal(scale=25.0, size=base.shape)
        images.append(np.clip(noisy, 0, 255).astype(np.uint8))
        labels.append(np.full(per_class, label, dtype=np.int64))
    order = rng.permutation(3 * per_class)
    return np.concatenate(images)[order], np.concatenate(labels)[order]


def state_snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


# --------------------------------------------------------------------------- kNN


@pytest.mark.parametrize(("k", "temperature"), [(1, 0.07), (5, 0.07), (20, 0.5), (7, 0.01)])
def test_knn_matches_loop_reference_per_prediction(k, temperature):
    rng = np.random.default_rng(k)
    train, train_labels = clustered(rng, 120, 8, 4, spread=1.5)
    test, _ = clustered(rng, 30, 8, 4, spread=1.5)
    expected = reference_knn_predictions(train, train_labels, test, k, temperature, 4)
    got = knn_predictions(train, train_labels, test, 4, k=k, temperature=temperature)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_knn_accuracy_matches_reference_on_random_data_for_any_chunk(chunk):
    rng = np.random.default_rng(1)
    train = rng.normal(size=(300, 16))
    train_labels = rng.integers(0, 5, size=300)
    test = rng.normal(size=(97, 16))
    test_labels = rng.integers(0, 5, size=97)
    expected = reference_knn_predictions(train, train_labels, test, 10, 0.07, 5)
    got = knn_top1(train, train_labels, test, test_labels, k=10, chunk=chunk)
    assert got == pytest.approx(np.mean(expected == test_labels), abs=0)


def test_knn_accuracy_on_structured_data_matches_reference():
    rng = np.random.default_rng(2)
    train, train_labels = clustered(rng, 400, 12, 6, spread=2.0)
    test, test_labels = clustered(rng, 150, 12, 6, spread=2.0)
    expected = np.mean(
        reference_knn_predictions(train, train_labels, test, 20, 0.07, 6) == test_labels
    )
    assert 0.0 < expected < 1.0  # the case must be neither trivial nor hopeless
    assert knn_top1(train, train_labels, test, test_labels, k=20) == pytest.approx(expected, abs=0)


def test_knn_two_separated_clusters_is_perfect():
    rng = np.random.default_rng(3)
    centres = np.array([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    train_labels = np.repeat([0, 1], 50)
    test_labels = np.repeat([0, 1], 20)
    train = centres[train_labels] + rng.normal(size=(100, 3))
    test = centres[test_labels] + rng.normal(size=(40, 3))
    for k in (1, 20, 50):
        assert knn_top1(train, train_labels, test, test_labels, k=k) == 1.0


@pytest.mark.parametrize("label_on_first_axis", [0, 1])
def test_knn_equidistant_point_tie_goes_to_lowest_class(label_on_first_axis):
    # One train point per class on orthogonal axes; the test point is on the diagonal, so both
    # neighbours have similarity 1/sqrt(2) and equal weight, whichever axis holds which class.
    train = np.array([[1.0, 0.0], [0.0, 1.0]])
    train_labels = np.array([label_on_first_axis, 1 - label_on_first_axis])
    test = np.array([[1.0, 1.0]])
    assert knn_top1(train, train_labels, test, np.array([0]), k=2) == 1.0
    assert knn_top1(train, train_labels, test, np.array([1]), k=2) == 0.0


@pytest.mark.parametrize("nearest", [0, 1])
def test_knn_temperature_decides_between_nearest_and_majority(nearest):
    # One neighbour of class `nearest` at similarity 1, two of the other class at 0.8 (3-4-5
    # triangle). The nearest wins iff exp(1/T) > 2 exp(0.8/T), i.e. T < 0.2 / ln 2; above that
    # the majority wins. Both label layouts, so a tie-break cannot pass for a correct vote.
    majority = 1 - nearest
    train = np.array([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    train_labels = np.array([nearest, majority, majority])
    test = np.array([[1.0, 0.0]])
    crossover = 0.2 / math.log(2.0)

    def prediction(temperature):
        return knn_predictions(train, train_labels, test, 2, k=3, temperature=temperature)[0]

    assert prediction(0.07) == nearest
    assert prediction(crossover * 0.95) == nearest
    assert prediction(crossover * 1.05) == majority
    assert prediction(100.0) == majority
    # exp(1/T) overflows float64 here: both classes would score inf and tie unless shifted.
    with np.errstate(over="raise"):
        assert prediction(1e-4) == nearest


def test_knn_k_larger_than_train_set_is_clamped():
    rng = np.random.default_rng(4)
    train, train_labels = clustered(rng, 10, 4, 3, spread=1.0)
    test, test_labels = clustered(rng, 50, 4, 3, spread=1.0)
    clamped = knn_top1(train, train_labels, test, test_labels, k=10_000, temperature=0.3)
    assert clamped == knn_top1(train, train_labels, test, test_labels, k=10, temperature=0.3)
    expected = reference_knn_predictions(train, train_labels, test, 10, 0.3, 3)
    assert clamped == pytest.approx(np.mean(expected == test_labels), abs=0)


def test_knn_ignores_embedding_scale():
    rng = np.random.default_rng(5)
    train, train_labels = clustered(rng, 200, 8, 4, spread=1.5)
    test, test_labels = clustered(rng, 60, 8, 4, spread=1.5)
    scaled_train = train * rng.uniform(0.1, 10.0, size=(200, 1))
    scaled_test = test * rng.uniform(0.1, 10.0, size=(60, 1))
    assert knn_top1(train, train_labels, test, test_labels, k=15) == knn_top1(
        scaled_train, train_labels, scaled_test, test_labels, k=15
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k": 0},
        {"k": 2.5},
        {"k": True},
        {"temperature": 0.0},
        {"temperature": float("nan")},
        {"chunk": 0},
    ],
)
def test_knn_rejects_bad_settings(kwargs):
    x = np.eye(3)
    y = np.arange(3)
    settings = {"k": 1, **kwargs}
    with pytest.raises(ConfigError):
        knn_top1(x, y, x, y, **settings)


@pytest.mark.parametrize(
    ("train", "train_labels", "test", "test_labels", "message"),
    [
        (np.eye(3), np.arange(3), np.eye(4), np.arange(4), "differ in size"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), np.eye(3), np.arange(3), "non-empty"),
        (np.eye(3), np.arange(2), np.eye(3), np.arange(3), "3 labels"),
        (np.eye(3), np.array([0.0, 1.0, 2.0]), np.eye(3), np.arange(3), "integer"),
        (np.eye(3), np.array([0, -1, 2]), np.eye(3), np.arange(3), ">= 0"),
        (np.full((3, 3), np.nan), np.arange(3), np.eye(3), np.arange(3), "NaN"),
    ],
)
def test_knn_rejects_bad_data(train, train_labels, test, test_labels, message):
    with pytest.raises(DataError, match=message):
        knn_top1(train, train_labels, test, test_labels, k=1)


def test_knn_num_classes_must_cover_labels():
    x = np.eye(3)
    y = np.arange(3)
    assert knn_top1(x, y, x, y, k=1, num_classes=10) == 1.0
    with pytest.raises(DataError, match="num_classes"):
        knn_top1(x, y, x, y, k=1, num_classes=2)


# --------------------------------------------------------------------------- linear probe


def test_linear_probe_separable_blobs_is_near_perfect():
    rng = np.random.default_rng(6)
    centres = 6.0 * np.eye(3, 8)
    train_labels = rng.integers(0, 3, size=300)
    test_labels = rng.integers(0, 3, size=150)
    train = centres[train_labels] + rng.normal(size=(300, 8))
    test = centres[test_labels] + rng.normal(size=(150, 8))
    assert linear_probe_top1(train, train_labels, test, test_labels) >= 0.98


def test_linear_probe_random_labels_is_near_chance():
    rng = np.random.default_rng(7)
    train, test = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    train_labels, test_labels = rng.integers(0, 4, size=400), rng.integers(0, 4, size=400)
    accuracy = linear_probe_top1(train, train_labels, test, test_labels)
    assert abs(accuracy - 0.25) < CHANCE_MARGIN


def test_linear_probe_is_deterministic_for_a_seed():
    rng = np.random.default_rng(8)
    train, train_labels = clustered(rng, 200, 8, 4, spread=2.0)
    test, test_labels = clustered(rng, 100, 8, 4, spread=2.0)
    first = linear_probe_top1(train, train_labels, test, test_labels, seed=3)
    assert first == linear_probe_top1(train, train_labels, test, test_labels, seed=3)


def test_linear_probe_needs_two_classes_and_valid_settings():
    x = np.eye(4)
    with pytest.raises(DataError, match="at least 2 classes"):
        linear_probe_top1(x, np.zeros(4, dtype=int), x, np.zeros(4, dtype=int))
    y = np.array([0, 1, 0, 1])
    with pytest.raises(ConfigError, match="max_iter"):
        linear_probe_top1(x, y, x, y, max_iter=0)
    with pytest.raises(ConfigError, match="seed"):
        linear_probe_top1(x, y, x, y, seed=-1)


# --------------------------------------------------------------------------- collapse health


def test_health_random_gaussian_is_spread():
    dim = 32
    health = embedding_health(np.random.default_rng(9).normal(size=(4000, dim)))
    assert not health.collapsed
    assert health.embed_dim == dim
    assert health.uniform_std == pytest.approx(1 / math.sqrt(dim))
    assert health.dim_std_mean == pytest.approx(1 / math.sqrt(dim), rel=STD_RTOL)
    assert health.dim_std_min == pytest.approx(1 / math.sqrt(dim), rel=STD_RTOL)
    assert 0.97 * dim < health.effective_rank <= dim


def test_health_identical_embeddings_are_collapsed():
    rows = np.tile(np.random.default_rng(10).normal(size=16), (200, 1))
    health = embedding_health(rows)
    assert health.collapsed
    assert health.effective_rank == pytest.approx(1.0, abs=RANK_ATOL)
    assert health.dim_std_mean < 1e-6


def test_health_all_zero_embeddings_are_collapsed_with_rank_zero():
    health = embedding_health(np.zeros((50, 8)))
    assert health.collapsed
    assert health.effective_rank == 0.0
    assert health.dim_std_mean == 0.0


def test_health_rank_two_embeddings_have_effective_rank_at_most_two():
    rng = np.random.default_rng(11)
    rows = rng.normal(size=(500, 2)) @ rng.normal(size=(2, 32))
    health = embedding_health(rows)
    assert 1.5 < health.effective_rank <= 2.0 + RANK_ATOL


def test_health_effective_rank_analytic_values():
    # Orthonormal rows: D equal singular values, entropy log D.
    assert embedding_health(np.eye(6)).effective_rank == pytest.approx(6.0, abs=RANK_ATOL)
    # Four rows on e1 and one on e2: singular values 2 and 1, p = (2/3, 1/3).
    rows = np.array([[1.0, 0.0]] * 4 + [[0.0, 3.0]])
    p = np.array([2 / 3, 1 / 3])
    expected = math.exp(-float(np.sum(p * np.log(p))))
    assert embedding_health(rows).effective_rank == pytest.approx(expected, abs=RANK_ATOL)


def test_health_antipodal_clusters_are_collapsed_by_rank_not_std():
    # Rows +v and -v: the std looks spread but every embedding lies on one line.
    v = np.random.default_rng(12).normal(size=16)
    health = embedding_health(np.concatenate([np.tile(v, (50, 1)), np.tile(-v, (50, 1))]))
    assert health.dim_std_mean > ev.COLLAPSE_STD_RATIO * health.uniform_std
    assert health.effective_rank == pytest.approx(1.0, abs=RANK_ATOL)
    assert health.collapsed


@pytest.mark.parametrize(("spread", "collapsed"), [(0.1, False), (0.03, False), (1e-3, True)])
def test_health_shared_mean_direction_collapses_only_when_spread_vanishes(spread, collapsed):
    # Post-ReLU backbone features: one positive mean direction plus a spread around it.
    rng = np.random.default_rng(23)
    mean = np.abs(rng.normal(size=64))
    rows = mean + spread * mean.mean() * rng.normal(size=(500, 64))
    assert embedding_health(rows).collapsed is collapsed


def test_health_fewer_rows_than_dims_and_scale_invariance():
    rows = np.random.default_rng(13).normal(size=(5, 64))
    health = embedding_health(rows)
    assert 4.0 < health.effective_rank <= 5.0 + RANK_ATOL
    scaled = embedding_health(rows * np.arange(1, 6)[:, None])
    assert scaled.effective_rank == pytest.approx(health.effective_rank)
    assert scaled.dim_std_mean == pytest.approx(health.dim_std_mean)


def test_health_rejects_too_few_or_bad_embeddings():
    with pytest.raises(DataError, match="at least 2"):
        embedding_health(np.ones((1, 4)))
    with pytest.raises(DataError, match="NaN"):
        embedding_health(np.array([[1.0, np.inf], [0.0, 1.0]]))


def test_health_to_dict_is_json():
    data = embedding_health(np.random.default_rng(14).normal(size=(20, 4))).to_dict()
    assert set(data) == {
        "dim_std_mean",
        "dim_std_min",
        "uniform_std",
        "effective_rank",
        "embed_dim",
        "collapsed",
    }
    assert json.loads(json.dumps(data)) == data


# --------------------------------------------------------------------------- embed


def test_embed_shape_and_same_result_for_any_batch_size():
    encoder = tiny_encoder()
    images = np.random.default_rng(15).integers(0, 256, size=(10, 32, 32, 3), dtype=np.uint8)
    full = embed(encoder, images, batch_size=64)
    assert full.shape == (10, 6)
    assert full.dtype == np.float32
    for batch_size in (1, 3):
        np.testing.assert_allclose(
            embed(encoder, images, batch_size=batch_size), full, atol=EMBED_ATOL
        )


def test_embed_uses_eval_mode_and_preprocess():
    encoder = tiny_encoder()
    images = np.random.default_rng(16).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    got = embed(encoder, images)
    reference = tiny_encoder().eval()
    with torch.no_grad():
        expected = reference(preprocess(images, reference.spec.input)).numpy()
    np.testing.assert_allclose(got, expected, atol=EMBED_ATOL)


def test_embed_restores_modes_and_leaves_the_encoder_unchanged():
    encoder = tiny_encoder().train()
    encoder.features[1].eval()  # a frozen BN inside a training model must stay frozen
    modes = {name: module.training for name, module in encoder.named_modules()}
    before = state_snapshot(encoder)
    images = np.random.default_rng(17).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    embed(encoder, images, batch_size=4)
    assert {name: module.training for name, module in encoder.named_modules()} == modes
    after = state_snapshot(encoder)
    assert all(torch.equal(before[name], after[name]) for name in before)

    encoder.eval()
    embed(encoder, images)
    assert not any(module.training for module in encoder.modules())


def test_embed_restores_modes_when_the_forward_fails():
    class Failing(TinyEncoder):
        def forward(self, x):
            raise RuntimeError("boom")

    encoder = Failing().train()
    with pytest.raises(RuntimeError, match="boom"):
        embed(encoder, np.zeros((2, 16, 16, 3), dtype=np.uint8))
    assert all(module.training for module in encoder.modules())


def test_embed_empty_and_bad_inputs():
    encoder = tiny_encoder()
    assert embed(encoder, np.zeros((0, 32, 32, 3), dtype=np.uint8)).shape == (0, 6)
    with pytest.raises(DataError, match="uint8"):
        embed(encoder, np.zeros((2, 32, 32, 3), dtype=np.float32))
    with pytest.raises(DataError, match="uint8"):
        embed(encoder, np.zeros((2, 3, 32, 32), dtype=np.uint8))
    with pytest.raises(ConfigError, match="batch_size"):
        embed(encoder, np.zeros((2, 32, 32, 3), dtype=np.uint8), batch_size=0)


def test_embed_checks_the_encoder_contract():
    plain = nn.Sequential(nn.Flatten(), nn.LazyLinear(4))
    with pytest.raises(ConfigError, match="spec"):
        embed(plain, np.zeros((2, 16, 16, 3), dtype=np.uint8))

    wrong_dim = tiny_encoder()
    wrong_dim.spec = EncoderSpec(arch="tiny-test", input=wrong_dim.spec.input, embed_dim=7)
    with pytest.raises(ConfigError, match="embed_dim=7"):
        embed(wrong_dim, np.zeros((2, 16, 16, 3), dtype=np.uint8))

    class TupleOut(TinyEncoder):
        def forward(self, x):
            return super().forward(x), x

    with pytest.raises(ConfigError, match="one \\(N, D\\) tensor"):
        embed(TupleOut(), np.zeros((2, 16, 16, 3), dtype=np.uint8))


# --------------------------------------------------------------------------- devices


# The device names themselves are tested in tests/test_device.py.


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to torch")
def test_embed_on_cuda_matches_cpu_and_leaves_encoder_on_cpu():
    encoder = tiny_encoder()
    images = np.random.default_rng(18).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    on_gpu = embed(encoder, images, device="cuda")
    assert all(p.device.type == "cpu" for p in encoder.parameters())
    np.testing.assert_allclose(on_gpu, embed(encoder, images), atol=1e-4)


# --------------------------------------------------------------------------- config


def test_eval_config_defaults_and_normalization():
    assert EvalConfig(knn_k=[10, 5]).knn_k == (10, 5)
    assert config_from_dict(EvalConfig, {"knn_k": [7], "probe": False}).knn_k == (7,)


@pytest.mark.parametrize(
    "overrides",
    [
        {"knn_k": ()},
        {"knn_k": 20},
        {"knn_k": (0,)},
        {"knn_k": (20, 20)},
        {"knn_k": (2.5,)},
        {"knn_temperature": 0.0},
        {"knn_temperature": -1.0},
        {"knn_temperature": float("inf")},
        {"probe": "yes"},
        {"probe_max_iter": 0},
        {"batch_size": 0},
        {"batch_size": True},
        {"device": "gpu"},
        {"device": "cuda:-1"},
        {"seed": -1},
        {"seed": 2**32},
    ],
)
def test_eval_config_rejects_invalid_values(overrides):
    with pytest.raises(ConfigError):
        EvalConfig(**overrides)


# --------------------------------------------------------------------------- end to end


def test_evaluate_encoder_end_to_end():
    rng = np.random.default_rng(19)
    train_images, train_labels = colour_images(rng, per_class=20)
    test_images, test_labels = colour_images(rng, per_class=8)
    train = labeled(train_images, train_labels, source="colours train")
    test = labeled(test_images, test_labels, source="colours test")
    encoder = tiny_encoder().train()
    before = state_snapshot(encoder)
    config = EvalConfig(knn_k=(5, 200), batch_size=16, device="cpu")

    result = evaluate_encoder(encoder, train, test, config)

    assert isinstance(result, EvalResult)
    assert set(result.knn_top1) == {5, 200}
    assert result.knn_top1[5] >= 0.9
    assert 0.0 <= result.knn_top1[200] <= 1.0
    assert result.linear_probe_top1 is not None and result.linear_probe_top1 >= 0.9
    assert (result.num_train, result.num_test, result.num_classes) == (60, 24, 3)
    assert result.health.embed_dim == 6
    assert result.seconds > 0
    assert all(module.training for module in encoder.modules())
    after = state_snapshot(encoder)
    assert all(torch.equal(before[name], after[name]) for name in before)

    data = json.loads(json.dumps(result.to_dict()))
    assert set(data["knn_top1"]) == {"5", "200"}
    assert data["num_classes"] == 3
    assert data["health"]["embed_dim"] == 6


def test_evaluate_encoder_without_probe_and_declared_classes():
    rng = np.random.default_rng(20)
    images, labels = colour_images(rng, per_class=4)
    names = ("red", "green", "blue", "cyan", "pink")  # the last two classes have no images
    data = labeled(images, labels, class_names=names)
    result = evaluate_encoder(
        tiny_encoder(), data, data, EvalConfig(knn_k=(1,), probe=False, device="cpu")
    )
    assert result.linear_probe_top1 is None
    assert result.knn_top1 == {1: 1.0}  # each test image is its own nearest neighbour
    assert result.num_classes == 5


@pytest.mark.parametrize("role", ["train", "test"])
def test_evaluate_encoder_needs_labels(role):
    images, labels = colour_images(np.random.default_rng(21), per_class=2)
    with_labels = labeled(images, labels)
    unlabeled = ImageDataset(images=images, labels=None, class_names=None, source="flat/folder")
    train, test = (unlabeled, with_labels) if role == "train" else (with_labels, unlabeled)
    with pytest.raises(DataError, match=f"needs class labels, but the {role} data") as info:
        evaluate_encoder(tiny_encoder(), train, test, EvalConfig(device="cpu"))
    message = str(info.value)
    assert "flat/folder" in message and "subfolder per class" in message and ".npz" in message


def test_evaluate_encoder_rejects_empty_mismatched_or_misnamed_data():
    images, labels = colour_images(np.random.default_rng(22), per_class=2)
    with_labels = labeled(images, labels)
    config = EvalConfig(device="cpu", probe=False)
    empty = labeled(images[:0], labels[:0], source="empty.npz")
    with pytest.raises(DataError, match="test data \\(empty.npz\\) is empty"):
        evaluate_encoder(tiny_encoder(), with_labels, empty, config)
    with pytest.raises(DataError, match="train data \\(empty.npz\\) is empty"):
        evaluate_encoder(tiny_encoder(), empty, with_labels, config)
    short = DuckImages(images, labels[:-1], 3)  # ImageDataset itself refuses this
    with pytest.raises(DataError, match="6 labels"):
        evaluate_encoder(tiny_encoder(), short, with_labels, config)
    swapped = labeled(images, labels, class_names=("green", "red", "blue"))
    with pytest.raises(DataError, match="name their classes differently"):
        evaluate_encoder(tiny_encoder(), with_labels, swapped, config)
    with pytest.raises(ConfigError, match="EvalConfig"):
        evaluate_encoder(tiny_encoder(), with_labels, with_labels, {"probe": False})


def test_evaluate_encoder_accepts_any_object_with_the_dataset_surface():
    images, labels = colour_images(np.random.default_rng(24), per_class=3)
    data = DuckImages(images, labels, None)
    result = evaluate_encoder(
        tiny_encoder(), data, data, EvalConfig(knn_k=(1,), probe=False, device="cpu")
    )
    assert result.num_classes == 3
    assert result.knn_top1 == {1: 1.0}
