"""The accuracy-latency report: built from small real bundles, checked as HTML, PNG and in a browser."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from edge_ssl.runtime.bench import bench_bundle

from edge_ssl.bundle import lineage_entry, record_results, write_encoder_bundle
from edge_ssl.cli import main
from edge_ssl.errors import ConfigError
from edge_ssl.report import collect_report, write_report
from edge_ssl.report_plots import pareto_front


def _knn(encoder) -> float:
    from edge_ssl.data import embedded_default
    from edge_ssl.evaluate import embed, knn_top1

    train, test = embedded_default("train").subset(range(160)), embedded_default("test").subset(range(60))
    a = embed(encoder, train.images, batch_size=64, device="cpu")
    b = embed(encoder, test.images, batch_size=64, device="cpu")
    return knn_top1(a, train.labels, b, test.labels, k=20, num_classes=10)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> list[Path]:
    """A teacher and a distilled-width student, each evaluated (kNN) and timed for real."""
    import torch

    from edge_ssl.models import count_parameters, create_encoder

    root = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    teacher = create_encoder("resnet18_cifar", width=0.25)
    student = create_encoder("resnet18_cifar", width=0.125)
    first = write_encoder_bundle(root / "teacher.edge", teacher, lineage=(lineage_entry("pretrain", {}),),
                                 metrics={"params": count_parameters(teacher)})
    second = write_encoder_bundle(root / "student.edge", student,
                                  lineage=first.child_lineage("distill", {"width": 0.125}),
                                  metrics={"params": count_parameters(student)})
    for bundle, encoder in ((first, teacher), (second, student)):
        record_results(bundle, "eval", {"knn_top1": {"20": _knn(encoder)}})
        bench_bundle(bundle, "torch", iterations=12, warmup_s=0.05, threads=1)
        record_results(bundle, "predict", {"orin-nano-8gb": {"fp16": {"p50": 0.5, "p90": 0.6}}})
    record_results(second, "adapt", {"history": [
        {"step": i, "loss": 2.0 - 0.1 * i, "effective_rank": 10.0 + i} for i in range(5)]})
    return [first.path, second.path]


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(html: str) -> _Collector:
    parser = _Collector()
    parser.feed(html)
    parser.close()
    return parser


def _png_images(tags) -> dict[str, bytes]:
    return {
        attrs["id"]: base64.b64decode(attrs["src"].split(",", 1)[1])
        for tag, attrs in tags if tag == "img"
    }


def test_report_is_self_contained_html_with_table_lineage_and_charts(bundles, tmp_path):
    from PIL import Image

    out = tmp_path / "report.html"
    assert write_report(bundles, out) == [out]
    parsed = _parse(out.read_text(encoding="utf-8"))
    ids = {attrs.get("id") for _, attrs in parsed.tags}
    assert {"stage-table", "lineage-graph", "predicted-table", "environment-table"} <= ids
    for tag, attrs in parsed.tags:
        for attr in ("src", "href"):
            value = attrs.get(attr) or ""
            assert not value.startswith(("http:", "https:", "//")), f"external asset {tag} {value}"
    images = _png_images(parsed.tags)
    assert {"img-pareto", "img-latency", "img-predicted", "img-adaptation"} <= set(images)
    for png in images.values():
        with Image.open(io.BytesIO(png)) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300
    text = " ".join(parsed.text)
    assert "teacher" in text and "student" in text and "torch[cpu,fp32]" in text
    assert "(predicted)" in text


def test_report_numbers_come_from_the_bundles_and_predictions_stay_apart(bundles):
    data = collect_report(bundles)
    teacher, student = data.rows
    assert (teacher.stage, student.stage) == ("pretrain", "distill")
    assert student.params < teacher.params and student.bytes < teacher.bytes
    assert 0.0 <= student.knn_top1 <= 1.0
    assert [key[0] for key in data.latency_keys()] == ["torch[cpu,fp32]"]
    assert all(rec.predicted for rec in student.predicted())
    assert data.latency_keys(predicted=True) == [("fp16", "orin-nano-8gb")]
    key = data.latency_keys()[0]
    assert data.speedup(teacher, key) == pytest.approx(1.0)
    assert data.speedup(student, key) == pytest.approx(teacher.headline(key).p50 / student.headline(key).p50)
    assert [e.stage for e in data.edges] == ["distill"]
    assert data.edges[0].parent == teacher.manifest_sha256


def test_markdown_variant_writes_tables_and_png_files(bundles, tmp_path):
    written = write_report(bundles, tmp_path / "r.html", markdown=True)
    md = (tmp_path / "r.md").read_text(encoding="utf-8")
    assert written == [tmp_path / "r.html", tmp_path / "r.md"]
    assert "| stage | bundle |" in md and "```mermaid" in md and "predicted" in md
    assert (tmp_path / "r_pareto.png").read_bytes().startswith(b"\x89PNG")


def test_bundle_without_any_results_still_reports(tmp_path, bundles):
    bare = tmp_path / "bare.edge"
    shutil.copytree(bundles[0], bare)
    data = collect_report([bare])
    assert data.rows[0].knn_top1 is None and not data.rows[0].latencies
    out = tmp_path / "bare.html"
    write_report([bare], out)
    html = out.read_text(encoding="utf-8")
    assert "No latency was measured" in html and "<img" not in html


def test_cli_writes_the_report_and_rejects_a_bad_out_before_work(bundles, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["report", *map(str, bundles), "--out", str(tmp_path / "cli.html"), "--md", "--json"])
    assert done.value.code == 0
    assert '"written"' in capsys.readouterr().out
    assert (tmp_path / "cli.html").is_file() and (tmp_path / "cli.md").is_file()
    with pytest.raises(ConfigError, match="must end in .html"):
        write_report(bundles, tmp_path / "report.pdf")
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "missing.edge"), "--out", str(tmp_path / "x.html")])
    assert exc.value.code == 1


def test_pareto_front_keeps_only_points_no_other_beats():
    points = [(1.0, 0.5), (2.0, 0.4), (3.0, 0.7), (0.5, 0.3), (4.0, 0.7)]
    assert pareto_front(points) == [(0.5, 0.3), (1.0, 0.5), (3.0, 0.7)]


def _browser() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)


def test_report_renders_in_a_headless_browser(bundles, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser: install Debian's `chromium` (apt-get install -y chromium)")
    out = tmp_path / "report.html"
    write_report(bundles, out)
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", out.as_uri(),
    ]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    parsed = _parse(dom)
    ids = {attrs.get("id") for _, attrs in parsed.tags}
    assert "stage-table" in ids and "lineage-graph" in ids, dom[:500]
    images = _png_images(parsed.tags)
    assert images["img-pareto"].startswith(b"\x89PNG")
    rows = [attrs for tag, attrs in parsed.tags if tag == "tr"]
    assert len(rows) >= 3  # header + teacher + student in the stage table


def test_device_measurements_and_predictions_are_read_and_kept_apart():
    """Remote `bench --on` records and `predict` records, in the shapes those commands write."""
    from edge_ssl.devices.predict import Prediction

    from edge_ssl.report import latency_records

    prediction = Prediction(device="orin-nx-16gb", precision="int8", power_mode=None, batch=1,
                            predicted_ms=1.08, compute_bound_layers=3, memory_bound_layers=2, layers=5,
                            gflops=4.1, calibration={})
    results = {
        "device_bench": {"ssh://nvidia@orin": {
            "kind": "measured", "target": "ssh://nvidia@orin", "backend": "onnxruntime",
            "batches": {"1": {"p50": 3.0, "p90": 3.5, "p99": 4.0, "count": 200}},
            "environment": {"profile": "orin-nano-8gb", "nvpmodel": "15W"}}},
        "predict": {"orin-nx-16gb int8": prediction.to_dict()},
    }
    records = latency_records(results, {})
    measured = [r for r in records if not r.predicted]
    predicted = [r for r in records if r.predicted]
    assert [(r.backend, r.device, r.p50, r.p90) for r in measured] == [
        ("onnxruntime", "ssh://nvidia@orin", 3.0, 3.5)]
    assert [(r.device, r.backend, r.p50) for r in predicted] == [("orin-nx-16gb", "int8", 1.08)]



def test_an_existing_report_is_kept_unless_overwrite_is_given(bundles, tmp_path, capsys):
    out = tmp_path / "kept.html"
    out.write_text("my notes", encoding="utf-8")
    with pytest.raises(SystemExit) as refused:
        main(["report", *map(str, bundles), "--out", str(out)])
    assert refused.value.code == 1
    message = capsys.readouterr().err
    assert "kept.html already exists" in message and "--overwrite" in message
    assert out.read_text(encoding="utf-8") == "my notes"
    (tmp_path / "kept.md").write_text("md notes", encoding="utf-8")
    with pytest.raises(ConfigError, match="kept.md already exists"):
        write_report(bundles, tmp_path / "kept.html", markdown=True, overwrite=False)
    assert (tmp_path / "kept.md").read_text(encoding="utf-8") == "md notes"
    with pytest.raises(SystemExit) as replaced:
        main(["report", *map(str, bundles), "--out", str(out), "--md", "--overwrite"])
    assert replaced.value.code == 0
    assert "stage-table" in out.read_text(encoding="utf-8")
    assert "| stage | bundle |" in (tmp_path / "kept.md").read_text(encoding="utf-8")
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
