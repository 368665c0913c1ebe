"""Print a benchmark's JSON report and optionally save it (shared by the scripts here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(report: dict[str, Any], json_out: Path | None) -> None:
    """Print ``report`` as JSON; also write it to ``json_out`` when given."""
    text = json.dumps(report, indent=2, sort_keys=True)
    print(text)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
