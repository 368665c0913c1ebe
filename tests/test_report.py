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
from edge_ssl.report.collect import collect_report
from edge_ssl.report.plots import pareto_front
from edge_ssl.report.write import write_report


def _knn(encoder) -> float:
    from edge_ssl.data.sources import embedded_default
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

    from edge_ssl.report.collect import latency_records

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


def md_stage_table(markdown: str) -> list[dict[str, str]]:
    """The Markdown report's stage table as one {column: cell} dict per bundle, in order."""
    section = markdown.split("## Stages", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    split = [[cell.strip() for cell in line.strip().strip("|").split(" | ")] for line in lines]
    return [dict(zip(split[0], cells, strict=True)) for cells in split[1:]]


def compress_cells(recorded: dict) -> dict[str, str]:
    """The stage-table cells a compress stage row must be shown as."""
    from edge_ssl.report.collect import COMPRESS_BACKEND
    from edge_ssl.report.rows import human_count, percent

    return {"params": human_count(recorded["params"]), "MACs": human_count(recorded["macs"]),
            "kNN top-1": percent(recorded["knn_top1"]),
            f"{COMPRESS_BACKEND} p50 / p90 ms": f"{recorded['latency_ms']:.2f} / —"}


def test_report_shows_the_numbers_compress_recorded_for_every_stage(tmp_path):
    """kNN, params, MACs and ORT-CPU latency of each stage: the numbers compress measured."""
    import numpy as np

    from edge_ssl.bundle import Bundle, read_results
    from tests.test_compress_fixtures import tiny_dataset, write_tiny_bundle

    teacher = write_tiny_bundle(tmp_path / "teacher.edge")
    data = tiny_dataset(16, labeled=True)
    np.savez(tmp_path / "bank.npz", x=data.images, y=data.labels)
    test = tiny_dataset(8, seed=1, labeled=True)
    np.savez(tmp_path / "test.npz", x=test.images, y=test.labels)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "distill: {epochs: 1, batch_size: 8, cache_views: 1, queue_size: 16, head_hidden_dim: 16,"
        " warmup_epochs: 0.0}\nquantize_options: {calibration_images: 16}\nbench_seconds: 0.2\n")
    out = tmp_path / "c.edge"
    with pytest.raises(SystemExit) as done:
        main(["compress", str(teacher.path), "--student", "resnet18_cifar", "--arch-opt", "width=0.125",
              "--prune", "0.5", "--data", str(tmp_path / "bank.npz"), "--eval-data", str(tmp_path / "bank.npz"),
              "--eval-test", str(tmp_path / "test.npz"), "--recipe", str(recipe), "--device", "cpu",
              "--out", str(out), "--json"])
    assert done.value.code in (0, None)
    final = read_results(Bundle.open(out))["compress"]
    stages = sorted(out.with_name(out.name + ".stages").glob("*.edge"))
    recorded = [final["stages"][0]]  # the teacher: compress measures it but writes nothing beside it
    recorded += [read_results(Bundle.open(stage))["compress_stage"] for stage in stages]
    recorded.append(next(r for r in final["stages"] if r["name"] == final["chosen"]))
    assert len(recorded) == len(final["stages"]) + 1
    with pytest.raises(SystemExit) as done:
        main(["report", str(teacher.path), *map(str, stages), str(out), "--out", str(tmp_path / "r.md")])
    assert done.value.code == 0
    shown = md_stage_table((tmp_path / "r.md").read_text(encoding="utf-8"))
    assert len(shown) == len(recorded)
    for cells, row in zip(shown, recorded, strict=True):
        expected = compress_cells(row)
        assert {k: cells[k] for k in expected} == expected, (cells["bundle"], row)
        assert "—" not in (cells["kNN top-1"], cells["MACs"])
    base = recorded[0]["latency_ms"]
    assert shown[-1][f"speed-up vs {shown[0]['bundle']}"] == f"{base / recorded[-1]['latency_ms']:.2f}×"


def test_the_report_says_in_words_when_adaptation_cost_clean_accuracy(bundles, tmp_path):
    from edge_ssl.bundle import Bundle

    student = Bundle.open(bundles[1])
    record = {"history": [{"step": i, "loss": 1.0} for i in range(3)], "corruption": "gaussian_noise",
              "selection": {"kept": "adapted"},
              "knn_top1_shifted_before": 0.40, "knn_top1_shifted_after": 0.52,
              "knn_top1_clean_before": 0.764, "knn_top1_clean_after": 0.739}
    record_results(student, "adapt", record)
    out = tmp_path / "adapted.html"
    write_report(bundles, out)
    text = " ".join(_parse(out.read_text(encoding="utf-8")).text)
    assert "+12.0 points" in text and "COST 2.5 points of clean accuracy" in text
    record_results(student, "adapt", {**record, "knn_top1_clean_after": 0.762})
    write_report(bundles, out, overwrite=True)
    text = " ".join(_parse(out.read_text(encoding="utf-8")).text)
    assert "COST" not in text and "no loss beyond noise" in text
