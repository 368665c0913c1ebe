"""benchmarks/adapt.py: swapping the halves and pooling the folds (no data or teacher needed)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tests.conftest import PROJECT_ROOT

sys.path.append(str(PROJECT_ROOT / "benchmarks"))

from adapt import pool, summarize, swap_halves  # noqa: E402


def _row(clean, shifted, adapted, clean_after):
    return {"clean": clean, "shifted": shifted, "adapted": adapted, "clean_after": clean_after,
            "sec_per_step": 1.0, "plan": {"trainable": "lora"}}


def test_swapped_split_adapts_on_the_scored_half_and_scores_the_adapted_one():
    split = {"adapt_x": np.zeros(2), "adapt_y": np.array([0, 1]), "eval_x": np.ones(2),
             "eval_y": np.array([2, 3]), "bank_x": np.full(3, 7), "bank_y": np.arange(3)}
    swapped = swap_halves(split)
    assert swapped["adapt_x"] is split["eval_x"] and swapped["eval_x"] is split["adapt_x"]
    assert swapped["eval_y"] is split["adapt_y"] and swapped["bank_x"] is split["bank_x"]
    assert swap_halves(swapped) == split


def test_pooled_accuracies_are_the_accuracy_on_both_halves():
    folds = [{"noise": _row(0.70, 0.40, 0.60, 0.69)}, {"noise": _row(0.72, 0.44, 0.66, 0.70)}]
    pooled = pool(folds)["noise"]
    assert pooled["clean"] == pytest.approx(0.71) and pooled["shifted"] == pytest.approx(0.42)
    assert pooled["adapted"] == pytest.approx(0.63) and pooled["clean_after"] == pytest.approx(0.695)
    assert pooled["plan"] == {"trainable": "lora"} and len(pooled["by_fold"]) == 2
    assert pool(folds[:1]) is folds[0]


def test_ratios_of_shifts_under_the_noise_floor_stay_out_of_the_significant_mean():
    rows = {"noise": _row(0.70, 0.40, 0.55, 0.70), "brightness": _row(0.70, 0.69, 0.60, 0.70)}
    stats = summarize(rows, 0.70, eval_images=1000)
    assert stats["recovery_frac"] == pytest.approx((0.5 - 9.0) / 2)
    assert stats["recovery_frac_significant"] == pytest.approx(0.5)


def test_default_corruptions_are_the_contracts_five_and_cifar10c_names_the_twelve():
    from adapt import parse_args

    from edge_ssl.data.corruptions import BENCHMARK_CORRUPTIONS, CIFAR10C_CORRUPTIONS

    assert parse_args([]).corruptions == list(BENCHMARK_CORRUPTIONS)
    assert parse_args(["--corruptions", "cifar10c", "saturate"]).corruptions == [*CIFAR10C_CORRUPTIONS, "saturate"]
    with pytest.raises(SystemExit):
        parse_args(["--corruptions", "frost"])  # not implemented: refused by name


def test_validation_names_held_out_corruptions_that_no_benchmark_set_contains():
    from adapt import parse_args

    from edge_ssl.data.corruptions import CIFAR10C_CORRUPTIONS, VALIDATION_CORRUPTIONS

    chosen = parse_args(["--corruptions", "validation", "speckle_noise"]).corruptions
    assert chosen == list(VALIDATION_CORRUPTIONS)  # expanded once, no repeats
    assert not set(chosen) & set(CIFAR10C_CORRUPTIONS)


def test_default_bn_priors_include_the_runs_own_prior_and_an_empty_list_skips_them():
    from adapt import parse_args, priors_to_measure

    assert priors_to_measure(parse_args([]).bn_priors, 0.7) == [0.0, 0.25, 0.5, 0.7, 0.75]
    assert priors_to_measure(parse_args([]).bn_priors, 0.5) == [0.0, 0.25, 0.5, 0.75]
    assert priors_to_measure(parse_args(["--bn-priors"]).bn_priors, 0.7) == []
    assert priors_to_measure(parse_args(["--bn-priors", "0.3"]).bn_priors, 0.7) == [0.3]


def test_bn_priors_outside_zero_to_one_are_refused_before_any_work(capsys):
    from adapt import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--bn-priors", "0.5", "1.5"])
    assert "--bn-priors must be in [0, 0.999]" in capsys.readouterr().err


def test_recentring_moves_the_target_embedding_statistics_to_the_source():
    from adapt_recentre import shift

    rng = np.random.default_rng(0)
    emb = rng.normal(3.0, 2.0, (400, 8))
    target = (emb.mean(0), emb.std(0))
    source = (np.full(8, -1.0), np.full(8, 0.5))
    assert shift(emb, "none", target, source) is emb
    np.testing.assert_allclose(shift(emb, "mean", target, source).mean(0), source[0])
    np.testing.assert_allclose(shift(emb, "mean_half", target, source).mean(0), (target[0] + source[0]) / 2)
    matched = shift(emb, "meanstd", target, source)
    np.testing.assert_allclose(matched.mean(0), source[0], atol=1e-12)
    np.testing.assert_allclose(matched.std(0), source[1])


def test_replay_images_come_from_the_bank_and_never_from_the_test_halves():
    from adapt import replay_from_bank

    rng = np.random.default_rng(0)
    split = {"adapt_x": rng.integers(0, 255, (8, 4, 4, 3), dtype=np.uint8),
             "eval_x": rng.integers(0, 255, (8, 4, 4, 3), dtype=np.uint8),
             "bank_x": np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1).repeat(3, axis=3),
             "bank_y": np.repeat(np.arange(4), 10)}
    replay, labels = replay_from_bank(split, 8, seed=0)
    drawn = replay[:, 0, 0, 0]
    assert len(set(drawn.tolist())) == 8 and set(drawn.tolist()) <= set(range(40))  # bank images only
    assert np.array_equal(labels, split["bank_y"][drawn])  # each with its own label
    assert np.array_equal(replay, replay_from_bank(split, 8, seed=0)[0])  # seeded
    with pytest.raises(SystemExit, match="only 40"):
        replay_from_bank(split, 41, seed=0)
