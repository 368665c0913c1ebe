"""One exit-code table for every command: user error 1, usage 2, internal error 3, Ctrl-C 130."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from edge_ssl import cli
from edge_ssl.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def _run(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    return info.value.code, capsys.readouterr().err.strip()


def _failing_encoders(monkeypatch, exc):
    import edge_ssl.models as models

    def boom(*_a, **_k):
        raise exc

    monkeypatch.setattr(models, "encoder_names", boom)


def test_a_permission_error_names_the_path_and_exits_1(monkeypatch, capsys):
    _failing_encoders(monkeypatch, PermissionError(errno.EACCES, "Permission denied", "/srv/ro/out.edge"))
    code, err = _run(["encoders"], capsys)
    assert code == 1
    assert err == ("error: permission denied: /srv/ro/out.edge (Permission denied); choose a "
                   "location you can write to, or fix its permissions.")


def test_a_full_disk_says_so(monkeypatch, capsys):
    _failing_encoders(monkeypatch, OSError(errno.ENOSPC, "No space left on device", "/data/x.onnx"))
    code, err = _run(["encoders"], capsys)
    assert code == 1 and "disk is full" in err and "/data/x.onnx" in err


def test_a_bug_exits_3_and_asks_for_the_traceback(monkeypatch, capsys):
    _failing_encoders(monkeypatch, KeyError("oops"))
    code, err = _run(["encoders"], capsys)
    assert code == 3 and "internal error KeyError" in err and "--debug" in err
    assert len(err.splitlines()) == 1


def test_usage_errors_exit_2(capsys):
    code, _ = _run(["encoders", "--no-such-flag"], capsys)
    assert code == 2


def test_the_docs_table_matches_the_codes():
    text = DOCS.read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\d+)` \| ([^|]+)\|", text, flags=re.M))
    assert {int(k) for k in rows} == {0, cli.EXIT_USER_ERROR, cli.EXIT_USAGE, cli.EXIT_INTERNAL,
                                      cli.EXIT_INTERRUPTED}
