"""The stages folder of a compress run: where stages go, what is reused, how it is published."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from edge_ssl.compress.stage_table import StageRow

from edge_ssl.bundle import Bundle, read_results, record_results, results_path
from edge_ssl.config import config_to_dict
from edge_ssl.data.sources import ImageDataset
from edge_ssl.errors import ConfigError, EdgeSSLError


def stages_dir(out: str | os.PathLike) -> Path:
    """Where the recipe keeps every stage's bundle: ``NAME.edge`` -> ``NAME.edge.stages/``."""
    out = Path(out)
    return out.with_name(out.name + ".stages")


def partial_dir(out: str | os.PathLike) -> Path:
    """Where a run writes its stages until it finishes: ``NAME.edge.stages.partial/``.

    Only a finished run swaps it in for ``stages_dir(out)`` (and its chosen stage for
    ``out``), so a failed or interrupted run leaves the previous result untouched.
    """
    stages = stages_dir(out)
    return stages.with_name(stages.name + ".partial")


#: Folder name of each stage's bundle inside the stages folder.
STAGE_DIRS = {"distill": "1-distill.edge", "prune": "2-prune.edge", "quantize": "3-quantize.edge"}


class CompressInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``compress``: which stage was running and which finished bundles were kept."""

    def __init__(self, stage: str, kept: list[Path], folder: Path) -> None:
        super().__init__(stage)
        self.stage, self.kept, self.folder = stage, kept, folder


StageRunner = Callable[[Bundle, Path, bool], Bundle]


#: Where a stage's reuse key is recorded (the stage bundle's results file, beside it).
RESUME_KEY = "compress_resume"


@dataclass
class StageRun:
    """Runs (or, with ``resume``, reuses) the stages of one compress run inside ``work``."""

    work: Path
    previous: Path
    resume: bool
    fingerprints: Mapping[str, str | None]
    say: Callable[[str], None]
    name: str = "compress"
    device_settings: Any = None  # SSH settings for --on
    reused: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    current: str = "teacher"

    def stage(self, name: str, config: Any, parent: Bundle, runner: StageRunner) -> Bundle:
        path = self.work / STAGE_DIRS[name]
        settings = config_to_dict(config)
        key = stage_key(name, parent.manifest_sha256, settings, self._data(name, config))
        if self.resume and (found := self._reusable(path, key, parent, settings)) is not None:
            self.reused.append(name)
            self.say(f"{name}: reused {found.path.name} (same parent, settings and data)")
            return found
        self.say(_stage_title(name, config))
        _discard(path, keep_checkpoint=self.resume)
        bundle = _in_compress_terms(name, lambda: self._run(runner, parent, path))
        record_results(bundle, RESUME_KEY, {"key": key})
        self.ran.append(name)
        return bundle

    def _run(self, runner: StageRunner, parent: Bundle, path: Path) -> Bundle:
        """A distillation stopped mid-way continues from its epoch checkpoint when it can."""
        from edge_ssl.compress.distill import checkpoint_dir

        from edge_ssl.errors import CheckpointError

        ckpt = checkpoint_dir(path)
        if self.resume and (ckpt / "last.pt").is_file():
            try:
                return runner(parent, path, True)
            except (CheckpointError, ConfigError) as exc:
                self.say(f"cannot continue the checkpoint in {ckpt} ({exc}); starting this stage over")
                shutil.rmtree(ckpt, ignore_errors=True)
        return runner(parent, path, False)

    def _data(self, name: str, config: Any) -> dict[str, str | None]:
        knn = self.fingerprints["knn"] if getattr(config, "max_knn_drop", None) is not None else None
        return {"images": self.fingerprints["images"], "knn": knn}

    def _reusable(self, path: Path, key: str, parent: Bundle, settings: Mapping[str, Any]) -> Bundle | None:
        """The stage's bundle from this run's folder or the last finished run's, if it matches."""
        for candidate in (path, self.previous / path.name):
            bundle = _matching_stage(candidate, key, parent, settings)
            if bundle is None:
                continue
            if candidate != path:
                _discard(path, keep_checkpoint=False)
                shutil.copytree(candidate, path)
                shutil.copyfile(results_path(candidate), results_path(path))
                bundle = Bundle.open(path, verify=True)
            return bundle
        return None


def _matching_stage(path: Path, key: str, parent: Bundle, settings: Mapping[str, Any]) -> Bundle | None:
    """The bundle at ``path`` if its lineage names ``parent`` and ``settings`` and its key matches."""
    if not (path / "manifest.json").is_file():
        return None
    try:
        bundle = Bundle.open(path, verify=True)
        recorded = read_results(bundle).get(RESUME_KEY, {}).get("key")
    except EdgeSSLError:
        return None
    last = bundle.manifest.lineage[-1] if bundle.manifest.lineage else None
    if last is None or last.parent != parent.manifest_sha256 or recorded != key:
        return None
    if any(last.settings.get(k) != v for k, v in settings.items()):
        return None
    return bundle


def stage_key(name: str, parent_sha256: str, settings: Mapping[str, Any], data: Mapping[str, Any]) -> str:
    """What a stage's output depends on: its parent bundle, its settings and its images."""
    text = json.dumps({"stage": name, "parent": parent_sha256, "settings": settings, "data": data,
                       "ships": "model.onnx"},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprints(data: ImageDataset, knn: Any | None) -> dict[str, str | None]:
    def digest(*arrays: Any) -> str:
        h = hashlib.sha256()
        for array in arrays:
            array = np.ascontiguousarray(array)
            h.update(f"{array.dtype}{array.shape}".encode())
            h.update(memoryview(array).cast("B"))
        return h.hexdigest()

    knn_digest = None if knn is None else digest(knn.bank_images, knn.bank_labels, knn.test_images,
                                                 knn.test_labels)
    return {"images": digest(data.images), "knn": knn_digest}


def finished_stages(folder: Path) -> list[Path]:
    """The stage bundles a run has finished in ``folder`` (in stage order)."""
    return [folder / name for name in STAGE_DIRS.values() if (folder / name / "manifest.json").is_file()]


def fresh_partial(out: Path, resume: bool) -> Path:
    work = partial_dir(out)
    if work.exists() and not resume:
        shutil.rmtree(work)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {work} ({exc.strerror or exc}); pick a writable --out.") from None
    return work


def _discard(path: Path, *, keep_checkpoint: bool) -> None:
    from edge_ssl.compress.distill import checkpoint_dir

    shutil.rmtree(path, ignore_errors=True)
    results_path(path).unlink(missing_ok=True)
    if not keep_checkpoint:
        shutil.rmtree(checkpoint_dir(path), ignore_errors=True)


def _stage_title(name: str, config: Any) -> str:
    if name == "distill":
        return f"distill -> {config.student}"
    if name == "prune":
        return f"prune {config.ratio:.0%}"
    return f"quantize {config.precision} for {config.target}"


#: Flags of the single-stage commands that stage messages name, in compress's terms.
COMPRESS_TERMS = {
    "distill": {"--batch-size": "distill.batch_size (recipe key; --set)",
                "--lr": "distill.lr (recipe key; --set)"},
    "prune": {"--ratio": "--prune", "--batch-size": "prune_options.batch_size (recipe key; --set)",
              "--exclude": "prune_options.exclude (recipe key)",
              "--lr": "prune_options.recovery.lr (recipe key)"},
    "quantize": {"--max-fallback": "quantize_options.max_fallback (recipe key; --set)",
                 "--min-cosine": "quantize_options.min_cosine (recipe key; --set)",
                 "--calibration-images": "quantize_options.calibration_images (recipe key; --set)"},
}


def compress_terms(stage: str, message: str) -> str:
    """A stage's message with the flags of its own command replaced by what compress takes."""
    for flag, key in COMPRESS_TERMS.get(stage, {}).items():
        message = re.sub(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", key, message)
    return message


def _in_compress_terms(stage: str, call: Callable[[], Bundle]) -> Bundle:
    try:
        return call()
    except EdgeSSLError as exc:
        text = compress_terms(stage, str(exc))
        if text == str(exc):
            raise
        try:
            translated = type(exc)(text)
        except Exception:  # an error type with another constructor: keep it as it is
            raise exc from None
        raise translated from exc


def publish(rows: list[StageRow], chosen: str, out: Path, work: Path) -> Bundle:
    """Swap the finished run in: ``work`` becomes the stages folder and the chosen stage ``out``.

    Both are renames in ``out``'s folder; the earlier ones are removed only afterwards.
    """
    from edge_ssl.outputs import move_into_place

    stages = stages_dir(out)
    source = Path(next(r.bundle for r in rows if r.name == chosen))
    staged = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    shutil.copytree(source, staged)
    move_into_place({work: stages, staged: out})
    for row in rows:
        if Path(row.bundle).parent == work:
            row.bundle = str(stages / Path(row.bundle).name)
    return Bundle.open(out, verify=True)
