"""`edge-ssl demo --quick` runs the whole pipeline end to end and only prints measured (or predicted) numbers."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest

from edge_ssl.cli import main
from edge_ssl.errors import ConfigError

STAGE_ROWS = ["teacher", "student", "pruned", "int8", "adapted"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One quick demo through the real CLI (--json), shared by the tests below."""
    out = tmp_path_factory.mktemp("demo") / "run"
    capture = pytest.MonkeyPatch()
    lines: list[str] = []
    capture.setattr("typer.echo", lambda message="", **kw: lines.append(str(message)))
    try:
        with pytest.raises(SystemExit) as done:
            main(["demo", "--quick", "--out", str(out), "--device", "cpu", "--json"])
    finally:
        capture.undo()
    assert done.value.code == 0
    return out, json.loads("\n".join(lines))


def test_every_stage_runs_and_lands_in_the_table(demo_run):
    out, report = demo_run
    assert report["skipped"] == {}, report["skipped"]
    rows = report["table"]["rows"]
    assert [row[0] for row in rows] == STAGE_ROWS
    columns = report["table"]["columns"]
    assert columns[:5] == ["stage", "params", "MACs", "size", "kNN top-1"]
    knn = [row[4] for row in rows]
    assert all(cell.endswith("%") for cell in knn), knn
    assert rows[3][3].endswith("KiB") and rows[3][3] != rows[2][3]  # the INT8 graph is smaller
    for stage, path in report["bundles"].items():
        assert (out / path.split("/")[-1]).is_dir(), stage


def test_latency_is_measured_for_every_stage_on_onnxruntime(demo_run):
    _, report = demo_run
    columns = report["table"]["columns"]
    ort = next(i for i, c in enumerate(columns) if c.startswith("ort") and "p50" in c)
    for row in report["table"]["rows"]:
        p50, p90 = (float(v) for v in row[ort].split(" / "))
        assert 0 < p50 <= p90
    assert report["table"]["rows"][0][ort + 1] == "1.00x"  # the teacher against itself


def test_predictions_are_labelled_and_kept_out_of_the_table(demo_run):
    _, report = demo_run
    assert report["table"]["predicted"], "the demo predicts Jetson latency when devices/ is installed"
    assert not any("predict" in c.lower() or "orin" in c.lower() for c in report["table"]["columns"])


def test_adaptation_runs_on_a_shifted_copy_and_is_measured_there(demo_run):
    _, report = demo_run
    assert 0.0 <= report["shifted"]["before"] <= 1.0
    assert 0.0 <= report["shifted"]["after"] <= 1.0


def test_the_report_is_written_and_holds_the_stage_table(demo_run):
    out, report = demo_run
    html = (out / "report.html").read_text(encoding="utf-8")
    ids = []

    class Ids(HTMLParser):
        def handle_starttag(self, tag, attrs):
            ids.append(dict(attrs).get("id"))

    Ids().feed(html)
    assert {"stage-table", "lineage-graph", "img-pareto", "img-adaptation"} <= set(ids)
    assert report["report"] == str(out / "report.html")


def test_a_file_as_out_is_refused_before_any_work(tmp_path):
    from edge_ssl.demo import run_demo

    target = tmp_path / "not-a-folder"
    target.write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        run_demo(target, quick=True)


def test_user_data_is_split_for_training_and_evaluation(tmp_path):
    import numpy as np

    from edge_ssl.demo import DEMO_FULL, demo_data

    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, x=rng.integers(0, 255, (60, 32, 32, 3), dtype=np.uint8), y=np.repeat(np.arange(3), 20))
    train, test = demo_data([str(path)], DEMO_FULL)
    assert len(train) + len(test) == 60 and len(test) >= 10
    assert set(np.unique(test.labels)) == {0, 1, 2}


def test_the_demo_tables_fit_80_columns(demo_run, capsys, monkeypatch):
    from edge_ssl.demo import print_demo
    from tests.test_terminal_width import WIDTH, assert_fits

    _, report = demo_run
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    print_demo(report)
    lines = capsys.readouterr().out.splitlines()
    assert_fits(lines, [cell for row in report["table"]["rows"] for cell in row])
