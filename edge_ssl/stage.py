"""The skeleton every bundle stage shares: open the parent as float weights, and one result.

A stage (import, pretrain, distill, prune, quantize, export, adapt) is the part that differs:
it checks its output location (``edge_ssl.outputs.check_bundle_out``), opens its parent with
:func:`open_float_parent`, does its work, writes through ``edge_ssl.output_check``
(``write_stage_bundle`` for weights, ``check_graph`` before a graph-only bundle) and returns a
:class:`StageResult` (or a subclass that adds what only that stage knows).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from edge_ssl.bundle import Bundle


@dataclass(kw_only=True)
class StageResult:
    """What a stage wrote: the bundle (None when it wrote none, e.g. on ranks other than 0
    under torchrun) and the metrics recorded in it."""

    bundle: Bundle | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def wrote(self, bundle: Bundle | None) -> Bundle | None:
        """Record the written ``bundle`` and its metrics; returns it."""
        self.bundle = bundle
        if bundle is not None:
            self.metrics = {**self.metrics, **bundle.manifest.metrics}
        return bundle


class FloatParent(NamedTuple):
    """A stage's input: the bundle as given, the bundle holding its float weights (itself or
    an ancestor found by hash), and the encoder loaded from those weights."""

    bundle: Bundle
    source: Bundle
    encoder: Any


def open_float_parent(bundle: str | os.PathLike | Bundle, stage: str) -> FloatParent:
    """Open ``bundle`` (verified), trace a quantized one to its float ancestor and load the
    encoder; a BundleError that names ``stage`` when no float weights exist."""
    from edge_ssl.lineage import require_float_weights
    from edge_ssl.models import load_encoder

    parent = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, verify=True)
    source = require_float_weights(parent, stage)
    return FloatParent(parent, source, load_encoder(source))
