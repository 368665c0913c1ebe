"""benchmarks/compress.py: option checks that refuse before any data is read."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import PROJECT_ROOT

sys.path.append(str(PROJECT_ROOT / "benchmarks"))
# Loaded from its path: the name `compress` is the project's own compress package.
_spec = importlib.util.spec_from_file_location("compress_benchmark", PROJECT_ROOT / "benchmarks" / "compress.py")
compress = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compress)


def test_distill_cache_views_below_one_is_refused_before_any_work(tmp_path):
    missing = tmp_path / "no-such-data"
    with pytest.raises(SystemExit, match="--distill-cache-views must be >= 1"):
        compress.main(["--out", str(tmp_path / "r.json"), "--data", str(missing),
                       "--teacher", str(missing), "--distill-cache-views", "0"])
    assert not (tmp_path / "r.json").exists()


def test_an_unknown_setting_is_refused_and_values_keep_their_type():
    with pytest.raises(SystemExit, match="KEY one of"):
        compress.apply_overrides(compress.FULL, ["epoch=3"])
    changed = compress.apply_overrides(compress.FULL, ["epochs=5", "prune_ratio=0.4", "prune_importance=l2"])
    assert (changed["epochs"], changed["prune_ratio"], changed["prune_importance"]) == (5, 0.4, "l2")
    counts = compress.apply_overrides(compress.FULL, ["unlabeled=2000", "test=none"])
    assert counts["unlabeled"] == 2000 and isinstance(counts["unlabeled"], int) and counts["test"] is None


def test_validation_queries_are_held_out_of_training_and_the_bank(tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.setattr(compress, "VALIDATION_PER_FILE", 3)
    rng = np.random.default_rng(0)
    for i in range(4):
        np.savez(tmp_path / f"cifar10_train_{i}.npz", x=rng.integers(0, 255, (10, 32, 32, 3), dtype=np.uint8),
                 y=np.arange(10) % 10)
    np.savez(tmp_path / "cifar10_test.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.zeros(2))
    unlabeled, bank, held = compress.load_data(tmp_path, compress.FULL, validation=True)
    assert (len(unlabeled), len(bank), len(held)) == (28, 28, 12)
    seen = {img.tobytes() for img in bank.images} | {img.tobytes() for img in unlabeled.images}
    assert not any(img.tobytes() in seen for img in held.images)
