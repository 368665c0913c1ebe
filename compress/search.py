"""Before any training: which student fits a latency budget on a board (predicted, untrained graphs)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_ssl.errors import ConfigError, EdgeSSLError

#: Widths of the recipe's own student that the search tries.
WIDTHS = (1.0, 0.75, 0.5, 0.375, 0.25, 0.125)
#: Prune ratios tried on every candidate that does not fit unpruned.
PRUNE_RATIOS = (0.3, 0.5)


class LatencyBudgetError(EdgeSSLError, ValueError):
    """A latency budget no candidate can meet on the board (below its launch floor, or too tight)."""


@dataclass(frozen=True)
class CandidateSpec:
    """A student to try: ``student`` None is the teacher's own architecture (no distillation)."""

    student: str | None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    prune: float | None = None

    def label(self) -> str:
        name = self.student or "teacher"
        width = self.kwargs.get("width")
        return name if width in (None, 1, 1.0) else f"{name} w{width:g}"

    def unpruned(self) -> CandidateSpec:
        return CandidateSpec(self.student, self.kwargs, None)


@dataclass
class Candidate:
    """One candidate measured without training: sizes and its PREDICTED latency on the board."""

    spec: CandidateSpec
    params: int
    macs: int
    predicted_ms: float
    interval_ms: list[float]
    launch_floor_ms: float
    launch_bound_share: float
    calibration: str
    fits: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.spec.label(), "student": self.spec.student,
                "student_kwargs": dict(self.spec.kwargs), "prune": self.spec.prune,
                "params": self.params, "macs": self.macs, "kind": "predicted-for-board",
                "predicted_ms": self.predicted_ms, "interval_ms": list(self.interval_ms),
                "launch_floor_ms": self.launch_floor_ms, "launch_bound_share": self.launch_bound_share,
                "calibration": self.calibration, "fits": self.fits}


@dataclass
class SearchResult:
    """What the search found: the teacher's own prediction, every candidate, the one chosen."""

    board: str
    precision: str
    budget_ms: float
    teacher: Candidate
    candidates: list[Candidate]
    chosen: Candidate | None
    notes: list[str] = field(default_factory=list)

    @property
    def teacher_fits(self) -> bool:
        return self.teacher.predicted_ms <= self.budget_ms

    def to_dict(self) -> dict[str, Any]:
        return {"board": self.board, "precision": self.precision, "budget_ms": self.budget_ms,
                "rule": CHOICE_RULE, "teacher": self.teacher.to_dict(), "teacher_fits": self.teacher_fits,
                "candidates": [c.to_dict() for c in self.candidates],
                "chosen": None if self.chosen is None else self.chosen.to_dict(), "notes": list(self.notes)}


#: The rule, as the JSON and the docs state it.
CHOICE_RULE = ("among the candidates whose predicted latency on the board is within the budget, "
               "the one with the most MACs (ties: the faster one)")


def choose(candidates: Sequence[Candidate], budget_ms: float) -> Candidate | None:
    """The most-accurate-likely candidate that fits: the widest (most MACs) whose PREDICTED
    board latency (point estimate) is within ``budget_ms``; ties go to the faster one.

    MACs stand in for accuracy: at one teacher and one distillation budget a wider student
    keeps more of the teacher's kNN accuracy (docs/compress.md, full run), and the search
    runs before any training, so nothing better is known yet.
    """
    fitting = [c for c in candidates if c.predicted_ms <= budget_ms]
    return max(fitting, key=lambda c: (c.macs, -c.predicted_ms)) if fitting else None


def candidate_specs(teacher_spec: Any, student: str | None, student_kwargs: Mapping[str, Any], *,
                    prune: float | None = None, same_arch_only: bool = False) -> list[CandidateSpec]:
    """The unpruned candidates: the recipe's student at every width in WIDTHS, and (unless
    ``same_arch_only``, e.g. for ``init: teacher``) every registered encoder that reads the
    teacher's input at width 1. Without a student: the teacher itself. Prune variants are
    made by ``search`` from ``prune_ratios``."""
    if student is None:
        return [CandidateSpec(None, {}, None)]
    specs = [CandidateSpec(student, {**student_kwargs, "width": w}) for w in WIDTHS]
    if not same_arch_only:
        specs += [CandidateSpec(name, kwargs) for name, kwargs in _pairing_encoders(teacher_spec)
                  if name != student]
    return specs


def _pairing_encoders(teacher_spec: Any) -> list[tuple[str, dict[str, Any]]]:
    """Registered encoders with the teacher's kind of stem that read the teacher's image size."""
    from edge_ssl.models import ENCODERS, encoder_names

    size = int(teacher_spec.input.shape[1])
    try:
        cifar_stem = ENCODERS.get(teacher_spec.arch).cifar
    except ConfigError:
        cifar_stem = size < 64
    found = []
    for name in encoder_names():
        entry = ENCODERS.get(name)
        if entry.cifar != cifar_stem or size < entry.min_size:
            continue
        if entry.patch_size and size % entry.patch_size:
            continue
        found.append((name, {} if size == entry.info.input_size else {"image_size": size}))
    return found


def measure_candidate(encoder: Any, spec: CandidateSpec, profile: Any, precision: str, *,
                      sizes: Mapping[str, int] | None = None) -> Candidate:
    """Params, MACs (``sizes`` when already counted) and the PREDICTED board latency of an
    (untrained) encoder."""
    import warnings

    from edge_ssl.compress.measure import model_metrics
    from edge_ssl.devices.predict import predict_encoder

    sizes = sizes or model_metrics(encoder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes of the export: shapes are all we need
        predicted = predict_encoder(encoder, profile, precision, 1,
                                    input_shape=tuple(encoder.spec.input.shape))
    return Candidate(spec, sizes["params"], sizes["macs"], predicted.predicted_ms, list(predicted.interval_ms),
                     predicted.launch_bound_share * predicted.predicted_ms, predicted.launch_bound_share,
                     str(predicted.calibration))


def build_candidate(spec: CandidateSpec, teacher_spec: Any, round_to: int) -> Any:
    """The candidate's randomly initialized encoder (pruned uniformly when ``spec.prune``).

    Untrained weights carry no importance, so pruning here is ``uniform`` (the same share
    of every layer): the shapes a trained ``global`` prune gives vary around it.
    """
    from edge_ssl.compress.prune import PruneConfig, prune_encoder

    from edge_ssl.models import build_from_spec, create_encoder

    if spec.student is None:
        encoder = build_from_spec(teacher_spec)
    else:
        encoder = create_encoder(spec.student, **spec.kwargs)
    if spec.prune:
        config = PruneConfig(ratio=spec.prune, importance="l2", scope="uniform", round_to=round_to)
        encoder = prune_encoder(encoder, config).encoder
    return encoder


def search(teacher_spec: Any, specs: Sequence[CandidateSpec], profile: Any, precision: str, budget_ms: float,
           *, round_to: int = 8, prune_ratios: Sequence[float] = PRUNE_RATIOS,
           stop_if_teacher_fits: bool = False, log: Callable[[str], None] | None = None) -> SearchResult:
    """Predict every candidate on ``profile`` and choose one (``choose``); no training.

    Order: the teacher and the unpruned candidates (widest first within an architecture;
    once one width fits, the narrower ones are not predicted: they have fewer MACs and could
    not be chosen); a budget below the lowest launch floor
    among them (per-kernel overhead, which neither width nor pruning removes) is refused
    with ``LatencyBudgetError``; then each prune ratio of every candidate that does not fit
    unpruned (pruning one that fits only lowers its MACs, so it could not be chosen).
    ``stop_if_teacher_fits``: a teacher within the budget ends the search (nothing to compress).
    """
    say = log or (lambda _m: None)
    board = getattr(profile, "key", profile)
    teacher = measure_candidate(build_candidate(CandidateSpec(None), teacher_spec, round_to),
                                CandidateSpec(None), profile, precision)
    teacher.fits = teacher.predicted_ms <= budget_ms
    if teacher.fits and stop_if_teacher_fits:
        result = SearchResult(board, precision, budget_ms, teacher, [], None)
        result.notes = search_notes(result)
        return result
    unpruned: list[Candidate] = []
    for spec in specs:
        if any(c.fits and c.spec.student == spec.student for c in unpruned):
            continue  # a wider width of this architecture fits: a narrower one cannot be chosen
        found = _try(spec, teacher_spec, profile, precision, round_to, teacher, say)
        if found is not None:
            found.fits = found.predicted_ms <= budget_ms
            unpruned.append(found)
    check_launch_floor([teacher, *unpruned], budget_ms, board, precision)
    pruned = []
    for candidate in unpruned:
        if candidate.predicted_ms <= budget_ms or candidate.launch_floor_ms > budget_ms:
            continue  # fits already, or its launch floor alone is over: pruning cannot help
        for ratio in prune_ratios:
            spec = CandidateSpec(candidate.spec.student, candidate.spec.kwargs, ratio)
            found = _try(spec, teacher_spec, profile, precision, round_to, teacher, say)
            pruned += [found] if found is not None else []
    candidates = sorted([*unpruned, *pruned], key=lambda c: -c.macs)
    for candidate in [teacher, *candidates]:
        candidate.fits = candidate.predicted_ms <= budget_ms
    result = SearchResult(board, precision, budget_ms, teacher, candidates, choose(candidates, budget_ms))
    result.notes = search_notes(result)
    return result


def _try(spec: CandidateSpec, teacher_spec: Any, profile: Any, precision: str, round_to: int,
         teacher: Candidate, say: Callable[[str], None]) -> Candidate | None:
    """A candidate smaller than the teacher (params and MACs), or None (said why)."""
    from edge_ssl.compress.measure import model_metrics
    from edge_ssl.compress.prune import PruneError

    from edge_ssl.models import count_parameters

    try:
        encoder = build_candidate(spec, teacher_spec, round_to)
        if tuple(encoder.spec.input.shape) != tuple(teacher_spec.input.shape):
            return None
        # Not smaller than the teacher: distillation would refuse it (checked before the
        # export, which is the slow part).
        if spec.student is not None and count_parameters(encoder) >= teacher.params:
            return None
        sizes = model_metrics(encoder)
        if spec.student is not None and sizes["macs"] >= teacher.macs:
            return None
        return measure_candidate(encoder, spec, profile, precision, sizes=sizes)
    except (ConfigError, PruneError) as exc:
        say(f"search: skipped {spec.label()}: {exc}")
        return None


def check_launch_floor(candidates: Sequence[Candidate], budget_ms: float, board: str, precision: str) -> None:
    """Refuse a budget below every graph's launch floor: no width or prune ratio goes under it."""
    lowest = min(candidates, key=lambda c: c.launch_floor_ms)
    if budget_ms < lowest.launch_floor_ms:
        raise LatencyBudgetError(
            f"--max-latency-ms {budget_ms:g} is below the launch floor on {board} ({precision}): even "
            f"{lowest.spec.label()}, the graph with the lowest floor, spends "
            f"{lowest.launch_floor_ms:.3f} ms in per-kernel overhead alone (predicted), which "
            f"narrower or pruned layers do not reduce. Allow at least {lowest.launch_floor_ms:.3f} ms, "
            "or pick a board with a higher GPU clock."
        )


def search_notes(result: SearchResult) -> list[str]:
    """What the user should know before training: the teacher fits, launch-bound, nothing fits."""
    from edge_ssl.devices.predict import LAUNCH_BOUND_SHARE

    teacher, notes = result.teacher, []
    where = f"{result.board} ({result.precision})"
    if result.teacher_fits:
        notes.append(f"the teacher already fits: predicted {_ms(teacher)} on {where}, within "
                     f"{result.budget_ms:g} ms; nothing to compress for this budget")
    if teacher.launch_bound_share >= LAUNCH_BOUND_SHARE:
        notes.append(f"the teacher is launch-bound on {result.board}: "
                     f"{100 * teacher.launch_bound_share:.0f}% of its predicted time is per-kernel "
                     "overhead; fewer channels or pruning will barely speed it up there")
    if result.chosen is None and not result.teacher_fits:
        fastest = min(result.candidates or [teacher], key=lambda c: c.predicted_ms)
        notes.append(f"no candidate fits {result.budget_ms:g} ms on {where}: the fastest is "
                     f"{fastest.spec.label()} at {_ms(fastest)}")
    return notes


def _ms(candidate: Candidate) -> str:
    low, high = candidate.interval_ms or (candidate.predicted_ms, candidate.predicted_ms)
    return f"{candidate.predicted_ms:.3f} ms [{low:.3f}-{high:.3f}]"


def candidates_table(result: SearchResult) -> list[str]:
    """The candidates as lines of at most 80 columns (predicted board latency, MACs, params)."""
    lines = [f"candidates on {result.board} ({result.precision}), budget {result.budget_ms:g} ms, "
             "PREDICTED:",
             f"{'candidate':24s} {'prune':>5s} {'ms':>8s} {'interval':>15s} {'MACs':>8s} "
             f"{'params':>7s} {'fits':>5s}"]
    for candidate in [result.teacher, *result.candidates]:
        spec = candidate.spec
        low, high = candidate.interval_ms or (candidate.predicted_ms, candidate.predicted_ms)
        mark = " *" if candidate is result.chosen else ""
        lines.append(
            f"{spec.label()[:24]:24s} {'-' if not spec.prune else f'{spec.prune:.0%}':>5s} "
            f"{candidate.predicted_ms:8.3f} {f'{low:.3f}-{high:.3f}':>15s} {candidate.macs / 1e6:7.1f}M "
            f"{candidate.params / 1e6:6.2f}M {'yes' if candidate.fits else 'no':>5s}{mark}")
    return lines
