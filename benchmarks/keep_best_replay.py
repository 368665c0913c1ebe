"""What a fixed choice of candidate would have scored, replayed from an adapt benchmark's JSON.

``benchmarks/adapt.py`` records, per corruption, the kNN of every candidate (unadapted, AdaBN
alone, adapted) beside the one the guard kept. This prints the summary (recovery, significant
recovery, worst vs unadapted) had the guard always kept one candidate, or chosen on the
recorded scores without the adapted weights (``without-adapted``), with no new run:

    python benchmarks/keep_best_replay.py results/adapt_quick.json [more.json ...] [--json]

The clean drop is the kept candidate's only (the runs measure clean accuracy after the kept
weights), so it is not replayed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapt import summarize  # noqa: E402

RULES = ("kept", "unadapted", "adabn", "adapted", "without-adapted")
KEYS = ("recovery_frac", "recovery_frac_significant", "worst_vs_unadapted_pts")


def kept_by(row: dict[str, Any], rule: str) -> float:
    """kNN of the candidate ``rule`` keeps: as the run kept, always one, or the guard's choice
    on the recorded scores with the adapted weights excluded (the rule without a labeled bank)."""
    if rule == "kept":
        return row["adapted"]
    if rule == "without-adapted":
        from edge_ssl.adapt.select import choose_candidate

        selection = row["selection"]
        excluded = {**selection["excluded"], "adapted": "replayed without a bank"}
        rule = choose_candidate(selection["scores"], excluded, selection["criterion"], selection["margin"]).kept
    return row["candidates_knn"][rule]


def replay(result: dict[str, Any], rule: str) -> dict[str, float | None]:
    """The summary keys of ``result`` had every corruption kept what ``rule`` keeps."""
    rows = result["corruptions"]
    chosen = {name: {**row, "adapted": kept_by(row, rule)} for name, row in rows.items()}
    clean = next(iter(rows.values()))["clean"]
    images = result["settings"]["eval_images"]
    summary = summarize(chosen, clean, images)
    return {key: summary[key] for key in KEYS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    table = {str(path): {rule: replay(json.loads(path.read_text()), rule) for rule in RULES}
             for path in args.results}
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    for path, rules in table.items():
        print(path)
        print(f"  {'keeps':15} {'recovery':>9} {'significant':>12} {'worst pts':>10}")
        for rule, row in rules.items():
            cells = [f"{row[k]:.3f}" if row[k] is not None else "-" for k in KEYS]
            print(f"  {rule:15} {cells[0]:>9} {cells[1]:>12} {cells[2]:>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
