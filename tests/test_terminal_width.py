"""Tables read cleanly in an 80-column terminal: no line is wider, no number is cut or wrapped."""

from __future__ import annotations

import pytest

from edge_ssl.cli import main

WIDTH = 80


def _printed(args, capsys, monkeypatch, width: int = WIDTH) -> list[str]:
    monkeypatch.setenv("COLUMNS", str(width))
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None)
    return capsys.readouterr().out.splitlines()


def assert_fits(lines: list[str], cells: list[str]) -> None:
    assert max(len(line) for line in lines) <= WIDTH, "\n".join(lines)
    text = "\n".join(lines)
    cut = [cell for cell in cells if cell not in text]
    assert not cut, f"cells wrapped or cut: {cut}"


def test_the_devices_table_fits_80_columns(capsys, monkeypatch):
    from edge_ssl.devices.profiles import load_profiles

    lines = _printed(["devices"], capsys, monkeypatch)
    names = list(load_profiles())
    assert_fits(lines, names + [p.compute_capability for p in load_profiles().values()])
    assert "…" not in "\n".join(lines)


def test_the_encoders_table_fits_80_columns(capsys, monkeypatch):
    from edge_ssl.models import encoder_names

    lines = _printed(["encoders"], capsys, monkeypatch)
    assert_fits(lines, list(encoder_names()))


@pytest.mark.parametrize("command", [["devices", "--json"], ["encoders", "--json"]])
def test_json_output_is_not_shaped_by_the_terminal(command, capsys, monkeypatch):
    import json

    narrow = json.loads("\n".join(_printed(command, capsys, monkeypatch)))
    main_out = _printed(command, capsys, monkeypatch, width=200)
    assert json.loads("\n".join(main_out)) == narrow


@pytest.mark.parametrize("board, device", [(None, None), ("orin-nano-8gb", None),
                                           ("orin-nano-8gb", "ssh://nvidia@orin-lab-07")])
def test_the_compress_table_fits_80_columns(board, device, capsys):
    """Large numbers in every column (a ResNet-50 teacher on a slow board) still fit."""
    from types import SimpleNamespace

    from edge_ssl.compress.stage_table import StageRow

    from edge_ssl.commands.compress import _print_table

    rows = [StageRow(name, "x.edge", 25_557_032, 4_111_514_624, 102_000_000, 0.7615, 123.45, "host", "fp32",
                     board=board, board_ms=45.678, board_interval_ms=[31.25, 66.5], board_precision="int8",
                     device=device, device_ms=51.234 if device else None, device_backend="onnxruntime")
            for name in ("teacher", "distill", "prune", "quantize")]
    _print_table(SimpleNamespace(rows=rows, chosen="quantize", message="targets met",
                                 bundle=SimpleNamespace(path="c.edge")))
    cells = ["25.56M", "4111.5M", "76.15", "123.45", "quantize *"]
    cells += ["45.678"] if board else []
    cells += ["51.234"] if device else (["31.25-66.50"] if board else [])
    assert_fits(capsys.readouterr().out.splitlines(), cells)
