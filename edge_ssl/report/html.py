"""Render a ReportData as one self-contained HTML page (inline CSS, SVG, base64 PNGs) or Markdown."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from html import escape

from edge_ssl.report.rows import (
    LatencyRecord,
    LineageNode,
    ReportData,
    StageRow,
    adaptation_outcome,
    human_bytes,
    human_count,
    latency_text,
    percent,
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right;vertical-align:top}
th{background:#f3f3f3}td.l,th.l{text-align:left}
code{font-size:.85em}.predicted{color:#8a4b00;font-style:italic}
.note{color:#555;font-size:.9em}img{max-width:100%}
svg text{font-family:system-ui,sans-serif}
"""

CHART_CAPTIONS = {
    "pareto": "Accuracy vs measured latency (lower-right is worse; the dashed line is the Pareto front).",
    "latency": "Measured latency distributions per stage, backend and batch size.",
    "predicted": "PREDICTED latency from device profiles: a model, not a measurement.",
    "adaptation": "Adaptation curves: SSL loss and embedding health per step.",
}


def _sha_id(sha: str) -> str:
    return f"bundle-{sha[:16]}"


def render_html(data: ReportData, charts: Mapping[str, bytes]) -> str:
    """One HTML page with no external assets."""
    sections = [
        f"<h1>{escape(data.title)}</h1>",
        f"<p class='note'>Generated {escape(data.generated)} from {len(data.rows)} bundle(s). "
        "Latency numbers are measured unless labelled <span class='predicted'>predicted</span>; "
        "speed-ups are ratios against the first bundle on the same backend, device and batch size. "
        "Numbers from different machines are not comparable.</p>",
        "<h2 id='stages'>Stages</h2>",
        stage_table_html(data),
        "<h2 id='lineage'>Lineage</h2>",
        lineage_svg(data),
    ]
    for name in ("pareto", "latency", "predicted", "adaptation"):
        if name in charts:
            sections.append(_chart_html(name, charts[name]))
    sections.append(adaptation_outcome_html(data))
    sections.append(predicted_table_html(data))
    sections.append(environment_table_html(data))
    sections.append(files_html(data))
    body = "\n".join(s for s in sections if s)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(data.title)}</title><style>{_CSS}</style></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )


def adaptation_outcome_html(data: ReportData) -> str:
    """Per adapted bundle: kNN on shifted and clean images before and after, in words too."""
    items = []
    for row in data.rows:
        for curve in row.adaptation:
            outcome = adaptation_outcome(curve.get("summary") or {})
            if outcome is not None:
                items.append(f"<li id='adapt-{_sha_id(row.manifest_sha256)}'><b>{escape(row.name)}</b>: "
                             f"{escape(outcome['words'])}</li>")
    if not items:
        return ""
    return "<h2 id='adaptation-outcome'>What adaptation did</h2><ul>" + "".join(items) + "</ul>"


def _chart_html(name: str, png: bytes) -> str:
    encoded = base64.b64encode(png).decode("ascii")
    caption = CHART_CAPTIONS.get(name, name)
    return (
        f"<h2 id='chart-{name}'>{escape(caption.split(':')[0].split('(')[0].strip())}</h2>"
        f"<figure><img id='img-{name}' alt='{escape(caption)}' src='data:image/png;base64,{encoded}'>"
        f"<figcaption class='note'>{escape(caption)}</figcaption></figure>"
    )


def stage_columns(data: ReportData) -> list[str]:
    cols = ["stage", "bundle", "precision", "params", "MACs", "size", "kNN top-1"]
    for key in data.latency_keys():
        cols += [f"{data.key_label(key)} p50 / p90 ms", f"speed-up vs {data.rows[0].name}"]
    return cols


def stage_cells(data: ReportData, row: StageRow) -> list[str]:
    cells = [
        row.stage,
        row.name,
        row.precision,
        human_count(row.params),
        human_count(row.macs),
        human_bytes(row.bytes),
        percent(row.knn_top1),
    ]
    for key in data.latency_keys():
        rec = row.headline(key)
        batch = f" (b{rec.batch_size})" if rec and rec.batch_size != 1 else ""
        speed = data.speedup(row, key)
        cells += [latency_text(rec) + batch, "—" if speed is None else f"{speed:.2f}×"]
    return cells


def stage_table_html(data: ReportData) -> str:
    cols = stage_columns(data)
    head = "".join(f"<th class='l'>{escape(c)}</th>" if i < 3 else f"<th>{escape(c)}</th>"
                   for i, c in enumerate(cols))
    rows = []
    for row in data.rows:
        cells = stage_cells(data, row)
        tds = [f"<td class='l'>{escape(cells[0])}</td>",
               f"<td class='l'><a href='#{_sha_id(row.manifest_sha256)}'>{escape(cells[1])}</a></td>",
               f"<td class='l'>{escape(cells[2])}</td>"]
        tds += [f"<td>{escape(c)}</td>" for c in cells[3:]]
        rows.append(f"<tr>{''.join(tds)}</tr>")
    return (f"<table id='stage-table'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def predicted_table_html(data: ReportData) -> str:
    records = [(row.name, rec) for row in data.rows for rec in row.predicted()]
    if not records:
        return ""
    rows = "".join(
        f"<tr><td class='l'>{escape(name)}</td><td class='l'>{escape(rec.device)}</td>"
        f"<td class='l'>{escape(rec.backend)}</td><td>{rec.batch_size}</td>"
        f"<td class='predicted'>{rec.p50:.3f} ms (predicted)</td></tr>"
        for name, rec in records
    )
    return (
        "<h2 id='predicted'>Predicted latency (not measured)</h2>"
        "<p class='note'>From the device profiles' roofline model. Measure on the device to replace "
        "these numbers; they never enter the stage table or the Pareto chart.</p>"
        "<table id='predicted-table'><thead><tr><th class='l'>bundle</th><th class='l'>device profile</th>"
        "<th class='l'>precision/backend</th><th>batch</th><th>latency</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def environment_summary(rec: LatencyRecord) -> str:
    env = dict(rec.environment)
    parts = []
    for key in ("host", "cpu", "gpu", "jetson", "power_mode", "nvpmodel", "clocks", "threads",
                "cpu_count", "providers"):
        if key in env and env[key] not in (None, "", [], {}):
            value = env[key]
            parts.append(f"{key}={value if isinstance(value, str) else json.dumps(value, default=str)}")
    versions = env.get("versions")
    if isinstance(versions, Mapping):
        parts.append("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    return "; ".join(parts) or "(no environment recorded)"


def environment_table_html(data: ReportData) -> str:
    records = [(row.name, rec) for row in data.rows for rec in row.measured()]
    if not records:
        return ("<h2 id='environment'>Measurements</h2><p class='note'>No latency was measured for these "
                "bundles. Run <code>edge-ssl bench BUNDLE</code> and generate the report again.</p>")
    rows = "".join(
        f"<tr><td class='l'>{escape(name)}</td><td class='l'>{escape(rec.label)}</td>"
        f"<td>{rec.batch_size}</td><td>{escape(latency_text(rec))}</td>"
        f"<td>{'—' if rec.p99 is None else f'{rec.p99:.2f}'}</td><td>{len(rec.samples) or '—'}</td>"
        f"<td class='l'>{escape(environment_summary(rec))}</td></tr>"
        for name, rec in records
    )
    return (
        "<h2 id='environment'>Measurements and their environment</h2>"
        "<table id='environment-table'><thead><tr><th class='l'>bundle</th><th class='l'>backend @ device</th>"
        "<th>batch</th><th>p50 / p90 ms</th><th>p99 ms</th><th>samples</th>"
        f"<th class='l'>environment</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def files_html(data: ReportData) -> str:
    blocks = []
    for row in data.rows:
        files = "".join(
            f"<tr><td class='l'><code>{escape(name)}</code></td><td>{human_bytes(rec.get('bytes'))}</td>"
            f"<td class='l'><code>{escape(str(rec.get('sha256')))}</code></td></tr>"
            for name, rec in sorted(row.files.items())
        )
        blocks.append(
            f"<h3 id='{_sha_id(row.manifest_sha256)}'>{escape(row.name)} "
            f"<span class='note'>({escape(row.stage)}, {escape(row.arch)})</span></h3>"
            f"<p class='note'>path <code>{escape(row.path)}</code><br>manifest sha256 "
            f"<code>{row.manifest_sha256}</code><br>parent <code>{escape(str(row.parent_sha256))}</code></p>"
            f"<table><thead><tr><th class='l'>file</th><th>size</th><th class='l'>sha256</th></tr></thead>"
            f"<tbody>{files}</tbody></table>"
        )
    return "<h2 id='bundles'>Bundles and files</h2>" + "".join(blocks)


# ------------------------------------------------------------------ lineage SVG


def _depths(data: ReportData) -> dict[str, int]:
    depth = {node.sha256: 0 for node in data.nodes}
    for _ in range(len(data.nodes)):
        changed = False
        for edge in data.edges:
            if depth.get(edge.child, 0) < depth.get(edge.parent, 0) + 1:
                depth[edge.child] = depth.get(edge.parent, 0) + 1
                changed = True
        if not changed:
            break
    return depth


def lineage_svg(data: ReportData) -> str:
    """Inline SVG: one box per bundle (name, stage, sha256 prefix) and engine, arrows labelled by stage."""
    if not data.nodes:
        return "<p class='note'>No lineage recorded.</p>"
    depth = _depths(data)
    columns: dict[int, list[LineageNode]] = {}
    for node in data.nodes:
        columns.setdefault(depth[node.sha256], []).append(node)
    box_w, box_h, gap_x, gap_y = 190, 58, 70, 22
    pos = {}
    for col, nodes in columns.items():
        for row, node in enumerate(nodes):
            pos[node.sha256] = (10 + col * (box_w + gap_x), 10 + row * (box_h + gap_y))
    width = 20 + (max(columns) + 1) * (box_w + gap_x) - gap_x
    height = 20 + max(len(n) for n in columns.values()) * (box_h + gap_y) - gap_y
    parts = [
        f"<svg id='lineage-graph' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' style='max-width:100%;height:auto' role='img' "
        "aria-label='bundle lineage'>",
        "<defs><marker id='arrow' viewBox='0 0 10 10' refX='10' refY='5' markerWidth='7' markerHeight='7' "
        "orient='auto'><path d='M0,0 L10,5 L0,10 z' fill='#555'/></marker></defs>",
    ]
    for edge in data.edges:
        (x1, y1), (x2, y2) = pos[edge.parent], pos[edge.child]
        ax, ay, bx, by = x1 + box_w, y1 + box_h / 2, x2, y2 + box_h / 2
        parts.append(f"<line x1='{ax}' y1='{ay}' x2='{bx}' y2='{by}' stroke='#555' marker-end='url(#arrow)'/>")
        parts.append(f"<text x='{(ax + bx) / 2}' y='{(ay + by) / 2 - 4}' font-size='10' "
                     f"text-anchor='middle' fill='#333'>{escape(edge.stage)}</text>")
    for node in data.nodes:
        parts.append(_svg_node(node, *pos[node.sha256], box_w, box_h))
    parts.append("</svg>")
    return "".join(parts)


def _svg_node(node: LineageNode, x: float, y: float, w: int, h: int) -> str:
    fill = {"engine": "#fff4e0"}.get(node.kind, "#e8f1ff" if node.given else "#f4f4f4")
    name = node.name if len(node.name) <= 26 else node.name[:25] + "…"
    box = (
        f"<rect x='{x}' y='{y}' width='{w}' height='{h}' rx='6' fill='{fill}' stroke='#678'/>"
        f"<text x='{x + 8}' y='{y + 17}' font-size='12' font-weight='bold'>{escape(name)}</text>"
        f"<text x='{x + 8}' y='{y + 33}' font-size='10'>{escape(node.kind if node.kind == 'engine' else node.stage)}"
        "</text>"
        f"<text x='{x + 8}' y='{y + 48}' font-size='9' fill='#555'>sha256 {node.sha256[:16]}…</text>"
        f"<title>{escape(node.name)}\nsha256 {node.sha256}</title>"
    )
    if node.given and node.kind == "bundle":
        return f"<a href='#{_sha_id(node.sha256)}'>{box}</a>"
    return box


# ------------------------------------------------------------------ Markdown


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)])


def render_markdown(data: ReportData, images: Mapping[str, str]) -> str:
    """The same report as Markdown; charts are PNG files beside it (``images``: name -> file)."""
    out = [
        f"# {data.title}",
        "",
        f"Generated {data.generated} from {len(data.rows)} bundle(s). Latency is measured unless "
        "labelled *predicted*; speed-ups are ratios against the first bundle on the same backend, "
        "device and batch size.",
        "",
        "## Stages",
        "",
        _md_table(stage_columns(data), [stage_cells(data, row) for row in data.rows]),
        "",
        "## Lineage",
        "",
        "```mermaid",
        "graph LR",
    ]
    for node in data.nodes:
        out.append(f'  n{node.sha256[:12]}["{node.name}<br>{node.stage}<br>{node.sha256[:12]}"]')
    out += [f"  n{e.parent[:12]} -->|{e.stage}| n{e.child[:12]}" for e in data.edges]
    out += ["```", ""]
    for name, file in images.items():
        out += [f"![{CHART_CAPTIONS.get(name, name)}]({file})", ""]
    predicted = [(row.name, rec) for row in data.rows for rec in row.predicted()]
    if predicted:
        out += ["## Predicted latency (not measured)", "", _md_table(
            ["bundle", "device profile", "precision/backend", "batch", "latency (predicted)"],
            [[n, r.device, r.backend, str(r.batch_size), f"{r.p50:.3f} ms predicted"] for n, r in predicted],
        ), ""]
    measured = [(row.name, rec) for row in data.rows for rec in row.measured()]
    if measured:
        out += ["## Measurements and their environment", "", _md_table(
            ["bundle", "backend @ device", "batch", "p50 / p90 ms", "environment"],
            [[n, r.label, str(r.batch_size), latency_text(r), environment_summary(r)] for n, r in measured],
        ), ""]
    out += ["## Bundles", ""]
    out += [f"- **{row.name}** ({row.stage}): manifest sha256 `{row.manifest_sha256}`, "
            f"parent `{row.parent_sha256}`, `{row.path}`" for row in data.rows]
    return "\n".join(out) + "\n"

