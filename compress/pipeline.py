"""compress(): the recipe's stages chained, measured, and the best one published."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from edge_ssl.compress.compress_checks import check_compress_inputs, check_student
from edge_ssl.compress.recipe import RecipeConfig
from edge_ssl.compress.stage_run import (
    CompressInterrupted,
    StageRun,
    StageRunner,
    compress_terms,
    fingerprints,
    finished_stages,
    fresh_partial,
    publish,
    stages_dir,
)
from edge_ssl.compress.stage_table import (
    CompressResult,
    StageMeter,
    StageRow,
    choose_stage,
    row_text,
)

from edge_ssl.bundle import Bundle, record_results
from edge_ssl.data.sources import ImageDataset
from edge_ssl.lineage import require_float_weights


def compress(
    teacher: str | os.PathLike | Bundle,
    recipe: RecipeConfig,
    data: ImageDataset,
    out: str | os.PathLike,
    *,
    knn: Any | None = None,
    overwrite: bool = False,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
    progress: Callable[[Any], None] | None = None,
    device_settings: Any = None,
) -> CompressResult:
    """Run the recipe's stages and keep the best one (meeting the targets, else the closest).

    Stages are written to ``partial_dir(out)``; only when all are done does that folder
    become ``stages_dir(out)`` and the chosen stage ``out``, so a failure or Ctrl-C
    (``CompressInterrupted``) leaves an earlier result as it was. ``resume`` reuses finished
    stages (of the interrupted or the last run) whose parent, settings and data match.
    """
    say = log or (lambda _m: None)
    out = Path(out)
    teacher_bundle = teacher if isinstance(teacher, Bundle) else Bundle.open(teacher, verify=True)
    check_compress_inputs(teacher_bundle, recipe, data, out, knn, overwrite, resume)
    recipe, found = aim_at_board(teacher_bundle, recipe, data, say)
    if found is not None and found.teacher_fits and not recipe.force:
        return CompressResult([], "teacher", True, teacher_fits_text(found), None, search=found)
    run = StageRun(work=fresh_partial(out, resume), previous=stages_dir(out), resume=resume,
                   fingerprints=fingerprints(data, knn), say=say, name=out.name.removesuffix(".edge"),
                   device_settings=device_settings)
    rows = _run_stages(teacher_bundle, recipe, data, knn, run, progress)
    chosen, met, message = choose_stage(rows, recipe)
    bundle = publish(rows, chosen, out, run.work)
    result = CompressResult(rows, chosen, met, message, bundle, reused=run.reused, ran=run.ran, search=found)
    record_results(bundle, "compress", result.to_dict())
    from edge_ssl.compress.adapt_ready import make_adapt_ready  # adapt settings + replay images

    make_adapt_ready(result, knn, say)
    return result


def aim_at_board(teacher: Bundle, recipe: RecipeConfig, data: ImageDataset,
                 say: Callable[[str], None]) -> tuple[RecipeConfig, Any]:
    """With a board and a budget: search the candidates (no training) and return the recipe
    with the chosen student and prune ratio, and the search. Refuses a budget under the
    launch floor or one no candidate meets, before any training."""
    from dataclasses import replace

    from edge_ssl.compress.prune import board_round_to
    from edge_ssl.compress.search import (
        LatencyBudgetError,
        candidate_specs,
        candidates_table,
        search,
    )

    if recipe.profile is None or recipe.max_latency_ms is None or not recipe.search:
        return recipe, None
    source = require_float_weights(teacher, "compress")
    same_arch = recipe.distill_config() is not None and recipe.distill_config().init == "teacher"
    specs = candidate_specs(source.manifest.encoder, recipe.student, recipe.student_kwargs,
                            same_arch_only=same_arch)
    ratios = sorted({0.3, 0.5} | ({recipe.prune} if recipe.prune else set()))
    say(f"search: {len(specs)} students x prune ratios {', '.join(f'{r:.0%}' for r in ratios)}, "
        f"predicted on {recipe.profile} (no training)")
    found = search(source.manifest.encoder, specs, recipe.profile, recipe.board_precision,
                   recipe.max_latency_ms, round_to=board_round_to(recipe.profile, recipe.board_precision),
                   prune_ratios=ratios, stop_if_teacher_fits=not recipe.force, log=say)
    for line in [*candidates_table(found), *found.notes]:
        say(line)
    if found.teacher_fits and not recipe.force:
        return recipe, found
    if found.chosen is None:
        raise LatencyBudgetError(f"{found.notes[-1]}. Raise --max-latency-ms, or pick another --precision "
                                 "or board; nothing was trained.")
    spec = found.chosen.spec
    chosen = replace(recipe, student=spec.student if recipe.student else None,
                     student_kwargs=dict(spec.kwargs) if recipe.student else recipe.student_kwargs,
                     prune=spec.prune)
    check_student(source, chosen, data)
    return chosen, found


def teacher_fits_text(found: Any) -> str:
    return (f"{found.notes[0]}. Not compressed (pass --force to compress anyway); to run it on "
            f"the board, quantize it alone: `edge-ssl quantize TEACHER --precision {found.precision} "
            "--target tensorrt --out Q.edge`.")


def _run_stages(teacher: Bundle, recipe: RecipeConfig, data: ImageDataset, knn: Any | None,
                run: StageRun, progress: Callable[[Any], None] | None) -> list[StageRow]:
    rows: list[StageRow] = []
    try:
        with tempfile.TemporaryDirectory(prefix="edge-ssl-compress-") as tmp, \
                _device_meter(recipe, run) as device:
            meter = StageMeter(recipe, knn, Path(tmp), device)
            rows.append(meter.measure("teacher", teacher, record=False))
            run.say(row_text(rows[-1]))
            current = teacher
            for name, config, runner in _stage_plan(recipe, data, knn, progress, run.say):
                run.current = name
                current = run.stage(name, config, current, runner)
                rows.append(meter.measure(name, current))
                run.say(row_text(rows[-1]))
    except CompressInterrupted:
        raise
    except KeyboardInterrupt as exc:
        raise CompressInterrupted(run.current, finished_stages(run.work), run.work) from exc
    return rows


@contextlib.contextmanager
def _device_meter(recipe: RecipeConfig, run: StageRun) -> Iterator[Any]:
    """The --on device, connected (and asked who it is) before any stage runs; else None."""
    if recipe.on is None:
        yield None
        return
    from edge_ssl.compress.on_device import DeviceMeter

    run.say(f"latency: measured on {recipe.on} through the agent (measured-on-board)")
    with DeviceMeter(recipe.on, run.device_settings, batch=recipe.latency_batch,
                     seconds=recipe.bench_seconds, run=run.name) as meter:
        yield meter


def _stage_plan(recipe: RecipeConfig, data: ImageDataset, knn: Any | None,
                progress: Callable[[Any], None] | None,
                say: Callable[[str], None]) -> list[tuple[str, Any, StageRunner]]:
    """(name, config, run(parent, out, resume_checkpoint) -> bundle) for each stage of the recipe."""
    from edge_ssl.compress.distill import distill
    from edge_ssl.compress.prune import prune
    from edge_ssl.compress.quantize import quantize

    plan: list[tuple[str, Any, StageRunner]] = []
    if (dconf := recipe.distill_config()) is not None:
        plan.append(("distill", dconf, lambda parent, path, resume: distill(
            parent, dconf, data, path, resume=resume, progress=progress, with_graph=True).bundle))
    if (pconf := recipe.prune_config()) is not None:
        plan.append(("prune", pconf, lambda parent, path, _resume: prune(
            parent, pconf, data, path, with_graph=True).bundle))
    if (qconf := recipe.quantize_config()) is not None:
        plan.append(("quantize", qconf, lambda parent, path, _resume: quantize(
            parent, qconf, data.images, path, knn=knn,
            log=lambda m: say(compress_terms("quantize", m))).bundle))
    return plan
