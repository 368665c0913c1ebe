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
